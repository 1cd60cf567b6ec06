"""Reference backend of the softmax-Fisher ops (docs/design.md §3): chunked
PyTorch over V, the oracle the other backends are tested against, and the
fallback they use for cases their kernels do not cover (given logits,
per-token U). Also the two passes every backend reuses: the p-weighted
SYRKs of the exact gram and the top-p candidate selection of the truncated
gram.

One signature per op (every backend module has the same):
    lm_logsumexp(a, W, b, chunk) -> (B,)
    matmat(a, W, U, b, logits, chunk) -> (B, d, k)
    quad(a, W, U, b, logits, chunk) -> (B, k, k)
    gram(a, W, b, logits, reduce, chunk) -> (B, d, d) or (d, d)
    gram_topk(a, W, b, logits, reduce, tail_tol, chunk) -> (G, tau (B,) float64, n_kept (B,) int64)
on contiguous compute-dtype a/b/logits/U with B ≥ 1 (the public file has
validated and converted them); W may be half precision here (cast one
V-chunk at a time, so no full-size copy of W is ever made).
"""
from __future__ import annotations

import math

import torch

from fisherfast.ops._checks import compute_dtype
from fisherfast.ops.softmax_fisher_common import chunk_size, raise_nonfinite_normalizer

def logit_chunks(a, W, b, logits, C):
    """Yield (start, stop, Z_c (B,C), W_c (C,d)) over V; Z_c = a W_cᵀ + b_c or
    the slice of the given logits. A half-precision W is cast one chunk at a
    time (W_c in float32), so no full-size copy of W is ever made."""
    V = W.shape[0]
    dt = compute_dtype(W.dtype)
    for start in range(0, V, C):
        stop = min(V, start + C)
        Wc = W[start:stop].to(dt)
        if logits is not None:
            Zc = logits[:, start:stop]
        else:
            Zc = a @ Wc.T
            if b is not None:
                Zc = Zc + b[start:stop]
        yield start, stop, Zc, Wc



def probs(Zc, norm):
    """p = exp((z − m) − log l): z − m is exact (Sterbenz), whereas rounding
    lse = m + log l first would scale every p by up to ε·|m| (2e-4 at |z| = 1e4)."""
    m, log_l = norm
    return torch.exp((Zc - m[:, None]) - log_l[:, None])


def lse_mu(a, W, b, logits, C, need_mu: bool):
    """Pass 1: the normalizer (m_i, log l_i), lse_i = m_i + log l_i =
    log Σ_v exp(z_iv), and μ_i = Wᵀ p_i, with an online max."""
    B = (logits if logits is not None else a).shape[0]
    dt = compute_dtype(W.dtype)
    m = torch.full((B,), -math.inf, dtype=dt, device=W.device)
    l = torch.zeros(B, dtype=dt, device=W.device)
    acc_mu = torch.zeros(B, W.shape[1], dtype=dt, device=W.device) if need_mu else None
    for _, _, Zc, Wc in logit_chunks(a, W, b, logits, C):
        m_new = torch.maximum(m, Zc.max(dim=1).values)
        # exp(-inf - -inf) = nan on the first chunk: the empty accumulators stay 0.
        scale = torch.where(torch.isfinite(m), torch.exp(m - m_new), torch.zeros_like(m))
        E = torch.exp(Zc - torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))[:, None])
        l = l * scale + E.sum(dim=1)
        if need_mu:
            acc_mu = acc_mu * scale[:, None] + E @ Wc
        m = m_new
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    mu = acc_mu / l[:, None] if need_mu else None
    return (m, torch.log(l)), mu


def lm_logsumexp(a, W, b, chunk):
    C = chunk_size(W.shape[0], a.shape[0], chunk)
    m, log_l = lse_mu(a, W, b, None, C, need_mu=False)[0]
    return m + log_l


def matmat(a, W, U, b, logits, chunk):
    """Two passes: (lse, μ), then G U = Σ_v p_v w_v ŷ_vᵀ − μ tᵀ with the
    centered ŷ_v = (w_v − μ)ᵀU and t = Σ_v p_v ŷ_v (0 up to rounding: the
    correction keeps the result exact for an inexact μ)."""
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = lse_mu(a, W, b, logits, C, need_mu=True)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    acc = torch.zeros(B, W.shape[1], k, dtype=compute_dtype(W.dtype), device=W.device)
    t = torch.zeros(B, k, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)
        Y = (Wc @ U)[None] if U.dim() == 2 else torch.einsum("cd,bdk->bck", Wc, U)
        X = P[:, :, None] * (Y - ybar[:, None, :])
        acc += torch.einsum("bck,cd->bdk", X, Wc)
        t += X.sum(dim=1)
    return acc - mu[:, :, None] * t[:, None, :]


def quad(a, W, U, b, logits, chunk):
    """Two passes: (lse, ȳ = μᵀU), then Σ_v p_v (y_v − ȳ)(y_v − ȳ)ᵀ."""
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = lse_mu(a, W, b, logits, C, need_mu=True)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    Q = torch.zeros(B, k, k, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)
        Y = (Wc @ U)[None] if U.dim() == 2 else torch.einsum("cd,bdk->bck", Wc, U)
        Yc = Y - ybar[:, None, :]
        Q += torch.einsum("bc,bci,bcj->bij", P, Yc, Yc)
    return 0.5 * (Q + Q.transpose(1, 2))


