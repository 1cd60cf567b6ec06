// Per-token pieces of the streamed softmax-Fisher contractions (docs/design.md §3).
// Header-only, shared by the CPU driver and the CUDA kernels (the
// FF_HOST_DEVICE pieces: exp_nonpos, weight, Merge, merge_normalizer).
//
// One token b, one V-chunk of logits z_c (plus bias) and projections
// y_c = Uᵀw_c ∈ R^k:
//   chunk moments   m_c = max z,  e = exp(z − m_c),  l_c = Σ e,  ȳ_c = Σ e y / l_c,
//                   ŷ = y − ȳ_c  (centered within the chunk: no cancellation);
//   running merge   (Chan's parallel update, rescaled as in flash attention)
//                   m′ = max(m, m_c),  a = e^{m−m′},  β = e^{m_c−m′},
//                   L = a·l + β·l_c,  w = β·l_c / L,  κ = a·l·w,
//                   M ← a·M + β·M_c + κ·δx δyᵀ,  x̄ ← x̄ + w·δx,  ȳ ← ȳ + w·δy,
//                   δx = x̄_c − x̄, δy = ȳ_c − ȳ (x = w_v for matmat, y for quad).
// A NaN anywhere poisons m (and so the normalizer): the Python driver reports
// it. Offsets are int64 so V·B > 2^31 is safe.
//
// Accuracy: every sum over the chunk runs in blocks of kBlock logits (a
// vectorized float sum, ≤ kBlock/16 terms per lane) whose totals are added
// in double, so a float32 chunk of any length keeps a few ulp of error
// (plain float sums over 16 lanes of 3,000+ terms each lost 1e-5 – 1e-4 of
// the normalizer on real heads). The running state merged across chunks
// (m, l, ȳ, μ, M) is double whatever T: merged in T, a float32 state took
// one rounding per chunk, so short chunks (V/C merges) lost up to 1.7e-4 of
// lse on real heads; in double the merge adds nothing at float32 accuracy.
//
// Soft-capping (optional s, the per-logit factor 1 − tanh²(z/c) of capped
// logits z′ = c·tanh(z/c), given with z′ by the driver): the rows become
// w̃ = s w and the projections ỹ = s y (the driver scales Y), so matmat's
// GEMM rows are [e s ŷ | e s] and t_c stays Σ e ŷ.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fisherfast/common.h"

namespace fisherfast {
namespace softmax_fisher {

using std::int64_t;

// e^x for x ≤ 0 (or −inf / NaN), vectorizable: 2^t, t = x·log2 e, split as
// n + f (n = round t, |f| ≤ ½), 2^f = e^{f ln 2} by its degree-7 Taylor
// polynomial (truncation < 1.2e-9 relative), 2^n through the exponent bits.
// Relative error ≤ 3 ulp; e^x = 0 below −87.3 (the float32 normal range).
FF_HOST_DEVICE inline float exp_nonpos(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 0.f ? 0.f : x);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5·2^23 trick)
  const float g = (t - n) * 0.693147180559945309f;
  float p = 1.f / 5040.f;
  p = p * g + 1.f / 720.f;
  p = p * g + 1.f / 120.f;
  p = p * g + 1.f / 24.f;
  p = p * g + 1.f / 6.f;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
#endif
  const float r = p * scale;
  return x != x ? x : (x < -87.3f ? 0.f : r);
}
FF_HOST_DEVICE inline double exp_nonpos(double x) { return std::exp(x); }

// Weight of a logit relative to the chunk max m; an all −inf chunk (every
// logit masked) has m = −inf and contributes nothing.
template <typename T>
FF_HOST_DEVICE inline T weight(T z, T m) {
  return m == -INFINITY ? T(0) : exp_nonpos(z - m);
}

// Running softmax normalizer and the merge weights of one chunk.
template <typename T>
struct Merge {
  T a, beta, w, kappa;
};

// Merges the chunk's (m_c, l_c) into the running (m, l) in place and returns
// the weights of the update above. NaN in either propagates to m.
template <typename T>
FF_HOST_DEVICE inline Merge<T> merge_normalizer(T& m, T& l, T m_c, T l_c) {
  if (m != m || m_c != m_c) {
    m = NAN;
    l = NAN;
    return {T(NAN), T(NAN), T(NAN), T(NAN)};
  }
  const T m_new = m > m_c ? m : m_c;
  if (m_new == -INFINITY) return {T(0), T(0), T(0), T(0)};  // nothing seen yet
  const T a = m == -INFINITY ? T(0) : exp_nonpos(m - m_new);
  const T beta = m_c == -INFINITY ? T(0) : exp_nonpos(m_c - m_new);
  const T la = a * l, lb = beta * l_c, L = la + lb;
  const T w = L > 0 ? lb / L : T(0);
  m = m_new;
  l = L;
  return {a, beta, w, la * w};
}

