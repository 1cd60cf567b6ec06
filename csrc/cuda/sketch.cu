// Fused FisherSketch update on CUDA (docs/design.md §7): the two kernels around the
// FWHT (csrc/cuda/fwht.cu, called by the op layer between them).
//
//   fisher_sketch_prepare   one block per row: z_max and Z = Σ exp(z − z_max) by
//                           block reductions; q = exp(z − z_max) written signed
//                           into every sign block of the error buffers (D_b q).
//   fisher_sketch_features  one thread per feature j, looping over the rows:
//                           gather, u^e = (H D q)[idx]/Z − (H D e_y)[idx] (closed
//                           form), ψ products, float64 sums in registers, one
//                           add per owned coordinate (no atomics, deterministic);
//                           the first moment φ = u^a u^e/√m too when sums has
//                           four rows. A soft-cap slope is applied between the
//                           two by the op layer (fisher_sketch_common.apply_softcap).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fisherfast/sketch.h"
#include "fisherfast/view.h"

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
                                double inv_root_m, int kinds) {
  const std::int64_t j = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (j >= m) return;
  const std::int64_t i_ra = ra.idx[j], i_sa = sa.idx[j], i_re = re.idx[j], i_se = se.idx[j];
  double s[4] = {0.0, 0.0, 0.0, 0.0}, q[4] = {0.0, 0.0, 0.0, 0.0};
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
    const double phi = double(u_a) * double(u_e) * inv_root_m;  // the first moment (stored when kinds == 4)
    s[3] += phi;
    q[3] += phi * phi;
  }
  for (int k = 0; k < kinds; ++k) {
    sums[k * m + j] += s[k];
    sumsqs[k * m + j] += q[k];
  }
}

namespace py = pybind11;

// er, es (rows, n_blocks·N) ← D_b exp(z − z_max), Z (rows,) ← Σ exp(z − z_max), from z (rows, K); float32 views.
void prepare(py::handle z_h, py::handle er_h, py::handle es_h, py::handle r_h, py::handle s_h, py::handle Z_h,
             std::uintptr_t stream) {
  const char* fn = "fisher_sketch_prepare";
  const View z = view(fn, "z", z_h), er = view(fn, "er", er_h), es = view(fn, "es", es_h);
  const View r = view(fn, "r_signs", r_h), s = view(fn, "s_signs", s_h), Z = view(fn, "Z", Z_h);
  expect(fn, z, DType::f32, Device::cuda, {-1, -1});
  const std::int64_t rows = z.size(0), K = z.size(1);
  expect(fn, r, DType::f32, Device::cuda, {-1, -1});
  expect(fn, s, DType::f32, Device::cuda, {-1, -1});
  const std::int64_t nb_r = r.size(0), n_r = r.size(1), nb_s = s.size(0), n_s = s.size(1);
  if (n_r < K || n_s < K) throw std::invalid_argument("fisher_sketch_prepare: plan N smaller than K");
  expect(fn, er, DType::f32, Device::cuda, {rows, nb_r * n_r});
  expect(fn, es, DType::f32, Device::cuda, {rows, nb_s * n_s});
  expect(fn, Z, DType::f32, Device::cuda, {rows});
  if (rows == 0) return;
  prepare_kernel<<<static_cast<unsigned>(rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      z.ptr<const float>(), K, er.ptr<float>(), es.ptr<float>(), r.ptr<const float>(), nb_r, n_r,
      s.ptr<const float>(), nb_s, n_s, Z.ptr<float>());
  check(cudaGetLastError(), "fisher_sketch_prepare");
}

// The error side's plan (signs (n_blocks, N), idx (m,)); the activation side needs only idx.
SketchPlanView error_plan(const char* fn, const View& signs, const View& idx, std::int64_t m) {
  expect(fn, signs, DType::f32, Device::cuda, {-1, -1});
  expect(fn, idx, DType::i64, Device::cuda, {m});
  const std::int64_t N = signs.size(1);
  if (!is_power_of_two(N)) bad(fn, signs, "must have a power-of-two N columns");
  return {signs.ptr<const float>(), idx.ptr<const std::int64_t>(), signs.size(0), N, log2_exact(N)};
}

