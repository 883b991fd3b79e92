// The MLA launchers (kernels/mla/mla_prefill.cu, mla_decode.cu) against fp64 CPU references fed
// the kernels' exact bf16 inputs, under the H5 policy (bf16 table AND relative RMS error below
// 5e-3); outputs are NaN-poisoned before each run. On a mismatch the message also names the
// (token, head) with the largest error, so a failure log points at the broken tile.
//   Prefill: MlaPrefillAttentionReference per sequence; T ∈ {1, 63, 64, 65, 127, 500, 2100},
//     ragged batches of 3 and 7 (with an empty sequence), chunked prefill over a context
//     (len_q < len_k), both dims of the dispatch ((192, 128) and the tiny preset's (48, 32)),
//     strided q/k/v views (gaps filled with NaN, so reading one fails the test).
//   Decode: the kernel's contract (softmax over scale·(q_lat·c + q_pe·kpe), applied to c) for
//     page sizes 16/64/256 over a shuffled page pool, lengths off the page size, B ∈ {1, 3, 19},
//     one split (direct output), forced splits with empty ones, H = 40 (two head groups), every
//     dims variant; unread cache rows and table entries point at NaN; a CUDA graph replayed
//     after seq_lens change on the device; one end-to-end check against
//     MlaDecodeAbsorbedReference through host-side W_UK / W_UV products.
//   Cache append: exactly the addressed rows change, bit for bit; guards drop bad positions.
//   Bad arguments: cudaErrorInvalidValue and no launch.
// Fixed seeds throughout.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/mla/mla.h"
#include "kernels/mla/mla_ref.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/test_util.h"

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
using ::kls::testing::Poison;
using ::kls::testing::ToBf16;
using ::kls::testing::Upload;

using bf16 = __nv_bfloat16;

// bf16 outputs: the bf16 row of the H5 table and a relative RMS error below 5e-3 (fla's bound).
constexpr double kRmsBound = 5e-3;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <typename T>
std::vector<double> DownloadAsDouble(const DeviceBuffer<T>& d) {
  std::vector<T> h;
  EXPECT_CUDA_OK(Download(d, h));
  if constexpr (std::is_same_v<T, bf16>) {
    return Bf16ToDouble(h);
  } else {
    return std::vector<double>(h.begin(), h.end());
  }
}

// Where a [rows, heads, dim] result is worst: non-finite count, the element with the largest
// absolute error, and the (row, head) vector with the largest relative RMS error.
std::string Locate(const std::vector<double>& actual, const std::vector<double>& expected,
                   int heads, int dim) {
  std::ostringstream os;
  if (actual.size() != expected.size()) return "size mismatch";
  int64_t non_finite = 0, worst = -1, worst_vec = -1;
  double max_abs = -1, worst_rms = -1;
  const int64_t vecs = static_cast<int64_t>(actual.size()) / dim;
  for (int64_t v = 0; v < vecs; ++v) {
    double diff = 0, ref = 0;
    for (int d = 0; d < dim; ++d) {
      const int64_t i = v * dim + d;
      if (!std::isfinite(actual[i])) {
        ++non_finite;
        continue;
      }
      const double e = std::fabs(actual[i] - expected[i]);
      if (e > max_abs) {
        max_abs = e;
        worst = i;
      }
      diff += e * e;
      ref += expected[i] * expected[i];
    }
    const double rms = std::sqrt(diff / std::max(ref, 1e-300));
    if (rms > worst_rms) {
      worst_rms = rms;
      worst_vec = v;
    }
  }
  os << non_finite << " non-finite; ";
  if (worst >= 0) {
    os << "max |err| " << max_abs << " at (row " << worst / dim / heads << ", head "
       << (worst / dim) % heads << ", col " << worst % dim << "): " << actual[worst] << " vs "
       << expected[worst] << "; worst vector (row " << worst_vec / heads << ", head "
       << worst_vec % heads << ") rel RMS " << worst_rms;
  }
  return os.str();
}

std::string Join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

// =============================================================================================
// Prefill
// =============================================================================================

struct PrefillCase {
  std::string name;
  std::vector<int> len_q;
  std::vector<int> len_k;  // ≥ len_q
  int heads;
  int dqk;
  int dv;
  bool strided;  // q, k, v as views into wider buffers
  uint64_t seed;
};

// gtest prints the case name instead of its bytes.
void PrintTo(const PrefillCase& c, std::ostream* os) { *os << c.name; }

struct PrefillProblem {
  PrefillCase c;
  std::vector<int32_t> cu_q, cu_k;
  std::vector<double> q, k, v;  // contiguous [total, H, D], bf16 values
  double scale = 0;
};

PrefillProblem MakePrefillProblem(const PrefillCase& c) {
  PrefillProblem p;
  p.c = c;
  p.cu_q = {0};
  p.cu_k = {0};
  for (size_t n = 0; n < c.len_q.size(); ++n) {
    p.cu_q.push_back(p.cu_q.back() + c.len_q[n]);
    p.cu_k.push_back(p.cu_k.back() + c.len_k[n]);
  }
  const size_t hq = static_cast<size_t>(c.heads) * c.dqk, hv = static_cast<size_t>(c.heads) * c.dv;
  p.q = Bf16Normal(p.cu_q.back() * hq, c.seed);
  p.k = Bf16Normal(p.cu_k.back() * hq, c.seed + 1);
  p.v = Bf16Normal(p.cu_k.back() * hv, c.seed + 2);
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.dqk));
  return p;
}

