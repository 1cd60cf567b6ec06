// Fast Walsh–Hadamard transform kernels (docs/design.md §7).
//
// y = H_N x over contiguous rows of length N = 2^L, H_N the Sylvester matrix
// (natural order): stage s (h = 2^s) maps the pair (i, i + h) inside each
// block of 2h to (x_i + x_{i+h}, x_i − x_{i+h}). The L stages commute, so any
// grouping of them gives the same result; the kernels group them for memory
// locality:
//   H_N = (H_{N/B} ⊗ I_B) (I_{N/B} ⊗ H_B)
// i.e. first the log2 B stages inside each cache-sized block of B elements,
// then the remaining stages across blocks, several stages per pass.
//
// log2_exact and parity are shared with the CUDA sources; the CPU kernels
// below use GCC vector extensions and are compiled only for the host.
#pragma once
#include <cstdint>
#include <cstring>

#include "fisherfast/common.h"

namespace fisherfast {

// log2 of a power of two.
FF_HOST_DEVICE inline int log2_exact(std::int64_t n) {
  int l = 0;
  while ((std::int64_t(1) << l) < n) ++l;
  return l;
}

// popcount(v) mod 2: the sign of H_N[i][j] is (−1)^parity(i & j).
FF_HOST_DEVICE inline int parity(std::uint64_t v) {
  v ^= v >> 32;
  v ^= v >> 16;
  v ^= v >> 8;
  v ^= v >> 4;
  v ^= v >> 2;
  v ^= v >> 1;
  return static_cast<int>(v & 1);
}

#if !defined(__CUDACC__)
// One row, single-threaded, src → dst (may alias): the multiversioned kernels
// of csrc/cpu/fwht.cpp (AVX-512 / AVX2 / baseline picked at load time). Other
// CPU sources should call these rather than fwht_cpu::row, which compiles for
// the baseline target of whatever translation unit includes it.
void fwht_row(const float* src, float* dst, std::int64_t n, float scale);
void fwht_row(const double* src, double* dst, std::int64_t n, double scale);

// Vectors are passed by reference only: a 64-byte vector by value has a
// target-dependent ABI.
namespace fwht_cpu {

// One 64-byte vector (an AVX-512 register; two AVX2 or four SSE registers on
// narrower targets, which the compiler splits for us).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef std::int32_t mask __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef std::int64_t mask __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

// Elements per cache block: 16 KiB, a third of the 48 KiB L1d of current x86
// cores, leaving room for the input streaming in (measured: 32 KiB and larger
// blocks are 20–60% slower at N = 2^17 despite fewer cross-block passes).
template <typename T>
constexpr std::int64_t kBlock = 16384 / sizeof(T);

template <typename T>
__attribute__((always_inline)) inline void load(const T* p, typename Vec<T>::type& v) {
  std::memcpy(&v, p, sizeof v);
}

template <typename T>
__attribute__((always_inline)) inline void store(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof v);
}

// Stage h < W inside one vector: lane i gets v[i ^ h] ± v[i]; the product with
// ±1 is exact, so this equals the butterfly (a + b, a − b).
template <typename T, int H>
__attribute__((always_inline)) inline void lane_stage(typename Vec<T>::type& v) {
  typename Vec<T>::mask partner;
  typename Vec<T>::type sign;
  for (int i = 0; i < Vec<T>::W; ++i) {
    partner[i] = i ^ H;
    sign[i] = (i & H) ? T(-1) : T(1);
  }
  v = v * sign + __builtin_shuffle(v, partner);
}

template <typename T>
__attribute__((always_inline)) inline void lane_stages(typename Vec<T>::type& v) {
  lane_stage<T, 1>(v);
  lane_stage<T, 2>(v);
  lane_stage<T, 4>(v);
  if constexpr (Vec<T>::W == 16) lane_stage<T, 8>(v);
}

// R stages (vector stride 1, 2, …, 2^(R−1) within a[]) in registers.
template <typename T, int R>
__attribute__((always_inline)) inline void register_stages(typename Vec<T>::type* a) {
  for (int s = 0; s < R; ++s) {
    const int d = 1 << s;
    for (int k = 0; k < (1 << R); ++k) {
      if (k & d) continue;
      auto u = a[k], v = a[k + d];
      a[k] = u + v;
      a[k + d] = u - v;
    }
  }
}

// Stages h, 2h, …, 2^(R−1) h (h a multiple of W) over the units [u0, u1) of a
// row: unit u is the W-wide column j = (u mod h/W)·W of group g = u div (h/W),
// i.e. the 2^R vectors at base + j + k·h, base = g·2^R·h. Reads src, writes dst
// (may alias). LANES also runs the in-vector stages first (only for h = W).
template <typename T, int R, bool LANES, bool SCALE>
__attribute__((always_inline)) inline void pass_units(const T* src, T* dst, std::int64_t h, std::int64_t u0,
                                                      std::int64_t u1, T scale) {
  constexpr int W = Vec<T>::W;
  const std::int64_t cols = h / W;
  for (std::int64_t u = u0; u < u1; ++u) {
    const std::int64_t g = u / cols, j = (u - g * cols) * W;
    const std::int64_t base = (g << R) * h + j;
    typename Vec<T>::type a[1 << R];
    for (int k = 0; k < (1 << R); ++k) {
      load<T>(src + base + k * h, a[k]);
      if constexpr (LANES) lane_stages<T>(a[k]);
    }
    register_stages<T, R>(a);
    for (int k = 0; k < (1 << R); ++k) {
      if constexpr (SCALE) a[k] *= scale;
      store<T>(dst + base + k * h, a[k]);
    }
  }
}

template <typename T, int R, bool LANES>
__attribute__((always_inline)) inline void pass_dispatch_scale(const T* src, T* dst, std::int64_t h,
                                                               std::int64_t u0, std::int64_t u1, T scale) {
  if (scale != T(1))
    pass_units<T, R, LANES, true>(src, dst, h, u0, u1, scale);
  else
    pass_units<T, R, LANES, false>(src, dst, h, u0, u1, scale);
}

// One pass of r stages starting at h (r ≤ 3 with the in-vector stages, else
// r ≤ kMaxRadix); see pass_units.
template <typename T>
__attribute__((always_inline)) inline void pass(const T* src, T* dst, std::int64_t h, int r, bool lanes,
                                                std::int64_t u0, std::int64_t u1, T scale) {
  if (lanes) {
    switch (r) {
      case 0: return pass_dispatch_scale<T, 0, true>(src, dst, h, u0, u1, scale);
      case 1: return pass_dispatch_scale<T, 1, true>(src, dst, h, u0, u1, scale);
      case 2: return pass_dispatch_scale<T, 2, true>(src, dst, h, u0, u1, scale);
      default: return pass_dispatch_scale<T, 3, true>(src, dst, h, u0, u1, scale);
    }
  }
  switch (r) {
    case 1: return pass_dispatch_scale<T, 1, false>(src, dst, h, u0, u1, scale);
    case 2: return pass_dispatch_scale<T, 2, false>(src, dst, h, u0, u1, scale);
    case 3: return pass_dispatch_scale<T, 3, false>(src, dst, h, u0, u1, scale);
    default: return pass_dispatch_scale<T, 4, false>(src, dst, h, u0, u1, scale);
  }
}

// Stages per pass: a pass of r stages holds 2^r vectors in registers (16 for
// r = 4, half of AVX-512's 32); k remaining stages are split into ⌈k/4⌉
// passes of balanced size.
constexpr int kMaxRadix = 4;
inline int next_radix(int remaining) {
  const int passes = (remaining + kMaxRadix - 1) / kMaxRadix;
  return (remaining + passes - 1) / passes;
}

// Number of units of a pass of r stages at any h over n elements.
template <typename T>
inline std::int64_t pass_units_count(std::int64_t n, int r) {
  return n / (std::int64_t(Vec<T>::W) << r);
}

// Rows shorter than one vector: plain radix-2 butterflies.
template <typename T>
inline void small_row(const T* src, T* dst, std::int64_t n, T scale) {
  if (dst != src) std::memcpy(dst, src, n * sizeof(T));
  for (std::int64_t h = 1; h < n; h *= 2)
    for (std::int64_t base = 0; base < n; base += 2 * h)
      for (std::int64_t i = base; i < base + h; ++i) {
        T a = dst[i], b = dst[i + h];
        dst[i] = a + b;
        dst[i + h] = a - b;
      }
  if (scale != T(1))
    for (std::int64_t i = 0; i < n; ++i) dst[i] *= scale;
}

// All stages inside one contiguous block of nb ≥ W elements (src → dst): the
// first pass does the in-vector stages plus up to three more in registers
// while copying, the others run in place on dst while it sits in L1.
template <typename T>
__attribute__((always_inline)) inline void block(const T* src, T* dst, std::int64_t nb, T scale) {
  constexpr int w = Vec<T>::W == 16 ? 4 : 3;
  const int lb = log2_exact(nb);
  int s = w;
  int r = lb - s < 3 ? lb - s : 3;  // the first pass also holds the lane shuffles
  pass<T>(src, dst, Vec<T>::W, r, true, 0, pass_units_count<T>(nb, r), s + r == lb ? scale : T(1));
  for (s += r; s < lb; s += r) {
    r = next_radix(lb - s);
    pass<T>(dst, dst, std::int64_t(1) << s, r, false, 0, pass_units_count<T>(nb, r), s + r == lb ? scale : T(1));
  }
}

// A whole row, single-threaded: blocks, then the cross-block stages in passes
// of up to four stages (the row is expected to stay in L2 between passes).
template <typename T>
__attribute__((always_inline)) inline void row(const T* src, T* dst, std::int64_t n, T scale) {
  if (n < Vec<T>::W) return small_row<T>(src, dst, n, scale);
  const std::int64_t nb = n < kBlock<T> ? n : kBlock<T>;
  const int lb = log2_exact(nb), L = log2_exact(n);
  for (std::int64_t b = 0; b < n; b += nb) block<T>(src + b, dst + b, nb, lb == L ? scale : T(1));
  for (int s = lb, r; s < L; s += r) {
    r = next_radix(L - s);
    pass<T>(dst, dst, std::int64_t(1) << s, r, false, 0, pass_units_count<T>(n, r), s + r == L ? scale : T(1));
  }
}

}  // namespace fwht_cpu
#endif  // !__CUDACC__

}  // namespace fisherfast
