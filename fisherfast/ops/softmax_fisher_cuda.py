"""cuda backend of the softmax-Fisher ops (the CUDA extension
fisherfast._C_cuda, csrc/cuda/softmax_fisher.cu; same signatures as
``softmax_fisher_reference``): lm_logsumexp and matmat for a shared U from
the head input. Per-token U and given logits are sent to the reference by the
dispatcher (softmax_fisher._OPS); quad and gram
have no cuda implementation (the dispatcher then picks triton or reference).

Two kernels split V over blocks: ``softmax_fisher_stats`` (per split: the
online max m_s, mass l_s and Σ e^{z−m_s} y) and
``softmax_fisher_matmat_pass2`` (the centered Wᵀ accumulation). The splits
are merged on the host by ``merge_splits`` (softmax_fisher_common). A split
covers at most SPLIT_ROWS rows (each thread's sums are sequential), and the
splits' partials are added in float64 (matmat over V-slices whose partials
stay within PARTIAL_ELEMENTS), so the error does not grow with V.
"""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends
from fisherfast.ops.softmax_fisher_common import merge_splits, raise_nonfinite_normalizer, split_shape, v_slices


def _dl(x):
    """The C++ side's tensor view: a DLPack capsule (None stays None)."""
    return None if x is None else to_dlpack(x)


def _cuda_launch_shape(V: int, B: int) -> tuple[int, int]:
    """(rows per split, splits): about 4 blocks per SM-scale target of 512 in
    all, at most SPLIT_ROWS rows per split and at most 65,535 splits."""
    splits = max(1, min(V, 512 // max(B, 1), 65535))
    rows, splits = split_shape(V, -(-V // splits))
    if splits > 65535:
        rows = -(-V // 65535)
        splits = -(-V // rows)
    return rows, splits


def _stats(a, W, U, b, softcap=None):
    ext = _backends.cuda_extension()
    B, d = a.shape
    V = W.shape[0]
    k = 0 if U is None else U.shape[1]
    rows, splits = _cuda_launch_shape(V, B)
    M = torch.empty(splits, B, dtype=W.dtype, device=W.device)
    L = torch.empty_like(M)
    S = torch.empty(splits, B, max(k, 1), dtype=W.dtype, device=W.device)
    ext.softmax_fisher_stats(_dl(a), _dl(W), _dl(b), _dl(U), _dl(M), _dl(L), _dl(S), rows, softcap or 0.0,
                             torch.cuda.current_stream(W.device).cuda_stream)
    m, log_l, ybar = merge_splits(M, L, S[:, :, :k])
    return m, log_l, ybar, (rows, splits)


def lm_logsumexp(a, W, b, chunk, softcap=None):
    m, log_l, _, _ = _stats(a, W, None, b, softcap)
    lse = m + log_l
    raise_nonfinite_normalizer(lse, False)
    return lse


def matmat(a, W, U, b, logits, chunk, softcap=None):
    """Two passes (stats, then the centered Wᵀ accumulation) per column block
    of U; G U = A − μ tᵀ summed over the splits."""
    ext = _backends.cuda_extension()
    B, d = a.shape
    out = []
    for Uj in U.split(ext.softmax_fisher_max_k, dim=1):
        Uj = Uj.contiguous()
        k = Uj.shape[1]
        m, log_l, ybar, (rows, _) = _stats(a, W, Uj, b, softcap)
        raise_nonfinite_normalizer(m + log_l, False)
        f64 = dict(dtype=torch.float64, device=W.device)
        acc, mu, t = torch.zeros(B, d, k, **f64), torch.zeros(B, d, **f64), torch.zeros(B, k, **f64)
        for v0, v1 in v_slices(W.shape[0], rows, B * d * (k + 1)):
            splits = -(-(v1 - v0) // rows)
            A = torch.zeros(splits, B, d, k, dtype=W.dtype, device=W.device)
            Mu = torch.zeros(splits, B, d, dtype=W.dtype, device=W.device)
            T = torch.zeros(splits, B, k, dtype=W.dtype, device=W.device)
            ext.softmax_fisher_matmat_pass2(_dl(a), _dl(W[v0:v1]), _dl(None if b is None else b[v0:v1]), _dl(Uj),
                                            _dl(m.contiguous()), _dl(log_l.contiguous()), _dl(ybar.contiguous()),
                                            _dl(A), _dl(Mu), _dl(T), rows, softcap or 0.0,
                                            torch.cuda.current_stream(W.device).cuda_stream)
            acc += A.sum(dim=0, dtype=torch.float64)
            mu += Mu.sum(dim=0, dtype=torch.float64)
            t += T.sum(dim=0, dtype=torch.float64)
        out.append((acc - mu[:, :, None] * t[:, None, :]).to(W.dtype))
    return torch.cat(out, dim=2)
