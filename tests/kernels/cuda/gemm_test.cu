// CublasLtGemm (kernels/gemm/gemm_cublaslt.cu) against the fp64 GemmReference (gemm_ref.h), fed
// the kernel's exact bf16 inputs. Shapes hit edges (1, 3, 17, 64, 65, 500, 2304) in each of m, n
// and k; every shape runs both weight layouts × {dense, padded, unaligned} strides ×
// {overwrite, accumulate}, for bf16 and fp32 outputs. Outputs are NaN-poisoned first, and the
// padding between rows must still be NaN afterwards (nothing written outside y). Batched GEMMs:
// generic strides, a broadcast weight, and the MLA W_UK / W_UV absorption against independent
// loops. Also: m == 0, CUDA-graph capture and replay with new inputs, a plan missing during
// capture, the plan cache, a caller-owned workspace and bad arguments.
//
// Tolerances (H5): bf16 outputs use the bf16 table and relative RMS < 5e-3; fp32 outputs use
// rtol 1e-5 and atol 1e-5·max(1, √(k/64)) (inputs are scaled so |y| ~ 1; fp32 summation error
// grows like √k) and relative RMS < 1e-5.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/gemm/gemm.h"
#include "kernels/gemm/gemm_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/test_util.h"

// Fails the test (fatally) unless `expr` returns an ok GemmStatus; prints both codes and the
// message.
#define ASSERT_GEMM_OK(expr)                                                                     \
  do {                                                                                           \
    const ::kls::kernels::GemmStatus kls_gemm_status_ = (expr);                                  \
    ASSERT_TRUE(kls_gemm_status_.ok())                                                           \
        << #expr << ": cublas " << cublasLtGetStatusString(kls_gemm_status_.cublas) << ", cuda " \
        << cudaGetErrorName(kls_gemm_status_.cuda) << ": " << kls_gemm_status_.message;          \
  } while (0)

namespace kls::kernels {
namespace {

using ::kls::testing::Bf16Normal;
using ::kls::testing::Bf16ToDouble;
using ::kls::testing::CudaParamTest;
using ::kls::testing::CudaTest;
using ::kls::testing::DeviceBuffer;
using ::kls::testing::Download;
using ::kls::testing::kBf16StateTolerance;
using ::kls::testing::MatchesReference;
using ::kls::testing::RandomNormal;
using ::kls::testing::ToBf16;
using ::kls::testing::ToDouble;
using ::kls::testing::ToFloat;
using ::kls::testing::Tolerance;
using ::kls::testing::Upload;

constexpr double kBf16RmsBound = 5e-3;
constexpr double kFp32RmsBound = 1e-5;

std::unique_ptr<CublasLtGemm> MakeGemm(const CublasLtGemmOptions& options = {}) {
  GemmCreateResult created = CublasLtGemm::Create(options);
  EXPECT_TRUE(created.status.ok()) << created.status.message;
  return std::move(created.gemm);
}

Tolerance Fp32Tolerance(int64_t k) {
  return {1e-5 * std::max(1.0, std::sqrt(static_cast<double>(k) / 64.0)), 1e-5};
}

// A host matrix buffer of doubles and its device twin (bf16 or fp32), with the element offset of
// the matrix inside the buffer.
struct Operand {
  std::vector<double> host;
  DeviceBuffer<__nv_bfloat16> bf16;
  DeviceBuffer<float> fp32;
  int64_t offset = 0;
};

::testing::AssertionResult UploadOperand(Operand& op, GemmOutputType type) {
  const cudaError_t err = type == GemmOutputType::kBf16 ? Upload(ToBf16(op.host), op.bf16)
                                                        : Upload(ToFloat(op.host), op.fp32);
  if (err != cudaSuccess) return ::testing::AssertionFailure() << cudaGetErrorString(err);
  return ::testing::AssertionSuccess();
}

std::vector<double> DownloadOperand(const Operand& op, GemmOutputType type) {
  if (type == GemmOutputType::kBf16) {
    std::vector<__nv_bfloat16> h;
    EXPECT_CUDA_OK(Download(op.bf16, h));
    return Bf16ToDouble(h);
  }
  std::vector<float> h;
  EXPECT_CUDA_OK(Download(op.fp32, h));
  return ToDouble(h);
}

void* DevicePointer(Operand& op, GemmOutputType type) {
  return type == GemmOutputType::kBf16 ? static_cast<void*>(op.bf16.get() + op.offset)
                                       : static_cast<void*>(op.fp32.get() + op.offset);
}

// Checks y's matrix elements against `expected` (same buffer layout) and that every other
// element of the buffer is still NaN.
::testing::AssertionResult CheckOutput(const std::vector<double>& actual,
                                       const std::vector<double>& expected,
                                       const std::vector<bool>& in_matrix, GemmOutputType type,
                                       int64_t k) {
  std::vector<double> a, e;
  int64_t written_outside = 0, first_outside = -1;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (in_matrix[i]) {
      a.push_back(actual[i]);
      e.push_back(expected[i]);
    } else if (!std::isnan(actual[i])) {
      if (written_outside++ == 0) first_outside = static_cast<int64_t>(i);
    }
  }
  if (written_outside > 0) {
    return ::testing::AssertionFailure()
           << written_outside << " elements outside y were written (first at buffer index "
           << first_outside << ", value " << actual[first_outside] << ")";
  }
  return type == GemmOutputType::kBf16 ? MatchesReference(a, e, kBf16StateTolerance, kBf16RmsBound)
                                       : MatchesReference(a, e, Fp32Tolerance(k), kFp32RmsBound);
}

enum class Strides { kDense, kPadded, kUnaligned };

const char* StridesName(Strides s) {
  switch (s) {
    case Strides::kDense:
      return "dense";
    case Strides::kPadded:
      return "padded";
    case Strides::kUnaligned:
      return "unaligned";
  }
  return "?";
}

struct Shape {
  int64_t m, n, k;
};

struct LinearCase {
  Shape shape;
  GemmOutputType type;
};

std::ostream& operator<<(std::ostream& os, const LinearCase& c) {
  return os << "m" << c.shape.m << " n" << c.shape.n << " k" << c.shape.k
            << (c.type == GemmOutputType::kBf16 ? " bf16" : " fp32");
}

std::string LinearCaseName(const ::testing::TestParamInfo<LinearCase>& info) {
  const LinearCase& c = info.param;
  return "M" + std::to_string(c.shape.m) + "_N" + std::to_string(c.shape.n) + "_K" +
         std::to_string(c.shape.k) + (c.type == GemmOutputType::kBf16 ? "_Bf16" : "_Fp32");
}

// Runs one (layout, strides, mode) variant of a single GEMM and checks it.
void RunSingleGemm(CublasLtGemm& gemm, cudaStream_t stream, Shape shape, GemmOutputType type,
                   GemmWeightLayout layout, Strides strides, GemmOutputMode mode, uint64_t seed) {
  const auto [m, n, k] = shape;
  const bool nk = layout == GemmWeightLayout::kNK;
  const int64_t pad = strides == Strides::kDense ? 0 : (strides == Strides::kPadded ? 8 : 1);
  const int64_t offset = strides == Strides::kUnaligned ? 1 : 0;
  const int64_t w_rows = nk ? n : k, w_cols = nk ? k : n;
  const int64_t ldx = k + pad, ldw = w_cols + pad, ldy = n + pad;

  Operand x, w, y;
  x.offset = w.offset = y.offset = offset;
  x.host = Bf16Normal(offset + m * ldx, seed);
  w.host = Bf16Normal(offset + w_rows * ldw, seed + 1, 0.0, 1.0 / std::sqrt(double(k)));
  y.host.assign(offset + m * ldy, NAN);
  std::vector<bool> in_matrix(y.host.size(), false);
  const std::vector<double> y0 = RandomNormal(y.host.size(), seed + 2);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < n; ++o) {
      const int64_t idx = offset + i * ldy + o;
      in_matrix[idx] = true;
      if (mode == GemmOutputMode::kAccumulate) {
        y.host[idx] = type == GemmOutputType::kBf16 ? ::kls::testing::RoundToBf16(y0[idx])
                                                    : static_cast<double>(float(y0[idx]));
      }
    }
  }
  ASSERT_TRUE(UploadOperand(x, GemmOutputType::kBf16));
  ASSERT_TRUE(UploadOperand(w, GemmOutputType::kBf16));
  ASSERT_TRUE(UploadOperand(y, type));

  GemmArgs args;
  args.m = m;
  args.n = n;
  args.k = k;
  args.x = x.bf16.get() + offset;
  args.ldx = ldx;
  args.w = w.bf16.get() + offset;
  args.w_layout = layout;
  args.ldw = ldw;
  args.y = DevicePointer(y, type);
  args.y_type = type;
  args.ldy = ldy;
  args.mode = mode;
  ASSERT_GEMM_OK(gemm.Run(args, stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));

  std::vector<double> expected = y.host;
  GemmReference<double>(x.host.data() + offset, ldx, 0, w.host.data() + offset, nk ? ldw : 1,
                        nk ? 1 : ldw, 0, expected.data() + offset, ldy, 0, m, n, k, 1,
                        mode == GemmOutputMode::kAccumulate);
  EXPECT_TRUE(CheckOutput(DownloadOperand(y, type), expected, in_matrix, type, k));
}

