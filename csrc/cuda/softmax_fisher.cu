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
// Soft-capping (softcap c > 0; 0: none): z′ = c·tanh(z/c) replaces z and the
// rows become s·w with s = 1 − tanh²(z/c) = cosh⁻²(z/c) (no cancellation):
// y_j → s y_j in both passes, and pass 2 weights A and μ by p·s.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fisherfast/softmax_fisher.h"
#include "fisherfast/view.h"

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

// (m, l, s) ← merged with a part (m2, l2, s2): the header's normalizer merge
// (flash-attention rescaling to the larger max, NaN propagated), applied to
// the k running sums s_j = Σ e^{z−m} y_j as well.
template <typename T>
__device__ inline void merge_part(T& m, T& l, T* s, T m2, T l2, const T* s2, int k) {
  const softmax_fisher::Merge<T> g = softmax_fisher::merge_normalizer(m, l, m2, l2);
  for (int j = 0; j < k; ++j) s[j] = g.a * s[j] + g.beta * s2[j];
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

// Soft-caps a logit in place (c > 0) and returns s = dz′/dz (1 without a cap);
// a −inf logit (a mask) stays −inf with s = 0.
template <typename T>
__device__ inline T cap_logit(T& z, T c) {
  if (!(c > T(0))) return T(1);
  if (z == -INFINITY) return T(0);
  const T x = z / c, ch = cosh(x);
  z = c * tanh(x);
  return T(1) / (ch * ch);
}

// Pass 1 (and lse with k = 0): per (token b, split), (m, l, s_j = Σ e y_j).
template <typename T>
__global__ void stats_kernel(const T* __restrict__ H, const T* __restrict__ W, const T* __restrict__ bias,
                             const T* __restrict__ U, int64_t B, int64_t V, int64_t D, int k, int64_t rows_per_split,
                             T softcap, T* __restrict__ M_out, T* __restrict__ L_out, T* __restrict__ S_out) {
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
    const T sc = cap_logit(z, softcap);
    for (int j = 0; j < k; ++j) y[j] *= sc;
    merge_part(m, l, s, z, T(1), y, k);
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
    for (int w = 1; w < kWarps; ++w) merge_part(mb, lb, sb, sm[w], sl[w], ss[w], k);
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
                              int64_t rows_per_split, T softcap, T* __restrict__ A, T* __restrict__ Mu,
                              T* __restrict__ Tt) {
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
    const T sc = cap_logit(z, softcap);
    const T p = exp((z - m) - log_l);
    for (int j = 0; j < k; ++j) {
      y[j] = p * (sc * y[j] - Ybar[b * k + j]);
      t[j] += y[j];
      y[j] *= sc;  // the row is s·w: A accumulates w · (p s ŷ)
    }
    for (int64_t i = lane; i < D; i += 32) {
      const T w = Wv[i];
      mub[i] += p * sc * w;
      for (int j = 0; j < k; ++j) Ab[i * k + j] += w * y[j];
    }
  }
  if (lane == 0)
    for (int j = 0; j < k; ++j) Tt[o * k + j] = t[j];
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// The tensors of one launch, read and checked once: H (B,D), W (V,D), bias
// (V,) or None, U (D,k) or None, all of one float dtype on the GPU, contiguous.
struct Head {
  View H, W, bias, U;
  int64_t B, V, D;
  int k;
};

Head head_views(const char* fn, py::handle H, py::handle W, py::handle bias, py::handle U) {
  Head h{view(fn, "H", H), view(fn, "W", W), view(fn, "bias", bias, true), view(fn, "U", U, true), 0, 0, 0, 0};
  with_float_view(fn, h.H, [](auto*) {});
  expect(fn, h.H, h.H.dtype, Device::cuda, {-1, -1});
  h.B = h.H.size(0);
  h.D = h.H.size(1);
  expect(fn, h.W, h.H.dtype, Device::cuda, {-1, h.D});
  h.V = h.W.size(0);
  expect(fn, h.bias, h.H.dtype, Device::cuda, {h.V});
  expect(fn, h.U, h.H.dtype, Device::cuda, {h.D, -1});
  h.k = h.U ? static_cast<int>(h.U.size(1)) : 0;
  return h;
}

void check_launch(const char* fn, const Head& h, int64_t rows_per_split, int64_t splits) {
  if (h.B < 1 || h.V < 1 || h.D < 1 || rows_per_split < 1 || splits < 1 || splits > 65535)
    throw std::invalid_argument(std::string(fn) + ": B, V, D, rows_per_split >= 1 and 1 <= splits <= 65535 required");
  if (h.B > 2147483647) throw std::invalid_argument(std::string(fn) + ": B must be < 2^31");
  if (h.k > kMaxK) throw std::invalid_argument(std::string(fn) + ": U must have at most 32 columns");
}

}  // namespace