void features(py::handle sums_h, py::handle sumsqs_h, py::handle a_r_h, py::handle a_s_h, py::handle er_h,
              py::handle es_h, py::handle Z_h, py::handle y_h, py::handle ra_i, py::handle sa_i, py::handle re_i,
              py::handle se_i, py::handle re_s, py::handle se_s, std::uintptr_t stream) {
  const char* fn = "fisher_sketch_features";
  const View sums = view(fn, "sums", sums_h), sumsqs = view(fn, "sumsqs", sumsqs_h);
  const View a_r = view(fn, "a_r", a_r_h), a_s = view(fn, "a_s", a_s_h), er = view(fn, "er", er_h);
  const View es = view(fn, "es", es_h), Z = view(fn, "Z", Z_h), y = view(fn, "y", y_h);
  const View vra = view(fn, "ra_idx", ra_i), vsa = view(fn, "sa_idx", sa_i);
  expect(fn, sums, DType::f64, Device::cuda, {-1, -1});
  const std::int64_t kinds = sums.size(0), m = sums.size(1);
  if (kinds != 3 && kinds != 4) bad(fn, sums, "must have 3 rows, or 4 with the first moment");
  expect(fn, sumsqs, DType::f64, Device::cuda, {kinds, m});
  expect(fn, Z, DType::f32, Device::cuda, {-1});
  const std::int64_t rows = Z.size(0);
  for (const View* v : {&a_r, &a_s, &er, &es}) expect(fn, *v, DType::f32, Device::cuda, {rows, -1});
  expect(fn, y, DType::i64, Device::cuda, {rows});
  for (const View* v : {&vra, &vsa}) expect(fn, *v, DType::i64, Device::cuda, {m});
  // Only idx is read on the activation side; the error side also needs the signs for the one-hot.
  const SketchPlanView ra{nullptr, vra.ptr<const std::int64_t>(), 0, 0, 0};
  const SketchPlanView sa{nullptr, vsa.ptr<const std::int64_t>(), 0, 0, 0};
  const SketchPlanView re = error_plan(fn, view(fn, "re_signs", re_s), view(fn, "re_idx", re_i), m);
  const SketchPlanView se = error_plan(fn, view(fn, "se_signs", se_s), view(fn, "se_idx", se_i), m);
  if (er.size(1) != re.n_blocks * re.N || es.size(1) != se.n_blocks * se.N)
    throw std::invalid_argument("fisher_sketch_features: er/es must have n_blocks·N columns of their plans");
  if (m == 0 || rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((m + kThreads - 1) / kThreads);
  features_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      sums.ptr<double>(), sumsqs.ptr<double>(), a_r.ptr<const float>(), a_s.ptr<const float>(), er.ptr<const float>(),
      es.ptr<const float>(), Z.ptr<const float>(), y.ptr<const std::int64_t>(), ra, sa, re, se, a_r.size(1),
      a_s.size(1), er.size(1), es.size(1), rows, m, 1.0 / std::sqrt(static_cast<double>(m)), static_cast<int>(kinds));
  check(cudaGetLastError(), "fisher_sketch_features");
}

}  // namespace

void bind_sketch_cuda(pybind11::module_& m) {
  m.def("fisher_sketch_prepare", &prepare, pybind11::arg("z"), pybind11::arg("er"), pybind11::arg("es"),
        pybind11::arg("r_signs"), pybind11::arg("s_signs"), pybind11::arg("Z"), pybind11::arg("stream"),
        "er, es (rows, n_blocks·N, zeroed) ← D_b exp(z − z_max); Z (rows,) ← Σ exp(z − z_max). float32 DLPack "
        "views, on stream.");
  m.def("fisher_sketch_features", &features, pybind11::arg("sums"), pybind11::arg("sumsqs"), pybind11::arg("a_r"),
        pybind11::arg("a_s"), pybind11::arg("er"), pybind11::arg("es"), pybind11::arg("Z"), pybind11::arg("y"),
        pybind11::arg("ra_idx"), pybind11::arg("sa_idx"), pybind11::arg("re_idx"), pybind11::arg("se_idx"),
        pybind11::arg("re_signs"), pybind11::arg("se_signs"), pybind11::arg("stream"),
        "Gather the transformed buffers, subtract the closed-form one-hot, add Σψ and Σψ² (float64) into "
        "sums/sumsqs (3, m), or (4, m) with the first moment u^a u^e/√m in the fourth row. On stream.");
}

}  // namespace fisherfast
