// The CUDA backend's own ops against host references (HOUSE_STYLE.md H5, H6): the fp32-residual
// add + RMSNorm at the block boundaries against fp64, through both of its kernels (rows held in
// registers when dim % 4 == 0 and dim <= 8192, a strided loop otherwise), with and without a
// delta, at odd shapes and the real model's width; the samplable-logits check against
// kernels::SamplableLogits.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "engine/backend/cuda/cuda_ops.h"
#include "kernels/sampling/sampling_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"

namespace kls::engine::cuda {
namespace {

using ::kls::testing::Bf16Normal;
using ::kls::testing::Bf16Uniform;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::Poison;
using ::kls::testing::ToBf16;
using ::kls::testing::Upload;

constexpr float kEps = 1e-6f;
constexpr double kRmsBound = 5e-3;  // relative RMS error, bf16 output

struct NormCase {
  int rows;
  int dim;
  bool with_delta;
  int residual_offset = 0;  // floats: 1 misaligns the residual, which takes the strided kernel
};

class AddRmsNormF32Test : public CudaTest, public ::testing::WithParamInterface<NormCase> {};

// residual ← residual + delta (fp32, exactly the host's float sum); out = bf16(w ⊙ residual ·
// rsqrt(mean(residual²) + eps)) against fp64 with the bf16 row of the tolerance table.
TEST_P(AddRmsNormF32Test, MatchesFp64Reference) {
  const auto [rows, dim, with_delta, offset] = GetParam();
  const size_t n = static_cast<size_t>(rows) * dim;
  const std::vector<double> delta = Bf16Normal(n, 11);
  const std::vector<double> w = Bf16Uniform(dim, 12, 0.5, 1.5);
  std::vector<float> residual(n);
  {
    const std::vector<double> r = Bf16Normal(n, 13, 0.0, 3.0);
    for (size_t i = 0; i < n; ++i) residual[i] = static_cast<float>(r[i] * 1.0009765625);
  }
  DeviceBuffer<__nv_bfloat16> d_delta, d_w, d_out;
  DeviceBuffer<float> d_res;
  ASSERT_CUDA_OK(d_out.Allocate(n));
  ASSERT_CUDA_OK(Upload(ToBf16(delta), d_delta));
  ASSERT_CUDA_OK(Upload(ToBf16(w), d_w));
  std::vector<float> padded(offset, 0.0f);
  padded.insert(padded.end(), residual.begin(), residual.end());
  ASSERT_CUDA_OK(Upload(padded, d_res));
  ASSERT_CUDA_OK(Poison(d_out));
  ASSERT_CUDA_OK(LaunchAddRmsNormF32(with_delta ? d_delta.get() : nullptr, d_res.get() + offset,
                                     d_w.get(), rows, dim, kEps, d_out.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<float> got_res;
  std::vector<__nv_bfloat16> got_out;
  ASSERT_CUDA_OK(Download(d_res, got_res));
  got_res.erase(got_res.begin(), got_res.begin() + offset);
  ASSERT_CUDA_OK(Download(d_out, got_out));

  std::vector<float> sum = residual;
  if (with_delta) {
    for (size_t i = 0; i < n; ++i) sum[i] = residual[i] + static_cast<float>(delta[i]);
  }
  EXPECT_EQ(got_res, sum);  // an fp32 add of the same operands: bit for bit
  std::vector<double> expected(n), actual(n);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int c = 0; c < dim; ++c) {
      const double v = sum[static_cast<size_t>(r) * dim + c];
      ss += v * v;
    }
    const double inv = 1.0 / std::sqrt(ss / dim + kEps);
    for (int c = 0; c < dim; ++c) {
      const size_t i = static_cast<size_t>(r) * dim + c;
      expected[i] = w[c] * sum[i] * inv;
      actual[i] = ::kls::testing::Bf16ToFloat(got_out[i]);
    }
  }
  EXPECT_TRUE(::kls::testing::MatchesReference(actual, expected,
                                               ::kls::testing::kBf16StateTolerance, kRmsBound));
}

// The registers kernel: dim % 4 == 0 up to 8192 with aligned rows. The strided kernel: 8196 (too
// wide), 1001 and 1002 (dim % 4 != 0), and a misaligned residual.
INSTANTIATE_TEST_SUITE_P(Shapes, AddRmsNormF32Test,
                         ::testing::Values(NormCase{1, 2304, true}, NormCase{1, 2304, false},
                                           NormCase{3, 4, true}, NormCase{5, 1028, true},
                                           NormCase{2, 8192, true}, NormCase{1, 8196, true},
                                           NormCase{4, 1000, false}, NormCase{7, 1001, true},
                                           NormCase{4, 1002, false}, NormCase{3, 2304, true, 1},
                                           NormCase{33, 256, true}),
                         [](const ::testing::TestParamInfo<NormCase>& info) {
                           return "rows" + std::to_string(info.param.rows) + "_dim" +
                                  std::to_string(info.param.dim) +
                                  (info.param.with_delta ? "_delta" : "_nodelta") +
                                  (info.param.residual_offset != 0 ? "_misaligned" : "");
                         });

// LaunchLogitsSamplable agrees with kernels::SamplableLogits: a NaN anywhere or no finite
// value makes a row unsamplable; ±inf alongside a finite value does not.
class CudaOpsTest : public CudaTest {};

TEST_F(CudaOpsTest, LogitsSamplableFlagsNaNAndAllInfiniteRows) {
  constexpr int kVocab = 1000;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::vector<float>> rows(5, std::vector<float>(kVocab, 0.5f));
  rows[1][999] = nan;            // one NaN at the end
  rows[2].assign(kVocab, -inf);  // nothing finite
  rows[3].assign(kVocab, -inf);
  rows[3][17] = 2.0f;  // one finite value
  rows[4][0] = inf;    // +inf and finite ones
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  DeviceBuffer<float> d_logits;
  DeviceBuffer<int32_t> d_ok;
  ASSERT_CUDA_OK(Upload(flat, d_logits));
  ASSERT_CUDA_OK(d_ok.Allocate(5));
  ASSERT_CUDA_OK(Poison(d_ok));
  ASSERT_CUDA_OK(LaunchLogitsSamplable(d_logits.get(), 5, kVocab, d_ok.get(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<int32_t> ok;
  ASSERT_CUDA_OK(Download(d_ok, ok));
  for (int r = 0; r < 5; ++r) {
    EXPECT_EQ(ok[r] == 1, kernels::SamplableLogits(rows[r].data(), kVocab)) << "row " << r;
    EXPECT_TRUE(ok[r] == 0 || ok[r] == 1) << "row " << r;
  }
  EXPECT_EQ(ok, (std::vector<int32_t>{1, 0, 0, 1, 1}));
  EXPECT_EQ(LaunchLogitsSamplable(nullptr, 1, kVocab, d_ok.get(), stream()), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchLogitsSamplable(d_logits.get(), 1, 0, d_ok.get(), stream()),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace kls::engine::cuda