void bind_softmax_fisher_cuda(py::module_& m) {
  m.attr("softmax_fisher_max_k") = kMaxK;
  m.def(
      "softmax_fisher_stats",
      [](py::handle H, py::handle W, py::handle bias, py::handle U, py::handle M_out, py::handle L_out,
         py::handle S_out, int64_t rows_per_split, double softcap, std::uintptr_t stream) {
        const char* fn = "softmax_fisher_stats";
        const Head h = head_views(fn, H, W, bias, U);
        const View vM = view(fn, "M_out", M_out), vL = view(fn, "L_out", L_out), vS = view(fn, "S_out", S_out);
        const int64_t splits = vM.ndim == 2 ? vM.size(0) : -1;
        expect(fn, vM, h.H.dtype, Device::cuda, {splits, h.B});
        expect(fn, vL, h.H.dtype, Device::cuda, {splits, h.B});
        expect(fn, vS, h.H.dtype, Device::cuda, {splits, h.B, h.k > 0 ? h.k : 1});
        check_launch(fn, h, rows_per_split, splits);
        with_float_view(fn, h.H, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          stats_kernel<T><<<dim3(h.B, splits), 32 * kWarps, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              h.H.ptr<const T>(), h.W.ptr<const T>(), h.bias.ptr<const T>(), h.U.ptr<const T>(), h.B, h.V, h.D, h.k,
              rows_per_split, static_cast<T>(softcap), vM.ptr<T>(), vL.ptr<T>(), vS.ptr<T>());
        });
        check(cudaGetLastError(), "softmax_fisher_stats launch");
      },
      py::arg("H"), py::arg("W"), py::arg("bias"), py::arg("U"), py::arg("M_out"), py::arg("L_out"), py::arg("S_out"),
      py::arg("rows_per_split"), py::arg("softcap"), py::arg("stream"),
      "Per (split, token): running max M_out, normalizer L_out (splits,B) and S_out = sum e^(z-m) U^T w "
      "(splits,B,max(k,1)); U (D,k), k <= 32, or None for the lse parts; softcap c > 0 caps z (0: none).");
  m.def(
      "softmax_fisher_matmat_pass2",
      [](py::handle H, py::handle W, py::handle bias, py::handle U, py::handle Mx, py::handle LogL, py::handle Ybar,
         py::handle A, py::handle Mu, py::handle Tt, int64_t rows_per_split, double softcap, std::uintptr_t stream) {
        const char* fn = "softmax_fisher_matmat_pass2";
        const Head h = head_views(fn, H, W, bias, U);
        if (!h.U) throw std::invalid_argument(std::string(fn) + ": U is required");
        const View vm = view(fn, "Mx", Mx), vl = view(fn, "LogL", LogL), vy = view(fn, "Ybar", Ybar);
        const View vA = view(fn, "A", A), vmu = view(fn, "Mu", Mu), vt = view(fn, "T", Tt);
        const int64_t splits = vA.ndim == 4 ? vA.size(0) : -1;
        const DType dt = h.H.dtype;
        for (const View* v : {&vm, &vl}) expect(fn, *v, dt, Device::cuda, {h.B});
        expect(fn, vy, dt, Device::cuda, {h.B, h.k});
        expect(fn, vA, dt, Device::cuda, {splits, h.B, h.D, h.k});
        expect(fn, vmu, dt, Device::cuda, {splits, h.B, h.D});
        expect(fn, vt, dt, Device::cuda, {splits, h.B, h.k});
        check_launch(fn, h, rows_per_split, splits);
        with_float_view(fn, h.H, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          matmat_kernel<T><<<dim3(h.B, splits), 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              h.H.ptr<const T>(), h.W.ptr<const T>(), h.bias.ptr<const T>(), h.U.ptr<const T>(), vm.ptr<const T>(),
              vl.ptr<const T>(), vy.ptr<const T>(), h.B, h.V, h.D, h.k, rows_per_split, static_cast<T>(softcap),
              vA.ptr<T>(), vmu.ptr<T>(), vt.ptr<T>());
        });
        check(cudaGetLastError(), "softmax_fisher_matmat_pass2 launch");
      },
      py::arg("H"), py::arg("W"), py::arg("bias"), py::arg("U"), py::arg("Mx"), py::arg("LogL"), py::arg("Ybar"),
      py::arg("A"), py::arg("Mu"), py::arg("T"), py::arg("rows_per_split"), py::arg("softcap"), py::arg("stream"),
      "Pass 2 of matmat per (split, token): A = sum p w (y - ybar)^T, Mu = sum p w, T = sum p (y - ybar); "
      "outputs zero-initialized (splits,B,D,k), (splits,B,D), (splits,B,k).");
}

}  // namespace fisherfast