// z_c + b_c into zb (C), returns max (NaN if any is NaN).
template <typename T>
inline T shifted_max(const T* z, const T* bias, int64_t C, T* zb) {
  T m = -INFINITY;
  int nan = 0;
  if (bias) {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t c = 0; c < C; ++c) {
      const T v = z[c] + bias[c];
      zb[c] = v;
      m = v > m ? v : m;
      nan |= v != v;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t c = 0; c < C; ++c) {
      zb[c] = z[c];
      m = z[c] > m ? z[c] : m;
      nan |= z[c] != z[c];
    }
  }
  return nan ? T(NAN) : m;
}

// Logits per block of a blocked sum: 16 float lanes × 16 terms.
constexpr int64_t kBlock = 256;

// e = exp(z − m) in place over zb, returns l = Σ e (blocked, double total).
template <typename T>
inline T exp_sum(T* zb, int64_t C, T m) {
  if (m == -INFINITY || m != m) {
    for (int64_t c = 0; c < C; ++c) zb[c] = m != m ? m : T(0);
    return m != m ? m : T(0);
  }
  double l = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
    T part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t c = c0; c < c1; ++c) {
      const T e = exp_nonpos(zb[c] - m);
      zb[c] = e;
      part += e;
    }
    l += part;
  }
  return T(l);
}

// Σ_c x[c]·y[c] (y null: Σ x), blocked with a double total.
template <typename T>
inline double blocked_dot(const T* x, const T* y, int64_t C) {
  double total = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
    T part = 0;
    if (y) {
#pragma omp simd reduction(+ : part)
      for (int64_t c = c0; c < c1; ++c) part += x[c] * y[c];
    } else {
#pragma omp simd reduction(+ : part)
      for (int64_t c = c0; c < c1; ++c) part += x[c];
    }
    total += part;
  }
  return total;
}

// lm_logsumexp: merge one chunk of one token into the double (m, l). zb: C scratch.
template <typename T>
inline void lse_token(const T* z, const T* bias, int64_t C, T* zb, double& m, double& l) {
  const T m_c = shifted_max(z, bias, C, zb);
  const T l_c = exp_sum(zb, C, m_c);
  merge_normalizer(m, l, double(m_c), double(l_c));
}

// ȳ_c[j] = Σ e y_j / l_c for the k rows y_j = Y + j·ysj.
template <typename T>
inline void chunk_mean(const T* e, const T* Y, int64_t ysj, int64_t C, int64_t k, T l_c, T* ybar_c) {
  const double inv = l_c > 0 ? 1.0 / double(l_c) : 0.0;
  for (int64_t j = 0; j < k; ++j) ybar_c[j] = T(blocked_dot(e, Y + j * ysj, C) * inv);
}

// matmat, chunk half: X (k+1 rows of C) = [e ⊙ (y_j − ȳ_c,j) | e] (one GEMM
// X W_c then gives Σ e ŷ wᵀ and Σ e wᵀ), t_c[j] = Σ e ŷ_j (0 up to rounding),
// m_c, l_c, ȳ_c. With S (soft-capping): X = [e s ŷ | e s], t_c as before.
template <typename T>
inline void matmat_token_chunk(const T* z, const T* bias, const T* S, const T* Y, int64_t ysj, int64_t C, int64_t k,
                               T* X, T& m_c, T& l_c, T* ybar_c, T* t_c) {
  T* e = X + k * C;
  m_c = shifted_max(z, bias, C, e);
  l_c = exp_sum(e, C, m_c);
  chunk_mean(e, Y, ysj, C, k, l_c, ybar_c);
  for (int64_t j = 0; j < k; ++j) {
    const T* y = Y + j * ysj;
    T* x = X + j * C;
    const T yb = ybar_c[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) x[c] = e[c] * (y[c] - yb);
    t_c[j] = T(blocked_dot(x, static_cast<const T*>(nullptr), C));
    if (S) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) x[c] *= S[c];
    }
  }
  if (S) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) e[c] *= S[c];
  }
}

// matmat, merge half: A (k+1 rows of d) = X W_c; the chunk's centered
// cross-moment M_c = A_{:k}ᵀ − μ_c t_cᵀ (d×k) with μ_c = A_k / l_c, merged
// into the running double (m, l, μ, ȳ, M (d×k)).
template <typename T>
inline void matmat_token_merge(const T* A, int64_t d, int64_t k, T m_c, T l_c, const T* ybar_c, const T* t_c,
                               double& m, double& l, double* mu, double* ybar, double* M) {
  const Merge<double> g = merge_normalizer(m, l, double(m_c), double(l_c));
  const double inv = l_c > 0 ? 1.0 / double(l_c) : 0.0;
  const T* s = A + k * d;
  for (int64_t i = 0; i < d; ++i) {
    const double mu_c = s[i] * inv;
    const double dmu = mu_c - mu[i];
    double* Mi = M + i * k;
    for (int64_t j = 0; j < k; ++j) {
      const double Mc = A[j * d + i] - mu_c * t_c[j];
      const double dy = ybar_c[j] - ybar[j];
      // β = 0 (masked chunk): its M_c is finite (A = 0), 0·M_c = 0.
      Mi[j] = g.a * Mi[j] + g.beta * Mc + g.kappa * dmu * dy;
    }
    mu[i] += g.w * dmu;
  }
  for (int64_t j = 0; j < k; ++j) ybar[j] += g.w * (ybar_c[j] - ybar[j]);
}

