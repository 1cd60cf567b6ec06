"""Reference backend of the softmax-Fisher ops (docs/design.md §3): chunked
PyTorch over V, the oracle the other backends are tested against, and the
fallback they use for cases their kernels do not cover (given logits,
per-token U). Also the two passes every backend reuses: the p-weighted
SYRKs of the exact gram and the top-p candidate selection of the truncated
gram.

One signature per op (every backend module has the same):
    lm_logsumexp(a, W, b, chunk, softcap=None) -> (B,)
    matmat(a, W, U, b, logits, chunk, softcap=None) -> (B, d, k)
    quad(a, W, U, b, logits, chunk, softcap=None) -> (B, k, k)
    gram(a, W, b, logits, reduce, chunk, softcap=None) -> (B, d, d) or (d, d)
    gram_topk(a, W, b, logits, reduce, tail_tol, chunk, softcap=None) -> (G, tau (B,) float64, n_kept (B,) int64)
on contiguous compute-dtype a/b/logits/U with B ≥ 1 (the public file has
validated and converted them); W may be half precision here (cast one
V-chunk at a time, so no full-size copy of W is ever made).

Soft-capping (softcap = c): the logits are z′ = c·tanh(z/c), z = W a + b
(or the given ``logits``), and the head map a ↦ z′ has Jacobian
J = diag(s) W, s_v = 1 − tanh²(z_v/c). The metric Jᵀ (diag p − p pᵀ) J is the
same p-weighted covariance with the rows w_v replaced by the per-token rows
w̃_v = s_v w_v: G = Σ_v p_v (w̃_v − μ̃)(w̃_v − μ̃)ᵀ, μ̃ = Σ_v p_v s_v w_v.

Accuracy: float32 contractions over V run over chunks of at most
``REDUCTION_BLOCK`` rows and add into float64 accumulators (softmax_fisher_common),
so the rounding error does not grow with the chunk length or V.
"""
from __future__ import annotations

import math

import torch

from fisherfast.checks import compute_dtype
from fisherfast.ops.softmax_fisher_common import (cap_logits, chunk_size, raise_nonfinite_normalizer,
                                                  reduction_chunk)

F64 = torch.float64


def logit_chunks(a, W, b, logits, C, softcap=None):
    """Yield (start, stop, Z_c (B,C), W_c (C,d), S_c (B,C) or None) over V; Z_c =
    a W_cᵀ + b_c or the slice of the given logits, soft-capped when ``softcap``
    is given (S_c = dz′/dz, see ``cap_logits``). A half-precision W is cast one
    chunk at a time (W_c in float32), so no full-size copy of W is ever made.
    float32 chunks are at most REDUCTION_BLOCK rows."""
    V = W.shape[0]
    dt = compute_dtype(W.dtype)
    C = reduction_chunk(C, dt)
    for start in range(0, V, C):
        stop = min(V, start + C)
        Wc = W[start:stop].to(dt)
        if logits is not None:
            Zc = logits[:, start:stop]
        else:
            Zc = a @ Wc.T
            if b is not None:
                Zc = Zc + b[start:stop]
        Zc, Sc = cap_logits(Zc, softcap)
        yield start, stop, Zc, Wc, Sc


def probs(Zc, norm):
    """p = exp((z − m) − log l): z − m is exact (Sterbenz), whereas rounding
    lse = m + log l first would scale every p by up to ε·|m| (2e-4 at |z| = 1e4)."""
    m, log_l = norm
    return torch.exp((Zc - m[:, None]) - log_l[:, None])


def _scaled(Sc, X):
    """s ⊙ X over the chunk axis (dim 1) of a (B,C,…) tensor; X itself without a cap."""
    if Sc is None:
        return X
    return X * Sc.reshape(Sc.shape + (1,) * (X.dim() - 2))