std::vector<double> PrefillReference(const PrefillProblem& p) {
  const PrefillCase& c = p.c;
  std::vector<double> out(static_cast<size_t>(p.cu_q.back()) * c.heads * c.dv);
  for (size_t n = 0; n < c.len_q.size(); ++n) {
    const int64_t hq = static_cast<int64_t>(c.heads) * c.dqk, hv = int64_t{c.heads} * c.dv;
    MlaPrefillAttentionReference<double>(
        p.q.data() + p.cu_q[n] * hq, p.k.data() + p.cu_k[n] * hq, p.v.data() + p.cu_k[n] * hv,
        c.len_q[n], c.len_k[n], c.heads, c.dqk, c.dv, p.scale, out.data() + p.cu_q[n] * hv);
  }
  return out;
}

// Device copies of a problem, contiguous or as strided views (gaps hold NaN).
struct PrefillDevice {
  DeviceBuffer<bf16> q, kv, v, out;
  DeviceBuffer<int32_t> cu_q, cu_k;
  MlaPrefillParams params;
};

// Scatters a contiguous [tokens, H, dim] array into a [tokens] × token_stride buffer with head
// stride head_stride at element offset `base`; everything else stays as `fill` holds it.
void Scatter(const std::vector<double>& src, int64_t tokens, int heads, int dim,
             int64_t token_stride, int64_t head_stride, int64_t base, std::vector<double>& dst) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int d = 0; d < dim; ++d) {
        dst[base + t * token_stride + h * head_stride + d] = src[(t * heads + h) * dim + d];
      }
    }
  }
}

void UploadPrefill(const PrefillProblem& p, PrefillDevice& d) {
  const PrefillCase& c = p.c;
  const int64_t tq = p.cu_q.back(), tk = p.cu_k.back();
  MlaPrefillParams& m = d.params;
  if (!c.strided) {
    ASSERT_CUDA_OK(Upload(ToBf16(p.q), d.q));
    ASSERT_CUDA_OK(Upload(ToBf16(p.k), d.kv));
    ASSERT_CUDA_OK(Upload(ToBf16(p.v), d.v));
    m.q = d.q.get();
    m.k = d.kv.get();
    m.v = d.v.get();
    m.q_head_stride = c.dqk;
    m.q_token_stride = int64_t{c.heads} * c.dqk;
    m.k_head_stride = c.dqk;
    m.k_token_stride = int64_t{c.heads} * c.dqk;
    m.v_head_stride = c.dv;
    m.v_token_stride = int64_t{c.heads} * c.dv;
  } else {
    // q: heads padded by 16, tokens by 8 more; k and v interleaved per head like kv_b_proj's
    // output ([k (Dqk) | v (Dv)] per head), tokens padded by 8.
    m.q_head_stride = c.dqk + 16;
    m.q_token_stride = c.heads * m.q_head_stride + 8;
    std::vector<double> qw(static_cast<size_t>(std::max<int64_t>(tq, 1) * m.q_token_stride), kNaN);
    Scatter(p.q, tq, c.heads, c.dqk, m.q_token_stride, m.q_head_stride, 0, qw);
    m.k_head_stride = m.v_head_stride = c.dqk + c.dv;
    m.k_token_stride = m.v_token_stride = c.heads * m.k_head_stride + 8;
    std::vector<double> kvw(static_cast<size_t>(std::max<int64_t>(tk, 1) * m.k_token_stride), kNaN);
    Scatter(p.k, tk, c.heads, c.dqk, m.k_token_stride, m.k_head_stride, 0, kvw);
    Scatter(p.v, tk, c.heads, c.dv, m.v_token_stride, m.v_head_stride, c.dqk, kvw);
    ASSERT_CUDA_OK(Upload(ToBf16(qw), d.q));
    ASSERT_CUDA_OK(Upload(ToBf16(kvw), d.kv));
    m.q = d.q.get();
    m.k = d.kv.get();
    m.v = d.kv.get() + c.dqk;
  }
  ASSERT_CUDA_OK(Upload(p.cu_q, d.cu_q));
  ASSERT_CUDA_OK(Upload(p.cu_k, d.cu_k));
  ASSERT_CUDA_OK(d.out.Allocate(static_cast<size_t>(std::max<int64_t>(tq, 1)) * c.heads * c.dv));
  ASSERT_CUDA_OK(Poison(d.out));
  m.out = d.out.get();
  m.cu_seqlens_q = d.cu_q.get();
  m.cu_seqlens_k = d.cu_k.get();
  m.num_seqs = static_cast<int>(c.len_q.size());
  m.max_seqlen_q = *std::max_element(c.len_q.begin(), c.len_q.end());
  m.total_q = tq;
  m.num_heads = c.heads;
  m.head_dim_qk = c.dqk;
  m.head_dim_v = c.dv;
  m.scale = static_cast<float>(p.scale);
}

class MlaPrefillTest : public CudaParamTest<PrefillCase> {};

