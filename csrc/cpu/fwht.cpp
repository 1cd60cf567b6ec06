// CPU driver of the Walsh–Hadamard transform and the fused SRHT (docs/design.md §7).
//
// Kernels: csrc/include/fisherfast/fwht.h. Each hot entry point below is
// compiled three times (AVX-512, AVX2, baseline) through target_clones and
// picked at load time, so the portable build still uses the wide registers.
// OpenMP runs outside the clones (an outlined parallel body would not inherit
// the clone's target): threads split rows, or the blocks and passes of one row
// when there are fewer rows than threads.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fisherfast/fwht.h"
#include "fisherfast/view.h"

namespace py = pybind11;

namespace fisherfast {
namespace {

using std::int64_t;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_CLONES
#endif

FF_CLONES void row_f32(const float* src, float* dst, int64_t n, float scale) { fwht_cpu::row<float>(src, dst, n, scale); }
FF_CLONES void row_f64(const double* src, double* dst, int64_t n, double scale) {
  fwht_cpu::row<double>(src, dst, n, scale);
}
FF_CLONES void block_f32(const float* src, float* dst, int64_t nb, float scale) {
  fwht_cpu::block<float>(src, dst, nb, scale);
}
FF_CLONES void block_f64(const double* src, double* dst, int64_t nb, double scale) {
  fwht_cpu::block<double>(src, dst, nb, scale);
}
FF_CLONES void pass_f32(float* x, int64_t h, int r, int64_t u0, int64_t u1, float scale) {
  fwht_cpu::pass<float>(x, x, h, r, false, u0, u1, scale);
}
FF_CLONES void pass_f64(double* x, int64_t h, int r, int64_t u0, int64_t u1, double scale) {
  fwht_cpu::pass<double>(x, x, h, r, false, u0, u1, scale);
}

template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
  static void row(const float* s, float* d, int64_t n, float c) { row_f32(s, d, n, c); }
  static void block(const float* s, float* d, int64_t nb, float c) { block_f32(s, d, nb, c); }
  static void pass(float* x, int64_t h, int r, int64_t u0, int64_t u1, float c) { pass_f32(x, h, r, u0, u1, c); }
};
template <>
struct Kernels<double> {
  static void row(const double* s, double* d, int64_t n, double c) { row_f64(s, d, n, c); }
  static void block(const double* s, double* d, int64_t nb, double c) { block_f64(s, d, nb, c); }
  static void pass(double* x, int64_t h, int r, int64_t u0, int64_t u1, double c) { pass_f64(x, h, r, u0, u1, c); }
};

// Threads worth waking for `elements` values of work: one per kGrain, at most
// `requested` (a parallel region costs a wake-up and a barrier, which on a
// busy machine can take longer than a small transform).
constexpr int64_t kGrain = 32768;
int team_size(int64_t requested, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min(requested, elements / kGrain)));
}

// rows × n, row-major contiguous; dst may equal src.
template <typename T>
void fwht_rows(const T* src, T* dst, int64_t rows, int64_t n, T scale, int threads) {
  constexpr int64_t B = fwht_cpu::kBlock<T>;
  threads = team_size(threads, rows * n);
  if (rows >= threads || n < 2 * B) {
    const int nt = std::min<int64_t>(threads, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < rows; ++i) Kernels<T>::row(src + i * n, dst + i * n, n, scale);
    return;
  }
  // Fewer rows than threads: split each row's blocks, then each cross-block
  // pass's units, across the team (a barrier between passes).
  const int L = log2_exact(n), lb = log2_exact(B);
  const int64_t n_blocks = n / B;
#pragma omp parallel num_threads(threads)
  {
    int tid = 0, nt = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    for (int64_t i = 0; i < rows; ++i) {
      const T* s_row = src + i * n;
      T* d_row = dst + i * n;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < n_blocks; ++b) Kernels<T>::block(s_row + b * B, d_row + b * B, B, T(1));
      for (int s = lb, r; s < L; s += r) {
        r = fwht_cpu::next_radix(L - s);
        const int64_t units = fwht_cpu::pass_units_count<T>(n, r);
        const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
        Kernels<T>::pass(d_row, int64_t(1) << s, r, u0, u1, s + r == L ? scale : T(1));
#pragma omp barrier
      }
    }
  }
}

void check_fwht_args(int64_t rows, int64_t n, int threads) {
  if (rows < 0) throw std::invalid_argument("fwht: rows must be >= 0, got " + std::to_string(rows));
  if (!is_power_of_two(n)) throw std::invalid_argument("fwht: n must be a power of two, got " + std::to_string(n));
  if (threads < 1) throw std::invalid_argument("fwht: threads must be >= 1, got " + std::to_string(threads));
}