def lse_mu(a, W, b, logits, C, need_mu: bool, softcap=None):
    """Pass 1: the normalizer (m_i, log l_i), lse_i = m_i + log l_i =
    log Σ_v exp(z_iv), and μ_i = Σ_v p_iv s_iv w_v (= Wᵀp_i uncapped), with an
    online max; l and μ accumulate in float64."""
    B = (logits if logits is not None else a).shape[0]
    dt = compute_dtype(W.dtype)
    m = torch.full((B,), -math.inf, dtype=dt, device=W.device)
    l = torch.zeros(B, dtype=F64, device=W.device)
    acc_mu = torch.zeros(B, W.shape[1], dtype=F64, device=W.device) if need_mu else None
    for _, _, Zc, Wc, Sc in logit_chunks(a, W, b, logits, C, softcap):
        m_new = torch.maximum(m, Zc.max(dim=1).values)
        # exp(-inf - -inf) = nan on the first chunk: the empty accumulators stay 0.
        scale = torch.where(torch.isfinite(m), torch.exp((m - m_new).to(F64)), torch.zeros_like(l))
        E = torch.exp(Zc - torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))[:, None])
        l = l * scale + E.sum(dim=1, dtype=F64)
        if need_mu:
            acc_mu = acc_mu * scale[:, None] + (E if Sc is None else E * Sc) @ Wc
        m = m_new
    raise_nonfinite_normalizer(m + torch.log(l).to(dt), logits is not None)
    mu = (acc_mu / l[:, None]).to(dt) if need_mu else None
    return (m, torch.log(l).to(dt)), mu


def lm_logsumexp(a, W, b, chunk, softcap=None):
    C = chunk_size(W.shape[0], a.shape[0], chunk)
    m, log_l = lse_mu(a, W, b, None, C, need_mu=False, softcap=softcap)[0]
    return m + log_l


def _projections(Wc, U, Sc):
    """ỹ_v = s_v Uᵀ w_v per token: (1 or B, C, k)."""
    Y = (Wc @ U)[None] if U.dim() == 2 else torch.einsum("cd,bdk->bck", Wc, U)
    return _scaled(Sc, Y)


def matmat(a, W, U, b, logits, chunk, softcap=None):
    """Two passes: (lse, μ̃), then G U = Σ_v p_v w̃_v ŷ_vᵀ − μ̃ tᵀ with the
    centered ŷ_v = (w̃_v − μ̃)ᵀU and t = Σ_v p_v ŷ_v (0 up to rounding: the
    correction keeps the result exact for an inexact μ̃)."""
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    dt = compute_dtype(W.dtype)
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = lse_mu(a, W, b, logits, C, need_mu=True, softcap=softcap)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    acc = torch.zeros(B, W.shape[1], k, dtype=F64, device=W.device)
    t = torch.zeros(B, k, dtype=F64, device=W.device)
    for _, _, Zc, Wc, Sc in logit_chunks(a, W, b, logits, C, softcap):
        P = probs(Zc, norm)
        X = P[:, :, None] * (_projections(Wc, U, Sc) - ybar[:, None, :])
        acc += torch.einsum("bck,cd->bdk", _scaled(Sc, X), Wc)
        t += X.sum(dim=1, dtype=F64)
    return (acc - mu[:, :, None].to(F64) * t[:, None, :]).to(dt)


def quad(a, W, U, b, logits, chunk, softcap=None):
    """Two passes: (lse, ȳ = μ̃ᵀU), then Σ_v p_v (ỹ_v − ȳ)(ỹ_v − ȳ)ᵀ."""
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = lse_mu(a, W, b, logits, C, need_mu=True, softcap=softcap)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    Q = torch.zeros(B, k, k, dtype=F64, device=W.device)
    for _, _, Zc, Wc, Sc in logit_chunks(a, W, b, logits, C, softcap):
        P = probs(Zc, norm)
        Yc = _projections(Wc, U, Sc) - ybar[:, None, :]
        Q += torch.einsum("bc,bci,bcj->bij", P, Yc, Yc)
    return (0.5 * (Q + Q.transpose(1, 2))).to(compute_dtype(W.dtype))


def _centered_rows(Wc, mu, Sc):
    """w̃_v − μ̃_i (B,C,d): the per-token centered (and capped) rows."""
    return _scaled(Sc, Wc[None].expand(mu.shape[0], -1, -1)) - mu[:, None, :]


