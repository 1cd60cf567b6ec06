"""Triton kernel of the streamed LM-head normalizer (DESIGN.md §3).

``lm_logsumexp`` on the triton backend: each program owns a block of BLOCK_B
tokens and a contiguous range of V (a split); it streams its V tiles, forms
the logit tile W_t hᵀ (BLOCK_V × BLOCK_B) by tl.dot over d blocks (operands
cast to float32 first), and keeps an online max m and normalizer
l = Σ e^{z−m} rescaled by e^{m_old−m_new} (flash-attention style). The
per-split (m, l) are merged on the host (B × n_splits values). No B×V tensor
is ever formed; offsets are int64, so V·B > 2^31 is safe. The matmat / quad /
gram contractions do not have a Triton kernel yet
(float64 inputs are accumulated in float32 here) (they run on the
reference backend's chunked torch path on CUDA tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_split_kernel(H, W, bias, M_out, L_out, B, V, D, tiles_per_split,
                      stride_hb, stride_wv, HAS_BIAS: tl.constexpr,
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
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w = tl.load(W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            hT = tl.load(H + offs_b[None, :].to(tl.int64) * stride_hb + offs_d[:, None],
                         mask=mask_d[:, None] & mask_b[None, :], other=0.0).to(tl.float32)
            z += tl.dot(w, hT)
        if HAS_BIAS:
            z += tl.load(bias + offs_v, mask=mask_v, other=0.0).to(tl.float32)[:, None]
        z = tl.where(mask_v[:, None], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[None, :]), axis=0)
        m = m_new
    out = split.to(tl.int64) * B + offs_b
    tl.store(M_out + out, m, mask=mask_b)
    tl.store(L_out + out, l, mask=mask_b)


def lm_logsumexp_triton(h, W, b, chunk, *, block_b=16, block_v=64, block_d=32, n_splits=None):
    """lse_i = log Σ_v exp(w_v·h_i + b_v) with the split-V streaming kernel."""
    B, D = h.shape
    V = W.shape[0]
    n_tiles = triton.cdiv(V, block_v)
    if n_splits is None:
        n_splits = max(1, min(n_tiles, 128 // triton.cdiv(B, block_b)))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    M = torch.empty(n_splits, B, dtype=torch.float32, device=h.device)
    L = torch.empty_like(M)
    grid = (triton.cdiv(B, block_b), n_splits)
    _lse_split_kernel[grid](h, W, b if b is not None else h, M, L, B, V, D, tiles_per_split,
                            h.stride(0), W.stride(0), HAS_BIAS=b is not None,
                            BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d)
    m = M.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = m_safe + torch.log((L * torch.exp(M - m_safe)).sum(dim=0))
    lse = torch.where(torch.isnan(m), m, lse)
    return lse

