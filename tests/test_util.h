// Shared test helpers: the one tolerance policy (HOUSE_STYLE.md H5), error norms, temp dirs.
#ifndef KLS_TESTS_TEST_UTIL_H_
#define KLS_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace kls::testing {

struct Tolerance {
  double atol;
  double rtol;
};
// Per-dtype table (H5).
inline constexpr Tolerance kFp32Tolerance{1e-5, 1e-5};
inline constexpr Tolerance kBf16StateTolerance{1.6e-2, 5e-3};

// Accepts element i when |a_i - e_i| <= atol + rtol * |e_i|; fails on any NaN or Inf in
// either input or on a size mismatch. On failure the message names the first bad index, the
// max abs and max rel error and the mismatch count.
::testing::AssertionResult AllClose(std::span<const double> actual,
                                    std::span<const double> expected, double atol, double rtol);
::testing::AssertionResult AllClose(std::span<const float> actual, std::span<const float> expected,
                                    double atol, double rtol);

// Normwise relative error max_i |a_i - e_i| / max_i |e_i| (0 when both are all zero), and a
// check that it is <= bound and that everything is finite.
double MaxRelativeError(std::span<const double> actual, std::span<const double> expected);
double MaxRelativeError(std::span<const float> actual, std::span<const float> expected);
::testing::AssertionResult RelativeErrorBelow(std::span<const double> actual,
                                              std::span<const double> expected, double bound);
::testing::AssertionResult RelativeErrorBelow(std::span<const float> actual,
                                              std::span<const float> expected, double bound);

// Readable names for tests typed over fp32 and fp64:
//   TYPED_TEST_SUITE(MyTest, FloatTypes, FloatTypeNames);
using FloatTypes = ::testing::Types<float, double>;
class FloatTypeNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, double> ? "fp64" : "fp32";
  }
};

// True when every value is finite.
bool AllFinite(std::span<const float> values);
bool AllFinite(std::span<const double> values);

// A fresh directory under $TMPDIR (or /tmp), removed by RemoveTree.
std::string MakeTempDir();
void RemoveTree(const std::string& path);

// The build tree and the source tree: $KLS_BINARY_DIR / $KLS_SOURCE_DIR when set, else the
// directories the test was compiled in.
std::string BinaryDir();
std::string SourceDir();

}  // namespace kls::testing

#endif  // KLS_TESTS_TEST_UTIL_H_
