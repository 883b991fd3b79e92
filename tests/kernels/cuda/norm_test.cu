// The norm launchers (kernels/norm/norm_rms.cu) against the fp64 CPU references of norm_ref.h,
// fed the kernels' exact bf16 inputs: H5 policy (bf16 table AND relative RMS error < 5e-3),
// outputs poisoned with NaN before each run. Dims cover each dispatch branch: vectorized or
// scalar (dim % 8, alignment) × one warp or one CTA per row (dim ≤ 1024 or not); out == x in
// place; zero rows; bad arguments. Fixed seeds throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/norm/norm.h"
#include "kernels/norm/norm_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace kls::kernels {
namespace {

using ::kls::testing::Bf16Normal;
using ::kls::testing::Bf16ToDouble;
using ::kls::testing::Bf16Uniform;
using ::kls::testing::CudaParamTest;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::kBf16StateTolerance;
using ::kls::testing::MatchesReference;
using ::kls::testing::Poison;
using ::kls::testing::ToBf16;
using ::kls::testing::Upload;

constexpr double kRmsBound = 5e-3;
constexpr float kRmsEps = 1e-5f;
constexpr float kL2Eps = 1e-6f;

std::vector<double> ToHost(const DeviceBuffer<__nv_bfloat16>& d) {
  std::vector<__nv_bfloat16> h;
  EXPECT_CUDA_OK(Download(d, h));
  return Bf16ToDouble(h);
}

// Uploads `host` and returns a NaN-poisoned output buffer of the same size.
void UploadAndPoison(const std::vector<double>& host, DeviceBuffer<__nv_bfloat16>& in,
                     DeviceBuffer<__nv_bfloat16>& out) {
  ASSERT_CUDA_OK(Upload(ToBf16(host), in));
  ASSERT_CUDA_OK(out.Allocate(host.size()));
  ASSERT_CUDA_OK(Poison(out));
}

struct RowsCase {
  int64_t rows;
  int dim;
};

std::ostream& operator<<(std::ostream& os, const RowsCase& c) {
  return os << c.rows << "x" << c.dim;
}

std::string RowsCaseName(const ::testing::TestParamInfo<RowsCase>& info) {
  return "Rows" + std::to_string(info.param.rows) + "_Dim" + std::to_string(info.param.dim);
}

// dim % 8 == 0 and ≤ 1024: vectorized, warp per row; 100: scalar, warp; 2304 (the model's
// hidden size): vectorized, CTA per row; 1030: scalar, CTA.
const std::vector<RowsCase> kRowsCases = {{1, 128}, {3, 100}, {64, 2304}, {5, 1030}, {1000, 512},
                                          {7, 8},   {9, 1},   {33, 1024}, {2, 1025}};

class RmsNormTest : public CudaParamTest<RowsCase> {};

TEST_P(RmsNormTest, MatchesFp64Reference) {
  const auto [rows, dim] = GetParam();
  const std::vector<double> x = Bf16Normal(rows * dim, 1);
  const std::vector<double> w = Bf16Uniform(dim, 2, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dw, dout;
  ASSERT_NO_FATAL_FAILURE(UploadAndPoison(x, dx, dout));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(LaunchRmsNorm(dx.get(), dw.get(), rows, dim, kRmsEps, dout.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected(x.size());
  RmsNormReference<double>(x.data(), w.data(), rows, dim, kRmsEps, expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dout), expected, kBf16StateTolerance, kRmsBound));
}

TEST_P(RmsNormTest, InPlace) {
  const auto [rows, dim] = GetParam();
  const std::vector<double> x = Bf16Normal(rows * dim, 3);
  const std::vector<double> w = Bf16Uniform(dim, 4, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dw;
  ASSERT_CUDA_OK(Upload(ToBf16(x), dx));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(LaunchRmsNorm(dx.get(), dw.get(), rows, dim, kRmsEps, dx.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected(x.size());
  RmsNormReference<double>(x.data(), w.data(), rows, dim, kRmsEps, expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dx), expected, kBf16StateTolerance, kRmsBound));
}

class AddRmsNormTest : public CudaParamTest<RowsCase> {};

// residual ← bf16(residual + x); out = RmsNorm(residual). The expected residual is rounded the
// same way, and the expected output normalizes that rounded sum.
TEST_P(AddRmsNormTest, MatchesFp64Reference) {
  const auto [rows, dim] = GetParam();
  const std::vector<double> x = Bf16Normal(rows * dim, 5);
  const std::vector<double> residual = Bf16Normal(rows * dim, 6, 0.0, 3.0);
  const std::vector<double> w = Bf16Uniform(dim, 7, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dres, dw, dout;
  ASSERT_NO_FATAL_FAILURE(UploadAndPoison(x, dx, dout));
  ASSERT_CUDA_OK(Upload(ToBf16(residual), dres));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(
      LaunchAddRmsNorm(dx.get(), dres.get(), dw.get(), rows, dim, kRmsEps, dout.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> sum(x.size()), expected(x.size());
  for (size_t i = 0; i < x.size(); ++i) sum[i] = ::kls::testing::RoundToBf16(x[i] + residual[i]);
  RmsNormReference<double>(sum.data(), w.data(), rows, dim, kRmsEps, expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dres), sum, kBf16StateTolerance, kRmsBound)) << "residual";
  EXPECT_TRUE(MatchesReference(ToHost(dout), expected, kBf16StateTolerance, kRmsBound)) << "out";
}

// out == x: the fused kernel reads x before writing out, per element.
TEST_P(AddRmsNormTest, OutAliasesX) {
  const auto [rows, dim] = GetParam();
  const std::vector<double> x = Bf16Normal(rows * dim, 8);
  const std::vector<double> residual = Bf16Normal(rows * dim, 9);
  const std::vector<double> w = Bf16Uniform(dim, 10, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dres, dw;
  ASSERT_CUDA_OK(Upload(ToBf16(x), dx));
  ASSERT_CUDA_OK(Upload(ToBf16(residual), dres));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(
      LaunchAddRmsNorm(dx.get(), dres.get(), dw.get(), rows, dim, kRmsEps, dx.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> sum(x.size()), expected(x.size());
  for (size_t i = 0; i < x.size(); ++i) sum[i] = ::kls::testing::RoundToBf16(x[i] + residual[i]);
  RmsNormReference<double>(sum.data(), w.data(), rows, dim, kRmsEps, expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dres), sum, kBf16StateTolerance, kRmsBound)) << "residual";
  EXPECT_TRUE(MatchesReference(ToHost(dx), expected, kBf16StateTolerance, kRmsBound)) << "out";
}

class L2NormTest : public CudaParamTest<RowsCase> {};

TEST_P(L2NormTest, MatchesFp64Reference) {
  const auto [rows, dim] = GetParam();
  std::vector<double> x = Bf16Normal(rows * dim, 11);
  for (int i = 0; i < dim; ++i) x[i] = 0.0;  // a zero row normalizes to zero (eps > 0)
  DeviceBuffer<__nv_bfloat16> dx, dout;
  ASSERT_NO_FATAL_FAILURE(UploadAndPoison(x, dx, dout));
  ASSERT_CUDA_OK(LaunchL2Norm(dx.get(), rows, dim, kL2Eps, dout.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected(x.size());
  L2NormReference<double>(x.data(), rows, dim, kL2Eps, expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dout), expected, kBf16StateTolerance, kRmsBound));
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormTest, ::testing::ValuesIn(kRowsCases), RowsCaseName);
INSTANTIATE_TEST_SUITE_P(Shapes, AddRmsNormTest, ::testing::ValuesIn(kRowsCases), RowsCaseName);
INSTANTIATE_TEST_SUITE_P(Shapes, L2NormTest, ::testing::ValuesIn(kRowsCases), RowsCaseName);

struct GatedCase {
  int64_t tokens;
  int heads;
  int dim;
};

std::ostream& operator<<(std::ostream& os, const GatedCase& c) {
  return os << c.tokens << "x" << c.heads << "x" << c.dim;
}

class GatedRmsNormTest : public CudaParamTest<GatedCase> {};

// out = w ⊙ x / rms(x) ⊙ sigmoid(gate) per (token, head), one weight for all heads.
TEST_P(GatedRmsNormTest, MatchesFp64Reference) {
  const auto [tokens, heads, dim] = GetParam();
  const size_t n = static_cast<size_t>(tokens) * heads * dim;
  const std::vector<double> x = Bf16Normal(n, 12);
  const std::vector<double> gate = Bf16Normal(n, 13, 0.0, 3.0);
  const std::vector<double> w = Bf16Uniform(dim, 14, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dgate, dw, dout;
  ASSERT_NO_FATAL_FAILURE(UploadAndPoison(x, dx, dout));
  ASSERT_CUDA_OK(Upload(ToBf16(gate), dgate));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(LaunchGatedRmsNorm(dx.get(), dgate.get(), dw.get(), tokens, heads, dim, kRmsEps,
                                    dout.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected(n);
  GatedRmsNormReference<double>(x.data(), gate.data(), w.data(), tokens, heads, dim, kRmsEps,
                                expected.data());
  EXPECT_TRUE(MatchesReference(ToHost(dout), expected, kBf16StateTolerance, kRmsBound));

  // In place (out == x) gives the same result.
  ASSERT_CUDA_OK(LaunchGatedRmsNorm(dx.get(), dgate.get(), dw.get(), tokens, heads, dim, kRmsEps,
                                    dx.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  EXPECT_TRUE(MatchesReference(ToHost(dx), expected, kBf16StateTolerance, kRmsBound)) << "in place";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GatedRmsNormTest,
                         ::testing::Values(GatedCase{1, 32, 128}, GatedCase{7, 4, 64},
                                           GatedCase{1000, 4, 128}, GatedCase{3, 2, 100},
                                           GatedCase{2, 1, 2304}, GatedCase{64, 32, 128}),
                         [](const ::testing::TestParamInfo<GatedCase>& info) {
                           return "T" + std::to_string(info.param.tokens) + "_H" +
                                  std::to_string(info.param.heads) + "_D" +
                                  std::to_string(info.param.dim);
                         });

class NormKernelTest : public CudaTest {};

// A 16-byte aligned buffer offset by one element takes the scalar path with dim % 8 == 0.
TEST_F(NormKernelTest, UnalignedPointersTakeTheScalarPath) {
  const int64_t rows = 5;
  const int dim = 128;
  const std::vector<double> x = Bf16Normal(rows * dim + 1, 15);
  const std::vector<double> w = Bf16Uniform(dim, 16, 0.5, 1.5);
  DeviceBuffer<__nv_bfloat16> dx, dw, dout;
  ASSERT_NO_FATAL_FAILURE(UploadAndPoison(x, dx, dout));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(
      LaunchRmsNorm(dx.get() + 1, dw.get(), rows, dim, kRmsEps, dout.get() + 1, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected(rows * dim);
  RmsNormReference<double>(x.data() + 1, w.data(), rows, dim, kRmsEps, expected.data());
  const std::vector<double> out = ToHost(dout);
  EXPECT_TRUE(MatchesReference(std::vector<double>(out.begin() + 1, out.end()), expected,
                               kBf16StateTolerance, kRmsBound));
  EXPECT_TRUE(std::isnan(out[0])) << "wrote before the start of the output";
}

TEST_F(NormKernelTest, ZeroRowsIsANoOp) {
  DeviceBuffer<__nv_bfloat16> buf;
  ASSERT_CUDA_OK(buf.Allocate(64));
  ASSERT_CUDA_OK(Poison(buf));
  EXPECT_EQ(LaunchRmsNorm(buf.get(), buf.get(), 0, 64, kRmsEps, buf.get(), stream()), cudaSuccess);
  EXPECT_EQ(LaunchL2Norm(buf.get(), 0, 64, kL2Eps, buf.get(), stream()), cudaSuccess);
  EXPECT_EQ(
      LaunchGatedRmsNorm(buf.get(), buf.get(), buf.get(), 0, 4, 16, kRmsEps, buf.get(), stream()),
      cudaSuccess);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

TEST_F(NormKernelTest, RejectsBadArguments) {
  DeviceBuffer<__nv_bfloat16> a, b, c;
  ASSERT_CUDA_OK(a.Allocate(256));
  ASSERT_CUDA_OK(b.Allocate(256));
  ASSERT_CUDA_OK(c.Allocate(256));
  const cudaStream_t s = stream();
  constexpr cudaError_t kBad = cudaErrorInvalidValue;
  EXPECT_EQ(LaunchRmsNorm(a.get(), b.get(), 2, 0, kRmsEps, c.get(), s), kBad) << "dim 0";
  EXPECT_EQ(LaunchRmsNorm(a.get(), b.get(), -1, 8, kRmsEps, c.get(), s), kBad) << "rows -1";
  EXPECT_EQ(LaunchRmsNorm(a.get(), nullptr, 2, 8, kRmsEps, c.get(), s), kBad) << "null weight";
  EXPECT_EQ(LaunchRmsNorm(nullptr, b.get(), 2, 8, kRmsEps, c.get(), s), kBad) << "null x";
  EXPECT_EQ(LaunchRmsNorm(a.get(), b.get(), 2, 8, kRmsEps, nullptr, s), kBad) << "null out";
  EXPECT_EQ(LaunchRmsNorm(a.get(), b.get(), 2, 8, -1.f, c.get(), s), kBad) << "eps -1";
  EXPECT_EQ(LaunchRmsNorm(a.get(), b.get(), 2, 8, NAN, c.get(), s), kBad) << "eps NaN";
  EXPECT_EQ(LaunchAddRmsNorm(a.get(), nullptr, b.get(), 2, 8, kRmsEps, c.get(), s), kBad)
      << "null residual";
  EXPECT_EQ(LaunchGatedRmsNorm(a.get(), nullptr, b.get(), 2, 4, 8, kRmsEps, c.get(), s), kBad)
      << "null gate";
  EXPECT_EQ(LaunchGatedRmsNorm(a.get(), b.get(), b.get(), 2, 0, 8, kRmsEps, c.get(), s), kBad)
      << "heads 0";
  EXPECT_EQ(LaunchL2Norm(a.get(), 2, 0, kL2Eps, c.get(), s), kBad) << "L2 dim 0";
  EXPECT_EQ(LaunchL2Norm(a.get(), 2, 8, INFINITY, c.get(), s), kBad) << "L2 eps inf";
  ASSERT_CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace kls::kernels
