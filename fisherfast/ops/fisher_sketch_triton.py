"""Triton kernels of the fused FisherSketch update (docs/design.md §7).

Two kernels around the FWHT (fisherfast.ops.fwht, triton backend):

- ``_softmax_signs_kernel`` (one program per row): z_max, then q = exp(z − z_max)
  written signed into every sign block of the two error buffers, D_b q (the
  padding stays zero), and Z = Σ q. The transform is linear, so 1/Z is applied
  after the gather.
- ``_features_kernel`` (one program per BLOCK_M features): for every row, the
  four gathered projections, u^e = (H D q)[idx]/Z − (H D e_y)[idx] with the
  one-hot part in closed form, the three features ψ and their float64
  accumulation in registers (and the first moment φ = u^a u^e/√m when sums
  has a fourth row); each program adds its own slice of sums/sumsqs (no
  atomics, deterministic). A soft-cap slope is applied between the two
  (``fisher_sketch_common.apply_softcap``).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from fisherfast.ops.fisher_sketch_common import N_KINDS, staged

BLOCK_K = 1024
BLOCK_M = 128


@triton.jit
def _softmax_signs_kernel(z_ptr, K, er_ptr, es_ptr, r_signs, s_signs, n_r, nb_r, n_s, nb_s, Z_ptr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    z_row = z_ptr + row * K
    running = tl.full([BLOCK], float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK):
        running = tl.maximum(running, tl.load(z_row + k0 + offs, mask=k0 + offs < K, other=float("-inf")))
    z_max = tl.max(running, axis=0)
    total = tl.zeros([BLOCK], tl.float32)
    er_row = er_ptr + row * nb_r * n_r
    es_row = es_ptr + row * nb_s * n_s
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        mask = k < K
        q = tl.where(mask, tl.exp(tl.load(z_row + k, mask=mask, other=0.0) - z_max), 0.0)
        total += q
        for b in range(nb_r):
            tl.store(er_row + b * n_r + k, q * tl.load(r_signs + b * n_r + k, mask=mask, other=0.0), mask=mask)
        for b in range(nb_s):
            tl.store(es_row + b * n_s + k, q * tl.load(s_signs + b * n_s + k, mask=mask, other=0.0), mask=mask)
    tl.store(Z_ptr + row, tl.sum(total, axis=0))


@triton.jit
def _onehot(signs, idx, y, log2_n):
    """(H_N D_b e_y)[i] at flattened idx = b·N + i: D_b[y]·(−1)^popcount(i & y)."""
    n = tl.full(idx.shape, 1, tl.int64) << log2_n
    d_y = tl.load(signs + (idx >> log2_n) * n + y)
    p = (idx & (n - 1)) & y
    p ^= p >> 32
    p ^= p >> 16
    p ^= p >> 8
    p ^= p >> 4
    p ^= p >> 2
    p ^= p >> 1
    return tl.where((p & 1) == 1, -d_y, d_y)


@triton.jit
def _features_kernel(ar, as_, er, es, Z, y, ra_idx, sa_idx, re_idx, se_idx, re_signs, se_signs, len_ar, len_as,
                     len_er, len_es, log2_re, log2_se, rows, m, sums, sumsqs, inv_root_m, BLOCK: tl.constexpr,
                     MEAN: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < m
    i_ra = tl.load(ra_idx + j, mask=mask, other=0)
    i_sa = tl.load(sa_idx + j, mask=mask, other=0)
    i_re = tl.load(re_idx + j, mask=mask, other=0)
    i_se = tl.load(se_idx + j, mask=mask, other=0)
    s_joint = tl.zeros([BLOCK], tl.float64)
    s_act = tl.zeros([BLOCK], tl.float64)
    s_err = tl.zeros([BLOCK], tl.float64)
    q_joint = tl.zeros([BLOCK], tl.float64)
    q_act = tl.zeros([BLOCK], tl.float64)
    q_err = tl.zeros([BLOCK], tl.float64)
    s_mean = tl.zeros([BLOCK], tl.float64)
    q_mean = tl.zeros([BLOCK], tl.float64)
    for r in range(rows):
        r64 = tl.full([BLOCK], r, tl.int64)
        y_r = tl.load(y + r64)
        inv_Z = 1.0 / tl.load(Z + r64)
        u_a = tl.load(ar + r64 * len_ar + i_ra, mask=mask, other=0.0)
        v_a = tl.load(as_ + r64 * len_as + i_sa, mask=mask, other=0.0)
        u_e = tl.load(er + r64 * len_er + i_re, mask=mask, other=0.0) * inv_Z - _onehot(re_signs, i_re, y_r, log2_re)
        v_e = tl.load(es + r64 * len_es + i_se, mask=mask, other=0.0) * inv_Z - _onehot(se_signs, i_se, y_r, log2_se)
        act = u_a.to(tl.float64) * v_a.to(tl.float64) * inv_root_m
        err = u_e.to(tl.float64) * v_e.to(tl.float64)
        joint = act * err
        err = err * inv_root_m
        s_joint += joint
        s_act += act
        s_err += err
        q_joint += joint * joint
        q_act += act * act
        q_err += err * err
        if MEAN:  # the first moment φ = u^a u^e / √m
            phi = u_a.to(tl.float64) * u_e.to(tl.float64) * inv_root_m
            s_mean += phi
            q_mean += phi * phi
    tl.store(sums + j, tl.load(sums + j, mask=mask, other=0.0) + s_joint, mask=mask)
    tl.store(sums + m + j, tl.load(sums + m + j, mask=mask, other=0.0) + s_act, mask=mask)
    tl.store(sums + 2 * m + j, tl.load(sums + 2 * m + j, mask=mask, other=0.0) + s_err, mask=mask)
    tl.store(sumsqs + j, tl.load(sumsqs + j, mask=mask, other=0.0) + q_joint, mask=mask)
    tl.store(sumsqs + m + j, tl.load(sumsqs + m + j, mask=mask, other=0.0) + q_act, mask=mask)
    tl.store(sumsqs + 2 * m + j, tl.load(sumsqs + 2 * m + j, mask=mask, other=0.0) + q_err, mask=mask)
    if MEAN:
        tl.store(sums + 3 * m + j, tl.load(sums + 3 * m + j, mask=mask, other=0.0) + s_mean, mask=mask)
        tl.store(sumsqs + 3 * m + j, tl.load(sumsqs + 3 * m + j, mask=mask, other=0.0) + q_mean, mask=mask)


def prepare_triton(logits, re_signs, se_signs, er, es, Z) -> None:
    """er, es (rows, n_blocks·N, zeroed) ← D_b exp(z − z_max); Z (rows,) ← Σ exp(z − z_max)."""
    rows, K = logits.shape
    _softmax_signs_kernel[(rows,)](logits, K, er, es, re_signs, se_signs, re_signs.shape[1], re_signs.shape[0],
                                   se_signs.shape[1], se_signs.shape[0], Z, BLOCK=min(BLOCK_K, triton.next_power_of_2(K)))


def features_triton(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_idx, sa_idx, re_idx, se_idx, re_signs, se_signs) -> None:
    """Gather, one-hot correction, ψ products; adds Σψ, Σψ² over the rows into sums, sumsqs (3, m),
    or (4, m) with the first moment φ = u^a u^e / √m in the fourth row."""
    m = ra_idx.shape[0]
    _features_kernel[(triton.cdiv(m, BLOCK_M),)](
        a_r, a_s, er, es, Z, y, ra_idx, sa_idx, re_idx, se_idx, re_signs, se_signs, a_r.shape[1], a_s.shape[1],
        er.shape[1], es.shape[1], re_signs.shape[1].bit_length() - 1, se_signs.shape[1].bit_length() - 1, Z.shape[0],
        m, sums, sumsqs, 1.0 / math.sqrt(m), BLOCK=BLOCK_M, MEAN=sums.shape[0] > N_KINDS)


def update(sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=None) -> None:
    """The backend's op (signature as ``fisher_sketch_reference.update``): the
    staged pipeline with these kernels and the triton fwht."""
    staged("triton", prepare_triton, features_triton, sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=softcap)