TEST_P(MlaPrefillTest, MatchesFp64Reference) {
  const PrefillProblem p = MakePrefillProblem(GetParam());
  PrefillDevice d;
  ASSERT_NO_FATAL_FAILURE(UploadPrefill(p, d));
  ASSERT_CUDA_OK(LaunchMlaPrefill(d.params, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  std::vector<double> out = DownloadAsDouble(d.out);
  out.resize(static_cast<size_t>(p.cu_q.back()) * p.c.heads * p.c.dv);
  const std::vector<double> ref = PrefillReference(p);
  EXPECT_TRUE(MatchesReference(out, ref, kBf16StateTolerance, kRmsBound))
      << "len_q {" << Join(p.c.len_q) << "} len_k {" << Join(p.c.len_k) << "} cu_q {"
      << Join(std::vector<int>(p.cu_q.begin(), p.cu_q.end()))
      << "}: " << Locate(out, ref, p.c.heads, p.c.dv);
}

std::vector<PrefillCase> PrefillCases() {
  std::vector<PrefillCase> cases;
  uint64_t seed = 1000;
  for (int t : {1, 63, 64, 65, 127, 128, 129, 500}) {
    cases.push_back({"T" + std::to_string(t) + "_H2_D192", {t}, {t}, 2, 192, 128, false, seed++});
  }
  cases.push_back({"T2100_H1_D192", {2100}, {2100}, 1, 192, 128, false, seed++});
  for (int t : {1, 65, 300}) {
    cases.push_back({"T" + std::to_string(t) + "_H4_D48", {t}, {t}, 4, 48, 32, false, seed++});
  }
  // Ragged batches (one empty sequence in the 7).
  cases.push_back({"Batch3_H3_D192", {1, 200, 129}, {1, 200, 129}, 3, 192, 128, false, seed++});
  cases.push_back({"Batch7_H2_D192",
                   {5, 64, 0, 300, 128, 77, 130},
                   {5, 64, 0, 300, 128, 77, 130},
                   2,
                   192,
                   128,
                   false,
                   seed++});
  cases.push_back({"Batch7_H4_D48",
                   {5, 64, 1, 300, 128, 77, 130},
                   {5, 64, 1, 300, 128, 77, 130},
                   4,
                   48,
                   32,
                   false,
                   seed++});
  // Chunked prefill: queries are the last len_q of len_k positions.
  cases.push_back(
      {"Context_H2_D192", {1, 65, 128, 200}, {100, 300, 129, 1000}, 2, 192, 128, false, seed++});
  cases.push_back({"Context_1of3000_H2_D192", {1}, {3000}, 2, 192, 128, false, seed++});
  cases.push_back({"Context_H4_D48", {1, 65, 130}, {64, 66, 700}, 4, 48, 32, false, seed++});
  // The model's head count, and strided views.
  cases.push_back({"T257_H32_D192", {257}, {257}, 32, 192, 128, false, seed++});
  cases.push_back({"Strided_H3_D192", {70, 1, 130}, {70, 40, 300}, 3, 192, 128, true, seed++});
  cases.push_back({"Strided_H4_D48", {70, 129}, {100, 129}, 4, 48, 32, true, seed++});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaPrefillTest, ::testing::ValuesIn(PrefillCases()),
                         [](const ::testing::TestParamInfo<PrefillCase>& info) {
                           return info.param.name;
                         });

class MlaPrefillKernelTest : public CudaTest {};

TEST_F(MlaPrefillKernelTest, RejectsBadArguments) {
  const PrefillProblem p =
      MakePrefillProblem({"bad", {3, 5}, {3, 9}, 2, 192, 128, false, /*seed=*/77});
  PrefillDevice d;
  ASSERT_NO_FATAL_FAILURE(UploadPrefill(p, d));
  const MlaPrefillParams good = d.params;
  ASSERT_CUDA_OK(LaunchMlaPrefill(good, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  MlaPrefillParams bad = good;
  bad.head_dim_qk = 128;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "Dqk 128 with Dv 128";
  bad = good;
  bad.head_dim_v = 192;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "Dv 192";
  bad = good;
  bad.num_seqs = 0;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "no sequences";
  bad = good;
  bad.num_heads = 0;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "no heads";
  bad = good;
  bad.max_seqlen_q = -1;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "negative max_seqlen_q";
  bad = good;
  bad.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "NaN scale";
  bad = good;
  bad.k = nullptr;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "null k";
  bad = good;
  bad.cu_seqlens_k = nullptr;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "null cu_seqlens_k";
  bad = good;
  bad.v = good.v + 1;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "misaligned v";
  bad = good;
  bad.q_token_stride = good.q_token_stride + 4;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "stride % 8 != 0";
  bad = good;
  bad.k_head_stride = -8;
  EXPECT_EQ(LaunchMlaPrefill(bad, stream()), cudaErrorInvalidValue) << "negative stride";
  EXPECT_CUDA_OK(cudaGetLastError());

  // No queries: success without a launch.
  bad = good;
  bad.total_q = 0;
  EXPECT_CUDA_OK(LaunchMlaPrefill(bad, stream()));
}

// =============================================================================================
// Decode
// =============================================================================================

struct DecodeCase {
  std::string name;
  std::vector<int> seq_lens;
  int heads;
  int dc;
  int dr;
  int page_size;
  int num_splits;   // 0: the launcher chooses
  int max_seq_len;  // host bound; 0: the largest of seq_lens
  uint64_t seed;
};

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

// A shuffled page pool. Every cache row no sequence owns (the tail of a last page, unused and
// spare pages) and every unused block-table entry (pointing at a page of NaN) holds NaN, so a
// kernel that reads past seq_lens produces NaN.
struct DecodeProblem {
  DecodeCase c;
  int max_seq_len = 0;
  int max_pages = 0;
  int num_pages = 0;
  std::vector<double> pool;         // [num_pages, page_size, Dc + Dr]
  std::vector<int32_t> table;       // [N, max_pages]
  std::vector<double> q_lat, q_pe;  // [N, H, Dc], [N, H, Dr]
  double scale = 0;
};

// Pages back each sequence's seq_lens (or all of max_seq_len when `pages_for_max_len`, for a
// test that grows the lengths), in shuffled order, plus a NaN page and 3 spare ones.
DecodeProblem MakeDecodeProblem(const DecodeCase& c, bool pages_for_max_len = false) {
  DecodeProblem p;
  p.c = c;
  const int n = static_cast<int>(c.seq_lens.size());
  p.max_seq_len = c.max_seq_len > 0
                      ? c.max_seq_len
                      : std::max(1, *std::max_element(c.seq_lens.begin(), c.seq_lens.end()));
  p.max_pages = (p.max_seq_len + c.page_size - 1) / c.page_size;
  std::vector<int> owned(static_cast<size_t>(n));
  int used = 0;
  for (int b = 0; b < n; ++b) {
    const int len = pages_for_max_len ? p.max_seq_len : c.seq_lens[b];
    owned[b] = (len + c.page_size - 1) / c.page_size;
    used += owned[b];
  }
  p.num_pages = used + 4;
  std::vector<int32_t> ids(static_cast<size_t>(p.num_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(c.seed));
  const int nan_page = ids[used];
  const int row = c.dc + c.dr;
  p.pool.assign(static_cast<size_t>(p.num_pages) * c.page_size * row, kNaN);
  p.table.assign(static_cast<size_t>(n) * p.max_pages, nan_page);
  const std::vector<double> values =
      Bf16Normal(static_cast<size_t>(used) * c.page_size * row, c.seed + 1);
  int next = 0;  // index into ids / values, in page units
  for (int b = 0; b < n; ++b) {
    for (int j = 0; j < owned[b]; ++j, ++next) {
      const int page = ids[next];
      p.table[b * p.max_pages + j] = page;
      std::copy_n(values.begin() + static_cast<int64_t>(next) * c.page_size * row,
                  c.page_size * row,
                  p.pool.begin() + static_cast<int64_t>(page) * c.page_size * row);
    }
  }
  p.q_lat = Bf16Normal(static_cast<size_t>(n) * c.heads * c.dc, c.seed + 2);
  p.q_pe = Bf16Normal(static_cast<size_t>(n) * c.heads * c.dr, c.seed + 3);
  p.scale = 1.0 / std::sqrt(192.0);
  return p;
}

// NaN in the tail rows of each sequence's pages past `seq_lens` (what a real cache may hold).
void PoisonTails(DecodeProblem& p, const std::vector<int>& lens) {
  const int row = p.c.dc + p.c.dr;
  for (size_t b = 0; b < lens.size(); ++b) {
    for (int tok = lens[b]; tok < p.max_pages * p.c.page_size; ++tok) {
      const int page = p.table[b * p.max_pages + tok / p.c.page_size];
      const int64_t at = (static_cast<int64_t>(page) * p.c.page_size + tok % p.c.page_size) * row;
      std::fill_n(p.pool.begin() + at, row, kNaN);
    }
  }
}

// The kernel's contract in fp64: out[b, h] = Σ_τ softmax(scale·(q_lat·c_τ + q_pe·kpe_τ)) c_τ;
// zeros for an empty sequence.
std::vector<double> DecodeReference(const DecodeProblem& p, const std::vector<int>& lens) {
  const DecodeCase& c = p.c;
  const int row = c.dc + c.dr;
  std::vector<double> out(lens.size() * c.heads * c.dc, 0.0);
  for (size_t b = 0; b < lens.size(); ++b) {
    const int len = lens[b];
    std::vector<const double*> rows(static_cast<size_t>(len));
    for (int tok = 0; tok < len; ++tok) {
      const int page = p.table[b * p.max_pages + tok / c.page_size];
      rows[tok] =
          p.pool.data() + (static_cast<int64_t>(page) * c.page_size + tok % c.page_size) * row;
    }
    std::vector<double> s(static_cast<size_t>(len));
    for (int h = 0; h < c.heads; ++h) {
      if (len == 0) continue;
      const double* ql = p.q_lat.data() + (b * c.heads + h) * c.dc;
      const double* qp = p.q_pe.data() + (b * c.heads + h) * c.dr;
      double mx = -INFINITY;
      for (int tok = 0; tok < len; ++tok) {
        double dot = 0;
        for (int i = 0; i < c.dc; ++i) dot += ql[i] * rows[tok][i];
        for (int i = 0; i < c.dr; ++i) dot += qp[i] * rows[tok][c.dc + i];
        s[tok] = dot * p.scale;
        mx = std::max(mx, s[tok]);
      }
      double sum = 0;
      for (int tok = 0; tok < len; ++tok) sum += (s[tok] = std::exp(s[tok] - mx));
      double* o = out.data() + (b * c.heads + h) * c.dc;
      for (int tok = 0; tok < len; ++tok) {
        for (int i = 0; i < c.dc; ++i) o[i] += s[tok] / sum * rows[tok][i];
      }
    }
  }
  return out;
}

struct DecodeDevice {
  DeviceBuffer<bf16> pool, q_lat, q_pe, out;
  DeviceBuffer<int32_t> table, lens;
  DeviceBuffer<unsigned char> workspace;
  MlaDecodeParams params;
};

void UploadDecode(const DecodeProblem& p, const std::vector<int>& lens, DecodeDevice& d) {
  const DecodeCase& c = p.c;
  ASSERT_CUDA_OK(Upload(ToBf16(p.pool), d.pool));
  ASSERT_CUDA_OK(Upload(ToBf16(p.q_lat), d.q_lat));
  ASSERT_CUDA_OK(Upload(ToBf16(p.q_pe), d.q_pe));
  ASSERT_CUDA_OK(Upload(p.table, d.table));
  ASSERT_CUDA_OK(Upload(std::vector<int32_t>(lens.begin(), lens.end()), d.lens));
  ASSERT_CUDA_OK(d.out.Allocate(p.q_lat.size()));
  ASSERT_CUDA_OK(Poison(d.out));
  MlaDecodeParams& m = d.params;
  m.q_latent = d.q_lat.get();
  m.q_pe = d.q_pe.get();
  m.cache_pages = d.pool.get();
  m.block_table = d.table.get();
  m.max_pages_per_seq = p.max_pages;
  m.seq_lens = d.lens.get();
  m.out_latent = d.out.get();
  m.num_seqs = static_cast<int>(lens.size());
  m.num_heads = c.heads;
  m.head_dim_latent = c.dc;
  m.head_dim_rope = c.dr;
  m.page_size = c.page_size;
  m.max_seq_len = p.max_seq_len;
  m.scale = static_cast<float>(p.scale);
  m.num_pages = p.num_pages;
  m.num_splits = c.num_splits;
  const size_t bytes = MlaDecodeWorkspaceBytes(m);
  ASSERT_GT(MlaDecodeNumSplits(m), 0) << "unsupported decode shape";
  ASSERT_CUDA_OK(d.workspace.Allocate(bytes));
  if (bytes > 0) ASSERT_CUDA_OK(Poison(d.workspace));
}

::testing::AssertionResult DecodeMatches(const DecodeProblem& p, const std::vector<int>& lens,
                                         const DecodeDevice& d) {
  const std::vector<double> out = DownloadAsDouble(d.out);
  const std::vector<double> ref = DecodeReference(p, lens);
  ::testing::AssertionResult r = MatchesReference(out, ref, kBf16StateTolerance, kRmsBound);
  if (!r) {
    r << "; seq_lens {" << Join(lens) << "}, splits " << MlaDecodeNumSplits(d.params)
      << ", page size " << p.c.page_size << ": " << Locate(out, ref, p.c.heads, p.c.dc)
      << " (row = sequence)";
  }
  return r;
}

class MlaDecodeTest : public CudaParamTest<DecodeCase> {};

TEST_P(MlaDecodeTest, MatchesContractReference) {
  DecodeProblem p = MakeDecodeProblem(GetParam());
  PoisonTails(p, p.c.seq_lens);
  DecodeDevice d;
  ASSERT_NO_FATAL_FAILURE(UploadDecode(p, p.c.seq_lens, d));
  ASSERT_CUDA_OK(LaunchMlaDecode(d.params, d.workspace.get(), d.workspace.bytes(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
  EXPECT_TRUE(DecodeMatches(p, p.c.seq_lens, d));
}

std::vector<DecodeCase> DecodeCases() {
  std::vector<DecodeCase> cases;
  uint64_t seed = 5000;
  // One sequence, the model dims, every page size, lengths around tiles and pages; automatic
  // splits.
  for (int ps : {16, 64, 256}) {
    for (int len : {1, 31, 32, 33, 63, 64, 65, 127, 500, 3000}) {
      cases.push_back({"L" + std::to_string(len) + "_P" + std::to_string(ps) + "_H32",
                       {len},
                       32,
                       512,
                       64,
                       ps,
                       0,
                       0,
                       seed++});
    }
  }
  // Batches.
  cases.push_back({"B3_P64_H32", {1000, 1, 129}, 32, 512, 64, 64, 0, 0, seed++});
  std::vector<int> b19;
  for (int i = 0; i < 19; ++i) b19.push_back(1 + (i * 97) % 700);
  cases.push_back({"B19_P16_H32", b19, 32, 512, 64, 16, 0, 0, seed++});
  cases.push_back({"B19_P64_H16", b19, 16, 512, 64, 64, 0, 0, seed++});
  // One split writes the output directly; many forced splits leave some empty (len 100 over 8
  // splits: two of 64 tokens, the last 6 empty); an empty sequence gets zeros either way.
  cases.push_back({"Split1_B3_H32", {700, 0, 33}, 32, 512, 64, 64, 1, 0, seed++});
  cases.push_back({"Split8_EmptySplits_H32", {100, 0, 5, 257}, 32, 512, 64, 64, 8, 0, seed++});
  cases.push_back({"Split1000_H32", {3000}, 32, 512, 64, 64, 1000, 0, seed++});
  // A host bound far above the actual lengths (a graph captured for long contexts).
  cases.push_back({"MaxLen64K_B3_H32", {1, 300, 64}, 32, 512, 64, 64, 0, 65536, seed++});
  // Head counts: 16 (one MMA row tile), 40 (two head groups, the second partial), 1.
  cases.push_back({"L300_P64_H40", {300, 77}, 40, 512, 64, 64, 0, 0, seed++});
  cases.push_back({"L300_P64_H1", {300, 77}, 1, 512, 64, 64, 0, 0, seed++});
  // The mid preset (Dc 256, H 8) and the tiny preset (Dc 64, Dr 16, H 4), each also with more
  // than 16 heads (the two-tile variants), automatic and forced split counts.
  for (int heads : {8, 24}) {
    const std::string h = "_H" + std::to_string(heads);
    cases.push_back({"Mid" + h, {1, 65, 500}, heads, 256, 64, 64, 0, 0, seed++});
    cases.push_back({"Mid" + h + "_Split1_P16", {1, 65, 500}, heads, 256, 64, 16, 1, 0, seed++});
  }
  for (int heads : {4, 20}) {
    const std::string h = "_H" + std::to_string(heads);
    cases.push_back({"Tiny" + h, {1, 65, 500}, heads, 64, 16, 16, 0, 0, seed++});
    cases.push_back({"Tiny" + h + "_Split5_P256", {1, 65, 500}, heads, 64, 16, 256, 5, 0, seed++});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaDecodeTest, ::testing::ValuesIn(DecodeCases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& info) {
                           return info.param.name;
                         });

class MlaDecodeKernelTest : public CudaTest {};

// Captured once with host sizes for contexts up to 4096; seq_lens then change on the device
// (longer, shorter, empty) between replays, and each replay matches the reference.
TEST_F(MlaDecodeKernelTest, GraphReplayFollowsDeviceSeqLens) {
  const DecodeCase c{"graph", {100, 1000, 4000}, 32, 512, 64, 64, 0, 4096, 9000};
  // Pages for all 4096 positions; no tail poisoning: the lengths change below.
  const DecodeProblem p = MakeDecodeProblem(c, /*pages_for_max_len=*/true);
  DecodeDevice d;
  ASSERT_NO_FATAL_FAILURE(UploadDecode(p, c.seq_lens, d));
  ASSERT_GT(MlaDecodeNumSplits(d.params), 1) << "the test needs the combine path";
  // One eager call configures the kernels; the capture then makes no attribute calls.
  ASSERT_CUDA_OK(LaunchMlaDecode(d.params, d.workspace.get(), d.workspace.bytes(), stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  cudaStream_t capture = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
  const cudaError_t launch =
      LaunchMlaDecode(d.params, d.workspace.get(), d.workspace.bytes(), capture);
  ASSERT_CUDA_OK(cudaStreamEndCapture(capture, &graph));
  ASSERT_CUDA_OK(launch);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  for (const std::vector<int>& lens :
       std::vector<std::vector<int>>{{100, 1000, 4000}, {4096, 1, 0}, {33, 4095, 64}, {0, 0, 0}}) {
    ASSERT_CUDA_OK(Poison(d.out));
    const std::vector<int32_t> lens32(lens.begin(), lens.end());
    ASSERT_CUDA_OK(cudaMemcpyAsync(d.lens.get(), lens32.data(), lens32.size() * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, capture));
    ASSERT_CUDA_OK(cudaGraphLaunch(exec, capture));
    ASSERT_CUDA_OK(cudaStreamSynchronize(capture));
    EXPECT_TRUE(DecodeMatches(p, lens, d)) << "replay with seq_lens {" << Join(lens) << "}";
  }
  ASSERT_CUDA_OK(cudaGraphExecDestroy(exec));
  ASSERT_CUDA_OK(cudaGraphDestroy(graph));
  ASSERT_CUDA_OK(cudaStreamDestroy(capture));
}

// The absorbed decode composed with host-side W_UK / W_UV products equals the non-split
// reference MlaDecodeAbsorbedReference (which never rounds q_lat). The kernel sees q_lat rounded
// to bf16, as the engine produces it; that rounding moves the scores by ~1e-3 relative, so this
// check bounds the RMS error at 1e-2 (the element-wise bf16 table is unchanged).
TEST_F(MlaDecodeKernelTest, ComposesToAbsorbedReference) {
  struct Dims {
    int heads, dn, dr, dc, dv;
  };
  for (const Dims& dims : {Dims{32, 128, 64, 512, 128}, Dims{4, 32, 16, 64, 32}}) {
    SCOPED_TRACE("H " + std::to_string(dims.heads) + " Dc " + std::to_string(dims.dc));
    const std::vector<int> lens = {1, 77, 700};
    DecodeCase c{"e2e", lens, dims.heads, dims.dc, dims.dr, 64, 0, 0, 9100};
    DecodeProblem p = MakeDecodeProblem(c);
    PoisonTails(p, lens);
    const int n = static_cast<int>(lens.size());
    const int64_t head_rows = dims.dn + dims.dv;
    const std::vector<double> q_nope =
        Bf16Normal(static_cast<size_t>(n) * dims.heads * dims.dn, 9101);
    std::vector<double> kv_b = Bf16Normal(static_cast<size_t>(dims.heads) * head_rows * dims.dc,
                                          9102, 0.0, 1.0 / std::sqrt(static_cast<double>(dims.dc)));
    // q_lat = W_UK^hᵀ q_nope^h, rounded to bf16.
    for (int b = 0; b < n; ++b) {
      for (int h = 0; h < dims.heads; ++h) {
        for (int i = 0; i < dims.dc; ++i) {
          double acc = 0;
          for (int j = 0; j < dims.dn; ++j) {
            acc += q_nope[(b * dims.heads + h) * dims.dn + j] *
                   kv_b[(h * head_rows + j) * dims.dc + i];
          }
          p.q_lat[(b * dims.heads + h) * dims.dc + i] = ::kls::testing::RoundToBf16(acc);
        }
      }
    }
    DecodeDevice d;
    ASSERT_NO_FATAL_FAILURE(UploadDecode(p, lens, d));
    ASSERT_CUDA_OK(LaunchMlaDecode(d.params, d.workspace.get(), d.workspace.bytes(), stream()));
    ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));
    const std::vector<double> lat = DownloadAsDouble(d.out);

    std::vector<double> got(static_cast<size_t>(n) * dims.heads * dims.dv);
    std::vector<double> want(got.size());
    for (int b = 0; b < n; ++b) {
      // o^h = W_UV^h · out_latent^h.
      for (int h = 0; h < dims.heads; ++h) {
        for (int v = 0; v < dims.dv; ++v) {
          double acc = 0;
          for (int i = 0; i < dims.dc; ++i) {
            acc += kv_b[(h * head_rows + dims.dn + v) * dims.dc + i] *
                   lat[(b * dims.heads + h) * dims.dc + i];
          }
          got[(b * dims.heads + h) * dims.dv + v] = acc;
        }
      }
      // The reference over a contiguous copy of this sequence's cache rows.
      const int row = dims.dc + dims.dr;
      std::vector<double> cache(static_cast<size_t>(lens[b]) * row);
      for (int tok = 0; tok < lens[b]; ++tok) {
        const int page = p.table[b * p.max_pages + tok / c.page_size];
        std::copy_n(
            p.pool.begin() + (static_cast<int64_t>(page) * c.page_size + tok % c.page_size) * row,
            row, cache.begin() + static_cast<int64_t>(tok) * row);
      }
      MlaDecodeAbsorbedReference<double>(
          q_nope.data() + b * dims.heads * dims.dn, p.q_pe.data() + b * dims.heads * dims.dr,
          cache.data(), kv_b.data(), 1, lens[b], dims.heads, dims.dn, dims.dr, dims.dc, dims.dv,
          p.scale, want.data() + b * dims.heads * dims.dv);
    }
    EXPECT_TRUE(MatchesReference(got, want, kBf16StateTolerance, 1e-2))
        << Locate(got, want, dims.heads, dims.dv);
  }
}

TEST_F(MlaDecodeKernelTest, SplitCountFillsTheGpuAndSizesTheWorkspace) {
  int device = 0, sms = 0;
  ASSERT_CUDA_OK(cudaGetDevice(&device));
  ASSERT_CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MlaDecodeParams m;
  m.num_seqs = 1;
  m.num_heads = 32;
  m.head_dim_latent = 512;
  m.head_dim_rope = 64;
  m.page_size = 64;
  m.max_pages_per_seq = 2048;
  m.num_pages = 2048;
  m.max_seq_len = 131072;
  m.scale = 0.07f;
  const int splits = MlaDecodeNumSplits(m);
  EXPECT_GE(splits, sms * 9 / 10) << "B = 1, L = 128K must fill the GPU";
  EXPECT_LE(splits, 1024);
  EXPECT_EQ(MlaDecodeWorkspaceBytes(m),
            static_cast<size_t>(32) * splits * 512 * 4 + ((32 * splits * 4 + 255) / 256) * 256)
      << "partials [N, H, splits, Dc] fp32 + lse [N, H, splits]";
  m.num_splits = 1;
  EXPECT_EQ(MlaDecodeNumSplits(m), 1);
  EXPECT_EQ(MlaDecodeWorkspaceBytes(m), 0u) << "one split needs no workspace";
  m.num_splits = 0;
  m.max_seq_len = 0;
  EXPECT_EQ(MlaDecodeNumSplits(m), 1) << "an empty cache needs one split";
  m.head_dim_latent = 384;
  EXPECT_EQ(MlaDecodeNumSplits(m), 0) << "unsupported dims";
  EXPECT_EQ(MlaDecodeWorkspaceBytes(m), 0u);
}

TEST_F(MlaDecodeKernelTest, RejectsBadArguments) {
  const DecodeCase c{"bad", {100, 7}, 32, 512, 64, 64, 4, 0, 9200};
  const DecodeProblem p = MakeDecodeProblem(c);
  DecodeDevice d;
  ASSERT_NO_FATAL_FAILURE(UploadDecode(p, c.seq_lens, d));
  const MlaDecodeParams good = d.params;
  void* ws = d.workspace.get();
  const size_t bytes = d.workspace.bytes();
  ASSERT_CUDA_OK(LaunchMlaDecode(good, ws, bytes, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  const auto expect_invalid = [&](const MlaDecodeParams& bad, const char* what) {
    EXPECT_EQ(LaunchMlaDecode(bad, ws, bytes, stream()), cudaErrorInvalidValue) << what;
  };
  MlaDecodeParams bad = good;
  bad.head_dim_latent = 128;
  expect_invalid(bad, "Dc 128");
  bad = good;
  bad.head_dim_rope = 32;
  expect_invalid(bad, "Dr 32 with Dc 512");
  for (int ps : {0, 8, 24, 272}) {
    bad = good;
    bad.page_size = ps;
    expect_invalid(bad, ("page size " + std::to_string(ps)).c_str());
  }
  bad = good;
  bad.num_seqs = 0;
  expect_invalid(bad, "no sequences");
  bad = good;
  bad.num_heads = 0;
  expect_invalid(bad, "no heads");
  bad = good;
  bad.max_seq_len = -1;
  expect_invalid(bad, "negative max_seq_len");
  bad = good;
  bad.max_pages_per_seq = 0;
  expect_invalid(bad, "no pages per sequence");
  bad = good;
  bad.num_pages = 0;
  expect_invalid(bad, "empty pool");
  bad = good;
  bad.num_pages = (int64_t{1} << 31) / good.page_size;  // 2^31 rows: beyond the TMA's int32 rows
  expect_invalid(bad, "pool of 2^31 rows");
  bad = good;
  bad.num_splits = 1025;
  expect_invalid(bad, "1025 splits");
  bad = good;
  bad.num_splits = -1;
  expect_invalid(bad, "negative splits");
  bad = good;
  bad.scale = INFINITY;
  expect_invalid(bad, "infinite scale");
  bad = good;
  bad.block_table = nullptr;
  expect_invalid(bad, "null block table");
  bad = good;
  bad.seq_lens = nullptr;
  expect_invalid(bad, "null seq_lens");
  bad = good;
  bad.cache_pages = good.cache_pages + 4;
  expect_invalid(bad, "misaligned cache");
  EXPECT_EQ(LaunchMlaDecode(good, nullptr, bytes, stream()), cudaErrorInvalidValue)
      << "null workspace";
  EXPECT_EQ(LaunchMlaDecode(good, ws, bytes - 1, stream()), cudaErrorInvalidValue)
      << "short workspace";
  EXPECT_CUDA_OK(cudaGetLastError());
}

// =============================================================================================
// Cache append
// =============================================================================================

TEST_F(MlaDecodeKernelTest, CacheAppendWritesExactlyTheAddressedRows) {
  constexpr int kRow = 576, kStride = 576 + 64, kPageSize = 16, kMaxPages = 8, kPages = 48;
  // Sequences: 3 tokens at 0; 40 tokens at 70 (crossing pages); none; 2 tokens at 127 (the
  // second falls past max_pages·page_size = 128 and is dropped); 1 token whose page id is
  // outside the pool (dropped); 1 token at a negative position (dropped).
  const std::vector<int32_t> starts = {0, 70, 5, 127, 0, -1};
  const std::vector<int32_t> cu = {0, 3, 43, 43, 45, 46, 47};
  const int n = static_cast<int>(starts.size());
  std::vector<int32_t> ids(kPages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(77));
  std::vector<int32_t> table(static_cast<size_t>(n) * kMaxPages);
  for (int i = 0; i < n * kMaxPages; ++i) table[i] = ids[i % kPages];
  for (int j = 0; j < kMaxPages; ++j) table[4 * kMaxPages + j] = kPages + 3;  // outside the pool

  const std::vector<double> pool = Bf16Normal(static_cast<size_t>(kPages) * kPageSize * kRow, 1);
  const std::vector<double> rows = Bf16Normal(static_cast<size_t>(cu.back()) * kStride, 2);
  DeviceBuffer<bf16> d_pool, d_rows;
  DeviceBuffer<int32_t> d_table, d_starts, d_cu;
  ASSERT_CUDA_OK(Upload(ToBf16(pool), d_pool));
  ASSERT_CUDA_OK(Upload(ToBf16(rows), d_rows));
  ASSERT_CUDA_OK(Upload(table, d_table));
  ASSERT_CUDA_OK(Upload(starts, d_starts));
  ASSERT_CUDA_OK(Upload(cu, d_cu));
  MlaCacheAppendParams m;
  m.rows = d_rows.get();
  m.row_stride = kStride;
  m.cache_pages = d_pool.get();
  m.num_pages = kPages;
  m.block_table = d_table.get();
  m.max_pages_per_seq = kMaxPages;
  m.seq_starts = d_starts.get();
  m.cu_seqlens = d_cu.get();
  m.num_seqs = n;
  m.total_new = cu.back();
  m.row_dim = kRow;
  m.page_size = kPageSize;
  ASSERT_CUDA_OK(LaunchMlaCacheAppend(m, stream()));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream()));

  std::vector<double> want = pool;
  int written = 0;
  for (int s = 0; s < n; ++s) {
    for (int i = 0; i < cu[s + 1] - cu[s]; ++i) {
      const int pos = starts[s] + i;
      if (pos < 0 || pos >= kMaxPages * kPageSize) continue;
      const int page = table[s * kMaxPages + pos / kPageSize];
      if (page < 0 || page >= kPages) continue;
      std::copy_n(rows.begin() + static_cast<int64_t>(cu[s] + i) * kStride, kRow,
                  want.begin() + (static_cast<int64_t>(page) * kPageSize + pos % kPageSize) * kRow);
      ++written;
    }
  }
  ASSERT_EQ(written, 44);
  const std::vector<double> got = DownloadAsDouble(d_pool);
  ASSERT_EQ(got.size(), want.size());
  int64_t diffs = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++diffs;
    }
  }
  EXPECT_EQ(diffs, 0) << "first differing element " << first << " (page "
                      << first / kRow / kPageSize << ", row " << (first / kRow) % kPageSize << ")";

  // Bad arguments.
  MlaCacheAppendParams bad = m;
  bad.row_dim = 572;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "row_dim % 8";
  bad = m;
  bad.row_stride = 568;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "stride < row_dim";
  bad = m;
  bad.page_size = 0;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "page size 0";
  bad = m;
  bad.num_seqs = 0;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "no sequences";
  bad = m;
  bad.rows = m.rows + 4;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "misaligned rows";
  bad = m;
  bad.block_table = nullptr;
  EXPECT_EQ(LaunchMlaCacheAppend(bad, stream()), cudaErrorInvalidValue) << "null table";
  EXPECT_CUDA_OK(cudaGetLastError());
}

}  // namespace
}  // namespace kls::kernels