// An out-of-place output is usually freshly allocated, so its first touch
// faults every 4 KiB page (on a 64 × 2^17 float32 output the 8,192 faults cost
// about three times the transform itself). Asking for transparent huge pages
// on the 2 MiB-aligned part of the output turns them into a few 2 MiB faults
// where the kernel allows it (THP "madvise" mode); a no-op elsewhere, and
// harmless for memory already touched.
void advise_huge_pages(std::uintptr_t p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  const std::uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// src, dst: DLPack views (rows, n) of one float dtype on the CPU, contiguous;
// dst may be src.
void fwht(py::handle src_h, py::handle dst_h, double scale, int threads) {
  const char* fn = "fwht";
  const View src = view(fn, "src", src_h), dst = view(fn, "dst", dst_h);
  with_float_view(fn, src, [](auto*) {});
  expect(fn, src, src.dtype, Device::cpu, {-1, -1});
  const int64_t rows = src.size(0), n = src.size(1);
  expect(fn, dst, src.dtype, Device::cpu, {rows, n});
  check_fwht_args(rows, n, threads);
  py::gil_scoped_release release;
  if (src.data != dst.data)
    advise_huge_pages(reinterpret_cast<std::uintptr_t>(dst.data), std::size_t(rows) * n * (src.dtype == DType::f64 ? 8 : 4));
  with_float_view(fn, src, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwht_rows<T>(src.ptr<const T>(), dst.ptr<T>(), rows, n, static_cast<T>(scale), threads);
  });
}

template <typename T>
void srht_rows(const T* x, const T* signs, const int64_t* idx, T* out, int64_t rows, int64_t n_in, int64_t N,
               int64_t n_blocks, int64_t m, int threads) {
  // Features grouped by block: (output column j, index within the block).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> by_block(n_blocks);
  for (int64_t j = 0; j < m; ++j) by_block[idx[j] / N].emplace_back(j, idx[j] % N);
  const int nt = std::min<int64_t>(team_size(threads, rows * N * n_blocks), rows);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<T> scratch(N);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T* x_row = x + i * n_in;
      T* out_row = out + i * m;
      for (int64_t b = 0; b < n_blocks; ++b) {
        if (by_block[b].empty()) continue;
        const T* D_b = signs + b * N;
        for (int64_t k = 0; k < n_in; ++k) scratch[k] = x_row[k] * D_b[k];
        std::fill(scratch.begin() + n_in, scratch.end(), T(0));
        Kernels<T>::row(scratch.data(), scratch.data(), N, T(1));
        for (const auto& [j, k] : by_block[b]) out_row[j] = scratch[k];
      }
    }
  }
}

// x (rows, n_in), signs (n_blocks, N) of x's float dtype, idx (m,) int64, out
// (rows, m): DLPack views on the CPU, contiguous.
void srht(py::handle x_h, py::handle signs_h, py::handle idx_h, py::handle out_h, int threads) {
  const char* fn = "srht";
  const View x = view(fn, "x", x_h), signs = view(fn, "signs", signs_h), idx = view(fn, "idx", idx_h);
  const View out = view(fn, "out", out_h);
  with_float_view(fn, x, [](auto*) {});
  expect(fn, x, x.dtype, Device::cpu, {-1, -1});
  expect(fn, signs, x.dtype, Device::cpu, {-1, -1});
  const int64_t rows = x.size(0), n_in = x.size(1), n_blocks = signs.size(0), N = signs.size(1);
  expect(fn, idx, DType::i64, Device::cpu, {-1});
  const int64_t m = idx.size(0);
  expect(fn, out, x.dtype, Device::cpu, {rows, m});
  check_fwht_args(rows, N, threads);
  if (n_in < 1 || n_in > N)
    throw std::invalid_argument("srht: n_in must be in [1, N], got " + std::to_string(n_in));
  if (n_blocks < 1 || m < 1) throw std::invalid_argument("srht: n_blocks and m must be >= 1");
  const int64_t* idx_p = idx.ptr<const int64_t>();
  for (int64_t j = 0; j < m; ++j)
    if (idx_p[j] < 0 || idx_p[j] >= n_blocks * N)
      throw std::invalid_argument("srht: idx[" + std::to_string(j) + "] out of range [0, n_blocks*N)");
  py::gil_scoped_release release;
  with_float_view(fn, x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    srht_rows<T>(x.ptr<const T>(), signs.ptr<const T>(), idx_p, out.ptr<T>(), rows, n_in, N, n_blocks, m, threads);
  });
}

}  // namespace

void fwht_row(const float* src, float* dst, int64_t n, float scale) { row_f32(src, dst, n, scale); }
void fwht_row(const double* src, double* dst, int64_t n, double scale) { row_f64(src, dst, n, scale); }

void bind_fwht(py::module_& m) {
  m.def("fwht", &fwht, py::arg("src"), py::arg("dst"), py::arg("scale"), py::arg("threads"),
        "Walsh–Hadamard transform of the rows of src (rows, n), a DLPack capsule of contiguous float32/float64 "
        "CPU values, into dst (same shape; may be src), times scale. Releases the GIL.");
  m.def("srht", &srht, py::arg("x"), py::arg("signs"), py::arg("idx"), py::arg("out"), py::arg("threads"),
        "Fused SRHT: out[i, j] = (H_N D_b x̃_i)[idx_j mod N], b = idx_j div N; DLPack capsules x (rows, n_in), "
        "signs (n_blocks, N) (same dtype), idx (m,) int64, out (rows, m). Releases the GIL.");
}

}  // namespace fisherfast
