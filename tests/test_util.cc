#include "tests/test_util.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>

namespace kls::testing {
namespace {

template <typename T>
::testing::AssertionResult AllCloseImpl(std::span<const T> actual, std::span<const T> expected,
                                        double atol, double rtol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size mismatch: actual " << actual.size() << " vs expected " << expected.size();
  }
  int64_t first_bad = -1;
  int64_t mismatches = 0;
  double max_abs = 0, max_rel = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    if (!std::isfinite(a) || !std::isfinite(e)) {
      return ::testing::AssertionFailure()
             << "non-finite value at index " << i << ": actual " << a << ", expected " << e;
    }
    const double diff = std::fabs(a - e);
    max_abs = std::max(max_abs, diff);
    if (e != 0) max_rel = std::max(max_rel, diff / std::fabs(e));
    if (diff > atol + rtol * std::fabs(e)) {
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      ++mismatches;
    }
  }
  if (mismatches == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << mismatches << " of " << actual.size() << " elements differ (atol " << atol << ", rtol "
         << rtol << "); first at index " << first_bad << ": actual " << actual[first_bad]
         << ", expected " << expected[first_bad] << "; max abs " << max_abs << ", max rel "
         << max_rel;
}

template <typename T>
double MaxRelativeErrorImpl(std::span<const T> actual, std::span<const T> expected) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < actual.size() && i < expected.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(double(actual[i]) - double(expected[i])));
    max_ref = std::max(max_ref, std::fabs(double(expected[i])));
  }
  if (max_ref == 0) return max_diff == 0 ? 0.0 : INFINITY;
  return max_diff / max_ref;
}

template <typename T>
bool AllFiniteImpl(std::span<const T> v) {
  for (T x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

template <typename T>
::testing::AssertionResult RelativeErrorBelowImpl(std::span<const T> actual,
                                                  std::span<const T> expected, double bound) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size mismatch: actual " << actual.size() << " vs expected " << expected.size();
  }
  if (!AllFiniteImpl(actual)) return ::testing::AssertionFailure() << "actual has NaN/Inf";
  if (!AllFiniteImpl(expected)) return ::testing::AssertionFailure() << "expected has NaN/Inf";
  const double err = MaxRelativeErrorImpl(actual, expected);
  if (err <= bound) return ::testing::AssertionSuccess() << "relative error " << err;
  return ::testing::AssertionFailure() << "relative error " << err << " > " << bound;
}

}  // namespace

::testing::AssertionResult AllClose(std::span<const double> a, std::span<const double> e,
                                    double atol, double rtol) {
  return AllCloseImpl(a, e, atol, rtol);
}
::testing::AssertionResult AllClose(std::span<const float> a, std::span<const float> e, double atol,
                                    double rtol) {
  return AllCloseImpl(a, e, atol, rtol);
}
double MaxRelativeError(std::span<const double> a, std::span<const double> e) {
  return MaxRelativeErrorImpl(a, e);
}
double MaxRelativeError(std::span<const float> a, std::span<const float> e) {
  return MaxRelativeErrorImpl(a, e);
}
::testing::AssertionResult RelativeErrorBelow(std::span<const double> a, std::span<const double> e,
                                              double bound) {
  return RelativeErrorBelowImpl(a, e, bound);
}
::testing::AssertionResult RelativeErrorBelow(std::span<const float> a, std::span<const float> e,
                                              double bound) {
  return RelativeErrorBelowImpl(a, e, bound);
}
bool AllFinite(std::span<const float> v) { return AllFiniteImpl(v); }
bool AllFinite(std::span<const double> v) { return AllFiniteImpl(v); }

std::string MakeTempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/kls_test_XXXXXX";
  char* made = ::mkdtemp(tmpl.data());
  EXPECT_NE(made, nullptr) << "mkdtemp failed for " << tmpl;
  return tmpl;
}

void RemoveTree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

std::string BinaryDir() {
  if (const char* d = std::getenv("KLS_BINARY_DIR")) return d;
#ifdef KLS_TEST_BINARY_DIR
  return KLS_TEST_BINARY_DIR;
#else
  return ".";
#endif
}
std::string SourceDir() {
  if (const char* d = std::getenv("KLS_SOURCE_DIR")) return d;
#ifdef KLS_TEST_SOURCE_DIR
  return KLS_TEST_SOURCE_DIR;
#else
  return ".";
#endif
}

}  // namespace kls::testing
