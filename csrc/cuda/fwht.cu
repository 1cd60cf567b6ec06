// CUDA Walsh–Hadamard transform (docs/design.md §7), for N up to kTile² (2^26 float32, 2^24 float64).
//
// One kernel transforms tiles in shared memory: a tile is P×CC values at
// base + k·stride + c (k < P, c < CC) and gets H_P along k (radix-2
// butterflies, one __syncthreads per stage). With H_N = (H_{N/C} ⊗ I_C)(I_{N/C} ⊗ H_C):
//   pass 1: contiguous chunks of C = min(N, kTile) values (stride 1, CC = 1):
//           one block per row when the row fits, else one per chunk;
//   pass 2: only when N > kTile: P = N/C along stride C, CC columns per block.
// Tiles are read whole into shared memory before any write, so dst may be src.
// Memory: one read and one write per pass; shared memory: kTile·sizeof(T) per block.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fisherfast/fwht.h"
#include "fisherfast/view.h"

namespace py = pybind11;

namespace fisherfast {
namespace {

using std::int64_t;

// Tile size: 32 KiB of shared memory, under the 48 KiB available without opt-in.
template <typename T>
constexpr int64_t kTile = 32768 / sizeof(T);

template <typename T>
__global__ void fwht_tile_kernel(const T* __restrict__ src, T* dst, int64_t stride, int log2_p, int log2_cc,
                                 int64_t col_blocks, T scale) {
  extern __shared__ unsigned char smem_raw[];
  T* s = reinterpret_cast<T*>(smem_raw);
  const int64_t P = int64_t(1) << log2_p, CC = int64_t(1) << log2_cc, size = P << log2_cc;
  const int64_t group = blockIdx.x / col_blocks, col_block = blockIdx.x % col_blocks;
  const int64_t base = group * (P * stride) + col_block * CC;
  for (int64_t e = threadIdx.x; e < size; e += blockDim.x) {
    const int64_t k = e >> log2_cc, c = e & (CC - 1);
    s[e] = src[base + k * stride + c];
  }
  for (int log2_h = 0; log2_h < log2_p; ++log2_h) {
    __syncthreads();
    const int64_t h = int64_t(1) << log2_h;
    for (int64_t q = threadIdx.x; q < (size >> 1); q += blockDim.x) {
      const int64_t c = q & (CC - 1), pk = q >> log2_cc;
      const int64_t i = ((pk >> log2_h) << (log2_h + 1)) + (pk & (h - 1));
      const T a = s[(i << log2_cc) + c], b = s[((i + h) << log2_cc) + c];
      s[(i << log2_cc) + c] = a + b;
      s[((i + h) << log2_cc) + c] = a - b;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < size; e += blockDim.x) {
    const int64_t k = e >> log2_cc, c = e & (CC - 1);
    dst[base + k * stride + c] = s[e] * scale;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fwht (cuda): ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// P×CC tiles over all rows (total values = rows·n), stride between k's.
template <typename T>
void launch_tiles(const T* src, T* dst, int64_t total, int64_t stride, int log2_p, int log2_cc, T scale,
                  cudaStream_t stream) {
  const int64_t P = int64_t(1) << log2_p, CC = int64_t(1) << log2_cc;
  const int64_t col_blocks = stride / CC, blocks = total / (P * stride) * col_blocks;
  const int threads = static_cast<int>(std::clamp<int64_t>((P * CC) / 2, 32, 256));
  const size_t smem = static_cast<size_t>(P * CC) * sizeof(T);
  if (blocks > 0x7fffffff) throw std::invalid_argument("fwht (cuda): too many tiles for one launch");
  fwht_tile_kernel<T><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(src, dst, stride, log2_p, log2_cc,
                                                                                col_blocks, scale);
  check(cudaGetLastError(), "kernel launch");
}

template <typename T>
void fwht_rows(const T* src, T* dst, int64_t rows, int64_t n, T scale, cudaStream_t stream) {
  const int L = log2_exact(n), lt = log2_exact(kTile<T>);
  if (L > 2 * lt)
    throw std::invalid_argument("fwht (cuda): n must be <= 2^" + std::to_string(2 * lt) + " for this dtype");
  const int l1 = std::min(L, lt);
  const int64_t total = rows * n;
  if (L == l1) return launch_tiles<T>(src, dst, total, 1, l1, 0, scale, stream);
  launch_tiles<T>(src, dst, total, 1, l1, 0, T(1), stream);
  const int l2 = L - l1;  // H_{N/C} along stride C = 2^l1, as many columns as fit one tile
  launch_tiles<T>(dst, dst, total, int64_t(1) << l1, l2, lt - l2, scale, stream);
}

// src, dst: DLPack views (rows, n) of one float dtype on the GPU, contiguous; dst may be src.
void fwht(py::handle src_h, py::handle dst_h, double scale, std::uintptr_t stream) {
  const char* fn = "fwht (cuda)";
  const View src = view(fn, "src", src_h), dst = view(fn, "dst", dst_h);
  with_float_view(fn, src, [](auto*) {});
  expect(fn, src, src.dtype, Device::cuda, {-1, -1});
  const int64_t rows = src.size(0), n = src.size(1);
  expect(fn, dst, src.dtype, Device::cuda, {rows, n});
  if (!is_power_of_two(n)) throw std::invalid_argument("fwht (cuda): n must be a power of two, got " + std::to_string(n));
  if (rows == 0) return;
  py::gil_scoped_release release;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  with_float_view(fn, src, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fwht_rows<T>(src.ptr<const T>(), dst.ptr<T>(), rows, n, static_cast<T>(scale), s);
  });
}

}  // namespace

void bind_fwht_cuda(py::module_& m) {
  m.def("fwht", &fwht, py::arg("src"), py::arg("dst"), py::arg("scale"), py::arg("stream"),
        "Walsh–Hadamard transform of the rows of src (rows, n), a DLPack capsule of contiguous float32/float64 "
        "device values, into dst (same shape; may be src), times scale, on the given cudaStream_t (an integer). "
        "Asynchronous.");
}

}  // namespace fisherfast
