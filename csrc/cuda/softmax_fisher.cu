// CUDA kernels of the streamed softmax-Fisher contractions (docs/design.md §3):
// lm_logsumexp and matmat (G U for a shared U, d×k), float32 and float64.
//
// A thread block owns one token and a contiguous range of V (a split); each
// warp takes a row w_v of the range at a time, its lanes split d, and warp
// shuffles reduce the logit z = w·h (+ b) and the projections y_j = w·u_j
// (the logit and W·U come from the same read of the row). Per split:
//   lse:     online max m and normalizer l = Σ e^{z−m} per warp, merged
//            across the block's warps (flash-attention rescaling);
//   matmat:  pass 1 as lse plus s_j = Σ e^{z−m} y_j; pass 2, given the merged
//            (m, log l) and ȳ = s/l, accumulates A_j = Σ p w (y_j − ȳ_j),
//            μ = Σ p w and t_j = Σ p (y_j − ȳ_j) over the split, the lanes
//            owning the d entries (no races: a split's outputs are private).
// The splits are merged by the Python driver, which forms the centered
// G U = A − μ tᵀ (exact for the rounding residual t). No B×V tensor exists;
// offsets are int64. Correctness first: the accumulators of pass 2 live in
// global memory (L2), not in shared memory.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fisherfast/common.h"

namespace py = pybind11;

