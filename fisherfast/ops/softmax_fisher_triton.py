"""Triton kernels of the streamed softmax-Fisher contractions (docs/design.md §3).

All kernels stream W in tiles of BLOCK_V rows; a program owns a block of
BLOCK_B tokens and a contiguous range of V (a split), so no B×V tensor is ever
formed; offsets are int64 (V·B > 2^31 is safe); operands are cast to float32
before every tl.dot (float16 inputs are computed in float32; float64 inputs
are accumulated in float32 here).

``lm_logsumexp``: per V tile the logit tile W_t hᵀ (BLOCK_V × BLOCK_B) by
tl.dot over d blocks, an online max m and normalizer l = Σ e^{z−m} rescaled
by e^{m_old−m_new} (flash-attention style); per-split (m, l) merged on the host.

``matmat`` / ``quad`` (U shared, d×k, in column blocks of ≤ K_MAX; a
per-token U runs token by token), two passes:

1. ``_stats_kernel``: from one read of each W tile, the logit tile and the
   projection tile W_t U (BLOCK_V × K) by two tl.dots sharing the loaded W
   block; online (m, l) and s = Σ e^{z−m} y, rescaled alike. Host: merge the
   splits, lse, ȳ = s / l (so the second pass is centered exactly).
2. ``_matmat_kernel``: the same tiles again, p = e^{(z−m)−log l},
   X = [p ⊙ (y − ȳ) | p] (BLOCK_V × BLOCK_B·(K+1)); the Wᵀ accumulation
   acc += W_t[:, d-block]ᵀ X by tl.dot, plus t = Σ p (y − ȳ) (0 up to
   rounding). Host: G U = A_ŷ − μ tᵀ with μ = A_p, the exact centered
   cross-covariance Σ p (w − μ)(y − ȳ)ᵀ (the correction removes the rounding
   residual of Σ p ŷ times the large common component of w).
   A program owns one d block of the output, so W tiles are read once per d
   block (n_d = ⌈d / BLOCK_D⌉ reads of W in pass 2).
   ``_quad_kernel``: Q = Σ p ŷ ŷᵀ over the program's tiles (no Wᵀ
   accumulation, one read of W).

``gram`` is matmat with U = I_d in column blocks (the exact per-token d×d
metric, centered); its top-p truncation uses the torch path with the Triton
normalizer.

Accuracy: every tl.dot runs in IEEE float32 (``input_precision="ieee"``; the
default TF32 would round its inputs to 10 bits); a split covers at most
SPLIT_ROWS rows of V (so a program's sequential sums are short), and the
splits' partials are added in float64 on the host (``merge_splits``; matmat's
large partials over V-slices of ``v_slices``), so the error does not grow
with V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fisherfast.ops import softmax_fisher_reference as reference
from fisherfast.ops.softmax_fisher_common import SPLIT_ROWS, merge_splits, raise_nonfinite_normalizer, v_slices

K_MAX = 16  # projection columns per kernel call (tl.dot needs ≥ 16: K is padded to 16)


@triton.jit
def _w_hT_tiles(H, W, offs_v, mask_v, offs_b, mask_b, d0, D, stride_hb, stride_wv, BLOCK_D: tl.constexpr):
    """The W tile (BLOCK_V × BLOCK_D) and hᵀ tile (BLOCK_D × BLOCK_B) of the d-chunk at
    d0 in float32, zero outside the bounds, with the chunk's offsets and mask."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w = tl.load(W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32)
    hT = tl.load(H + offs_b[None, :].to(tl.int64) * stride_hb + offs_d[:, None],
                 mask=mask_d[:, None] & mask_b[None, :], other=0.0).to(tl.float32)
    return w, hT, offs_d, mask_d


