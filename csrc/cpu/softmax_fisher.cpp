// CPU driver of the fused elementwise parts of the softmax-Fisher
// contractions (docs/design.md §3). The GEMMs (logits and projections in one
// [h; Uᵀ] W_cᵀ, the Wᵀ accumulation X W_c) stay in MKL through torch; each
// call here replaces every torch elementwise pass over a chunk by one fused
// sweep per token and merges the chunk into the running statistics in place,
// so a chunk costs two or three parallel regions whatever k is.
//
// Threads split the tokens; every inner loop runs over the chunk with unit
// stride. The per-token bodies are compiled three times (AVX-512, AVX2,
// baseline) through target_clones, with the header kernels flattened into
// each clone; OpenMP stays outside the clones (an
// outlined parallel body would not inherit the clone's target).
// Kernel math: csrc/include/fisherfast/softmax_fisher.h.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fisherfast/softmax_fisher.h"

namespace py = pybind11;

namespace fisherfast {
namespace {

using std::int64_t;
namespace sf = softmax_fisher;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FF_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define FF_CLONES
#endif

// One token's work, one clone set per dtype.
#define FF_TOKEN_KERNELS(T, S)                                                                                       \
  FF_CLONES void lse_##S(const T* z, const T* bias, int64_t C, T* zb, T* m, T* l) {                                   \
    sf::lse_token<T>(z, bias, C, zb, *m, *l);                                                                        \
  }                                                                                                                  \
  FF_CLONES void mm_chunk_##S(const T* z, const T* bias, const T* Y, int64_t ysj, int64_t C, int64_t k, T* X, T* m_c, \
                              T* l_c, T* ybar_c, T* t_c) {                                                           \
    sf::matmat_token_chunk<T>(z, bias, Y, ysj, C, k, X, *m_c, *l_c, ybar_c, t_c);                                    \
  }                                                                                                                  \
  FF_CLONES void mm_merge_##S(const T* A, int64_t d, int64_t k, T m_c, T l_c, const T* ybar_c, const T* t_c, T* m,    \
                              T* l, T* mu, T* ybar, T* M) {                                                          \
    sf::matmat_token_merge<T>(A, d, k, m_c, l_c, ybar_c, t_c, *m, *l, mu, ybar, M);                                  \
  }                                                                                                                  \
  FF_CLONES void quad_##S(const T* z, const T* bias, const T* Y, int64_t ysj, int64_t C, int64_t k, T* scratch,       \
                          T* ybar_c, T* m, T* l, T* ybar, T* M) {                                                    \
    sf::quad_token<T>(z, bias, Y, ysj, C, k, scratch, ybar_c, *m, *l, ybar, M);                                      \
  }

FF_TOKEN_KERNELS(float, f32)
FF_TOKEN_KERNELS(double, f64)
#undef FF_TOKEN_KERNELS

template <typename T>
struct K;
template <>
struct K<float> {
  static constexpr auto lse = lse_f32;
  static constexpr auto mm_chunk = mm_chunk_f32;
  static constexpr auto mm_merge = mm_merge_f32;
  static constexpr auto quad = quad_f32;
};
template <>
struct K<double> {
  static constexpr auto lse = lse_f64;
  static constexpr auto mm_chunk = mm_chunk_f64;
  static constexpr auto mm_merge = mm_merge_f64;
  static constexpr auto quad = quad_f64;
};

// Z (B,C) with row stride zsb; bias (C) or null; Y_b,j (C) at Y + b·ysb + j·ysj
// (ysb = 0: U shared by the tokens); X (B,k+1,C), A (B,k+1,d), M (B,d,k) or
// (B,k,k), mu (B,d), ybar/ybar_c/t_c (B,k), m/l/m_c/l_c (B) contiguous.
template <typename T>
void lse_update(const T* Z, int64_t zsb, const T* bias, int64_t B, int64_t C, T* m, T* l, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> zb(C);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) K<T>::lse(Z + b * zsb, bias, C, zb.data(), m + b, l + b);
  }
}

template <typename T>
void matmat_chunk(const T* Z, int64_t zsb, const T* bias, const T* Y, int64_t ysb, int64_t ysj, int64_t B, int64_t C,
                  int64_t k, T* X, T* m_c, T* l_c, T* ybar_c, T* t_c, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    K<T>::mm_chunk(Z + b * zsb, bias, Y + b * ysb, ysj, C, k, X + b * (k + 1) * C, m_c + b, l_c + b, ybar_c + b * k,
                   t_c + b * k);
}

template <typename T>
void matmat_merge(const T* A, int64_t B, int64_t d, int64_t k, const T* m_c, const T* l_c, const T* ybar_c,
                  const T* t_c, T* m, T* l, T* mu, T* ybar, T* M, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    K<T>::mm_merge(A + b * (k + 1) * d, d, k, m_c[b], l_c[b], ybar_c + b * k, t_c + b * k, m + b, l + b, mu + b * d,
                   ybar + b * k, M + b * d * k);
}

template <typename T>
void quad_update(const T* Z, int64_t zsb, const T* bias, const T* Y, int64_t ysb, int64_t ysj, int64_t B, int64_t C,
                 int64_t k, T* m, T* l, T* ybar, T* M, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> scratch(sf::quad_scratch(C, k)), ybar_c(k);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      K<T>::quad(Z + b * zsb, bias, Y + b * ysb, ysj, C, k, scratch.data(), ybar_c.data(), m + b, l + b,
                 ybar + b * k, M + b * k * k);
  }
}

using Addr = std::uintptr_t;

