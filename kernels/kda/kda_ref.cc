#include "kernels/kda/kda_ref.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace kls::kernels {
namespace {

// PyTorch/Triton convention: linear above 20, where log1p(exp(x)) == x in fp32 anyway.
double Softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// Head h of a packed [total_tokens, H, D] tensor, addressed by token.
template <typename T>
struct HeadRows {
  const T* base;
  int64_t row_stride;  // H * D

  const T* Row(int64_t token) const { return base + token * row_stride; }
};

template <typename T>
HeadRows<T> Rows(const T* data, int num_heads, int dim, int h) {
  return {data + static_cast<int64_t>(h) * dim, static_cast<int64_t>(num_heads) * dim};
}

// Loads / stores head h of a [H, K, V] state as a K x V fp64 matrix.
template <typename T>
void LoadState(const T* state, int h, int dk, int dv, std::vector<double>& s) {
  const T* src = state + static_cast<int64_t>(h) * dk * dv;
  for (int64_t i = 0; i < static_cast<int64_t>(dk) * dv; ++i) s[i] = static_cast<double>(src[i]);
}

template <typename T>
void StoreState(const std::vector<double>& s, int h, int dk, int dv, T* state) {
  T* dst = state + static_cast<int64_t>(h) * dk * dv;
  for (int64_t i = 0; i < static_cast<int64_t>(dk) * dv; ++i) dst[i] = static_cast<T>(s[i]);
}

// Per-chunk fp64 workspace of the chunked algorithm, sized for a full chunk of C rows.
struct ChunkWorkspace {
  ChunkWorkspace(int c, int bc, int dk, int dv)
      : q(static_cast<size_t>(c) * dk),
        k(static_cast<size_t>(c) * dk),
        v(static_cast<size_t>(c) * dv),
        g_cum(static_cast<size_t>(c) * dk),
        beta(c),
        a(static_cast<size_t>(c) * c),
        p(static_cast<size_t>(c) * c),
        t_inv(static_cast<size_t>(c) * c),
        q_tilde(static_cast<size_t>(bc) * dk),
        k_tilde(static_cast<size_t>(bc) * dk),
        k_hat(static_cast<size_t>(c) * dk),
        w(static_cast<size_t>(c) * dk),
        u(static_cast<size_t>(c) * dv),
        delta(static_cast<size_t>(c) * dv),
        q_gated(dk) {}