def gram_none_chunked(a, W, b, logits, chunk, norm, mu, softcap=None):
    """G_i = Σ_v p_iv (w̃_v − μ̃_i)(w̃_v − μ̃_i)ᵀ, exact centering (μ̃ from pass 1)."""
    B, d = mu.shape
    C = chunk_size(W.shape[0], B * d, chunk)
    G = torch.zeros(B, d, d, dtype=F64, device=W.device)
    for _, _, Zc, Wc, Sc in logit_chunks(a, W, b, logits, C, softcap):
        P = probs(Zc, norm)
        D = _centered_rows(Wc, mu, Sc)
        G += torch.bmm((P[:, :, None] * D).transpose(1, 2), D)
    return (0.5 * (G + G.transpose(1, 2))).to(compute_dtype(W.dtype))


def gram_mean_chunked(a, W, b, logits, chunk, norm, mu, softcap=None):
    """(1/B) Σ_i G_i as a sum of two PSD terms, with no cancellation:

    Σ_i Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ = T1 + T2,
      T1 = Σ_v q_v (w_v − m_v)(w_v − m_v)ᵀ,   q_v = Σ_i p_iv, m_v = Σ_i p_iv μ_i / q_v,
      T2 = Σ_{i<j} c_ij (μ_i − μ_j)(μ_i − μ_j)ᵀ = Aᵀ L A,   c_ij = Σ_v p_iv p_jv / q_v,
    (parallel-axis theorem per vocabulary row v, then the pairwise form of the
    p_·v-weighted scatter of the μ_i), with L the graph Laplacian of c
    (L_ii = Σ_{j≠i} c_ij summed directly) and A = μ − mean_i μ_i. One SYRK over
    V instead of B: cost V·d² + O(V·B·(d + B)).

    Soft-capped rows w̃_iv = s_iv w_v differ per token, so the parallel-axis
    form does not apply: one SYRK over the B·C centered rows per chunk
    (cost B·V·d², memory d² + one chunk)."""
    B, d = mu.shape
    dt = compute_dtype(W.dtype)
    if softcap is not None:
        C = chunk_size(W.shape[0], B * d, chunk)
        G = torch.zeros(d, d, dtype=F64, device=W.device)
        for _, _, Zc, Wc, Sc in logit_chunks(a, W, b, logits, C, softcap):
            P = probs(Zc, norm)
            D = _centered_rows(Wc, mu, Sc).reshape(-1, d)
            G += (P.reshape(-1, 1) * D).T @ D
        G = G / B
        return (0.5 * (G + G.T)).to(dt)
    C = chunk_size(W.shape[0], max(d, B), chunk)
    T1 = torch.zeros(d, d, dtype=F64, device=W.device)
    c = torch.zeros(B, B, dtype=F64, device=W.device)
    for _, _, Zc, Wc, _ in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)  # (B,C)
        q = P.sum(dim=0)
        R = torch.where(q > 0, P / q, torch.zeros_like(P))  # p_iv / q_v
        D = Wc - R.T @ mu  # w_v − m_v
        T1 += (q[:, None] * D).T @ D
        c += P @ R.T
    off = c - torch.diag_embed(torch.diagonal(c))
    L = torch.diag_embed(off.sum(dim=1)) - off
    A = (mu - mu.mean(dim=0)).to(F64)
    G = T1.addmm_(A.T @ L, A).div_(B).to(dt)  # in place: no d×d float64 temporaries
    return 0.5 * (G + G.T)