namespace fisherfast {
namespace {

using std::int64_t;
constexpr int kWarps = 8;
constexpr int kMaxK = 32;  // projection columns per launch (the driver splits wider U)

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (m, l) ← merge with (m2, l2): rescale both to the larger max.
template <typename T>
__device__ inline void merge_ml(T& m, T& l, T m2, T l2, T* s = nullptr, const T* s2 = nullptr, int k = 0) {
  if (isnan(m) || isnan(m2)) {
    m = NAN;
    l = NAN;
    return;
  }
  const T mn = m > m2 ? m : m2;
  if (mn == -INFINITY) return;
  const T a = m == -INFINITY ? T(0) : exp(m - mn);
  const T c = m2 == -INFINITY ? T(0) : exp(m2 - mn);
  l = l * a + l2 * c;
  for (int j = 0; j < k; ++j) s[j] = s[j] * a + s2[j] * c;
  m = mn;
}

// z = w_v·h + b_v and y_j = w_v·u_j, reduced over the warp (all lanes get them).
template <typename T>
__device__ inline T row_dots(const T* __restrict__ Wv, const T* __restrict__ h, const T* __restrict__ U, int64_t D,
                             int k, int lane, T* y) {
  T z = 0;
  T yl[kMaxK];
  for (int j = 0; j < k; ++j) yl[j] = 0;
  for (int64_t i = lane; i < D; i += 32) {
    const T w = Wv[i];
    z += w * h[i];
    for (int j = 0; j < k; ++j) yl[j] += w * U[i * k + j];
  }
  for (int j = 0; j < k; ++j) y[j] = warp_sum(yl[j]);
  return warp_sum(z);
}

// Pass 1 (and lse with k = 0): per (token b, split), (m, l, s_j = Σ e y_j).
template <typename T>
__global__ void stats_kernel(const T* __restrict__ H, const T* __restrict__ W, const T* __restrict__ bias,
                             const T* __restrict__ U, int64_t B, int64_t V, int64_t D, int k, int64_t rows_per_split,
                             T* __restrict__ M_out, T* __restrict__ L_out, T* __restrict__ S_out) {
  const int64_t b = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* h = H + b * D;
  const int64_t v0 = split * rows_per_split;
  const int64_t v1 = v0 + rows_per_split < V ? v0 + rows_per_split : V;
  T m = -INFINITY, l = 0, s[kMaxK], y[kMaxK];
  for (int j = 0; j < k; ++j) s[j] = 0;
  for (int64_t v = v0 + warp; v < v1; v += kWarps) {
    T z = row_dots(W + v * D, h, U, D, k, lane, y);
    if (bias) z += bias[v];
    T one = 1;
    merge_ml(m, l, z, one, s, y, k);
  }
  __shared__ T sm[kWarps], sl[kWarps], ss[kWarps][kMaxK];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
    for (int j = 0; j < k; ++j) ss[warp][j] = s[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    T mb = sm[0], lb = sl[0], sb[kMaxK];
    for (int j = 0; j < k; ++j) sb[j] = ss[0][j];
    for (int w = 1; w < kWarps; ++w) merge_ml(mb, lb, sm[w], sl[w], sb, ss[w], k);
    const int64_t o = split * B + b;
    M_out[o] = mb;
    L_out[o] = lb;
    for (int j = 0; j < k; ++j) S_out[o * k + j] = sb[j];
  }
}

// Pass 2 of matmat: per (token b, split), one warp; lanes own d entries.
// A (splits,B,D,k), Mu (splits,B,D), Tt (splits,B,k), zero-initialized.
template <typename T>
__global__ void matmat_kernel(const T* __restrict__ H, const T* __restrict__ W, const T* __restrict__ bias,
                              const T* __restrict__ U, const T* __restrict__ Mx, const T* __restrict__ LogL,
                              const T* __restrict__ Ybar, int64_t B, int64_t V, int64_t D, int k,
                              int64_t rows_per_split, T* __restrict__ A, T* __restrict__ Mu, T* __restrict__ Tt) {
  const int64_t b = blockIdx.x, split = blockIdx.y;
  const int lane = threadIdx.x;
  const T* h = H + b * D;
  const int64_t v0 = split * rows_per_split;
  const int64_t v1 = v0 + rows_per_split < V ? v0 + rows_per_split : V;
  const int64_t o = split * B + b;
  T* Ab = A + o * D * k;
  T* mub = Mu + o * D;
  T y[kMaxK], t[kMaxK];
  for (int j = 0; j < k; ++j) t[j] = 0;
  const T m = Mx[b], log_l = LogL[b];
  for (int64_t v = v0; v < v1; ++v) {
    const T* Wv = W + v * D;
    T z = row_dots(Wv, h, U, D, k, lane, y);
    if (bias) z += bias[v];
    const T p = exp((z - m) - log_l);
    for (int j = 0; j < k; ++j) {
      y[j] = p * (y[j] - Ybar[b * k + j]);
      t[j] += y[j];
    }
    for (int64_t i = lane; i < D; i += 32) {
      const T w = Wv[i];
      mub[i] += p * w;
      for (int j = 0; j < k; ++j) Ab[i * k + j] += w * y[j];
    }
  }
  if (lane == 0)
    for (int j = 0; j < k; ++j) Tt[o * k + j] = t[j];
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
T* P(std::uintptr_t a) {
  return as_ptr<T>(a);
}


void check_args(const char* fn, int64_t B, int64_t V, int64_t D, int k, int64_t rows_per_split, int64_t splits) {
  if (B < 1 || V < 1 || D < 1 || rows_per_split < 1 || splits < 1 || splits > 65535)
    throw std::invalid_argument(std::string(fn) + ": B, V, D, rows_per_split >= 1 and 1 <= splits <= 65535 required");
  if (B > 2147483647) throw std::invalid_argument(std::string(fn) + ": B must be < 2^31");
  if (k < 0 || k > kMaxK) throw std::invalid_argument(std::string(fn) + ": k must be in [0, 32]");
}

}  // namespace

void bind_softmax_fisher_cuda(py::module_& m) {
  m.attr("softmax_fisher_max_k") = kMaxK;
  m.def(
      "softmax_fisher_stats",
      [](const std::string& dtype, std::uintptr_t H, std::uintptr_t W, std::uintptr_t bias, std::uintptr_t U,
         int64_t B, int64_t V, int64_t D, int k, int64_t rows_per_split, int64_t splits, std::uintptr_t M_out,
         std::uintptr_t L_out, std::uintptr_t S_out, std::uintptr_t stream) {
        check_args("softmax_fisher_stats", B, V, D, k, rows_per_split, splits);
        with_float_dtype("softmax_fisher_stats", dtype, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          stats_kernel<T><<<dim3(B, splits), 32 * kWarps, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              P<const T>(H), P<const T>(W), P<const T>(bias), P<const T>(U), B, V, D, k, rows_per_split, P<T>(M_out),
              P<T>(L_out), P<T>(S_out));
        });
        check(cudaGetLastError(), "softmax_fisher_stats launch");
      },
      py::arg("dtype"), py::arg("H"), py::arg("W"), py::arg("bias"), py::arg("U"), py::arg("B"), py::arg("V"),
      py::arg("D"), py::arg("k"), py::arg("rows_per_split"), py::arg("splits"), py::arg("M_out"), py::arg("L_out"),
      py::arg("S_out"), py::arg("stream"),
      "Per (split, token): running max m, normalizer l and s = sum e^(z-m) U^T w (k <= 32; k = 0 gives lse parts).");
  m.def(
      "softmax_fisher_matmat_pass2",
      [](const std::string& dtype, std::uintptr_t H, std::uintptr_t W, std::uintptr_t bias, std::uintptr_t U,
         std::uintptr_t Mx, std::uintptr_t LogL, std::uintptr_t Ybar, int64_t B, int64_t V, int64_t D, int k,
         int64_t rows_per_split, int64_t splits, std::uintptr_t A, std::uintptr_t Mu, std::uintptr_t Tt,
         std::uintptr_t stream) {
        check_args("softmax_fisher_matmat_pass2", B, V, D, k, rows_per_split, splits);
        with_float_dtype("softmax_fisher_matmat_pass2", dtype, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          matmat_kernel<T><<<dim3(B, splits), 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              P<const T>(H), P<const T>(W), P<const T>(bias), P<const T>(U), P<const T>(Mx), P<const T>(LogL),
              P<const T>(Ybar), B, V, D, k, rows_per_split, P<T>(A), P<T>(Mu), P<T>(Tt));
        });
        check(cudaGetLastError(), "softmax_fisher_matmat_pass2 launch");
      },
      py::arg("dtype"), py::arg("H"), py::arg("W"), py::arg("bias"), py::arg("U"), py::arg("Mx"), py::arg("LogL"),
      py::arg("Ybar"), py::arg("B"), py::arg("V"), py::arg("D"), py::arg("k"), py::arg("rows_per_split"),
      py::arg("splits"), py::arg("A"), py::arg("Mu"), py::arg("T"), py::arg("stream"),
      "Pass 2 of matmat per (split, token): A = sum p w (y - ybar)^T, Mu = sum p w, T = sum p (y - ybar); "
      "outputs zero-initialized (splits,B,D,k), (splits,B,D), (splits,B,k).");
}

}  // namespace fisherfast