void check_sizes(const char* fn, int64_t B, int64_t C, int64_t k, int threads) {
  if (B < 0 || C < 0 || k < 0) throw std::invalid_argument(std::string(fn) + ": B, C, k must be >= 0");
  if (threads < 1) throw std::invalid_argument(std::string(fn) + ": threads must be >= 1");
}

// Dtype dispatch with the GIL released for the kernel.
template <typename F>
void on_dtype(const char* fn, const std::string& dtype, F&& f) {
  py::gil_scoped_release release;
  with_float_dtype(fn, dtype, std::forward<F>(f));
}

template <typename T>
T* p(Addr a) {
  return as_ptr<T>(a);
}

}  // namespace

void bind_softmax_fisher(py::module_& m) {
  m.def(
      "softmax_fisher_lse_update",
      [](const std::string& dtype, Addr Z, int64_t zsb, Addr bias, int64_t B, int64_t C, Addr mm, Addr l,
         int threads) {
        check_sizes("softmax_fisher_lse_update", B, C, 0, threads);
        on_dtype("softmax_fisher_lse_update", dtype, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          lse_update<T>(p<const T>(Z), zsb, p<const T>(bias), B, C, p<T>(mm), p<T>(l), threads);
        });
      },
      py::arg("dtype"), py::arg("Z"), py::arg("zsb"), py::arg("bias"), py::arg("B"), py::arg("C"), py::arg("m"),
      py::arg("l"), py::arg("threads"),
      "Merge one chunk of logits Z (+ bias) into the running max m and normalizer l (in place).");
  m.def(
      "softmax_fisher_matmat_chunk",
      [](const std::string& dtype, Addr Z, int64_t zsb, Addr bias, Addr Y, int64_t ysb, int64_t ysj, int64_t B,
         int64_t C, int64_t k, Addr X, Addr m_c, Addr l_c, Addr ybar_c, Addr t_c, int threads) {
        check_sizes("softmax_fisher_matmat_chunk", B, C, k, threads);
        if (k > 0 && Y == 0) throw std::invalid_argument("softmax_fisher_matmat_chunk: Y is required when k > 0");
        on_dtype("softmax_fisher_matmat_chunk", dtype, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          matmat_chunk<T>(p<const T>(Z), zsb, p<const T>(bias), p<const T>(Y), ysb, ysj, B, C, k, p<T>(X), p<T>(m_c),
                          p<T>(l_c), p<T>(ybar_c), p<T>(t_c), threads);
        });
      },
      py::arg("dtype"), py::arg("Z"), py::arg("zsb"), py::arg("bias"), py::arg("Y"), py::arg("ysb"), py::arg("ysj"),
      py::arg("B"), py::arg("C"), py::arg("k"), py::arg("X"), py::arg("m_c"), py::arg("l_c"), py::arg("ybar_c"),
      py::arg("t_c"), py::arg("threads"),
      "Chunk moments of matmat: X (B,k+1,C) = [e*(y - ybar_c) | e], m_c, l_c, ybar_c, t_c = sum e*(y - ybar_c).");
  m.def(
      "softmax_fisher_matmat_merge",
      [](const std::string& dtype, Addr A, int64_t B, int64_t d, int64_t k, Addr m_c, Addr l_c, Addr ybar_c, Addr t_c,
         Addr mm, Addr l, Addr mu, Addr ybar, Addr M, int threads) {
        check_sizes("softmax_fisher_matmat_merge", B, d, k, threads);
        on_dtype("softmax_fisher_matmat_merge", dtype, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          matmat_merge<T>(p<const T>(A), B, d, k, p<const T>(m_c), p<const T>(l_c), p<const T>(ybar_c),
                          p<const T>(t_c), p<T>(mm), p<T>(l), p<T>(mu), p<T>(ybar), p<T>(M), threads);
        });
      },
      py::arg("dtype"), py::arg("A"), py::arg("B"), py::arg("d"), py::arg("k"), py::arg("m_c"), py::arg("l_c"),
      py::arg("ybar_c"), py::arg("t_c"), py::arg("m"), py::arg("l"), py::arg("mu"), py::arg("ybar"), py::arg("M"),
      py::arg("threads"),
      "Merge a chunk's A = X W_c (B,k+1,d) into the running m, l, mu (B,d), ybar (B,k), M (B,d,k) in place.");
  m.def(
      "softmax_fisher_quad_update",
      [](const std::string& dtype, Addr Z, int64_t zsb, Addr bias, Addr Y, int64_t ysb, int64_t ysj, int64_t B,
         int64_t C, int64_t k, Addr mm, Addr l, Addr ybar, Addr M, int threads) {
        check_sizes("softmax_fisher_quad_update", B, C, k, threads);
        if (k > 0 && Y == 0) throw std::invalid_argument("softmax_fisher_quad_update: Y is required when k > 0");
        on_dtype("softmax_fisher_quad_update", dtype, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          quad_update<T>(p<const T>(Z), zsb, p<const T>(bias), p<const T>(Y), ysb, ysj, B, C, k, p<T>(mm), p<T>(l),
                         p<T>(ybar), p<T>(M), threads);
        });
      },
      py::arg("dtype"), py::arg("Z"), py::arg("zsb"), py::arg("bias"), py::arg("Y"), py::arg("ysb"), py::arg("ysj"),
      py::arg("B"), py::arg("C"), py::arg("k"), py::arg("m"), py::arg("l"), py::arg("ybar"), py::arg("M"),
      py::arg("threads"),
      "Merge one chunk into the running m, l, ybar (B,k) and centered moment M (B,k,k) of y = U^T w (in place).");
}

}  // namespace fisherfast
