// FisherSketch feature helpers shared by the CPU and CUDA kernels (docs/design.md §7).
//
// A plan (from fisherfast.ops.SRHTPlan) is n_blocks sign rows D_b of length
// N = 2^L and m gathered indices into the flattened (n_blocks·N) outputs of
// H_N D_b x̃. Per sample, with u^a = rᵃ·a, v^a = sᵃ·a, u^e = rᵉ·e, v^e = sᵉ·e:
//   ψ_joint = u^a u^e v^a v^e / √m,  ψ_act = u^a v^a / √m,  ψ_err = u^e v^e / √m
// and the state adds Σψ and Σψ² (float64) per kind, rows (joint, act, err).
#pragma once
#include <cstdint>

#include "fisherfast/common.h"
#include "fisherfast/fwht.h"

namespace fisherfast {

struct SketchPlanView {
  const float* signs;        // (n_blocks, N) ±1
  const std::int64_t* idx;   // (m,) into the flattened n_blocks·N outputs
  std::int64_t n_blocks, N;  // N a power of two
  int log2_N;
};

// (H_N D_b e_y)[i] at the flattened index j = b·N + i: D_b[y] · (−1)^popcount(i & y).
FF_HOST_DEVICE inline float onehot_feature(const SketchPlanView& plan, std::int64_t j, std::int64_t y) {
  const std::int64_t b = j >> plan.log2_N, i = j & (plan.N - 1);
  const float d_y = plan.signs[b * plan.N + y];
  return parity(static_cast<std::uint64_t>(i & y)) ? -d_y : d_y;
}

// The three features of one coordinate from its four projections.
struct SketchFeatures {
  double joint, act, err;
};

FF_HOST_DEVICE inline SketchFeatures sketch_features(float u_a, float v_a, float u_e, float v_e, double inv_root_m) {
  const double act = double(u_a) * double(v_a) * inv_root_m;
  const double err = double(u_e) * double(v_e);
  return {act * err, act, err * inv_root_m};
}

}  // namespace fisherfast