class GemmLinearTest : public CudaParamTest<LinearCase> {};

TEST_P(GemmLinearTest, MatchesFp64Reference) {
  const LinearCase c = GetParam();
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  uint64_t seed = 100;
  for (GemmWeightLayout layout : {GemmWeightLayout::kNK, GemmWeightLayout::kKN}) {
    for (Strides strides : {Strides::kDense, Strides::kPadded, Strides::kUnaligned}) {
      for (GemmOutputMode mode : {GemmOutputMode::kOverwrite, GemmOutputMode::kAccumulate}) {
        SCOPED_TRACE(::testing::Message()
                     << (layout == GemmWeightLayout::kNK ? "kNK" : "kKN") << " "
                     << StridesName(strides) << " "
                     << (mode == GemmOutputMode::kOverwrite ? "overwrite" : "accumulate"));
        ASSERT_NO_FATAL_FAILURE(
            RunSingleGemm(*gemm, stream(), c.shape, c.type, layout, strides, mode, seed += 3));
      }
    }
  }
}

std::vector<LinearCase> LinearCases() {
  const Shape shapes[] = {{1, 1, 1},       {1, 2304, 2304}, {3, 17, 65},    {17, 64, 3},
                          {64, 65, 17},    {65, 500, 64},   {500, 3, 2304}, {500, 2304, 64},
                          {2304, 65, 500}, {17, 3, 1}};
  std::vector<LinearCase> cases;
  for (const Shape& s : shapes) {
    for (GemmOutputType t : {GemmOutputType::kBf16, GemmOutputType::kFp32}) cases.push_back({s, t});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmLinearTest, ::testing::ValuesIn(LinearCases()),
                         LinearCaseName);

class GemmTest : public CudaTest {};

// The Linear convenience overloads (dense w) for both output types.
TEST_F(GemmTest, LinearOverloads) {
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  const int64_t m = 5, n = 24, k = 40, ldx = 48, ldy = 32;
  const std::vector<double> x = Bf16Normal(m * ldx, 1);
  const std::vector<double> w = Bf16Normal(n * k, 2, 0.0, 1.0 / std::sqrt(double(k)));
  DeviceBuffer<__nv_bfloat16> dx, dw, dy16;
  DeviceBuffer<float> dy32;
  ASSERT_CUDA_OK(Upload(ToBf16(x), dx));
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  std::vector<double> y0(m * ldy, 0.0);
  ASSERT_CUDA_OK(Upload(ToBf16(y0), dy16));
  ASSERT_CUDA_OK(Upload(ToFloat(y0), dy32));
  ASSERT_GEMM_OK(gemm->Linear(dx.get(), ldx, dw.get(), dy16.get(), ldy, m, n, k,
                              GemmOutputMode::kOverwrite, stream()));
  // Accumulating twice into zeros gives 2·x·Wᵀ.
  for (int rep = 0; rep < 2; ++rep) {
    ASSERT_GEMM_OK(gemm->Linear(dx.get(), ldx, dw.get(), dy32.get(), ldy, m, n, k,
                                GemmOutputMode::kAccumulate, stream()));
  }
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> expected = y0;
  GemmReference<double>(x.data(), ldx, 0, w.data(), k, 1, 0, expected.data(), ldy, 0, m, n, k, 1,
                        false);
  std::vector<double> twice(expected.size());
  for (size_t i = 0; i < twice.size(); ++i) twice[i] = 2.0 * expected[i];
  std::vector<__nv_bfloat16> h16;
  std::vector<float> h32;
  ASSERT_CUDA_OK(Download(dy16, h16));
  ASSERT_CUDA_OK(Download(dy32, h32));
  EXPECT_TRUE(MatchesReference(Bf16ToDouble(h16), expected, kBf16StateTolerance, kBf16RmsBound));
  EXPECT_TRUE(MatchesReference(ToDouble(h32), twice, Fp32Tolerance(k), kFp32RmsBound));
}

// Generic strided batches (both layouts, fp32 out), including a weight shared by every batch
// (batch_stride_w = 0).
TEST_F(GemmTest, StridedBatched) {
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  const int64_t batch = 3, m = 5, n = 17, k = 24;
  for (GemmWeightLayout layout : {GemmWeightLayout::kNK, GemmWeightLayout::kKN}) {
    for (bool broadcast_w : {false, true}) {
      SCOPED_TRACE(::testing::Message() << (layout == GemmWeightLayout::kNK ? "kNK" : "kKN")
                                        << (broadcast_w ? " broadcast w" : ""));
      const bool nk = layout == GemmWeightLayout::kNK;
      const int64_t ldx = k + 8, ldw = (nk ? k : n) + 8, ldy = n + 3;
      const int64_t sx = m * ldx + 16, sw = broadcast_w ? 0 : (nk ? n : k) * ldw + 8,
                    sy = m * ldy + 5;
      const std::vector<double> x = Bf16Normal(batch * sx, 7);
      const std::vector<double> w =
          Bf16Normal((broadcast_w ? 1 : batch) * (nk ? n : k) * ldw + 8, 8, 0.0, 0.2);
      std::vector<double> y(batch * sy, NAN);
      std::vector<bool> in_matrix(y.size(), false);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t o = 0; o < n; ++o) in_matrix[b * sy + i * ldy + o] = true;
        }
      }
      DeviceBuffer<__nv_bfloat16> dx, dw;
      DeviceBuffer<float> dy;
      ASSERT_CUDA_OK(Upload(ToBf16(x), dx));
      ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
      ASSERT_CUDA_OK(Upload(ToFloat(y), dy));
      GemmArgs args;
      args.m = m;
      args.n = n;
      args.k = k;
      args.batch = batch;
      args.x = dx.get();
      args.ldx = ldx;
      args.batch_stride_x = sx;
      args.w = dw.get();
      args.w_layout = layout;
      args.ldw = ldw;
      args.batch_stride_w = sw;
      args.y = dy.get();
      args.y_type = GemmOutputType::kFp32;
      args.ldy = ldy;
      args.batch_stride_y = sy;
      ASSERT_GEMM_OK(gemm->Run(args, stream()));
      ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
      std::vector<double> expected = y;
      GemmReference<double>(x.data(), ldx, sx, w.data(), nk ? ldw : 1, nk ? 1 : ldw, sw,
                            expected.data(), ldy, sy, m, n, k, batch, false);
      std::vector<float> actual;
      ASSERT_CUDA_OK(Download(dy, actual));
      EXPECT_TRUE(CheckOutput(ToDouble(actual), expected, in_matrix, GemmOutputType::kFp32, k));
    }
  }
}