  std::vector<double> q, k, v;  // [L, K] (q already scaled), [L, K], [L, V]
  std::vector<double> g_cum;    // [L, K] chunk-local inclusive cumsum G
  std::vector<double> beta;     // [L]
  std::vector<double> a;        // [L, L] strictly lower: beta_r k_r . (exp(G_r - G_c) k_c)
  std::vector<double> p;        // [L, L] lower incl. diagonal: q_r . (exp(G_r - G_c) k_c)
  std::vector<double> t_inv;    // [L, L] (I + A)^-1, unit lower triangular
  std::vector<double> q_tilde;  // [BC, K] anchored factors of row sub-chunk i
  std::vector<double> k_tilde;  // [BC, K]
  std::vector<double> k_hat;    // [L, K] anchored factor of the columns before sub-chunk i
  std::vector<double> w, u;     // [L, K], [L, V]
  std::vector<double> delta;    // [L, V]
  std::vector<double> q_gated;  // [K] one row of Q . exp(G)
};

// A and P (README "Chunked form") of one chunk of `len` rows, built block by block
// over sub-chunks of `bc` rows the way the CUDA kernel tiles them. Every exponent is <= 0.
void IntraChunkInteractions(int len, int bc, int dk, ChunkWorkspace& ws) {
  std::fill(ws.a.begin(), ws.a.begin() + static_cast<size_t>(len) * len, 0.0);
  std::fill(ws.p.begin(), ws.p.begin() + static_cast<size_t>(len) * len, 0.0);
  const auto at = [len](std::vector<double>& m, int r, int c) -> double& {
    return m[static_cast<size_t>(r) * len + c];
  };
  const auto row = [dk](const std::vector<double>& m, int r) {
    return m.data() + static_cast<size_t>(r) * dk;
  };

  for (int i0 = 0; i0 < len; i0 += bc) {
    const int i1 = std::min(i0 + bc, len);

    // Diagonal sub-block: pairwise exp(G_r - G_c) with c <= r only (the c > r half would be
    // exp of a positive number).
    for (int r = i0; r < i1; ++r) {
      const double* k_r = row(ws.k, r);
      const double* q_r = row(ws.q, r);
      const double* g_r = row(ws.g_cum, r);
      for (int c = i0; c <= r; ++c) {
        const double* k_c = row(ws.k, c);
        const double* g_c = row(ws.g_cum, c);
        double sum_a = 0, sum_p = 0;
        for (int d = 0; d < dk; ++d) {
          const double decayed_k = k_c[d] * std::exp(g_r[d] - g_c[d]);
          sum_a += k_r[d] * decayed_k;
          sum_p += q_r[d] * decayed_k;
        }
        if (c < r) at(ws.a, r, c) = ws.beta[r] * sum_a;
        at(ws.p, r, c) = sum_p;
      }
    }
    if (i0 == 0) continue;

    // Off-diagonal sub-blocks (j < i): exp(G_r - G_c) = exp(G_r - G_n) * exp(G_n - G_c) with the
    // anchor n = i0, the first row of sub-chunk i. r >= n > c and G is non-increasing, so both
    // factors are <= 1 and the blocks become plain products of the anchored factors.
    const int n = i0;
    const double* g_n = row(ws.g_cum, n);
    for (int r = i0; r < i1; ++r) {
      const double* g_r = row(ws.g_cum, r);
      double* qt = ws.q_tilde.data() + static_cast<size_t>(r - i0) * dk;
      double* kt = ws.k_tilde.data() + static_cast<size_t>(r - i0) * dk;
      for (int d = 0; d < dk; ++d) {
        const double decay = std::exp(g_r[d] - g_n[d]);
        qt[d] = row(ws.q, r)[d] * decay;
        kt[d] = row(ws.k, r)[d] * decay;
      }
    }
    for (int c = 0; c < n; ++c) {
      const double* g_c = row(ws.g_cum, c);
      double* kh = ws.k_hat.data() + static_cast<size_t>(c) * dk;
      for (int d = 0; d < dk; ++d) kh[d] = row(ws.k, c)[d] * std::exp(g_n[d] - g_c[d]);
    }
    for (int j0 = 0; j0 < i0; j0 += bc) {
      const int j1 = std::min(j0 + bc, i0);
      // Block (i, j): A_ij = Diag(beta_i) K~_i K^_j^T, P_ij = Q~_i K^_j^T.
      for (int r = i0; r < i1; ++r) {
        const double* qt = ws.q_tilde.data() + static_cast<size_t>(r - i0) * dk;
        const double* kt = ws.k_tilde.data() + static_cast<size_t>(r - i0) * dk;
        for (int c = j0; c < j1; ++c) {
          const double* kh = ws.k_hat.data() + static_cast<size_t>(c) * dk;
          double sum_a = 0, sum_p = 0;
          for (int d = 0; d < dk; ++d) {
            sum_a += kt[d] * kh[d];
            sum_p += qt[d] * kh[d];
          }
          at(ws.a, r, c) = ws.beta[r] * sum_a;
          at(ws.p, r, c) = sum_p;
        }
      }
    }
  }
}

// T = (I + A)^-1 by forward substitution; A strictly lower, T unit lower triangular.
void UnitLowerInverse(int len, ChunkWorkspace& ws) {
  const auto a = [&](int r, int c) { return ws.a[static_cast<size_t>(r) * len + c]; };
  const auto t = [&](int r, int c) -> double& {
    return ws.t_inv[static_cast<size_t>(r) * len + c];
  };
  for (int r = 0; r < len; ++r) {
    for (int c = 0; c < r; ++c) {
      double sum = -a(r, c);
      for (int j = c + 1; j < r; ++j) sum -= a(r, j) * t(j, c);
      t(r, c) = sum;
    }
    t(r, r) = 1.0;
    for (int c = r + 1; c < len; ++c) t(r, c) = 0.0;
  }
}

template <typename T>
void ChunkOneHead(const KdaArgs<T>& args, int64_t bos, int64_t eos, int h, int chunk_size,
                  int sub_chunk_size, ChunkWorkspace& ws, std::vector<double>& s) {
  const int dk = args.head_dim_k, dv = args.head_dim_v, nh = args.num_heads;
  const HeadRows<T> q_rows = Rows(args.q, nh, dk, h), k_rows = Rows(args.k, nh, dk, h);
  const HeadRows<T> g_rows = Rows(args.g, nh, dk, h), v_rows = Rows(args.v, nh, dv, h);
  const int64_t out_stride = static_cast<int64_t>(nh) * dv;
  T* out_base = args.out + static_cast<int64_t>(h) * dv;

  for (int64_t cs = bos; cs < eos; cs += chunk_size) {
    const int len = static_cast<int>(std::min<int64_t>(chunk_size, eos - cs));

    // Step 0: load the chunk; G is the inclusive cumsum of g, restarted at the chunk start.
    for (int r = 0; r < len; ++r) {
      const int64_t t = cs + r;
      for (int d = 0; d < dk; ++d) {
        const size_t idx = static_cast<size_t>(r) * dk + d;
        ws.q[idx] = args.scale * static_cast<double>(q_rows.Row(t)[d]);
        ws.k[idx] = static_cast<double>(k_rows.Row(t)[d]);
        const double prev = r == 0 ? 0.0 : ws.g_cum[idx - dk];
        ws.g_cum[idx] = prev + static_cast<double>(g_rows.Row(t)[d]);
      }
      for (int j = 0; j < dv; ++j) {
        ws.v[static_cast<size_t>(r) * dv + j] = static_cast<double>(v_rows.Row(t)[j]);
      }
      ws.beta[r] = static_cast<double>(args.beta[t * nh + h]);
    }

    // Steps 1-3: A, P, T = (I + A)^-1, W = T Diag(beta) (exp(G) . K), U = T Diag(beta) V.
    IntraChunkInteractions(len, sub_chunk_size, dk, ws);
    UnitLowerInverse(len, ws);
    for (int r = 0; r < len; ++r) {
      double* w_r = ws.w.data() + static_cast<size_t>(r) * dk;
      double* u_r = ws.u.data() + static_cast<size_t>(r) * dv;
      std::fill(w_r, w_r + dk, 0.0);
      std::fill(u_r, u_r + dv, 0.0);
      for (int c = 0; c <= r; ++c) {
        const double m = ws.t_inv[static_cast<size_t>(r) * len + c] * ws.beta[c];
        const double* k_c = ws.k.data() + static_cast<size_t>(c) * dk;
        const double* g_c = ws.g_cum.data() + static_cast<size_t>(c) * dk;
        const double* v_c = ws.v.data() + static_cast<size_t>(c) * dv;
        for (int d = 0; d < dk; ++d) w_r[d] += m * std::exp(g_c[d]) * k_c[d];
        for (int j = 0; j < dv; ++j) u_r[j] += m * v_c[j];
      }
    }

    // Step 4: Delta = U - W S.
    for (int r = 0; r < len; ++r) {
      const double* w_r = ws.w.data() + static_cast<size_t>(r) * dk;
      for (int j = 0; j < dv; ++j) {
        double sum = ws.u[static_cast<size_t>(r) * dv + j];
        for (int d = 0; d < dk; ++d) sum -= w_r[d] * s[static_cast<size_t>(d) * dv + j];
        ws.delta[static_cast<size_t>(r) * dv + j] = sum;
      }
    }

    // O = (Q . exp(G)) S + P Delta.
    for (int r = 0; r < len; ++r) {
      const double* q_r = ws.q.data() + static_cast<size_t>(r) * dk;
      const double* g_r = ws.g_cum.data() + static_cast<size_t>(r) * dk;
      for (int d = 0; d < dk; ++d) ws.q_gated[d] = q_r[d] * std::exp(g_r[d]);
      T* o = out_base + (cs + r) * out_stride;
      for (int j = 0; j < dv; ++j) {
        double sum = 0;
        for (int d = 0; d < dk; ++d) sum += ws.q_gated[d] * s[static_cast<size_t>(d) * dv + j];
        for (int c = 0; c <= r; ++c) {
          sum += ws.p[static_cast<size_t>(r) * len + c] * ws.delta[static_cast<size_t>(c) * dv + j];
        }
        o[j] = static_cast<T>(sum);
      }
    }

    // S <- Diag(exp(G_last)) S + (K . exp(G_last - G))^T Delta, G_last = last valid row.
    const double* g_last = ws.g_cum.data() + static_cast<size_t>(len - 1) * dk;
    for (int d = 0; d < dk; ++d) {
      double* s_d = s.data() + static_cast<size_t>(d) * dv;
      const double decay = std::exp(g_last[d]);
      for (int j = 0; j < dv; ++j) s_d[j] *= decay;
      for (int r = 0; r < len; ++r) {
        const size_t rd = static_cast<size_t>(r) * dk + d;
        const double kd = ws.k[rd] * std::exp(g_last[d] - ws.g_cum[rd]);
        const double* delta_r = ws.delta.data() + static_cast<size_t>(r) * dv;
        for (int j = 0; j < dv; ++j) s_d[j] += kd * delta_r[j];
      }
    }
  }
}

// False when there is nothing to do (no sequences or an empty head shape).
template <typename T>
bool HasWork(const KdaArgs<T>& args) {
  return args.num_seqs > 0 && args.num_heads > 0 && args.head_dim_k > 0 && args.head_dim_v > 0;
}

}  // namespace

