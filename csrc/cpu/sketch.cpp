// Fused FisherSketch update on the CPU (docs/design.md §7): per row of logits,
// softmax → signs (→ soft-cap slope) → FWHT → gather → one-hot correction → feature products →
// float64 accumulation. Rows run in parallel (OpenMP); each thread owns the
// transform scratch of one row (2·n_blocks·N floats per side) and its own
// float64 partial sums, reduced in thread order at the end. The caller
// allocates that scratch (torch tensors), so the kernel itself allocates nothing.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fisherfast/fwht.h"
#include "fisherfast/sketch.h"
#include "fisherfast/view.h"

namespace fisherfast {
namespace {

namespace py = pybind11;

constexpr int kKinds = 3;  // joint, activation, error; a fourth row (the first moment) when the state has it

// exp(x) for x ≤ 0 (softmax after the max shift), Cephes-style: x = n ln2 + r,
// |r| ≤ ln2/2, degree-6 polynomial, 2^n by exponent bits; < 1 ulp on [−87, 0]
// against double exp. Plain,
// branch-free arithmetic so the loop vectorizes (libm expf does not without
// -ffast-math). x < −87 is clamped (exp(−87) ≈ 1.6e−38, negligible next to Z ≥ 1).
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23 trick)
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Scratch {
  float *a_r, *a_s, *e_r, *e_s;  // transform buffers of one row
  double* acc;                   // (2·kinds, m): Σψ then Σψ²
  std::int64_t kinds;            // kKinds, or kKinds + 1 with the first moment φ = u^a u^e / √m
  float softcap;                 // c > 0 of a capped head (logits z′ = c·tanh(z/c)), or 0 for none
};

// s = 1 − tanh²(z/c) = (1 − t)(1 + t), t = z′/c clamped to [−1, 1] (a −inf mask gives 0).
__attribute__((always_inline)) inline float softcap_slope(float z_capped, float inv_c) {
  const float t = std::min(1.0f, std::max(-1.0f, z_capped * inv_c));
  return (1.0f - t) * (1.0f + t);
}

// Signs then FWHT of every block: buf = ⊕_b H_N D_b x̃ (x zero-padded to N).
__attribute__((always_inline)) inline void signed_transform(const float* x, std::int64_t n_in,
                                                            const SketchPlanView& plan, float* buf) {
  for (std::int64_t b = 0; b < plan.n_blocks; ++b) {
    float* out = buf + b * plan.N;
    const float* sign = plan.signs + b * plan.N;
#pragma omp simd
    for (std::int64_t i = 0; i < n_in; ++i) out[i] = x[i] * sign[i];
    std::memset(out + n_in, 0, (plan.N - n_in) * sizeof(float));
    fwht_row(out, out, plan.N, 1.0f);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void sketch_row(
    const float* a, const float* z, std::int64_t y_given, double u, std::int64_t d, std::int64_t K, std::int64_t m,
    const SketchPlanView& ra, const SketchPlanView& sa, const SketchPlanView& re, const SketchPlanView& se,
    Scratch& s) {
  signed_transform(a, d, ra, s.a_r);
  signed_transform(a, d, sa, s.a_s);

  // Unnormalized softmax q = exp(z − max z) written signed into block 0 of both
  // error buffers; the transform is linear, so 1/Z is applied after the gather.
  float z_max = z[0];
#pragma omp simd reduction(max : z_max)
  for (std::int64_t k = 0; k < K; ++k) z_max = std::max(z_max, z[k]);
  float* __restrict er = s.e_r;
  float* __restrict es = s.e_s;
  for (std::int64_t k = 0; k < K; ++k) {
    const float q = exp_nonpositive(z[k] - z_max);
    er[k] = q * re.signs[k];
    es[k] = q * se.signs[k];
  }
  // Z = Σ q: float partial sums over short chunks (vectorized), added in float64.
  constexpr std::int64_t kChunk = 2048;
  double Z = 0.0;
  for (std::int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const std::int64_t k1 = std::min(K, k0 + kChunk);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (std::int64_t k = k0; k < k1; ++k) part += std::fabs(er[k]);
    Z += part;
  }
  std::int64_t y = y_given;
  if (y < 0) {  // y ∼ p by inverse CDF: the first k with Σ_{i≤k} q_i > u·Z
    const double target = u * Z;
    double c = 0.0;
    y = K - 1;
    for (std::int64_t k = 0; k < K; ++k) {
      c += std::fabs(er[k]);
      if (c > target) {
        y = k;
        break;
      }
    }
  }
  float s_y = 1.0f;  // soft-cap: e = s ⊙ (p − e_y), so block 0 holds D (s ⊙ q) and the one-hot part is s_y e_y
  if (s.softcap > 0.0f) {
    const float inv_c = 1.0f / s.softcap;
#pragma omp simd
    for (std::int64_t k = 0; k < K; ++k) {
      const float slope = softcap_slope(z[k], inv_c);
      er[k] *= slope;
      es[k] *= slope;
    }
    s_y = softcap_slope(z[y], inv_c);
  }
  for (std::int64_t b = 1; b < re.n_blocks; ++b)  // further sign blocks share q
    for (std::int64_t k = 0; k < K; ++k) er[b * re.N + k] = std::fabs(er[k]) * re.signs[b * re.N + k];
  for (std::int64_t b = 1; b < se.n_blocks; ++b)
    for (std::int64_t k = 0; k < K; ++k) es[b * se.N + k] = std::fabs(es[k]) * se.signs[b * se.N + k];
  for (std::int64_t b = 0; b < re.n_blocks; ++b) {
    std::memset(er + b * re.N + K, 0, (re.N - K) * sizeof(float));
    fwht_row(er + b * re.N, er + b * re.N, re.N, 1.0f);
  }
  for (std::int64_t b = 0; b < se.n_blocks; ++b) {
    std::memset(es + b * se.N + K, 0, (se.N - K) * sizeof(float));
    fwht_row(es + b * se.N, es + b * se.N, se.N, 1.0f);
  }

  const float inv_Z = static_cast<float>(1.0 / Z);
  const double inv_root_m = 1.0 / std::sqrt(static_cast<double>(m));
  double* sum = s.acc;
  double* sq = sum + s.kinds * m;
  const bool mean = s.kinds > kKinds;
  for (std::int64_t j = 0; j < m; ++j) {
    const float u_a = s.a_r[ra.idx[j]], v_a = s.a_s[sa.idx[j]];
    const float u_e = er[re.idx[j]] * inv_Z - s_y * onehot_feature(re, re.idx[j], y);
    const float v_e = es[se.idx[j]] * inv_Z - s_y * onehot_feature(se, se.idx[j], y);
    const SketchFeatures f = sketch_features(u_a, v_a, u_e, v_e, inv_root_m);
    sum[j] += f.joint;
    sum[m + j] += f.act;
    sum[2 * m + j] += f.err;
    sq[j] += f.joint * f.joint;
    sq[m + j] += f.act * f.act;
    sq[2 * m + j] += f.err * f.err;
    if (mean) {
      const double phi = double(u_a) * double(u_e) * inv_root_m;
      sum[3 * m + j] += phi;
      sq[3 * m + j] += phi * phi;
    }
  }
}

// One plan from its (signs (n_blocks, N) float32, idx (m,) int64) views.
SketchPlanView plan_view(const char* fn, const View& signs, const View& idx, std::int64_t m, std::int64_t n_in) {
  expect(fn, signs, DType::f32, Device::cpu, {-1, -1});
  expect(fn, idx, DType::i64, Device::cpu, {m});
  const std::int64_t N = signs.size(1);
  if (!is_power_of_two(N)) bad(fn, signs, "must have a power-of-two N columns");
  if (N < n_in) bad(fn, signs, "must have N >= its input size " + std::to_string(n_in));
  return {signs.ptr<const float>(), idx.ptr<const std::int64_t>(), signs.size(0), N, log2_exact(N)};
}

std::int64_t scratch_floats(const SketchPlanView& ra, const SketchPlanView& sa, const SketchPlanView& re,
                            const SketchPlanView& se) {
  return ra.n_blocks * ra.N + sa.n_blocks * sa.N + re.n_blocks * re.N + se.n_blocks * se.N;
}

void fisher_sketch_update(py::handle sums_h, py::handle sumsqs_h, py::handle a_h, py::handle z_h, py::handle y_h,
                          py::handle u_h, py::handle ra_s, py::handle ra_i, py::handle sa_s, py::handle sa_i,
                          py::handle re_s, py::handle re_i, py::handle se_s, py::handle se_i, py::handle scratch_h,
                          py::handle acc_h, int threads, double softcap) {
  const char* fn = "fisher_sketch_update";
  if (threads < 1) throw std::invalid_argument("fisher_sketch_update: threads must be >= 1");
  if (!(softcap >= 0.0) || std::isinf(softcap))
    throw std::invalid_argument("fisher_sketch_update: softcap must be a finite c > 0, or 0 for none");
  const View vsums = view(fn, "sums", sums_h), vsumsqs = view(fn, "sumsqs", sumsqs_h);
  const View va = view(fn, "a", a_h), vz = view(fn, "logits", z_h);
  const View vy = view(fn, "y", y_h, true), vu = view(fn, "u", u_h, true);
  if (bool(vy) == bool(vu)) throw std::invalid_argument("fisher_sketch_update: give exactly one of y or u");
  expect(fn, va, DType::f32, Device::cpu, {-1, -1});
  const std::int64_t rows = va.size(0), d = va.size(1);
  expect(fn, vz, DType::f32, Device::cpu, {rows, -1});
  const std::int64_t K = vz.size(1);
  expect(fn, vy, DType::i64, Device::cpu, {rows});
  expect(fn, vu, DType::f64, Device::cpu, {rows});
  expect(fn, vsums, DType::f64, Device::cpu, {-1, -1});
  const std::int64_t kinds = vsums.size(0), m = vsums.size(1);
  if (kinds != kKinds && kinds != kKinds + 1) bad(fn, vsums, "must have 3 rows, or 4 with the first moment");
  expect(fn, vsumsqs, DType::f64, Device::cpu, {kinds, m});
  const SketchPlanView ra = plan_view(fn, view(fn, "ra_signs", ra_s), view(fn, "ra_idx", ra_i), m, d);
  const SketchPlanView sa = plan_view(fn, view(fn, "sa_signs", sa_s), view(fn, "sa_idx", sa_i), m, d);
  const SketchPlanView re = plan_view(fn, view(fn, "re_signs", re_s), view(fn, "re_idx", re_i), m, K);
  const SketchPlanView se = plan_view(fn, view(fn, "se_signs", se_s), view(fn, "se_idx", se_i), m, K);
  const std::int64_t per_thread = scratch_floats(ra, sa, re, se);
  const View vscratch = view(fn, "scratch", scratch_h), vacc = view(fn, "acc", acc_h);
  expect(fn, vscratch, DType::f32, Device::cpu, {threads, per_thread});
  expect(fn, vacc, DType::f64, Device::cpu, {threads, 2 * kinds, m});
  const float* a = va.ptr<const float>();
  const float* z = vz.ptr<const float>();
  const std::int64_t* y = vy.ptr<const std::int64_t>();
  const double* u = vu.ptr<const double>();
  double* sums = vsums.ptr<double>();
  double* sumsqs = vsumsqs.ptr<double>();
  float* scratch = vscratch.ptr<float>();
  double* acc = vacc.ptr<double>();

  pybind11::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    Scratch s;
    s.a_r = scratch + t * per_thread;
    s.a_s = s.a_r + ra.n_blocks * ra.N;
    s.e_r = s.a_s + sa.n_blocks * sa.N;
    s.e_s = s.e_r + re.n_blocks * re.N;
    s.acc = acc + t * 2 * kinds * m;
    s.kinds = kinds;
    s.softcap = static_cast<float>(softcap);
    std::fill(s.acc, s.acc + 2 * kinds * m, 0.0);
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r)
      sketch_row(a + r * d, z + r * K, y ? y[r] : -1, u ? u[r] : 0.0, d, K, m, ra, sa, re, se, s);
  }
  for (int t = 0; t < threads; ++t) {  // thread order: deterministic for a fixed thread count
    const double* part = acc + t * 2 * kinds * m;
    for (std::int64_t j = 0; j < kinds * m; ++j) {
      sums[j] += part[j];
      sumsqs[j] += part[kinds * m + j];
    }
  }
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void bind_sketch(pybind11::module_& m) {
  m.def("fisher_sketch_update", &fisher_sketch_update, py::arg("sums"), py::arg("sumsqs"), py::arg("a"),
        py::arg("logits"), py::arg("y"), py::arg("u"), py::arg("ra_signs"), py::arg("ra_idx"), py::arg("sa_signs"),
        py::arg("sa_idx"), py::arg("re_signs"), py::arg("re_idx"), py::arg("se_signs"), py::arg("se_idx"),
        py::arg("scratch"), py::arg("acc"), py::arg("threads"), py::arg("softcap") = 0.0,
        "Fused FisherSketch update of float64 sums/sumsqs (3, m) — or (4, m), the fourth row the first moment "
        "u^a u^e/√m — from a (rows, d) and logits (rows, K), float32; labels y (int64) or uniforms u (float64) "
        "for y ∼ p (the other None); plans as signs (n_blocks, N) float32 and idx (m,) int64. Scratch: (threads, "
        "Σ n_blocks·N over the four plans) float32 and (threads, 2·rows of sums, m) float64. softcap c > 0: the "
        "logits are capped z′ = c·tanh(z/c) and the error is (1 − (z′/c)²) ⊙ (p − e_y); 0 for none. "
        "Tensors are DLPack capsules.");
  m.def("fisher_sketch_max_threads", &max_threads, "OpenMP threads a fisher_sketch_update call may use.");
}

}  // namespace fisherfast