struct MlaCase {
  int64_t tokens;
  int heads, dn, dr, dv, dc;
};

std::ostream& operator<<(std::ostream& os, const MlaCase& c) {
  return os << "T" << c.tokens << " H" << c.heads << " dn" << c.dn << " dr" << c.dr << " dv" << c.dv
            << " dc" << c.dc;
}

class GemmMlaAbsorbTest : public CudaParamTest<MlaCase> {};

// q_latent = W_UK^hᵀ q_nope^h and out = W_UV^h o_latent^h per head, as MlaDecodeAbsorbedReference
// defines them (kernels/mla/mla_ref.h), computed here by independent loops. q_nope is read from a
// q_proj-shaped [T, H, dn + dr] buffer and q_latent written into a [T, H, dc + dr] buffer (the
// dr tail of each head must stay untouched).
TEST_P(GemmMlaAbsorbTest, MatchesPerHeadLoops) {
  const auto [t, h, dn, dr, dv, dc] = GetParam();
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  const int64_t rows = static_cast<int64_t>(h) * (dn + dv);
  const std::vector<double> kv_b = Bf16Normal(rows * dc, 21, 0.0, 1.0 / std::sqrt(double(dc)));
  const std::vector<double> q = Bf16Normal(t * h * (dn + dr), 22);
  const std::vector<double> o_lat = Bf16Normal(t * h * dc, 23);
  DeviceBuffer<__nv_bfloat16> d_kv_b, d_q, d_o_lat, d_q_lat, d_out;
  ASSERT_CUDA_OK(Upload(ToBf16(kv_b), d_kv_b));
  ASSERT_CUDA_OK(Upload(ToBf16(q), d_q));
  ASSERT_CUDA_OK(Upload(ToBf16(o_lat), d_o_lat));
  const std::vector<double> nan_q_lat(t * h * (dc + dr), NAN), nan_out(t * h * dv, NAN);
  ASSERT_CUDA_OK(Upload(ToBf16(nan_q_lat), d_q_lat));
  ASSERT_CUDA_OK(Upload(ToBf16(nan_out), d_out));

  const GemmArgs query =
      MlaAbsorbQueryArgs(d_q.get(), h * (dn + dr), dn + dr, d_kv_b.get(), d_q_lat.get(),
                         h * (dc + dr), dc + dr, t, h, dn, dv, dc);
  const GemmArgs output = MlaAbsorbOutputArgs(d_o_lat.get(), h * dc, dc, d_kv_b.get(), d_out.get(),
                                              h * dv, dv, t, h, dn, dv, dc);
  ASSERT_GEMM_OK(gemm->Run(query, stream()));
  ASSERT_GEMM_OK(gemm->Run(output, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  std::vector<double> expected_q_lat = nan_q_lat, expected_out(t * h * dv);
  std::vector<bool> q_lat_in(nan_q_lat.size(), false), out_in(expected_out.size(), true);
  for (int64_t ti = 0; ti < t; ++ti) {
    for (int hi = 0; hi < h; ++hi) {
      const double* w_uk = kv_b.data() + static_cast<int64_t>(hi) * (dn + dv) * dc;
      const double* w_uv = w_uk + static_cast<int64_t>(dn) * dc;
      for (int c = 0; c < dc; ++c) {
        double sum = 0;
        for (int i = 0; i < dn; ++i) sum += w_uk[i * dc + c] * q[(ti * h + hi) * (dn + dr) + i];
        const int64_t idx = (ti * h + hi) * (dc + dr) + c;
        expected_q_lat[idx] = sum;
        q_lat_in[idx] = true;
      }
      for (int v = 0; v < dv; ++v) {
        double sum = 0;
        for (int c = 0; c < dc; ++c) sum += w_uv[v * dc + c] * o_lat[(ti * h + hi) * dc + c];
        expected_out[(ti * h + hi) * dv + v] = sum;
      }
    }
  }
  std::vector<__nv_bfloat16> h_q_lat, h_out;
  ASSERT_CUDA_OK(Download(d_q_lat, h_q_lat));
  ASSERT_CUDA_OK(Download(d_out, h_out));
  EXPECT_TRUE(
      CheckOutput(Bf16ToDouble(h_q_lat), expected_q_lat, q_lat_in, GemmOutputType::kBf16, dn))
      << "q_latent";
  EXPECT_TRUE(CheckOutput(Bf16ToDouble(h_out), expected_out, out_in, GemmOutputType::kBf16, dc))
      << "out";
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmMlaAbsorbTest,
                         ::testing::Values(MlaCase{1, 1, 16, 8, 24, 40},
                                           MlaCase{3, 4, 16, 8, 24, 40},
                                           MlaCase{17, 2, 32, 16, 8, 64},
                                           MlaCase{1, 32, 128, 64, 128, 512},
                                           MlaCase{5, 32, 128, 64, 128, 512}),
                         [](const ::testing::TestParamInfo<MlaCase>& info) {
                           const MlaCase& c = info.param;
                           return "T" + std::to_string(c.tokens) + "_H" + std::to_string(c.heads) +
                                  "_Dn" + std::to_string(c.dn) + "_Dv" + std::to_string(c.dv) +
                                  "_Dc" + std::to_string(c.dc);
                         });

TEST_F(GemmTest, ZeroRowsOrBatchIsANoOp) {
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  GemmArgs args =
      LinearArgs(static_cast<const __nv_bfloat16*>(nullptr), 64, nullptr,
                 static_cast<float*>(nullptr), 32, 0, 32, 64, GemmOutputMode::kOverwrite);
  ASSERT_GEMM_OK(gemm->Run(args, stream()));
  ASSERT_GEMM_OK(gemm->Prepare(args));
  args.m = 4;
  args.batch = 0;
  ASSERT_GEMM_OK(gemm->Run(args, stream()));
  EXPECT_EQ(gemm->cached_plans(), 0u);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

// A Linear and an MLA batched GEMM captured into one graph after Prepare; replays read the new
// contents of the same buffers.
TEST_F(GemmTest, CapturedGraphReplaysWithNewInputs) {
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  const int64_t m = 3, n = 64, k = 128;
  const int h = 4, dn = 16, dv = 24, dc = 40;
  DeviceBuffer<__nv_bfloat16> dx, dw, dy, d_kv_b, d_q, d_q_lat;
  const std::vector<double> w = Bf16Normal(n * k, 31, 0.0, 1.0 / std::sqrt(double(k)));
  const std::vector<double> kv_b = Bf16Normal(h * (dn + dv) * dc, 32, 0.0, 0.25);
  ASSERT_CUDA_OK(Upload(ToBf16(w), dw));
  ASSERT_CUDA_OK(Upload(ToBf16(kv_b), d_kv_b));
  ASSERT_CUDA_OK(dx.Allocate(m * k));
  ASSERT_CUDA_OK(dy.Allocate(m * n));
  ASSERT_CUDA_OK(d_q.Allocate(m * h * dn));
  ASSERT_CUDA_OK(d_q_lat.Allocate(m * h * dc));
  const GemmArgs linear =
      LinearArgs(dx.get(), k, dw.get(), dy.get(), n, m, n, k, GemmOutputMode::kOverwrite);
  const GemmArgs absorb = MlaAbsorbQueryArgs(d_q.get(), h * dn, dn, d_kv_b.get(), d_q_lat.get(),
                                             h * dc, dc, m, h, dn, dv, dc);
  ASSERT_GEMM_OK(gemm->Prepare(linear));
  ASSERT_GEMM_OK(gemm->Prepare(absorb));
  EXPECT_EQ(gemm->cached_plans(), 2u);

  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeGlobal));
  const GemmStatus s1 = gemm->Run(linear, stream());
  const GemmStatus s2 = gemm->Run(absorb, stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  ASSERT_TRUE(s1.ok()) << s1.message;
  ASSERT_TRUE(s2.ok()) << s2.message;
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  for (uint64_t replay = 0; replay < 3; ++replay) {
    SCOPED_TRACE(::testing::Message() << "replay " << replay);
    const std::vector<double> x = Bf16Normal(m * k, 40 + replay);
    const std::vector<double> q = Bf16Normal(m * h * dn, 50 + replay);
    ASSERT_CUDA_OK(cudaMemcpy(dx.get(), ToBf16(x).data(), dx.bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA_OK(cudaMemcpy(d_q.get(), ToBf16(q).data(), d_q.bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    std::vector<double> expected_y(m * n), expected_q_lat(m * h * dc);
    GemmReference<double>(x.data(), k, 0, w.data(), k, 1, 0, expected_y.data(), n, 0, m, n, k, 1,
                          false);
    GemmReference<double>(q.data(), h * dn, dn, kv_b.data(), 1, dc, (dn + dv) * dc,
                          expected_q_lat.data(), h * dc, dc, m, dc, dn, h, false);
    std::vector<__nv_bfloat16> hy, hq;
    ASSERT_CUDA_OK(Download(dy, hy));
    ASSERT_CUDA_OK(Download(d_q_lat, hq));
    EXPECT_TRUE(MatchesReference(Bf16ToDouble(hy), expected_y, kBf16StateTolerance, kBf16RmsBound));
    EXPECT_TRUE(
        MatchesReference(Bf16ToDouble(hq), expected_q_lat, kBf16StateTolerance, kBf16RmsBound));
  }
  EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
  EXPECT_CUDA_OK(cudaGraphDestroy(graph));
}

// A Run that needs a plan while its stream captures fails cleanly and leaves the capture valid;
// the same Run outside capture then succeeds.
TEST_F(GemmTest, MissingPlanDuringCaptureFails) {
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  const int64_t m = 2, n = 32, k = 16;
  DeviceBuffer<__nv_bfloat16> dx, dw;
  DeviceBuffer<float> dy;
  ASSERT_CUDA_OK(dx.Allocate(m * k));
  ASSERT_CUDA_OK(dw.Allocate(n * k));
  ASSERT_CUDA_OK(dy.Allocate(m * n));
  ASSERT_CUDA_OK(cudaMemset(dx.get(), 0, dx.bytes()));
  ASSERT_CUDA_OK(cudaMemset(dw.get(), 0, dw.bytes()));
  const GemmArgs args =
      LinearArgs(dx.get(), k, dw.get(), dy.get(), n, m, n, k, GemmOutputMode::kOverwrite);
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeGlobal));
  const GemmStatus status = gemm->Run(args, stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  EXPECT_CUDA_OK(cudaGraphDestroy(graph));
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.cuda, cudaErrorStreamCaptureUnsupported) << status.message;
  EXPECT_NE(std::string(status.message).find("Prepare"), std::string::npos) << status.message;
  EXPECT_EQ(gemm->cached_plans(), 0u);
  ASSERT_GEMM_OK(gemm->Run(args, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<float> y;
  ASSERT_CUDA_OK(Download(dy, y));
  for (float v : y) ASSERT_EQ(v, 0.0f);
}

// Keys: the same call reuses its plan; a different shape or a different alignment makes a new
// one; plans made by Run are dropped when the cache is full, prepared ones stay.
TEST_F(GemmTest, PlanCache) {
  CublasLtGemmOptions options;
  options.max_cached_plans = 2;
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm(options);
  ASSERT_NE(gemm, nullptr);
  const int64_t n = 32, k = 64;
  DeviceBuffer<__nv_bfloat16> dx, dw;
  DeviceBuffer<float> dy;
  ASSERT_CUDA_OK(dx.Allocate(8 * k + 8));
  ASSERT_CUDA_OK(dw.Allocate(n * k));
  ASSERT_CUDA_OK(dy.Allocate(8 * n));
  ASSERT_CUDA_OK(cudaMemset(dx.get(), 0, dx.bytes()));
  ASSERT_CUDA_OK(cudaMemset(dw.get(), 0, dw.bytes()));
  const auto args = [&](int64_t m, int64_t x_offset) {
    return LinearArgs(dx.get() + x_offset, k, dw.get(), dy.get(), n, m, n, k,
                      GemmOutputMode::kOverwrite);
  };
  ASSERT_GEMM_OK(gemm->Prepare(args(1, 0)));
  ASSERT_GEMM_OK(gemm->Prepare(args(1, 0)));
  EXPECT_EQ(gemm->cached_plans(), 1u);
  ASSERT_GEMM_OK(gemm->Run(args(1, 0), stream()));
  EXPECT_EQ(gemm->cached_plans(), 1u);
  ASSERT_GEMM_OK(gemm->Run(args(1, 8), stream()));  // 16-byte instead of 256-byte aligned x
  EXPECT_EQ(gemm->cached_plans(), 2u);
  ASSERT_GEMM_OK(gemm->Run(args(2, 0), stream()));  // full: the unpinned plan goes
  EXPECT_EQ(gemm->cached_plans(), 2u);
  ASSERT_GEMM_OK(gemm->Run(args(3, 0), stream()));
  EXPECT_EQ(gemm->cached_plans(), 2u);
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  // The prepared plan survived: it can still be captured.
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeGlobal));
  const GemmStatus status = gemm->Run(args(1, 0), stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  EXPECT_CUDA_OK(cudaGraphDestroy(graph));
  EXPECT_TRUE(status.ok()) << status.message;
}

TEST_F(GemmTest, CallerOwnedWorkspace) {
  DeviceBuffer<uint8_t> workspace;
  ASSERT_CUDA_OK(workspace.Allocate(size_t{4} << 20));
  CublasLtGemmOptions options;
  options.workspace = workspace.get();
  options.workspace_bytes = workspace.size();
  std::unique_ptr<CublasLtGemm> gemm = MakeGemm(options);
  ASSERT_NE(gemm, nullptr);
  ASSERT_NO_FATAL_FAILURE(RunSingleGemm(*gemm, stream(), {65, 500, 2304}, GemmOutputType::kFp32,
                                        GemmWeightLayout::kNK, Strides::kDense,
                                        GemmOutputMode::kOverwrite, 61));
  // No workspace at all also works (algorithms that need none).
  options.workspace = nullptr;
  options.workspace_bytes = 0;
  std::unique_ptr<CublasLtGemm> bare = MakeGemm(options);
  ASSERT_NE(bare, nullptr);
  ASSERT_NO_FATAL_FAILURE(RunSingleGemm(*bare, stream(), {17, 64, 65}, GemmOutputType::kBf16,
                                        GemmWeightLayout::kNK, Strides::kDense,
                                        GemmOutputMode::kOverwrite, 62));
}

TEST_F(GemmTest, RejectsBadArguments) {
  CublasLtGemmOptions bad_workspace;
  bad_workspace.workspace = reinterpret_cast<void*>(uintptr_t{4096 + 16});
  const GemmCreateResult created = CublasLtGemm::Create(bad_workspace);
  EXPECT_EQ(created.status.cublas, CUBLAS_STATUS_INVALID_VALUE) << created.status.message;
  EXPECT_EQ(created.gemm, nullptr);

  std::unique_ptr<CublasLtGemm> gemm = MakeGemm();
  ASSERT_NE(gemm, nullptr);
  DeviceBuffer<__nv_bfloat16> dx, dw;
  DeviceBuffer<float> dy;
  ASSERT_CUDA_OK(dx.Allocate(4 * 64));
  ASSERT_CUDA_OK(dw.Allocate(32 * 64));
  ASSERT_CUDA_OK(dy.Allocate(4 * 32));
  const GemmArgs good =
      LinearArgs(dx.get(), 64, dw.get(), dy.get(), 32, 4, 32, 64, GemmOutputMode::kOverwrite);
  struct BadCase {
    const char* what;
    GemmArgs args;
  };
  std::vector<BadCase> cases;
  const auto with = [&](const char* what, auto mutate) {
    GemmArgs a = good;
    mutate(a);
    cases.push_back({what, a});
  };
  with("m < 0", [](GemmArgs& a) { a.m = -1; });
  with("n == 0", [](GemmArgs& a) { a.n = 0; });
  with("k == 0", [](GemmArgs& a) { a.k = 0; });
  with("batch < 0", [](GemmArgs& a) { a.batch = -2; });
  with("ldx < k", [](GemmArgs& a) { a.ldx = 63; });
  with("ldw < k (kNK)", [](GemmArgs& a) { a.ldw = 63; });
  with("ldw < n (kKN)", [](GemmArgs& a) {
    a.w_layout = GemmWeightLayout::kKN;
    a.ldw = 31;
  });
  with("ldy < n", [](GemmArgs& a) { a.ldy = 31; });
  with("null x", [](GemmArgs& a) { a.x = nullptr; });
  with("null w", [](GemmArgs& a) { a.w = nullptr; });
  with("null y", [](GemmArgs& a) { a.y = nullptr; });
  with("negative batch stride", [](GemmArgs& a) {
    a.batch = 2;
    a.batch_stride_x = -64;
  });
  with("bad layout enum", [](GemmArgs& a) { a.w_layout = static_cast<GemmWeightLayout>(7); });
  with("bad type enum", [](GemmArgs& a) { a.y_type = static_cast<GemmOutputType>(7); });
  with("bad mode enum", [](GemmArgs& a) { a.mode = static_cast<GemmOutputMode>(7); });
  with("y overlaps x", [&](GemmArgs& a) {
    a.y = const_cast<__nv_bfloat16*>(a.x) + 8;
    a.y_type = GemmOutputType::kBf16;
  });
  with("y overlaps w", [&](GemmArgs& a) { a.y = const_cast<__nv_bfloat16*>(a.w); });
  with("extent overflows", [](GemmArgs& a) {
    a.batch = 3;
    a.batch_stride_y = int64_t{1} << 62;
  });
  for (const BadCase& c : cases) {
    const GemmStatus run = gemm->Run(c.args, stream());
    EXPECT_EQ(run.cublas, CUBLAS_STATUS_INVALID_VALUE) << c.what << ": " << run.message;
    EXPECT_NE(std::string(run.message), "") << c.what;
    const GemmStatus prepare = gemm->Prepare(c.args);
    EXPECT_EQ(prepare.cublas, CUBLAS_STATUS_INVALID_VALUE) << c.what << ": " << prepare.message;
  }
  EXPECT_EQ(gemm->cached_plans(), 0u);
  ASSERT_GEMM_OK(gemm->Run(good, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

// ---- Skinny GEMMs (LaunchSkinnyGemm) -----------------------------------------------------------

// One problem's operands for LaunchSkinnyGemm: x [m, k] and w [n, k] bf16 with padded row strides
// when `padded` (8 extra elements, so rows stay 16-byte aligned), y [m, n] NaN-poisoned around
// the matrix (and, for kAccumulate, starting from random values).
struct SkinnyOperands {
  int64_t m, n, k;
  GemmOutputType type;
  GemmOutputMode mode;
  int64_t ldx, ldw, ldy;
  Operand x, w, y;
  std::vector<bool> in_matrix;

  SkinnyOperands(int64_t m_, int64_t n_, int64_t k_, GemmOutputType type_, GemmOutputMode mode_,
                 bool padded, uint64_t seed)
      : m(m_), n(n_), k(k_), type(type_), mode(mode_) {
    const int64_t pad = padded ? 8 : 0;
    ldx = k + pad;
    ldw = k + pad;
    ldy = n + (padded ? 3 : 0);
    x.host = Bf16Normal(m * ldx, seed);
    w.host = Bf16Normal(n * ldw, seed + 1, 0.0, 1.0 / std::sqrt(double(k)));
    y.host.assign(m * ldy, NAN);
    in_matrix.assign(y.host.size(), false);
    const std::vector<double> y0 = RandomNormal(y.host.size(), seed + 2);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t o = 0; o < n; ++o) {
        const int64_t idx = i * ldy + o;
        in_matrix[idx] = true;
        if (mode == GemmOutputMode::kAccumulate) {
          y.host[idx] = type == GemmOutputType::kBf16 ? ::kls::testing::RoundToBf16(y0[idx])
                                                      : static_cast<double>(float(y0[idx]));
        }
      }
    }
  }

  ::testing::AssertionResult Upload() {
    for (Operand* op : {&x, &w}) {
      const ::testing::AssertionResult r = UploadOperand(*op, GemmOutputType::kBf16);
      if (!r) return r;
    }
    return UploadOperand(y, type);
  }

  SkinnyGemmProblem Problem() {
    SkinnyGemmProblem q;
    q.x = x.bf16.get();
    q.ldx = ldx;
    q.w = w.bf16.get();
    q.ldw = ldw;
    q.y = DevicePointer(y, type);
    q.y_type = type;
    q.ldy = ldy;
    q.n = n;
    q.k = k;
    q.mode = mode;
    return q;
  }

  // Downloads y and compares it with the fp64 reference on the host operands.
  ::testing::AssertionResult Check() const {
    std::vector<double> expected = y.host;
    GemmReference<double>(x.host.data(), ldx, 0, w.host.data(), ldw, 1, 0, expected.data(), ldy, 0,
                          m, n, k, 1, mode == GemmOutputMode::kAccumulate);
    return CheckOutput(DownloadOperand(y, type), expected, in_matrix, type, k);
  }
};

struct SkinnyCase {
  int64_t m, n, k;
};

std::string SkinnyCaseName(const ::testing::TestParamInfo<SkinnyCase>& info) {
  return "M" + std::to_string(info.param.m) + "_N" + std::to_string(info.param.n) + "_K" +
         std::to_string(info.param.k);
}

class SkinnyGemmTest : public CudaParamTest<SkinnyCase> {};

// Every shape × bf16/fp32 × overwrite/accumulate × dense/padded strides, one problem per launch.
TEST_P(SkinnyGemmTest, MatchesFp64Reference) {
  const SkinnyCase c = GetParam();
  uint64_t seed = 500;
  for (GemmOutputType type : {GemmOutputType::kBf16, GemmOutputType::kFp32}) {
    for (GemmOutputMode mode : {GemmOutputMode::kOverwrite, GemmOutputMode::kAccumulate}) {
      for (bool padded : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << (type == GemmOutputType::kBf16 ? "bf16 " : "fp32 ")
                     << (mode == GemmOutputMode::kOverwrite ? "overwrite" : "accumulate")
                     << (padded ? " padded" : " dense"));
        SkinnyOperands ops(c.m, c.n, c.k, type, mode, padded, seed += 3);
        ASSERT_TRUE(ops.Upload());
        SkinnyGemmArgs args;
        args.m = c.m;
        args.num_problems = 1;
        args.problems[0] = ops.Problem();
        ASSERT_GEMM_OK(LaunchSkinnyGemm(args, stream()));
        ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
        EXPECT_TRUE(ops.Check());
      }
    }
  }
}

// m over 1, 3, 8 (one n8 fragment), 9, 16 (two); n over 1, a partial row block, odd sizes and the
// model's widths; k over 8 (one lane group), non-multiples of 32 and the model's widths. The row
// block counts reach each warps-per-CTA choice (n = 9000: 4 warps, n = 5000: 8, else 16 on a
// 132-SM H100/H200).
std::vector<SkinnyCase> SkinnyCases() {
  std::vector<SkinnyCase> cases;
  for (int64_t m : {1, 3, 8, 9, 16}) {
    for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{
             {1, 8}, {17, 24}, {33, 1000}, {500, 2304}, {2304, 4096}, {5000, 136}, {9000, 64}}) {
      cases.push_back({m, n, k});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, SkinnyGemmTest, ::testing::ValuesIn(SkinnyCases()),
                         SkinnyCaseName);

// Four problems of one launch, each with its own x, k, n, output type and mode (the engine groups
// e.g. qkv + fa_ga + b_proj, which read the same rows, and f_b + g_b).
TEST_F(GemmTest, SkinnyGroupedProblems) {
  for (int64_t m : {1, 7, 12}) {
    SCOPED_TRACE(::testing::Message() << "m " << m);
    std::vector<std::unique_ptr<SkinnyOperands>> ops;
    ops.push_back(std::make_unique<SkinnyOperands>(m, 1200, 2304, GemmOutputType::kBf16,
                                                   GemmOutputMode::kOverwrite, false, 70));
    ops.push_back(std::make_unique<SkinnyOperands>(m, 40, 2304, GemmOutputType::kFp32,
                                                   GemmOutputMode::kOverwrite, true, 71));
    ops.push_back(std::make_unique<SkinnyOperands>(m, 3, 128, GemmOutputType::kBf16,
                                                   GemmOutputMode::kAccumulate, false, 72));
    ops.push_back(std::make_unique<SkinnyOperands>(m, 257, 520, GemmOutputType::kFp32,
                                                   GemmOutputMode::kAccumulate, true, 73));
    SkinnyGemmArgs args;
    args.m = m;
    args.num_problems = static_cast<int>(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      ASSERT_TRUE(ops[i]->Upload());
      args.problems[i] = ops[i]->Problem();
    }
    ASSERT_GEMM_OK(LaunchSkinnyGemm(args, stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    for (size_t i = 0; i < ops.size(); ++i) EXPECT_TRUE(ops[i]->Check()) << "problem " << i;
  }
}

// Every launch shape a benchmark may pick (warps per CTA × chunks in flight × programmatic
// launch) computes the same product.
TEST_F(GemmTest, SkinnyGemmEveryLaunchShape) {
  uint64_t seed = 90;
  for (int64_t m : {1, 12}) {
    for (int warps : {4, 8, 16}) {
      for (int chunks : {4, 8}) {
        for (bool overlap : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "m " << m << ", " << warps << " warps, " << chunks
                                            << " chunks" << (overlap ? ", overlapped" : ""));
          SkinnyOperands ops(m, 200, 1096, GemmOutputType::kBf16, GemmOutputMode::kOverwrite, true,
                             seed += 3);
          ASSERT_TRUE(ops.Upload());
          SkinnyGemmArgs args;
          args.m = m;
          args.num_problems = 1;
          args.problems[0] = ops.Problem();
          args.warps_per_cta = warps;
          args.chunks_in_flight = chunks;
          args.overlap_previous_kernel = overlap;
          ASSERT_GEMM_OK(LaunchSkinnyGemm(args, stream()));
          ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
          EXPECT_TRUE(ops.Check());
        }
      }
    }
  }
}

// Copies n bf16 values after spinning ~20 µs. It lets a kernel launched after it with
// programmatic dependent launch start at once (launch_dependents), so that kernel is running
// while the copy is still pending and only its griddepcontrol.wait orders it after the copy.
__global__ void SlowCopyKernel(const __nv_bfloat16* src, __nv_bfloat16* dst, int64_t n) {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const long long start = clock64();
  while (clock64() - start < 40000) {
  }
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = src[i];
  }
}

// With overlap_previous_kernel the GEMM may start during the kernel before it, which here writes
// its x: the GEMM must still read the x that kernel wrote (x holds NaN until then).
TEST_F(GemmTest, SkinnyGemmOverlappedLaunchReadsThePreviousKernelsOutput) {
  for (int64_t m : {1, 12}) {
    SCOPED_TRACE(::testing::Message() << "m " << m);
    SkinnyOperands ops(m, 2304, 4096, GemmOutputType::kFp32, GemmOutputMode::kOverwrite, false,
                       130 + m);
    ASSERT_TRUE(ops.Upload());
    DeviceBuffer<__nv_bfloat16> src;
    ASSERT_CUDA_OK(Upload(ToBf16(ops.x.host), src));
    ASSERT_CUDA_OK(Upload(ToBf16(std::vector<double>(ops.x.host.size(), NAN)), ops.x.bf16));
    SlowCopyKernel<<<8, 256, 0, stream()>>>(src.get(), ops.x.bf16.get(),
                                            static_cast<int64_t>(ops.x.host.size()));
    ASSERT_CUDA_OK(cudaGetLastError());
    SkinnyGemmArgs args;
    args.m = m;
    args.num_problems = 1;
    args.problems[0] = ops.Problem();
    args.overlap_previous_kernel = true;
    ASSERT_GEMM_OK(LaunchSkinnyGemm(args, stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    EXPECT_TRUE(ops.Check());
  }
}

// Captured once, replayed after x and y change on the device: the replay reads the new x.
TEST_F(GemmTest, SkinnyGemmCapturedAndReplayed) {
  SkinnyOperands ops(4, 300, 2304, GemmOutputType::kFp32, GemmOutputMode::kOverwrite, false, 80);
  ASSERT_TRUE(ops.Upload());
  SkinnyGemmArgs args;
  args.m = 4;
  args.num_problems = 1;
  args.problems[0] = ops.Problem();
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeGlobal));
  const GemmStatus captured = LaunchSkinnyGemm(args, stream());
  ASSERT_CUDA_OK(cudaStreamEndCapture(stream(), &graph));
  ASSERT_TRUE(captured.ok()) << captured.message;
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  ASSERT_CUDA_OK(cudaGraphDestroy(graph));
  for (uint64_t seed : {81, 82}) {
    ops.x.host = Bf16Normal(ops.x.host.size(), seed);
    ASSERT_TRUE(UploadOperand(ops.x, GemmOutputType::kBf16));
    ASSERT_TRUE(UploadOperand(ops.y, GemmOutputType::kFp32));  // NaN again around the matrix
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    EXPECT_TRUE(ops.Check()) << "replay with seed " << seed;
  }
  EXPECT_CUDA_OK(cudaGraphExecDestroy(exec));
}

TEST_F(GemmTest, SkinnyGemmRejectsBadArguments) {
  DeviceBuffer<__nv_bfloat16> dx, dw;
  DeviceBuffer<float> dy, dy_other;
  ASSERT_CUDA_OK(dx.Allocate(16 * 64 + 8));
  ASSERT_CUDA_OK(dw.Allocate(32 * 64 + 8));
  ASSERT_CUDA_OK(dy.Allocate(16 * 32 + 8));
  ASSERT_CUDA_OK(dy_other.Allocate(16 * 32 + 8));
  SkinnyGemmArgs good;
  good.m = 4;
  good.num_problems = 1;
  SkinnyGemmProblem& q = good.problems[0];
  q.x = dx.get();
  q.ldx = 64;
  q.w = dw.get();
  q.ldw = 64;
  q.y = dy.get();
  q.y_type = GemmOutputType::kFp32;
  q.ldy = 32;
  q.n = 32;
  q.k = 64;
  struct BadCase {
    const char* what;
    SkinnyGemmArgs args;
  };
  std::vector<BadCase> cases;
  const auto with = [&](const char* what, auto mutate) {
    SkinnyGemmArgs a = good;
    mutate(a);
    cases.push_back({what, a});
  };
  with("m < 0", [](SkinnyGemmArgs& a) { a.m = -1; });
  with("m > 16", [](SkinnyGemmArgs& a) { a.m = kSkinnyGemmMaxRows + 1; });
  with("no problems", [](SkinnyGemmArgs& a) { a.num_problems = 0; });
  with("five problems", [](SkinnyGemmArgs& a) { a.num_problems = kSkinnyGemmMaxProblems + 1; });
  with("warps_per_cta 5", [](SkinnyGemmArgs& a) { a.warps_per_cta = 5; });
  with("chunks_in_flight 6", [](SkinnyGemmArgs& a) { a.chunks_in_flight = 6; });
  with("n == 0", [](SkinnyGemmArgs& a) { a.problems[0].n = 0; });
  with("k not a multiple of 8", [](SkinnyGemmArgs& a) {
    a.problems[0].k = 60;
    a.problems[0].ldx = a.problems[0].ldw = 64;
  });
  with("k above 2^30", [](SkinnyGemmArgs& a) {
    a.problems[0].k = (int64_t{1} << 30) + 8;
    a.problems[0].ldx = a.problems[0].ldw = a.problems[0].k;
  });
  with("ldx not a multiple of 8", [](SkinnyGemmArgs& a) { a.problems[0].ldx = 68 + 1; });
  with("ldw < k", [](SkinnyGemmArgs& a) { a.problems[0].ldw = 56; });
  with("ldy < n", [](SkinnyGemmArgs& a) { a.problems[0].ldy = 31; });
  with("x not 16-byte aligned", [](SkinnyGemmArgs& a) { a.problems[0].x += 1; });
  with("w not 16-byte aligned", [](SkinnyGemmArgs& a) { a.problems[0].w += 4; });
  with("null w", [](SkinnyGemmArgs& a) { a.problems[0].w = nullptr; });
  with("null y", [](SkinnyGemmArgs& a) { a.problems[0].y = nullptr; });
  with("bad type enum",
       [](SkinnyGemmArgs& a) { a.problems[0].y_type = static_cast<GemmOutputType>(7); });
  with("bad mode enum",
       [](SkinnyGemmArgs& a) { a.problems[0].mode = static_cast<GemmOutputMode>(7); });
  with("y overlaps x", [](SkinnyGemmArgs& a) {
    a.problems[0].y = const_cast<__nv_bfloat16*>(a.problems[0].x) + 8;
    a.problems[0].y_type = GemmOutputType::kBf16;
  });
  with("y overlaps another problem's w", [&](SkinnyGemmArgs& a) {
    a.num_problems = 2;
    a.problems[1] = a.problems[0];
    a.problems[1].y = dy_other.get();  // its own y: only problem 0's y vs its w overlap
    a.problems[1].w = reinterpret_cast<const __nv_bfloat16*>(dy.get());
  });
  with("two problems write one y", [](SkinnyGemmArgs& a) {
    a.num_problems = 2;
    a.problems[1] = a.problems[0];
  });
  for (const BadCase& c : cases) {
    const GemmStatus launched = LaunchSkinnyGemm(c.args, stream());
    EXPECT_EQ(launched.cublas, CUBLAS_STATUS_INVALID_VALUE) << c.what << ": " << launched.message;
    EXPECT_NE(std::string(launched.message), "") << c.what;
  }
  // m == 0 launches nothing (pointers unused).
  SkinnyGemmArgs empty;
  empty.num_problems = 1;
  ASSERT_GEMM_OK(LaunchSkinnyGemm(empty, stream()));
  ASSERT_GEMM_OK(LaunchSkinnyGemm(good, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
}

}  // namespace
}  // namespace kls::kernels