// Scratch of quad_token: ŷ (k rows of C), e (C), then, 64-byte aligned (a
// vector store that splits a cache line costs several times one that does
// not), 16-lane partial sums of the k(k+1)/2 pair products and one 16-lane
// tile of e ŷ_i.
constexpr int64_t kLanes = 16;
constexpr int64_t kQuadBlock = 1024;  // columns per blocked sum of quad's lanes (64 terms a lane)
inline int64_t quad_scratch(int64_t C, int64_t k) { return (k + 1) * C + (k * (k + 1) / 2 + 2) * kLanes; }
inline int64_t quad_totals(int64_t k) { return k * (k + 1) / 2 * kLanes; }

template <typename T>
inline T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(p) + 63) & ~std::uintptr_t(63));
}

// quad: one chunk of one token, merged into the double (m, l, ȳ, M (k×k)); M_c =
// Σ e ŷ ŷᵀ is summed 16 columns at a time into 16-lane partial sums (one
// vector FMA per pair and tile, the tile in L1), added into double totals
// every kBlock columns (blocked sum) and reduced at the end.
template <typename T>
inline void quad_token(const T* z, const T* bias, const T* Y, int64_t ysj, int64_t C, int64_t k, T* scratch,
                       double* tot, T* ybar_c, double& m, double& l, double* ybar, double* M) {
  T* e = scratch + k * C;
  T* acc = align64(e + C);
  T* ey = acc + k * (k + 1) / 2 * kLanes;
  const T m_c = shifted_max(z, bias, C, e);
  const T l_c = exp_sum(e, C, m_c);
  chunk_mean(e, Y, ysj, C, k, l_c, ybar_c);
  for (int64_t j = 0; j < k; ++j) {
    const T* y = Y + j * ysj;
    T* yh = scratch + j * C;
    const T yb = ybar_c[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yh[c] = y[c] - yb;
  }
  const int64_t n_acc = quad_totals(k);
  for (int64_t q = 0; q < n_acc; ++q) acc[q] = 0;
  for (int64_t q = 0; q < n_acc; ++q) tot[q] = 0;
  const int64_t full = C - C % kLanes;
  for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
    if (c0 % kQuadBlock == 0 && c0) {  // blocked sum: the float lanes into the double totals
#pragma omp simd
      for (int64_t q = 0; q < n_acc; ++q) {
        tot[q] += acc[q];
        acc[q] = 0;
      }
    }
    T* a = acc;
    for (int64_t i = 0; i < k; ++i) {
      const T* yi = scratch + i * C + c0;
#pragma omp simd
      for (int64_t cc = 0; cc < kLanes; ++cc) ey[cc] = e[c0 + cc] * yi[cc];
      for (int64_t j = 0; j <= i; ++j, a += kLanes) {
        const T* yj = scratch + j * C + c0;
#pragma omp simd
        for (int64_t cc = 0; cc < kLanes; ++cc) a[cc] += ey[cc] * yj[cc];
      }
    }
  }
  for (int64_t c = full; c < C; ++c) {
    T* a = acc;
    for (int64_t i = 0; i < k; ++i) {
      const T eyi = e[c] * scratch[i * C + c];
      for (int64_t j = 0; j <= i; ++j, a += kLanes) a[c - full] += eyi * scratch[j * C + c];
    }
  }
  for (int64_t q = 0; q < n_acc; ++q) tot[q] += acc[q];
  const Merge<double> g = merge_normalizer(m, l, double(m_c), double(l_c));
  const double* a = tot;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j, a += kLanes) {
      double s = 0;
      for (int64_t cc = 0; cc < kLanes; ++cc) s += a[cc];
      const double cross = g.kappa * (ybar_c[i] - ybar[i]) * (ybar_c[j] - ybar[j]);
      const double v = g.a * M[i * k + j] + g.beta * s + cross;
      M[i * k + j] = v;
      M[j * k + i] = v;
    }
  }
  for (int64_t j = 0; j < k; ++j) ybar[j] += g.w * (ybar_c[j] - ybar[j]);
}

}  // namespace softmax_fisher
}  // namespace fisherfast
