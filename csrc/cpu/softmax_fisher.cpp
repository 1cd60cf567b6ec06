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
#include "fisherfast/view.h"

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
  FF_CLONES void lse_##S(const T* z, const T* bias, int64_t C, T* zb, double* m, double* l) {                                \
    sf::lse_token<T>(z, bias, C, zb, *m, *l);                                                                        \
  }                                                                                                                  \
  FF_CLONES void mm_chunk_##S(const T* z, const T* bias, const T* s, const T* Y, int64_t ysj, int64_t C, int64_t k, \
                              T* X, T* m_c, T* l_c, T* ybar_c, T* t_c) {                                             \
    sf::matmat_token_chunk<T>(z, bias, s, Y, ysj, C, k, X, *m_c, *l_c, ybar_c, t_c);                                 \
  }                                                                                                                  \
  FF_CLONES void mm_merge_##S(const T* A, int64_t d, int64_t k, T m_c, T l_c, const T* ybar_c, const T* t_c,         \
                              double* m, double* l, double* mu, double* ybar, double* M) {                           \
    sf::matmat_token_merge<T>(A, d, k, m_c, l_c, ybar_c, t_c, *m, *l, mu, ybar, M);                                  \
  }                                                                                                                  \
  FF_CLONES void quad_##S(const T* z, const T* bias, const T* Y, int64_t ysj, int64_t C, int64_t k, T* scratch,       \
                          double* tot, T* ybar_c, double* m, double* l, double* ybar, double* M) {                   \
    sf::quad_token<T>(z, bias, Y, ysj, C, k, scratch, tot, ybar_c, *m, *l, ybar, M);                                 \
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

// Z (B,C) with row stride zsb; bias (C) or null; S (B,C) with row stride ssb
// or null (soft-capping factors); Y_b,j (C) at Y + b·ysb + j·ysj
// (ysb = 0: U shared by the tokens); X (B,k+1,C), A (B,k+1,d), ybar_c/t_c
// (B,k), m_c/l_c (B) contiguous in T; the running state merged across chunks,
// m/l (B), mu (B,d), ybar (B,k), M (B,d,k) or (B,k,k), contiguous in double
// (softmax_fisher.h: "Accuracy").
template <typename T>
void lse_update(const T* Z, int64_t zsb, const T* bias, int64_t B, int64_t C, double* m, double* l, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> zb(C);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) K<T>::lse(Z + b * zsb, bias, C, zb.data(), m + b, l + b);
  }
}

template <typename T>
void matmat_chunk(const T* Z, int64_t zsb, const T* bias, const T* S, int64_t ssb, const T* Y, int64_t ysb,
                  int64_t ysj, int64_t B, int64_t C, int64_t k, T* X, T* m_c, T* l_c, T* ybar_c, T* t_c, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    K<T>::mm_chunk(Z + b * zsb, bias, S ? S + b * ssb : nullptr, Y + b * ysb, ysj, C, k, X + b * (k + 1) * C, m_c + b,
                   l_c + b, ybar_c + b * k, t_c + b * k);
}

template <typename T>
void matmat_merge(const T* A, int64_t B, int64_t d, int64_t k, const T* m_c, const T* l_c, const T* ybar_c,
                  const T* t_c, double* m, double* l, double* mu, double* ybar, double* M, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    K<T>::mm_merge(A + b * (k + 1) * d, d, k, m_c[b], l_c[b], ybar_c + b * k, t_c + b * k, m + b, l + b, mu + b * d,
                   ybar + b * k, M + b * d * k);
}

template <typename T>
void quad_update(const T* Z, int64_t zsb, const T* bias, const T* Y, int64_t ysb, int64_t ysj, int64_t B, int64_t C,
                 int64_t k, double* m, double* l, double* ybar, double* M, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> scratch(sf::quad_scratch(C, k)), ybar_c(k);
    std::vector<double> tot(sf::quad_totals(k));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      K<T>::quad(Z + b * zsb, bias, Y + b * ysb, ysj, C, k, scratch.data(), tot.data(), ybar_c.data(), m + b, l + b,
                 ybar + b * k, M + b * k * k);
  }
}

void check_threads(const char* fn, int threads) {
  if (threads < 1) throw std::invalid_argument(std::string(fn) + ": threads must be >= 1");
}

// Dtype dispatch on the logits' view, with the GIL released for the kernel.
template <typename F>
void on_dtype(const char* fn, const View& z, F&& f) {
  py::gil_scoped_release release;
  with_float_view(fn, z, std::forward<F>(f));
}