def gram_none_chunked(a, W, b, logits, chunk, norm, mu):
    """G_i = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ, exact centering (μ from pass 1)."""
    B, d = mu.shape
    C = chunk_size(W.shape[0], B * d, chunk)
    G = torch.zeros(B, d, d, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)
        D = Wc[None] - mu[:, None, :]  # (B,C,d): centered rows
        G.baddbmm_((P[:, :, None] * D).transpose(1, 2), D)
    return 0.5 * (G + G.transpose(1, 2))


def gram_mean_chunked(a, W, b, logits, chunk, norm, mu):
    """(1/B) Σ_i G_i as a sum of two PSD terms, with no cancellation:

    Σ_i Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ = T1 + T2,
      T1 = Σ_v q_v (w_v − m_v)(w_v − m_v)ᵀ,   q_v = Σ_i p_iv, m_v = Σ_i p_iv μ_i / q_v,
      T2 = Σ_{i<j} c_ij (μ_i − μ_j)(μ_i − μ_j)ᵀ = Aᵀ L A,   c_ij = Σ_v p_iv p_jv / q_v,
    (parallel-axis theorem per vocabulary row v, then the pairwise form of the
    p_·v-weighted scatter of the μ_i), with L the graph Laplacian of c
    (L_ii = Σ_{j≠i} c_ij summed directly) and A = μ − mean_i μ_i. One SYRK over
    V instead of B: cost V·d² + O(V·B·(d + B))."""
    B, d = mu.shape
    C = chunk_size(W.shape[0], max(d, B), chunk)
    T1 = torch.zeros(d, d, dtype=compute_dtype(W.dtype), device=W.device)
    c = torch.zeros(B, B, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)  # (B,C)
        q = P.sum(dim=0)
        R = torch.where(q > 0, P / q, torch.zeros_like(P))  # p_iv / q_v
        D = Wc - R.T @ mu  # w_v − m_v
        T1.addmm_((q[:, None] * D).T, D)
        c.addmm_(P, R.T)
    off = c - torch.diag_embed(torch.diagonal(c))
    L = torch.diag_embed(off.sum(dim=1)) - off
    A = mu - mu.mean(dim=0)
    G = (T1 + A.T @ L @ A) / B
    return 0.5 * (G + G.T)


def gram_truncated_chunked(a, W, b, logits, chunk, norm, tail_tol: float, reduce: str):
    """Top-p truncation (docs/design.md §3). Per token, S_i is the smallest set of
    largest-p rows with tail mass τ_i = 1 − Σ_{v∈S_i} p_iv ≤ tail_tol, and

        G_S = Σ_{v∈S} p_v (w_v − μ_S)(w_v − μ_S)ᵀ,   μ_S = Σ_S p_v w_v / Σ_S p_v,

    the p-weighted scatter of the kept rows about their own mean. Then
    0 ⪯ G_S ⪯ G and ‖G − G_S‖₂ ≤ τ/(1−τ) · max_{v∉S} ‖w_v − μ‖².

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
    tok, idx, pv = [], [], []
    for start, _, Zc, _ in logit_chunks(a, W, b, logits, C):
        P = probs(Zc, norm)
        i, v = torch.nonzero(P >= theta, as_tuple=True)
        tok.append(i)
        idx.append(v + start)
        pv.append(P[i, v])
    tok, idx, pv = torch.cat(tok), torch.cat(idx), torch.cat(pv)
    # Sort by p descending, then (stably) by token: each token's run is in descending p.
    order = torch.argsort(pv, descending=True, stable=True)
    order = order[torch.argsort(tok[order], stable=True)]
    tok, idx, pv = tok[order], idx[order], pv[order]
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
    Rp[tok, rank] = W[idx].to(dt)
    Pp = torch.zeros(B, n_max, dtype=dt, device=dev)  # their p (0 on the padding)
    Pp[tok, rank] = pv
    muS = torch.bmm(Pp[:, None, :], Rp)[:, 0] / Pp.sum(dim=1, keepdim=True)
    Dp = Rp - muS[:, None, :]  # padding rows carry weight 0
    G = torch.bmm((Pp[:, :, None] * Dp).transpose(1, 2), Dp)
    G = 0.5 * (G + G.transpose(1, 2))
    if reduce == "mean":
        G = G.mean(dim=0)
    return G, (1.0 - kept_mass).clamp_min(0.0), n_kept


def gram(a, W, b, logits, reduce, chunk):
    """Exact G: pass 1 (normalizer and μ), then the p-weighted SYRK of
    ``gram_none_chunked`` (reduce="none") or ``gram_mean_chunked`` ("mean")."""
    B = (logits if logits is not None else a).shape[0]
    norm, mu = lse_mu(a, W, b, logits, chunk_size(W.shape[0], B, chunk), need_mu=True)
    return (gram_none_chunked if reduce == "none" else gram_mean_chunked)(a, W, b, logits, chunk, norm, mu)


def gram_topk(a, W, b, logits, reduce, tail_tol, chunk):
    """Truncated G_S: pass 1 (normalizer only), then ``gram_truncated_chunked``."""
    B = (logits if logits is not None else a).shape[0]
    norm, _ = lse_mu(a, W, b, logits, chunk_size(W.shape[0], B, chunk), need_mu=False)
    return gram_truncated_chunked(a, W, b, logits, chunk, norm, tail_tol, reduce)