def gram_truncated_chunked(a, W, b, logits, chunk, norm, tail_tol: float, reduce: str, softcap=None):
    """Top-p truncation (docs/design.md §3). Per token, S_i is the smallest set of
    largest-p rows with tail mass τ_i = 1 − Σ_{v∈S_i} p_iv ≤ tail_tol, and

        G_S = Σ_{v∈S} p_v (w̃_v − μ_S)(w̃_v − μ_S)ᵀ,   μ_S = Σ_S p_v w̃_v / Σ_S p_v,

    the p-weighted scatter of the kept rows (w̃_v = s_v w_v soft-capped, w_v
    otherwise) about their own mean. Then 0 ⪯ G_S ⪯ G and
    ‖G − G_S‖₂ ≤ τ/(1−τ) · max_{v∉S} ‖w̃_v − μ‖².

    Candidates are the rows with p_v ≥ tail_tol / V (the rows below hold at
    most tail_tol of mass in all, so S lies within them); memory is
    O(#candidates), ≤ B·V only for flat distributions. The selection is
    vectorized over tokens: candidates sorted by (token, −p), per-token
    prefix mass by a cumulative sum minus each token's offset, and the kept
    rows' scatter as one padded batched GEMM (B, d, n_max)·(B, n_max, d)."""
    B = norm[0].shape[0]
    V, d = W.shape
    dev = W.device
    C = chunk_size(V, B, chunk)
    theta = tail_tol / V
    tok, idx, pv, sv = [], [], [], []
    for start, _, Zc, _, Sc in logit_chunks(a, W, b, logits, C, softcap):
        P = probs(Zc, norm)
        i, v = torch.nonzero(P >= theta, as_tuple=True)
        tok.append(i)
        idx.append(v + start)
        pv.append(P[i, v])
        if Sc is not None:
            sv.append(Sc[i, v])
    tok, idx, pv = torch.cat(tok), torch.cat(idx), torch.cat(pv)
    sv = torch.cat(sv) if sv else None
    # Sort by p descending, then (stably) by token: each token's run is in descending p.
    order = torch.argsort(pv, descending=True, stable=True)
    order = order[torch.argsort(tok[order], stable=True)]
    tok, idx, pv = tok[order], idx[order], pv[order]
    sv = None if sv is None else sv[order]
    counts = torch.bincount(tok, minlength=B)
    first = torch.cumsum(counts, 0) - counts  # offset of each token's run
    mass = torch.cumsum(pv.double(), 0)
    mass = mass - torch.cat([mass.new_zeros(1), mass])[first][tok]  # per-token prefix mass
    # Keep a row while the mass before it is < 1 − tail_tol: the smallest prefix with τ ≤ tail_tol.
    keep = (mass - pv.double()) < 1.0 - tail_tol
    n_kept = torch.zeros(B, dtype=torch.int64, device=dev).index_add_(0, tok, keep.long())
    kept_mass = torch.zeros(B, dtype=torch.float64, device=dev).index_add_(0, tok, torch.where(keep, pv.double(), 0))
    rank = torch.arange(tok.numel(), device=dev) - first[tok]  # position in the token's run
    tok, idx, pv, rank = tok[keep], idx[keep], pv[keep], rank[keep]
    n_max = int(n_kept.max())
    dt = compute_dtype(W.dtype)
    Rp = torch.zeros(B, n_max, d, dtype=dt, device=dev)  # kept rows, zero-padded
    Rp[tok, rank] = W[idx].to(dt) if sv is None else W[idx].to(dt) * sv[keep][:, None]
    Pp = torch.zeros(B, n_max, dtype=dt, device=dev)  # their p (0 on the padding)
    Pp[tok, rank] = pv
    muS = torch.bmm(Pp[:, None, :], Rp)[:, 0] / Pp.sum(dim=1, keepdim=True)
    Dp = Rp - muS[:, None, :]  # padding rows carry weight 0
    G = torch.bmm((Pp[:, :, None] * Dp).transpose(1, 2), Dp)
    G = 0.5 * (G + G.transpose(1, 2))
    if reduce == "mean":
        G = G.mean(dim=0)
    return G, (1.0 - kept_mass).clamp_min(0.0), n_kept


def gram(a, W, b, logits, reduce, chunk, softcap=None):
    """Exact G: pass 1 (normalizer and μ̃), then the p-weighted SYRK of
    ``gram_none_chunked`` (reduce="none") or ``gram_mean_chunked`` ("mean")."""
    B = (logits if logits is not None else a).shape[0]
    norm, mu = lse_mu(a, W, b, logits, chunk_size(W.shape[0], B, chunk), need_mu=True, softcap=softcap)
    return (gram_none_chunked if reduce == "none" else gram_mean_chunked)(a, W, b, logits, chunk, norm, mu, softcap)


def gram_topk(a, W, b, logits, reduce, tail_tol, chunk, softcap=None):
    """Truncated G_S: pass 1 (normalizer only), then ``gram_truncated_chunked``."""
    B = (logits if logits is not None else a).shape[0]
    norm, _ = lse_mu(a, W, b, logits, chunk_size(W.shape[0], B, chunk), need_mu=False, softcap=softcap)
    return gram_truncated_chunked(a, W, b, logits, chunk, norm, tail_tol, reduce, softcap)