// The logits Z (B,C), unit stride over C, any row stride; bias (C) or None;
// projections Y (B,k,C), unit stride over C (token stride 0: U shared).
struct ChunkInputs {
  View Z, bias, Y;
  int64_t B, C, k;
};

ChunkInputs chunk_inputs(const char* fn, py::handle Z, py::handle bias, py::handle Y, bool need_y) {
  ChunkInputs in{view(fn, "Z", Z), view(fn, "bias", bias, true), view(fn, "Y", Y, !need_y), 0, 0, 0};
  with_float_view(fn, in.Z, [](auto*) {});
  in.B = in.Z.ndim == 2 ? in.Z.size(0) : -1;
  in.C = in.Z.ndim == 2 ? in.Z.size(1) : -1;
  expect(fn, in.Z, in.Z.dtype, Device::cpu, {-1, -1}, false);
  expect(fn, in.bias, in.Z.dtype, Device::cpu, {in.C});
  if (need_y) {
    expect(fn, in.Y, in.Z.dtype, Device::cpu, {in.B, -1, in.C}, false);
    in.k = in.Y.size(1);
  }
  return in;
}

}  // namespace

void bind_softmax_fisher(py::module_& m) {
  m.def(
      "softmax_fisher_lse_update",
      [](py::handle Z, py::handle bias, py::handle mm, py::handle l, int threads) {
        const char* fn = "softmax_fisher_lse_update";
        check_threads(fn, threads);
        const ChunkInputs in = chunk_inputs(fn, Z, bias, py::none(), false);
        const View vm = view(fn, "m", mm), vl = view(fn, "l", l);
        for (const View* v : {&vm, &vl}) expect(fn, *v, DType::f64, Device::cpu, {in.B});
        on_dtype(fn, in.Z, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          lse_update<T>(in.Z.ptr<const T>(), in.Z.stride[0], in.bias.ptr<const T>(), in.B, in.C, vm.ptr<double>(),
                        vl.ptr<double>(), threads);
        });
      },
      py::arg("Z"), py::arg("bias"), py::arg("m"), py::arg("l"), py::arg("threads"),
      "Merge one chunk of logits Z (B,C) (+ bias (C,)) into the running max m and normalizer l (B,) (float64) in "
      "place.");
  m.def(
      "softmax_fisher_matmat_chunk",
      [](py::handle Z, py::handle bias, py::handle S, py::handle Y, py::handle X, py::handle m_c, py::handle l_c,
         py::handle ybar_c, py::handle t_c, int threads) {
        const char* fn = "softmax_fisher_matmat_chunk";
        check_threads(fn, threads);
        const ChunkInputs in = chunk_inputs(fn, Z, bias, Y, true);
        const View vS = view(fn, "S", S, true);
        expect(fn, vS, in.Z.dtype, Device::cpu, {in.B, in.C}, false);
        const View vX = view(fn, "X", X), vm = view(fn, "m_c", m_c), vl = view(fn, "l_c", l_c);
        const View vy = view(fn, "ybar_c", ybar_c), vt = view(fn, "t_c", t_c);
        const DType dt = in.Z.dtype;
        expect(fn, vX, dt, Device::cpu, {in.B, in.k + 1, in.C});
        for (const View* v : {&vm, &vl}) expect(fn, *v, dt, Device::cpu, {in.B});
        for (const View* v : {&vy, &vt}) expect(fn, *v, dt, Device::cpu, {in.B, in.k});
        on_dtype(fn, in.Z, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          matmat_chunk<T>(in.Z.ptr<const T>(), in.Z.stride[0], in.bias.ptr<const T>(), vS.ptr<const T>(),
                          vS.ndim == 2 ? vS.stride[0] : 0, in.Y.ptr<const T>(), in.Y.stride[0], in.Y.stride[1], in.B,
                          in.C, in.k, vX.ptr<T>(), vm.ptr<T>(), vl.ptr<T>(), vy.ptr<T>(), vt.ptr<T>(), threads);
        });
      },
      py::arg("Z"), py::arg("bias"), py::arg("S"), py::arg("Y"), py::arg("X"), py::arg("m_c"), py::arg("l_c"),
      py::arg("ybar_c"), py::arg("t_c"), py::arg("threads"),
      "Chunk moments of matmat: X (B,k+1,C) = [e*s*(y - ybar_c) | e*s], m_c, l_c (B,), ybar_c, t_c = sum e*(y - ybar_c) "
      "(B,k), from logits Z (B,C), optional soft-cap factors S (B,C) (None: s = 1) and projections Y (B,k,C).");
  m.def(
      "softmax_fisher_matmat_merge",
      [](py::handle A, py::handle m_c, py::handle l_c, py::handle ybar_c, py::handle t_c, py::handle mm, py::handle l,
         py::handle mu, py::handle ybar, py::handle M, int threads) {
        const char* fn = "softmax_fisher_matmat_merge";
        check_threads(fn, threads);
        const View vA = view(fn, "A", A);
        with_float_view(fn, vA, [](auto*) {});
        const DType dt = vA.dtype;
        expect(fn, vA, dt, Device::cpu, {-1, -1, -1});
        const int64_t B = vA.size(0), k = vA.size(1) - 1, d = vA.size(2);
        const View vmc = view(fn, "m_c", m_c), vlc = view(fn, "l_c", l_c), vm = view(fn, "m", mm), vl = view(fn, "l", l);
        const View vyc = view(fn, "ybar_c", ybar_c), vtc = view(fn, "t_c", t_c), vy = view(fn, "ybar", ybar);
        const View vmu = view(fn, "mu", mu), vM = view(fn, "M", M);
        for (const View* v : {&vmc, &vlc}) expect(fn, *v, dt, Device::cpu, {B});
        for (const View* v : {&vyc, &vtc}) expect(fn, *v, dt, Device::cpu, {B, k});
        for (const View* v : {&vm, &vl}) expect(fn, *v, DType::f64, Device::cpu, {B});
        expect(fn, vy, DType::f64, Device::cpu, {B, k});
        expect(fn, vmu, DType::f64, Device::cpu, {B, d});
        expect(fn, vM, DType::f64, Device::cpu, {B, d, k});
        on_dtype(fn, vA, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          matmat_merge<T>(vA.ptr<const T>(), B, d, k, vmc.ptr<const T>(), vlc.ptr<const T>(), vyc.ptr<const T>(),
                          vtc.ptr<const T>(), vm.ptr<double>(), vl.ptr<double>(), vmu.ptr<double>(),
                          vy.ptr<double>(), vM.ptr<double>(), threads);
        });
      },
      py::arg("A"), py::arg("m_c"), py::arg("l_c"), py::arg("ybar_c"), py::arg("t_c"), py::arg("m"), py::arg("l"),
      py::arg("mu"), py::arg("ybar"), py::arg("M"), py::arg("threads"),
      "Merge a chunk's A = X W_c (B,k+1,d) into the running m, l (B,), mu (B,d), ybar (B,k), M (B,d,k) (float64) "
      "in place.");
  m.def(
      "softmax_fisher_quad_update",
      [](py::handle Z, py::handle bias, py::handle Y, py::handle mm, py::handle l, py::handle ybar, py::handle M,
         int threads) {
        const char* fn = "softmax_fisher_quad_update";
        check_threads(fn, threads);
        const ChunkInputs in = chunk_inputs(fn, Z, bias, Y, true);
        const View vm = view(fn, "m", mm), vl = view(fn, "l", l), vy = view(fn, "ybar", ybar), vM = view(fn, "M", M);
        for (const View* v : {&vm, &vl}) expect(fn, *v, DType::f64, Device::cpu, {in.B});
        expect(fn, vy, DType::f64, Device::cpu, {in.B, in.k});
        expect(fn, vM, DType::f64, Device::cpu, {in.B, in.k, in.k});
        on_dtype(fn, in.Z, [&](auto* t) {
          using T = std::remove_pointer_t<decltype(t)>;
          quad_update<T>(in.Z.ptr<const T>(), in.Z.stride[0], in.bias.ptr<const T>(), in.Y.ptr<const T>(),
                         in.Y.stride[0], in.Y.stride[1], in.B, in.C, in.k, vm.ptr<double>(), vl.ptr<double>(),
                         vy.ptr<double>(), vM.ptr<double>(), threads);
        });
      },
      py::arg("Z"), py::arg("bias"), py::arg("Y"), py::arg("m"), py::arg("l"), py::arg("ybar"), py::arg("M"),
      py::arg("threads"),
      "Merge one chunk (logits Z (B,C), projections Y (B,k,C)) into the running m, l (B,), ybar (B,k) and centered "
      "moment M (B,k,k) of y = U^T w (float64, in place).");
}

}  // namespace fisherfast