template <typename T>
void KdaGateReference(const T* f, const T* a_log, const T* dt_bias, int64_t num_tokens,
                      int num_heads, int head_dim, T* g) {
  const int64_t width = static_cast<int64_t>(num_heads) * head_dim;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int h = 0; h < num_heads; ++h) {
      const double rate = std::exp(static_cast<double>(a_log[h]));
      for (int j = 0; j < head_dim; ++j) {
        const int64_t m = static_cast<int64_t>(h) * head_dim + j;
        const double x = static_cast<double>(f[t * width + m]) + static_cast<double>(dt_bias[m]);
        g[t * width + m] = static_cast<T>(-rate * Softplus(x));
      }
    }
  }
}

template <typename T>
void KdaRecurrentReference(const KdaArgs<T>& args) {
  if (!HasWork(args)) return;
  const int nh = args.num_heads, dk = args.head_dim_k, dv = args.head_dim_v;
  std::vector<double> s(static_cast<size_t>(dk) * dv), q(dk), k(dk), p(dv), delta(dv);
  for (int64_t n = 0; n < args.num_seqs; ++n) {
    const int64_t bos = args.cu_seqlens[n], eos = args.cu_seqlens[n + 1];
    for (int h = 0; h < nh; ++h) {
      LoadState(args.states[n], h, dk, dv, s);
      const HeadRows<T> q_rows = Rows(args.q, nh, dk, h), k_rows = Rows(args.k, nh, dk, h);
      const HeadRows<T> g_rows = Rows(args.g, nh, dk, h), v_rows = Rows(args.v, nh, dv, h);
      for (int64_t t = bos; t < eos; ++t) {
        for (int i = 0; i < dk; ++i) {
          q[i] = args.scale * static_cast<double>(q_rows.Row(t)[i]);
          k[i] = static_cast<double>(k_rows.Row(t)[i]);
        }
        // 1. Decay the key rows: S~ = Diag(exp(g_t)) S.
        for (int i = 0; i < dk; ++i) {
          const double alpha = std::exp(static_cast<double>(g_rows.Row(t)[i]));
          for (int j = 0; j < dv; ++j) s[static_cast<size_t>(i) * dv + j] *= alpha;
        }
        // 2-3. p = S~^T k, delta = beta (v - p).
        const double beta = static_cast<double>(args.beta[t * nh + h]);
        std::fill(p.begin(), p.end(), 0.0);
        for (int i = 0; i < dk; ++i) {
          for (int j = 0; j < dv; ++j) p[j] += s[static_cast<size_t>(i) * dv + j] * k[i];
        }
        for (int j = 0; j < dv; ++j) {
          delta[j] = beta * (static_cast<double>(v_rows.Row(t)[j]) - p[j]);
        }
        // 4. S = S~ + k delta^T.
        for (int i = 0; i < dk; ++i) {
          for (int j = 0; j < dv; ++j) s[static_cast<size_t>(i) * dv + j] += k[i] * delta[j];
        }
        // 5. o = S^T (scale q), from the updated state.
        T* o = args.out + (t * nh + h) * dv;
        for (int j = 0; j < dv; ++j) {
          double sum = 0;
          for (int i = 0; i < dk; ++i) sum += s[static_cast<size_t>(i) * dv + j] * q[i];
          o[j] = static_cast<T>(sum);
        }
      }
      StoreState(s, h, dk, dv, args.states[n]);
    }
  }
}

