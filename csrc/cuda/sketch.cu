// Fused FisherSketch update on CUDA (docs/design.md §7): the two kernels around the
// FWHT (csrc/cuda/fwht.cu, called by the op layer between them).
//
//   fisher_sketch_prepare   one block per row: z_max and Z = Σ exp(z − z_max) by
//                           block reductions; q = exp(z − z_max) written signed
//                           into every sign block of the error buffers (D_b q).
//   fisher_sketch_features  one thread per feature j, looping over the rows:
//                           gather, u^e = (H D q)[idx]/Z − (H D e_y)[idx] (closed
//                           form), ψ products, float64 sums in registers, one
//                           add per owned coordinate (no atomics, deterministic).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fisherfast/sketch.h"

namespace fisherfast {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Block-wide reduction (blockDim.x a multiple of 32); identity fills the unused warp slots.
template <typename Op>
__device__ float block_reduce(float v, float* shared, Op op, float identity) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float out = shared[0];
  __syncthreads();
  return out;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

__global__ void prepare_kernel(const float* __restrict__ z, std::int64_t K, float* __restrict__ er,
                               float* __restrict__ es, const float* __restrict__ r_signs, std::int64_t nb_r,
                               std::int64_t n_r, const float* __restrict__ s_signs, std::int64_t nb_s,
                               std::int64_t n_s, float* __restrict__ Z) {
  __shared__ float shared[32];
  const std::int64_t row = blockIdx.x;
  const float* z_row = z + row * K;
  float running = -INFINITY;
  for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) running = fmaxf(running, z_row[k]);
  const float z_max = block_reduce(running, shared, MaxOp(), -INFINITY);
  float total = 0.0f;
  float* er_row = er + row * nb_r * n_r;
  float* es_row = es + row * nb_s * n_s;
  for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float q = expf(z_row[k] - z_max);
    total += q;
    for (std::int64_t b = 0; b < nb_r; ++b) er_row[b * n_r + k] = q * r_signs[b * n_r + k];
    for (std::int64_t b = 0; b < nb_s; ++b) es_row[b * n_s + k] = q * s_signs[b * n_s + k];
  }
  total = block_reduce(total, shared, SumOp(), 0.0f);
  if (threadIdx.x == 0) Z[row] = total;
}

__global__ void features_kernel(double* __restrict__ sums, double* __restrict__ sumsqs, const float* __restrict__ a_r,
                                const float* __restrict__ a_s, const float* __restrict__ er,
                                const float* __restrict__ es, const float* __restrict__ Z,
                                const std::int64_t* __restrict__ y, SketchPlanView ra, SketchPlanView sa,
                                SketchPlanView re, SketchPlanView se, std::int64_t len_ar, std::int64_t len_as,
                                std::int64_t len_er, std::int64_t len_es, std::int64_t rows, std::int64_t m,
                                double inv_root_m) {
  const std::int64_t j = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  const std::int64_t i_ra = ra.idx[j], i_sa = sa.idx[j], i_re = re.idx[j], i_se = se.idx[j];
  double s[3] = {0.0, 0.0, 0.0}, q[3] = {0.0, 0.0, 0.0};
  for (std::int64_t r = 0; r < rows; ++r) {
    const float inv_Z = 1.0f / Z[r];
    const std::int64_t y_r = y[r];
    const float u_a = a_r[r * len_ar + i_ra], v_a = a_s[r * len_as + i_sa];
    const float u_e = er[r * len_er + i_re] * inv_Z - onehot_feature(re, i_re, y_r);
    const float v_e = es[r * len_es + i_se] * inv_Z - onehot_feature(se, i_se, y_r);
    const SketchFeatures f = sketch_features(u_a, v_a, u_e, v_e, inv_root_m);
    s[0] += f.joint;
    s[1] += f.act;
    s[2] += f.err;
    q[0] += f.joint * f.joint;
    q[1] += f.act * f.act;
    q[2] += f.err * f.err;
  }
  for (int k = 0; k < 3; ++k) {
    sums[k * m + j] += s[k];
    sumsqs[k * m + j] += q[k];
  }
}

int log2_of(std::int64_t n, const char* name) {
  if (!is_power_of_two(n)) throw std::invalid_argument(std::string(name) + " must be a power of two");
  return log2_exact(n);
}

void prepare(std::uintptr_t z, std::int64_t rows, std::int64_t K, std::uintptr_t er, std::uintptr_t es,
             std::uintptr_t r_signs, std::int64_t nb_r, std::int64_t n_r, std::uintptr_t s_signs, std::int64_t nb_s,
             std::int64_t n_s, std::uintptr_t Z, std::uintptr_t stream) {
  if (n_r < K || n_s < K) throw std::invalid_argument("plan N smaller than K");
  if (rows == 0) return;
  prepare_kernel<<<static_cast<unsigned>(rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      as_ptr<const float>(z), K, as_ptr<float>(er), as_ptr<float>(es), as_ptr<const float>(r_signs), nb_r, n_r,
      as_ptr<const float>(s_signs), nb_s, n_s, as_ptr<float>(Z));
  check(cudaGetLastError(), "fisher_sketch_prepare");
}

void features(std::uintptr_t sums, std::uintptr_t sumsqs, std::uintptr_t a_r, std::uintptr_t a_s, std::uintptr_t er,
              std::uintptr_t es, std::uintptr_t Z, std::uintptr_t y, std::uintptr_t ra_i, std::uintptr_t sa_i,
              std::uintptr_t re_i, std::uintptr_t se_i, std::uintptr_t re_s, std::uintptr_t se_s, std::int64_t len_ar,
              std::int64_t len_as, std::int64_t len_er, std::int64_t len_es, std::int64_t n_re, std::int64_t n_se,
              std::int64_t rows, std::int64_t m, std::uintptr_t stream) {
  // Only idx is read on the activation side; the error side also needs the signs for the one-hot.
  const SketchPlanView ra{nullptr, as_ptr<const std::int64_t>(ra_i), 0, 0, 0};
  const SketchPlanView sa{nullptr, as_ptr<const std::int64_t>(sa_i), 0, 0, 0};
  const SketchPlanView re{as_ptr<const float>(re_s), as_ptr<const std::int64_t>(re_i), len_er / n_re, n_re,
                          log2_of(n_re, "re N")};
  const SketchPlanView se{as_ptr<const float>(se_s), as_ptr<const std::int64_t>(se_i), len_es / n_se, n_se,
                          log2_of(n_se, "se N")};
  if (m == 0 || rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((m + kThreads - 1) / kThreads);
  features_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      as_ptr<double>(sums), as_ptr<double>(sumsqs), as_ptr<const float>(a_r), as_ptr<const float>(a_s),
      as_ptr<const float>(er), as_ptr<const float>(es), as_ptr<const float>(Z), as_ptr<const std::int64_t>(y), ra, sa,
      re, se, len_ar, len_as, len_er, len_es, rows, m, 1.0 / std::sqrt(static_cast<double>(m)));
  check(cudaGetLastError(), "fisher_sketch_features");
}

}  // namespace

void bind_sketch_cuda(pybind11::module_& m) {
  m.def("fisher_sketch_prepare", &prepare,
        "er, es (rows, n_blocks·N, zeroed) ← D_b exp(z − z_max); Z (rows,) ← Σ exp(z − z_max). float32, on stream.");
  m.def("fisher_sketch_features", &features,
        "Gather the transformed buffers, subtract the closed-form one-hot, add Σψ and Σψ² (float64) into "
        "sums/sumsqs (3, m). On stream.");
}

}  // namespace fisherfast