@triton.jit
def _bias_and_mask(z, bias, offs_v, mask_v, HAS_BIAS: tl.constexpr):
    """z + b over the logit tile (BLOCK_V × BLOCK_B), −inf on rows past V."""
    if HAS_BIAS:
        z += tl.load(bias + offs_v, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    return tl.where(mask_v[:, None], z, -float("inf"))


@triton.jit
def _cap(z, softcap):
    """Soft-capping of a logit tile: (z′ = c·tanh(z/c), s = 1 − tanh²(z/c)),
    from e = e^{−2|z|/c} (no overflow): tanh = ±(1 − e)/(1 + e) and
    1 − tanh² = 4e/(1 + e)² (no cancellation); −inf (masked) stays −inf, s = 0."""
    ex = tl.exp(-2.0 * tl.abs(z / softcap))
    t = (1.0 - ex) / (1.0 + ex)
    zc = tl.where(z < 0, -softcap * t, softcap * t)
    return tl.where(z == -float("inf"), z, zc), 4.0 * ex / ((1.0 + ex) * (1.0 + ex))


@triton.jit
def _online_step(m, z):
    """Online max over one tile: (m_new, a = e^{m − m_new}, e = e^{z − m_new}), with a
    shift of 0 while every logit so far is −inf (so no −inf − −inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    return m_new, tl.exp(m - m_safe), tl.exp(z - m_safe[None, :])


@triton.jit
def _lse_split_kernel(H, W, bias, M_out, L_out, B, V, D, tiles_per_split, softcap,
                      stride_hb, stride_wv, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    m = tl.full((BLOCK_B,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_B,), tl.float32)
    v_start = split.to(tl.int64) * tiles_per_split * BLOCK_V
    for t in range(0, tiles_per_split):
        offs_v = v_start + t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z = tl.zeros((BLOCK_V, BLOCK_B), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            w, hT, _, _ = _w_hT_tiles(H, W, offs_v, mask_v, offs_b, mask_b, d0, D, stride_hb, stride_wv, BLOCK_D)
            z += tl.dot(w, hT, input_precision="ieee")
        z = _bias_and_mask(z, bias, offs_v, mask_v, HAS_BIAS)
        if SOFTCAP:
            z, _ = _cap(z, softcap)
        m, a, e = _online_step(m, z)
        l = l * a + tl.sum(e, axis=0)
    out = split.to(tl.int64) * B + offs_b
    tl.store(M_out + out, m, mask=mask_b)
    tl.store(L_out + out, l, mask=mask_b)


@triton.jit
def _logit_proj_tile(H, W, U, bias, offs_v, mask_v, offs_b, mask_b, D, K, stride_hb, stride_wv, stride_ud,
                     HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     K_PAD: tl.constexpr):
    """z = W_t hᵀ + b (BLOCK_V × BLOCK_B, −inf outside V) and y = W_t U
    (BLOCK_V × K_PAD) from one load of each W block."""
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    z = tl.zeros((BLOCK_V, BLOCK_B), tl.float32)
    y = tl.zeros((BLOCK_V, K_PAD), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        w, hT, offs_d, mask_d = _w_hT_tiles(H, W, offs_v, mask_v, offs_b, mask_b, d0, D, stride_hb, stride_wv, BLOCK_D)
        u = tl.load(U + offs_d[:, None].to(tl.int64) * stride_ud + offs_k[None, :],
                    mask=mask_d[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        z += tl.dot(w, hT, input_precision="ieee")
        y += tl.dot(w, u, input_precision="ieee")
    return _bias_and_mask(z, bias, offs_v, mask_v, HAS_BIAS), y


@triton.jit
def _stats_kernel(H, W, U, bias, M_out, L_out, S_out, B, V, D, K, tiles_per_split, softcap, stride_hb, stride_wv,
                  stride_ud, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """Pass 1: per split, online (m, l) and s = Σ e^{z−m} y (BLOCK_B × K_PAD)
    (soft-capped: z′ and ỹ = s_cap y)."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = tl.arange(0, K_PAD)
    m = tl.full((BLOCK_B,), -float("inf"), tl.float32)
    l = tl.zeros((BLOCK_B,), tl.float32)
    s = tl.zeros((BLOCK_B, K_PAD), tl.float32)
    v_start = split.to(tl.int64) * tiles_per_split * BLOCK_V
    for t in range(0, tiles_per_split):
        offs_v = v_start + t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z, y = _logit_proj_tile(H, W, U, bias, offs_v, mask_v, offs_b, mask_b, D, K, stride_hb, stride_wv,
                                stride_ud, HAS_BIAS, BLOCK_B, BLOCK_V, BLOCK_D, K_PAD)
        if SOFTCAP:
            z, cap_s = _cap(z, softcap)
        m, a, e = _online_step(m, z)  # e: (BLOCK_V, BLOCK_B)
        l = l * a + tl.sum(e, axis=0)
        if SOFTCAP:
            e = e * cap_s  # Σ_v e_vb ỹ_vbk = Σ_v (e s)_vb y_vk
        s = s * a[:, None] + tl.dot(tl.trans(e), y, input_precision="ieee")  # Σ_v e_vb y_vk
    out = split.to(tl.int64) * B + offs_b
    tl.store(M_out + out, m, mask=mask_b)
    tl.store(L_out + out, l, mask=mask_b)
    tl.store(S_out + out[:, None] * K_PAD + offs_k[None, :], s, mask=mask_b[:, None])


@triton.jit
def _probs_centered(z, y, Mx, LogL, Ybar, offs_b, mask_b, K_PAD: tl.constexpr):
    """p = e^{(z − m) − log l} (BLOCK_V × BLOCK_B) and ŷ = y − ȳ_b (BLOCK_V × BLOCK_B × K_PAD)."""
    offs_k = tl.arange(0, K_PAD)
    m = tl.load(Mx + offs_b, mask=mask_b, other=0.0)
    log_l = tl.load(LogL + offs_b, mask=mask_b, other=0.0)
    ybar = tl.load(Ybar + offs_b[:, None].to(tl.int64) * K_PAD + offs_k[None, :], mask=mask_b[:, None], other=0.0)
    p = tl.exp((z - m[None, :]) - log_l[None, :])
    yhat = y[:, None, :] - ybar[None, :, :]
    return p, yhat


@triton.jit
def _probs_centered_capped(z, y, cap_s, Mx, LogL, Ybar, offs_b, mask_b, K_PAD: tl.constexpr):
    """``_probs_centered`` for capped logits: ŷ = s y − ȳ_b per token."""
    offs_k = tl.arange(0, K_PAD)
    m = tl.load(Mx + offs_b, mask=mask_b, other=0.0)
    log_l = tl.load(LogL + offs_b, mask=mask_b, other=0.0)
    ybar = tl.load(Ybar + offs_b[:, None].to(tl.int64) * K_PAD + offs_k[None, :], mask=mask_b[:, None], other=0.0)
    p = tl.exp((z - m[None, :]) - log_l[None, :])
    yhat = cap_s[:, :, None] * y[:, None, :] - ybar[None, :, :]
    return p, yhat


@triton.jit
def _matmat_kernel(H, W, U, bias, Mx, LogL, Ybar, Acc, Mu, T, B, V, D, K, tiles_per_split, softcap,
                   stride_hb, stride_wv, stride_ud, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """Pass 2 of matmat for one (token block, d block, split): Acc (BLOCK_D ×
    BLOCK_B·K_PAD) = Σ_v w_v[d-block] (p ŷ)ᵀ, Mu = Σ_v p w_v[d-block], T = Σ p ŷ
    (soft-capped: ŷ = s y − ȳ and the rows s w_v: Acc, Mu weight by p s)."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = tl.arange(0, K_PAD)
    offs_o = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_o = offs_o < D
    acc = tl.zeros((BLOCK_D, BLOCK_B * K_PAD), tl.float32)
    mu = tl.zeros((BLOCK_D, BLOCK_B), tl.float32)
    t_acc = tl.zeros((BLOCK_B, K_PAD), tl.float32)
    v_start = split.to(tl.int64) * tiles_per_split * BLOCK_V
    for t in range(0, tiles_per_split):
        offs_v = v_start + t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z, y = _logit_proj_tile(H, W, U, bias, offs_v, mask_v, offs_b, mask_b, D, K, stride_hb, stride_wv,
                                stride_ud, HAS_BIAS, BLOCK_B, BLOCK_V, BLOCK_D, K_PAD)
        if SOFTCAP:
            z, cap_s = _cap(z, softcap)
            p, yhat = _probs_centered_capped(z, y, cap_s, Mx, LogL, Ybar, offs_b, mask_b, K_PAD)
        else:
            p, yhat = _probs_centered(z, y, Mx, LogL, Ybar, offs_b, mask_b, K_PAD)
        x = p[:, :, None] * yhat  # (BLOCK_V, BLOCK_B, K_PAD)
        t_acc += tl.sum(x, axis=0)
        wT = tl.load(W + offs_v[None, :] * stride_wv + offs_o[:, None], mask=mask_o[:, None] & mask_v[None, :],
                     other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_V)
        if SOFTCAP:
            x = x * cap_s[:, :, None]
            p = p * cap_s
        acc += tl.dot(wT, tl.reshape(x, (BLOCK_V, BLOCK_B * K_PAD)), input_precision="ieee")
        mu += tl.dot(wT, p, input_precision="ieee")
    base = split.to(tl.int64) * B + offs_b  # (BLOCK_B,) rows of the (S, B, ...) outputs
    acc3 = tl.reshape(acc, (BLOCK_D, BLOCK_B, K_PAD))
    ptr = Acc + (base[None, :, None] * D + offs_o[:, None, None]) * K_PAD + offs_k[None, None, :]
    tl.store(ptr, acc3, mask=mask_o[:, None, None] & mask_b[None, :, None])
    tl.store(Mu + base[None, :] * D + offs_o[:, None], mu, mask=mask_o[:, None] & mask_b[None, :])
    if pid_d == 0:
        tl.store(T + base[:, None] * K_PAD + offs_k[None, :], t_acc, mask=mask_b[:, None])


@triton.jit
def _quad_kernel(H, W, U, bias, Mx, LogL, Ybar, Q, B, V, D, K, tiles_per_split, softcap, stride_hb, stride_wv,
                 stride_ud, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr):
    """Pass 2 of quad for one (token block, split): Q = Σ_v p ŷ ŷᵀ (BLOCK_B × K_PAD × K_PAD)."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = tl.arange(0, K_PAD)
    q = tl.zeros((BLOCK_B, K_PAD, K_PAD), tl.float32)
    v_start = split.to(tl.int64) * tiles_per_split * BLOCK_V
    for t in range(0, tiles_per_split):
        offs_v = v_start + t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z, y = _logit_proj_tile(H, W, U, bias, offs_v, mask_v, offs_b, mask_b, D, K, stride_hb, stride_wv,
                                stride_ud, HAS_BIAS, BLOCK_B, BLOCK_V, BLOCK_D, K_PAD)
        if SOFTCAP:
            z, cap_s = _cap(z, softcap)
            p, yhat = _probs_centered_capped(z, y, cap_s, Mx, LogL, Ybar, offs_b, mask_b, K_PAD)
        else:
            p, yhat = _probs_centered(z, y, Mx, LogL, Ybar, offs_b, mask_b, K_PAD)
        py = p[:, :, None] * yhat
        q += tl.sum(py[:, :, :, None] * yhat[:, :, None, :], axis=0)
    base = split.to(tl.int64) * B + offs_b
    ptr = Q + (base[:, None, None] * K_PAD + offs_k[None, :, None]) * K_PAD + offs_k[None, None, :]
    tl.store(ptr, q, mask=mask_b[:, None, None])


def _splits(n_tiles: int, n_programs: int, block_v: int, target: int = 128) -> tuple[int, int]:
    """(tiles per split, number of splits) so that about ``target`` programs
    run, with at most SPLIT_ROWS rows per split."""
    n_splits = max(1, min(n_tiles, target // max(n_programs, 1)))
    per = min(triton.cdiv(n_tiles, n_splits), max(1, SPLIT_ROWS // block_v))
    return per, triton.cdiv(n_tiles, per)


def _cap_args(softcap):
    """(softcap value for the kernel argument, SOFTCAP constexpr)."""
    return (1.0 if softcap is None else float(softcap)), softcap is not None


def normalizer_triton(a, W, b, *, block_b=16, block_v=64, block_d=32, n_splits=None, softcap=None):
    """(m_i, log l_i), lse_i = m_i + log l_i, by the split-V streaming kernel."""
    B, D = a.shape
    V = W.shape[0]
    n_tiles = triton.cdiv(V, block_v)
    if n_splits is None:
        per, n_splits = _splits(n_tiles, triton.cdiv(B, block_b), block_v)
    else:
        per = triton.cdiv(n_tiles, n_splits)
        n_splits = triton.cdiv(n_tiles, per)
    M = torch.empty(n_splits, B, dtype=torch.float32, device=a.device)
    L = torch.empty_like(M)
    grid = (triton.cdiv(B, block_b), n_splits)
    c, capped = _cap_args(softcap)
    _lse_split_kernel[grid](a, W, b if b is not None else a, M, L, B, V, D, per, c,
                            a.stride(0), W.stride(0), HAS_BIAS=b is not None, SOFTCAP=capped,
                            BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d)
    return merge_splits(M, L)[:2]


def lm_logsumexp_triton(a, W, b, chunk, softcap=None, **blocks):
    """lse_i = log Σ_v exp(z′_iv), z = w_v·h_i + b_v (z′ soft-capped), with the split-V streaming kernel."""
    m, log_l = normalizer_triton(a, W, b, softcap=softcap, **blocks)
    return m + log_l


class _Cfg:
    block_b = 16
    block_v = 32
    block_d = 32


def _stats(a, W, U, b, cfg, softcap=None):
    """Pass 1 for U (d×K, K ≤ K_MAX): (m, log l) per token and ȳ (B, K_PAD)."""
    B, D = a.shape
    V = W.shape[0]
    K = U.shape[1]
    n_tiles = triton.cdiv(V, cfg.block_v)
    per, n_splits = _splits(n_tiles, triton.cdiv(B, cfg.block_b), cfg.block_v)
    f32 = dict(dtype=torch.float32, device=a.device)
    M, L, S = torch.empty(n_splits, B, **f32), torch.empty(n_splits, B, **f32), torch.empty(n_splits, B, K_MAX, **f32)
    c, capped = _cap_args(softcap)
    _stats_kernel[(triton.cdiv(B, cfg.block_b), n_splits)](
        a, W, U, b if b is not None else a, M, L, S, B, V, D, K, per, c, a.stride(0), W.stride(0), U.stride(0),
        HAS_BIAS=b is not None, SOFTCAP=capped, BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        K_PAD=K_MAX)
    return merge_splits(M, L, S)


def _matmat_shared(a, W, U, b, cfg, softcap=None):
    """G U for U (d×K), K ≤ K_MAX: (B, d, K) in float32."""
    B, D = a.shape
    V = W.shape[0]
    K = U.shape[1]
    c, capped = _cap_args(softcap)
    m, log_l, ybar = _stats(a, W, U, b, cfg, softcap)
    raise_nonfinite_normalizer(m + log_l, False)
    n_b, n_d = triton.cdiv(B, cfg.block_b), triton.cdiv(D, cfg.block_d)
    f32, f64 = dict(dtype=torch.float32, device=a.device), dict(dtype=torch.float64, device=a.device)
    acc, mu, t = torch.zeros(B, D, K_MAX, **f64), torch.zeros(B, D, **f64), torch.zeros(B, K_MAX, **f64)
    per, _ = _splits(triton.cdiv(V, cfg.block_v), n_b * n_d, cfg.block_v)
    for v0, v1 in v_slices(V, per * cfg.block_v, B * D * (K_MAX + 1)):
        per, n_splits = _splits(triton.cdiv(v1 - v0, cfg.block_v), n_b * n_d, cfg.block_v)
        Acc = torch.empty(n_splits, B, D, K_MAX, **f32)
        Mu = torch.empty(n_splits, B, D, **f32)
        T = torch.empty(n_splits, B, K_MAX, **f32)
        _matmat_kernel[(n_b, n_d, n_splits)](
            a, W[v0:v1], U, b[v0:v1] if b is not None else a, m.contiguous(), log_l.contiguous(), ybar.contiguous(),
            Acc, Mu, T, B, v1 - v0, D, K, per, c, a.stride(0), W.stride(0), U.stride(0), HAS_BIAS=b is not None,
            SOFTCAP=capped, BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, K_PAD=K_MAX)
        acc += Acc.sum(dim=0, dtype=torch.float64)
        mu += Mu.sum(dim=0, dtype=torch.float64)
        t += T.sum(dim=0, dtype=torch.float64)
    return (acc - mu[:, :, None] * t[:, None, :])[:, :, :K].float()


def _quad_shared(a, W, U, b, cfg, softcap=None):
    """Uᵀ G U for U (d×K), K ≤ K_MAX: (B, K, K) in float32."""
    B, D = a.shape
    V = W.shape[0]
    K = U.shape[1]
    c, capped = _cap_args(softcap)
    m, log_l, ybar = _stats(a, W, U, b, cfg, softcap)
    raise_nonfinite_normalizer(m + log_l, False)
    n_tiles = triton.cdiv(V, cfg.block_v)
    n_b = triton.cdiv(B, cfg.block_b)
    per, n_splits = _splits(n_tiles, n_b, cfg.block_v)
    Q = torch.empty(n_splits, B, K_MAX, K_MAX, dtype=torch.float32, device=a.device)
    _quad_kernel[(n_b, n_splits)](
        a, W, U, b if b is not None else a, m.contiguous(), log_l.contiguous(), ybar.contiguous(), Q,
        B, V, D, K, per, c, a.stride(0), W.stride(0), U.stride(0), HAS_BIAS=b is not None, SOFTCAP=capped,
        BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, K_PAD=K_MAX)
    Q = Q.sum(dim=0, dtype=torch.float64)[:, :K, :K].float()
    return 0.5 * (Q + Q.transpose(1, 2))


def _per_column_block(fn, a, W, U, b, cfg, softcap=None):
    """Run ``fn`` on U's column blocks of ≤ K_MAX (shared U) or token by
    token (per-token U (B,d,k)); returns the per-block outputs."""
    if U.dim() == 3:
        return [[fn(a[i:i + 1], W, Ui, b, cfg, softcap) for Ui in U[i].split(K_MAX, dim=1)]
                for i in range(a.shape[0])]
    return [[fn(a, W, Ub.contiguous(), b, cfg, softcap) for Ub in U.split(K_MAX, dim=1)]]


def softmax_fisher_matmat_triton(a, W, U, b, cfg=_Cfg, softcap=None):
    """G_head(a_i) U_i (B, d, k) in float32 (two passes; see the module doc)."""
    blocks = _per_column_block(_matmat_shared, a, W, U, b, cfg, softcap)
    return torch.cat([torch.cat(row, dim=2) for row in blocks], dim=0)


def softmax_fisher_quad_triton(a, W, U, b, cfg=_Cfg, softcap=None):
    """U_iᵀ G_head(a_i) U_i (B, k, k) in float32. Column blocks of a shared U
    give the diagonal blocks; the off-diagonal ones come from matmat."""
    if U.dim() == 3:
        return torch.cat([softmax_fisher_quad_triton(a[i:i + 1], W, U[i], b, cfg, softcap)
                          for i in range(a.shape[0])])
    if U.shape[1] <= K_MAX:
        return _quad_shared(a, W, U.contiguous(), b, cfg, softcap)
    GU = softmax_fisher_matmat_triton(a, W, U, b, cfg, softcap)
    Q = U.T[None] @ GU
    return 0.5 * (Q + Q.transpose(1, 2))


def softmax_fisher_gram_triton(a, W, b, reduce, cfg=_Cfg, softcap=None):
    """The exact G_i (B, d, d) (or its mean) as matmat with U = I_d."""
    eye = torch.eye(W.shape[1], dtype=torch.float32, device=W.device)
    G = softmax_fisher_matmat_triton(a, W, eye, b, cfg, softcap)
    G = 0.5 * (G + G.transpose(1, 2))
    return G.mean(dim=0) if reduce == "mean" else G


# ---------------------------------------------------------------------------
# The backend's ops, with the signatures of ``softmax_fisher_reference``.
# Given logits are not implemented here: the dispatcher (softmax_fisher._OPS)
# sends those calls to the reference.
# ---------------------------------------------------------------------------

def lm_logsumexp(a, W, b, chunk, softcap=None):
    lse = lm_logsumexp_triton(a, W, b, chunk, softcap)
    raise_nonfinite_normalizer(lse, False)
    return lse


def matmat(a, W, U, b, logits, chunk, softcap=None):
    return softmax_fisher_matmat_triton(a, W, U, b, softcap=softcap)


def quad(a, W, U, b, logits, chunk, softcap=None):
    return softmax_fisher_quad_triton(a, W, U, b, softcap=softcap)


def gram(a, W, b, logits, reduce, chunk, softcap=None):
    """matmat with U = I_d on the Triton kernels."""
    return softmax_fisher_gram_triton(a, W, b, reduce, softcap=softcap)


def gram_topk(a, W, b, logits, reduce, tail_tol, chunk, softcap=None):
    """The Triton normalizer, then the reference's (torch) candidate selection."""
    norm = normalizer_triton(a, W, b, softcap=softcap)
    raise_nonfinite_normalizer(norm[0] + norm[1], False)
    return reference.gram_truncated_chunked(a, W, b, None, chunk, norm, tail_tol, reduce, softcap)