template <typename T>
void KdaChunkReference(const KdaArgs<T>& args, int chunk_size, int sub_chunk_size) {
  if (!HasWork(args)) return;
  const int nh = args.num_heads, dk = args.head_dim_k, dv = args.head_dim_v;
  if (chunk_size < 1 || sub_chunk_size < 1 || chunk_size % sub_chunk_size != 0) {
    // No error channel in this signature: make the misuse loud instead of silently wrong.
    const int64_t total = args.cu_seqlens[args.num_seqs] * nh * dv;
    std::fill(args.out, args.out + total, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  ChunkWorkspace ws(chunk_size, sub_chunk_size, dk, dv);
  std::vector<double> s(static_cast<size_t>(dk) * dv);
  for (int64_t n = 0; n < args.num_seqs; ++n) {
    const int64_t bos = args.cu_seqlens[n], eos = args.cu_seqlens[n + 1];
    for (int h = 0; h < nh; ++h) {
      LoadState(args.states[n], h, dk, dv, s);
      ChunkOneHead(args, bos, eos, h, chunk_size, sub_chunk_size, ws, s);
      StoreState(s, h, dk, dv, args.states[n]);
    }
  }
}

template void KdaGateReference<float>(const float*, const float*, const float*, int64_t, int, int,
                                      float*);
template void KdaGateReference<double>(const double*, const double*, const double*, int64_t, int,
                                       int, double*);
template void KdaRecurrentReference<float>(const KdaArgs<float>&);
template void KdaRecurrentReference<double>(const KdaArgs<double>&);
template void KdaChunkReference<float>(const KdaArgs<float>&, int, int);
template void KdaChunkReference<double>(const KdaArgs<double>&, int, int);

}  // namespace kls::kernels
