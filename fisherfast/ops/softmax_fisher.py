"""Softmax-Fisher contractions at vocabulary scale (docs/design.md §3).

For hidden states h (B×d, the head input after the final norm), unembedding
W (V×d), optional bias b (V,) and p_i = softmax(W h_i + b), the head metric is

    G_head(h_i) = Wᵀ (diag p_i − p_i p_iᵀ) W = Cov_{y∼p_i}[w_y]      (d×d).

Every op here streams over V in chunks and never holds a B×V or V×k×B tensor:
extra memory is O(B·(d + k)) plus one chunk (plus the outputs).

Numerics (docs/design.md §3): everything is computed as a *centered* covariance —
never as Wᵀdiag(p)W − μμᵀ, which loses about three digits in float32 on a real
model. float16/bfloat16 inputs are computed in float32 and returned in the input
dtype; a half-precision W is never copied whole (the Triton kernels convert
each tile they load, the reference casts one V-chunk at a time; only the cpu
and cuda backends, whose kernels take float32/float64, get a float32 copy).
Logits are shifted by their running maximum, so logits of magnitude 1e4
are fine. A non-finite normalizer (NaN/Inf in W, b or the logits) is detected
during the pass and raised as a ValueError naming the input; h (or the given
logits' finiteness is not pre-scanned, only the normalizer) is checked up front.

Logit-given variants: every op except ``lm_logsumexp`` takes ``logits=z``
(B×V, z = W h + b already computed by the caller) in place of ``h`` (pass
``h=None``, no ``b``); the chunks of z are then read instead of recomputed.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from fisherfast.ops import _backends
from fisherfast.ops._checks import check_finite, check_same_device, check_same_dtype, check_tensor, compute_dtype

# Default V-chunk is chosen so the per-chunk temporaries hold about this many
# elements (4 MiB in float32, at least 8192 rows for GEMM efficiency);
# ``chunk=`` overrides it.
CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK = 8192


class TruncatedGram(NamedTuple):
    """Result of ``softmax_fisher_gram(..., tail_tol=...)``.

    G: (B,d,d) or (d,d) truncated head metric; tau: tail mass 1 − Σ_{v∈S} p_v,
    (B,) per token, or its mean over tokens (0-dim) for reduce="mean";
    n_kept: (B,) int64, |S_i| per token."""

    G: torch.Tensor
    tau: torch.Tensor
    n_kept: torch.Tensor


# ---------------------------------------------------------------------------
# Streaming helpers shared by the chunked-PyTorch backends.
# ---------------------------------------------------------------------------

def chunk_size(V: int, per_row: int, chunk: int | None) -> int:
    """V-chunk length: ``chunk`` if given, else CHUNK_ELEMENTS / per_row."""
    if chunk:
        return min(chunk, V)
    return min(V, max(_MIN_CHUNK, CHUNK_ELEMENTS // max(per_row, 1)))


def logit_chunks(h, W, b, logits, C):
    """Yield (start, stop, Z_c (B,C), W_c (C,d)) over V; Z_c = h W_cᵀ + b_c or
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
            Zc = h @ Wc.T
            if b is not None:
                Zc = Zc + b[start:stop]
        yield start, stop, Zc, Wc


def raise_nonfinite_normalizer(lse: torch.Tensor, from_logits: bool) -> None:
    """Raise if any token's normalizer is NaN/±Inf (checked after the pass over V)."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        tokens = torch.nonzero(bad).flatten()[:8].tolist()
        source = "logits" if from_logits else "W or b (h was checked finite)"
        raise ValueError(f"non-finite softmax normalizer for token(s) {tokens}: {source} contain NaN or +Inf, "
                         f"or every logit of the token is -Inf")


def probs(Zc, norm):
    """p = exp((z − m) − log l): z − m is exact (Sterbenz), whereas rounding
    lse = m + log l first would scale every p by up to ε·|m| (2e-4 at |z| = 1e4)."""
    m, log_l = norm
    return torch.exp((Zc - m[:, None]) - log_l[:, None])


def raise_nonfinite_result(out: torch.Tensor, from_logits: bool) -> None:
    """A finite normalizer can still meet an Inf row of W whose logit is −Inf
    (p = 0, 0·Inf = NaN); the O(output) check catches that."""
    if not bool(torch.isfinite(out).all()):
        source = "logits or W" if from_logits else "W or b (h was checked finite)"
        raise ValueError(f"non-finite result: {source} contain NaN or Inf")


def _lse_mu_reference(h, W, b, logits, C, need_mu: bool):
    """Pass 1: the normalizer (m_i, log l_i), lse_i = m_i + log l_i =
    log Σ_v exp(z_iv), and μ_i = Wᵀ p_i, with an online max."""
    B = (logits if logits is not None else h).shape[0]
    dt = compute_dtype(W.dtype)
    m = torch.full((B,), -math.inf, dtype=dt, device=W.device)
    l = torch.zeros(B, dtype=dt, device=W.device)
    acc_mu = torch.zeros(B, W.shape[1], dtype=dt, device=W.device) if need_mu else None
    for _, _, Zc, Wc in logit_chunks(h, W, b, logits, C):
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


def _lm_logsumexp_reference(h, W, b, chunk):
    C = chunk_size(W.shape[0], h.shape[0], chunk)
    m, log_l = _lse_mu_reference(h, W, b, None, C, need_mu=False)[0]
    return m + log_l


def _matmat_reference(h, W, U, b, logits, chunk):
    """Two passes: (lse, μ), then G U = Σ_v p_v w_v ŷ_vᵀ − μ tᵀ with the
    centered ŷ_v = (w_v − μ)ᵀU and t = Σ_v p_v ŷ_v (0 up to rounding: the
    correction keeps the result exact for an inexact μ)."""
    B = (logits if logits is not None else h).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = _lse_mu_reference(h, W, b, logits, C, need_mu=True)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    acc = torch.zeros(B, W.shape[1], k, dtype=compute_dtype(W.dtype), device=W.device)
    t = torch.zeros(B, k, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(h, W, b, logits, C):
        P = probs(Zc, norm)
        Y = (Wc @ U)[None] if U.dim() == 2 else torch.einsum("cd,bdk->bck", Wc, U)
        X = P[:, :, None] * (Y - ybar[:, None, :])
        acc += torch.einsum("bck,cd->bdk", X, Wc)
        t += X.sum(dim=1)
    return acc - mu[:, :, None] * t[:, None, :]


def _quad_reference(h, W, U, b, logits, chunk):
    """Two passes: (lse, ȳ = μᵀU), then Σ_v p_v (y_v − ȳ)(y_v − ȳ)ᵀ."""
    B = (logits if logits is not None else h).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], B * (k + 1), chunk)
    norm, mu = _lse_mu_reference(h, W, b, logits, C, need_mu=True)
    ybar = mu @ U if U.dim() == 2 else torch.einsum("bd,bdk->bk", mu, U)
    Q = torch.zeros(B, k, k, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(h, W, b, logits, C):
        P = probs(Zc, norm)
        Y = (Wc @ U)[None] if U.dim() == 2 else torch.einsum("cd,bdk->bck", Wc, U)
        Yc = Y - ybar[:, None, :]
        Q += torch.einsum("bc,bci,bcj->bij", P, Yc, Yc)
    return 0.5 * (Q + Q.transpose(1, 2))


def gram_none_chunked(h, W, b, logits, chunk, norm, mu):
    """G_i = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ, exact centering (μ from pass 1)."""
    B, d = mu.shape
    C = chunk_size(W.shape[0], B * d, chunk)
    G = torch.zeros(B, d, d, dtype=compute_dtype(W.dtype), device=W.device)
    for _, _, Zc, Wc in logit_chunks(h, W, b, logits, C):
        P = probs(Zc, norm)
        D = Wc[None] - mu[:, None, :]  # (B,C,d): centered rows
        G.baddbmm_((P[:, :, None] * D).transpose(1, 2), D)
    return 0.5 * (G + G.transpose(1, 2))


def gram_mean_chunked(h, W, b, logits, chunk, norm, mu):
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
    for _, _, Zc, Wc in logit_chunks(h, W, b, logits, C):
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


def gram_truncated_chunked(h, W, b, logits, chunk, norm, tail_tol: float, reduce: str):
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
    for start, _, Zc, _ in logit_chunks(h, W, b, logits, C):
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


def _gram_reference(h, W, b, logits, reduce, tail_tol, chunk):
    B = (logits if logits is not None else h).shape[0]
    C = chunk_size(W.shape[0], B, chunk)
    truncated = tail_tol is not None
    norm, mu = _lse_mu_reference(h, W, b, logits, C, need_mu=not truncated)
    if truncated:
        return gram_truncated_chunked(h, W, b, logits, chunk, norm, tail_tol, reduce)
    G = (gram_none_chunked if reduce == "none" else gram_mean_chunked)(h, W, b, logits, chunk, norm, mu)
    return G, torch.zeros(B, dtype=torch.float64, device=W.device), torch.full((B,), W.shape[0], device=W.device)


# ---------------------------------------------------------------------------
# One-pass streaming (the cpu backend). Per chunk: one MKL GEMM [h; Uᵀ] W_cᵀ
# gives the logit tile and the projection tile from one read of W_c; one C++
# sweep per token (fisherfast._C) forms the chunk-local moments (max m_c, mass
# l_c, means, centered co-moments) and merges them into the running ones by
# Chan's parallel update, rescaled by e^{m_c − m′} as in flash attention
# (csrc/include/fisherfast/softmax_fisher.h); matmat adds the GEMM X W_c for
# the Wᵀ accumulation and a merge sweep. Centered within each chunk, so no
# cancellation; one read of W per call; the chunk buffers are allocated once.
# ---------------------------------------------------------------------------

# Chunk policy of the cpu backend: the per-chunk buffers hold about this many
# elements (4 MiB in float32), and a chunk has at least _CPU_MIN_CHUNK rows,
# so each chunk is GEMM work enough to hide the fixed cost of its calls.
CPU_CHUNK_ELEMENTS = 1 << 20
_CPU_MIN_CHUNK = 8192


# lm_logsumexp keeps only the B×C logit tile: a 16 MiB budget, so that usual
# shapes run in one or two chunks (each chunk wakes the GEMM's thread team
# again, which costs milliseconds on a loaded machine).
CPU_LSE_CHUNK_ELEMENTS = 1 << 22


def cpu_chunk_size(V: int, per_row: int, chunk: int | None, budget: int = CPU_CHUNK_ELEMENTS) -> int:
    if chunk:
        return min(chunk, V)
    return min(V, max(_CPU_MIN_CHUNK, budget // max(per_row, 1)))


# A C++ sweep runs on more than one thread only with at least this many
# element-operations per thread: waking the OpenMP team costs microseconds on
# an idle machine and milliseconds on a loaded one, and the sweeps are O(k) to
# O(k²) per logit against the GEMM's O(d).
SWEEP_WORK_PER_THREAD = 1 << 22


def _sweep_threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // SWEEP_WORK_PER_THREAD))


def _addr(x):
    return 0 if x is None else x.data_ptr()


def _cpu_chunks(h, W, U, logits, C):
    """Yield (W_c, Z address, row stride of Z, Y address, ysb, ysj, bias
    offset) over V. With h, the logits and the projections y = Uᵀw come from
    one GEMM [h; Uᵀ] W_cᵀ into a reused buffer (U shared: k rows; per token:
    B·k rows, token b's at B + b·k); given logits are read in place."""
    V, d = W.shape
    B = (logits if logits is not None else h).shape[0]
    k = 0 if U is None else U.shape[-1]
    parts = [] if logits is not None else [h]
    if U is not None:
        parts.append(U.T if U.dim() == 2 else U.transpose(1, 2).reshape(B * k, d))
    rows = torch.cat(parts) if len(parts) > 1 else (parts[0].contiguous() if parts else None)
    n = 0 if rows is None else rows.shape[0]
    buf = torch.empty(n * C, dtype=W.dtype, device=W.device)
    y0 = 0 if logits is not None else B  # first projection row
    ysb = k if (U is not None and U.dim() == 3) else 0
    for start in range(0, V, C):
        c = min(C, V - start)
        Wc = W[start:start + c]
        R = buf[:n * c].view(n, c)
        if n:
            torch.mm(rows, Wc.T, out=R)
        if logits is not None:
            z_addr, zsb = logits[:, start].data_ptr(), logits.stride(0)
        else:
            z_addr, zsb = R.data_ptr(), c
        y_addr = R[y0:].data_ptr() if k else 0
        yield start, Wc, z_addr, zsb, y_addr, ysb * c, c


def _bias_addr(b, start):
    return 0 if b is None else b[start:].data_ptr()


def _running(B, dt, dev):
    return torch.full((B,), -math.inf, dtype=dt, device=dev), torch.zeros(B, dtype=dt, device=dev)


def moments_cpu(h, W, U, b, logits, C):
    """One pass: the normalizer (m, l) per token, μ = Wᵀp (B,d) and, with U,
    the centered cross-moment Σ_v p_v (w_v − μ)(y_v − ȳ)ᵀ = G U (B,d,k)."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else h).shape[0]
    V, d = W.shape
    k = 0 if U is None else U.shape[-1]
    dt, dev, name = W.dtype, W.device, str(W.dtype).removeprefix("torch.")
    new = functools.partial(torch.empty, dtype=dt, device=dev)
    m, l = _running(B, dt, dev)
    mu, ybar, M = torch.zeros(B, d, dtype=dt), torch.zeros(B, k, dtype=dt), torch.zeros(B, d, k, dtype=dt)
    m_c, l_c, ybar_c, t_c = new(B), new(B), new(B, k), new(B, k)
    X, A = new(B * (k + 1) * C), new(B * (k + 1), d)
    merge_threads = _sweep_threads(B * d * (k + 1))
    for start, Wc, z, zsb, y, ysb, ysj in _cpu_chunks(h, W, U, logits, C):
        c = Wc.shape[0]
        ext.softmax_fisher_matmat_chunk(name, z, zsb, _bias_addr(b, start), y, ysb, ysj, B, c, k, X.data_ptr(),
                                        m_c.data_ptr(), l_c.data_ptr(), _addr(ybar_c), _addr(t_c),
                                        _sweep_threads(B * c * (k + 2)))
        torch.mm(X[:B * (k + 1) * c].view(B * (k + 1), c), Wc, out=A)
        ext.softmax_fisher_matmat_merge(name, A.data_ptr(), B, d, k, m_c.data_ptr(), l_c.data_ptr(), _addr(ybar_c),
                                        _addr(t_c), m.data_ptr(), l.data_ptr(), mu.data_ptr(), _addr(ybar),
                                        _addr(M), merge_threads)
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return m, l, mu, M


def _matmat_cpu(h, W, U, b, logits, chunk):
    B = (logits if logits is not None else h).shape[0]
    k = U.shape[-1]
    n_proj = k if U.dim() == 2 else B * k
    C = cpu_chunk_size(W.shape[0], (0 if logits is not None else B) + n_proj + B * (k + 1), chunk)
    _, l, _, M = moments_cpu(h, W, U, b, logits, C)
    return M / l[:, None, None]


def _quad_cpu(h, W, U, b, logits, chunk):
    """U_iᵀ G U_i as the p-weighted covariance of y_v = U_iᵀ w_v: one GEMM
    and one C++ sweep (moments and merge) per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else h).shape[0]
    k = U.shape[-1]
    C = cpu_chunk_size(W.shape[0], (0 if logits is not None else B) + (k if U.dim() == 2 else B * k), chunk)
    dt, name = W.dtype, str(W.dtype).removeprefix("torch.")
    m, l = _running(B, dt, W.device)
    ybar, M = torch.zeros(B, k, dtype=dt), torch.zeros(B, k, k, dtype=dt)
    for start, Wc, z, zsb, y, ysb, ysj in _cpu_chunks(h, W, U, logits, C):
        c = Wc.shape[0]
        ext.softmax_fisher_quad_update(name, z, zsb, _bias_addr(b, start), y, ysb, ysj, B, c, k, m.data_ptr(),
                                       l.data_ptr(), ybar.data_ptr(), M.data_ptr(),
                                       _sweep_threads(B * c * (k + 1) * (k + 4) // 2))
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return M / l[:, None, None]  # symmetric by construction (both triangles written from one sum)


def _lse_cpu(h, W, b, logits, C):
    """(m, l) per token: one GEMM and one C++ sweep per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else h).shape[0]
    name = str(W.dtype).removeprefix("torch.")
    m, l = _running(B, W.dtype, W.device)
    for start, Wc, z, zsb, _, _, _ in _cpu_chunks(h, W, None, logits, C):
        c = Wc.shape[0]
        ext.softmax_fisher_lse_update(name, z, zsb, _bias_addr(b, start), B, c, m.data_ptr(), l.data_ptr(),
                                      _sweep_threads(4 * B * c))
    return m, l


def _lm_logsumexp_cpu(h, W, b, chunk):
    m, l = _lse_cpu(h, W, b, None, cpu_chunk_size(W.shape[0], h.shape[0], chunk, CPU_LSE_CHUNK_ELEMENTS))
    lse = m + torch.log(l)
    raise_nonfinite_normalizer(lse, False)
    return lse


def _gram_cpu(h, W, b, logits, reduce, tail_tol, chunk):
    """Pass 1 (normalizer, and μ unless truncating) on the C++ path; pass 2,
    the p-weighted SYRK, as the reference's (GEMM-bound) chunked torch."""
    B = (logits if logits is not None else h).shape[0]
    V = W.shape[0]
    if tail_tol is not None:
        m, l = _lse_cpu(h, W, b, logits, cpu_chunk_size(V, B, chunk, CPU_LSE_CHUNK_ELEMENTS))
        raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
        return gram_truncated_chunked(h, W, b, logits, chunk, (m, torch.log(l)), tail_tol, reduce)
    m, l, mu, _ = moments_cpu(h, W, None, b, logits, cpu_chunk_size(V, 2 * B, chunk))
    G = (gram_none_chunked if reduce == "none" else gram_mean_chunked)(h, W, b, logits, chunk, (m, torch.log(l)), mu)
    return G, torch.zeros(B, dtype=torch.float64, device=W.device), torch.full((B,), V, device=W.device)


# ---------------------------------------------------------------------------
# Backend tables.
# ---------------------------------------------------------------------------

def _triton():
    # Imported on first use: TRITON_INTERPRET must be set before the kernels are defined.
    from fisherfast.ops import softmax_fisher_triton

    return softmax_fisher_triton


def _lm_logsumexp_triton(h, W, b, chunk):
    lse = _triton().lm_logsumexp_triton(h, W, b, chunk)
    raise_nonfinite_normalizer(lse, False)
    return lse


def _matmat_triton(h, W, U, b, logits, chunk):
    """Fused Triton kernels from h; given logits run the chunked reference."""
    if logits is not None:
        return _matmat_reference(h, W, U, b, logits, chunk)
    return _triton().softmax_fisher_matmat_triton(h, W, U, b)


def _quad_triton(h, W, U, b, logits, chunk):
    if logits is not None:
        return _quad_reference(h, W, U, b, logits, chunk)
    return _triton().softmax_fisher_quad_triton(h, W, U, b)


def _gram_triton(h, W, b, logits, reduce, tail_tol, chunk):
    """Exact: matmat with U = I_d on the Triton kernels. Truncated: the Triton
    normalizer, then the (torch) candidate selection. Logits given: reference."""
    if logits is not None:
        return _gram_reference(h, W, b, logits, reduce, tail_tol, chunk)
    B, V = h.shape[0], W.shape[0]
    if tail_tol is not None:
        norm = _triton().normalizer_triton(h, W, b)
        raise_nonfinite_normalizer(norm[0] + norm[1], False)
        return gram_truncated_chunked(h, W, b, None, chunk, norm, tail_tol, reduce)
    G = _triton().softmax_fisher_gram_triton(h, W, b, reduce)
    return G, torch.zeros(B, dtype=torch.float64, device=W.device), torch.full((B,), V, device=W.device)


# ---------------------------------------------------------------------------
# CUDA C++ (fisherfast._C_cuda, csrc/cuda/softmax_fisher.cu): lm_logsumexp and
# matmat for a shared U (per-token U and given logits run the reference).
# ---------------------------------------------------------------------------

def _cuda_launch_shape(V: int, B: int) -> tuple[int, int]:
    """(rows per split, splits): about 4 blocks per SM-scale target of 512 in all."""
    splits = max(1, min(V, 512 // max(B, 1), 65535))
    rows = -(-V // splits)
    return rows, -(-V // rows)


def _cuda_stats(h, W, U, b):
    ext = _backends.cuda_extension()
    B, d = h.shape
    V = W.shape[0]
    k = 0 if U is None else U.shape[1]
    rows, splits = _cuda_launch_shape(V, B)
    M = torch.empty(splits, B, dtype=W.dtype, device=W.device)
    L = torch.empty_like(M)
    S = torch.empty(splits, B, max(k, 1), dtype=W.dtype, device=W.device)
    ext.softmax_fisher_stats(str(W.dtype).removeprefix("torch."), h.data_ptr(), W.data_ptr(), _addr(b), _addr(U),
                             B, V, d, k, rows, splits, M.data_ptr(), L.data_ptr(), S.data_ptr(),
                             torch.cuda.current_stream(W.device).cuda_stream)
    m = M.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    scale = torch.exp(M - m_safe)
    l = (L * scale).sum(dim=0)
    m = torch.where(torch.isnan(M).any(dim=0), torch.full_like(m, math.nan), m)
    ybar = (S * scale[:, :, None]).sum(dim=0)[:, :k] / l[:, None]
    return m, torch.log(l), ybar, (rows, splits)


def _lm_logsumexp_cuda(h, W, b, chunk):
    m, log_l, _, _ = _cuda_stats(h, W, None, b)
    lse = m + log_l
    raise_nonfinite_normalizer(lse, False)
    return lse


def _matmat_cuda(h, W, U, b, logits, chunk):
    """Two passes (stats, then the centered Wᵀ accumulation) per column block
    of U; G U = A − μ tᵀ summed over the splits."""
    if logits is not None or U.dim() == 3:
        return _matmat_reference(h, W, U, b, logits, chunk)
    ext = _backends.cuda_extension()
    B, d = h.shape
    V = W.shape[0]
    name = str(W.dtype).removeprefix("torch.")
    out = []
    for Uj in U.split(ext.softmax_fisher_max_k, dim=1):
        Uj = Uj.contiguous()
        k = Uj.shape[1]
        m, log_l, ybar, (rows, splits) = _cuda_stats(h, W, Uj, b)
        raise_nonfinite_normalizer(m + log_l, False)
        A = torch.zeros(splits, B, d, k, dtype=W.dtype, device=W.device)
        Mu = torch.zeros(splits, B, d, dtype=W.dtype, device=W.device)
        T = torch.zeros(splits, B, k, dtype=W.dtype, device=W.device)
        ext.softmax_fisher_matmat_pass2(name, h.data_ptr(), W.data_ptr(), _addr(b), Uj.data_ptr(),
                                        m.contiguous().data_ptr(), log_l.contiguous().data_ptr(),
                                        ybar.contiguous().data_ptr(), B, V, d, k, rows, splits, A.data_ptr(),
                                        Mu.data_ptr(), T.data_ptr(), torch.cuda.current_stream(W.device).cuda_stream)
        mu, t = Mu.sum(dim=0), T.sum(dim=0)
        out.append(A.sum(dim=0) - mu[:, :, None] * t[:, None, :])
    return torch.cat(out, dim=2)


_LSE_IMPLS = {"reference": _lm_logsumexp_reference, "cpu": _lm_logsumexp_cpu, "triton": _lm_logsumexp_triton,
              "cuda": _lm_logsumexp_cuda}
_MATMAT_IMPLS = {"reference": _matmat_reference, "cpu": _matmat_cpu, "triton": _matmat_triton,
                 "cuda": _matmat_cuda}
_QUAD_IMPLS = {"reference": _quad_reference, "cpu": _quad_cpu, "triton": _quad_triton}
_GRAM_IMPLS = {"reference": _gram_reference, "cpu": _gram_cpu, "triton": _gram_triton}


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

def _check_chunk(chunk):
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")


def _check_head(h, W, b, logits, *, allow_logits: bool):
    """Validate (h | logits, W, b); returns (B, squeeze) where squeeze says h was 1-D."""
    check_tensor("W", W, ndim=2)
    V, d = W.shape
    if V < 1 or d < 1:
        raise ValueError(f"W must be non-empty (V×d), got shape {tuple(W.shape)}")
    if b is not None:
        check_tensor("b", b, ndim=1)
        if b.shape[0] != V:
            raise ValueError(f"b must have shape (V,) = ({V},) to match W, got {tuple(b.shape)}")
    if logits is not None:
        if not allow_logits:
            raise ValueError("logits= is not accepted here")
        if h is not None:
            raise ValueError("pass either h or logits=, not both (logits replace h W^T + b)")
        if b is not None:
            raise ValueError("b must be None when logits= is given (the bias is already in the logits)")
        check_tensor("logits", logits, ndim=(1, 2))
        if logits.shape[-1] != V:
            raise ValueError(f"logits must have last dimension V = {V} (rows of W), got shape {tuple(logits.shape)}")
        check_same_device(logits=logits, W=W)
        check_same_dtype(logits=logits, W=W)
        return (logits.shape[0] if logits.dim() == 2 else 1), logits.dim() == 1
    if h is None:
        raise ValueError("h must be a tensor (B,d) or (d,) (or pass logits=)")
    check_tensor("h", h, ndim=(1, 2))
    if h.shape[-1] != d:
        raise ValueError(f"h must have last dimension d = {d} (columns of W), got shape {tuple(h.shape)}")
    check_same_device(h=h, W=W, b=b)
    check_same_dtype(h=h, W=W, b=b)
    return (h.shape[0] if h.dim() == 2 else 1), h.dim() == 1


def _check_U(U, W, B, one_token: bool):
    check_tensor("U", U, ndim=(2, 3))
    d = W.shape[1]
    if U.dim() == 2 and U.shape[0] != d:
        raise ValueError(f"U must have shape (d,k) = ({d},k) or (B,d,k), got {tuple(U.shape)}")
    if U.dim() == 3:
        if one_token:
            raise ValueError(f"U must be (d,k) when h is a single token (d,), got {tuple(U.shape)}")
        if U.shape[0] != B or U.shape[1] != d:
            raise ValueError(f"U must have shape (B,d,k) = ({B},{d},k) or (d,k), got {tuple(U.shape)}")
    if U.shape[-1] < 1:
        raise ValueError(f"U must have at least one column, got shape {tuple(U.shape)}")
    check_same_device(U=U, W=W)
    check_same_dtype(U=U, W=W)


# Backends that read a half-precision W as it is (the Triton kernels load tiles
# and convert them; the reference casts one V-chunk at a time). The others get
# a float32 copy of W (their kernels take float32/float64 pointers).
_NATIVE_W_BACKENDS = ("reference", "triton")


def _prepare(h, W, b, logits, U, impls, impl):
    """Contiguous compute-dtype copies (float32 for half inputs) of h, b,
    logits and U, 2-D h/logits; W as it is for backends that read it natively.
    h (never W: scanning it costs as much as the op) is checked finite."""
    dt = compute_dtype(W.dtype)

    def cast(x):
        return None if x is None else x.to(dt).contiguous()

    if h is not None:
        check_finite("h", h)
        h = cast(h.reshape(1, -1) if h.dim() == 1 else h)
    if logits is not None:
        logits = cast(logits.reshape(1, -1) if logits.dim() == 1 else logits)
    native = any(impl is impls.get(name) for name in _NATIVE_W_BACKENDS)
    return h, (W.contiguous() if native else cast(W)), cast(b), logits, cast(U)


def _select(op, impls, device, backend):
    return _backends.select(op, impls, device, backend or None)


# ---------------------------------------------------------------------------
# torch.library ops (the bodies dispatch; fakes give shapes).
# ---------------------------------------------------------------------------

@torch.library.custom_op("fisherfast::lm_logsumexp", mutates_args=())
def _lse_op(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], backend: str,
            chunk: int) -> torch.Tensor:
    out_dtype = h.dtype
    impl = _select("lm_logsumexp", _LSE_IMPLS, W.device, backend)
    h, W, b, _, _ = _prepare(h, W, b, None, None, _LSE_IMPLS, impl)
    return impl(h, W, b, chunk or None).to(out_dtype)


@_lse_op.register_fake
def _(h, W, b, backend, chunk):
    return h.new_empty(h.shape[0])


def _contract(op: str, impls, h, W, U, b, logits, backend: str, chunk: int) -> torch.Tensor:
    """Shared body of the matmat and quad ops: prepare, dispatch, check, cast back."""
    out_dtype = W.dtype
    impl = _select(op, impls, W.device, backend)
    h, W, b, logits, U = _prepare(h, W, b, logits, U, impls, impl)
    out = impl(h, W, U, b, logits, chunk or None)
    raise_nonfinite_result(out, logits is not None)
    return out.to(out_dtype)


@torch.library.custom_op("fisherfast::softmax_fisher_matmat", mutates_args=())
def _matmat_op(h: Optional[torch.Tensor], W: torch.Tensor, U: torch.Tensor, b: Optional[torch.Tensor],
               logits: Optional[torch.Tensor], backend: str, chunk: int) -> torch.Tensor:
    return _contract("softmax_fisher_matmat", _MATMAT_IMPLS, h, W, U, b, logits, backend, chunk)


@_matmat_op.register_fake
def _(h, W, U, b, logits, backend, chunk):
    B = (h if h is not None else logits).shape[0]
    return W.new_empty(B, W.shape[1], U.shape[-1])


@torch.library.custom_op("fisherfast::softmax_fisher_quad", mutates_args=())
def _quad_op(h: Optional[torch.Tensor], W: torch.Tensor, U: torch.Tensor, b: Optional[torch.Tensor],
             logits: Optional[torch.Tensor], backend: str, chunk: int) -> torch.Tensor:
    return _contract("softmax_fisher_quad", _QUAD_IMPLS, h, W, U, b, logits, backend, chunk)


@_quad_op.register_fake
def _(h, W, U, b, logits, backend, chunk):
    B = (h if h is not None else logits).shape[0]
    return W.new_empty(B, U.shape[-1], U.shape[-1])


@torch.library.custom_op("fisherfast::softmax_fisher_gram", mutates_args=())
def _gram_op(h: Optional[torch.Tensor], W: torch.Tensor, b: Optional[torch.Tensor],
             logits: Optional[torch.Tensor], reduce: str, tail_tol: float, backend: str,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_dtype = W.dtype
    impl = _select("softmax_fisher_gram", _GRAM_IMPLS, W.device, backend)
    h, W, b, logits, _ = _prepare(h, W, b, logits, None, _GRAM_IMPLS, impl)
    G, tau, n_kept = impl(h, W, b, logits, reduce, tail_tol if tail_tol > 0 else None, chunk or None)
    raise_nonfinite_result(G, logits is not None)
    return G.to(out_dtype), tau.to(torch.float64), n_kept.to(torch.int64)


@_gram_op.register_fake
def _(h, W, b, logits, reduce, tail_tol, backend, chunk):
    B = (h if h is not None else logits).shape[0]
    d = W.shape[1]
    G = W.new_empty(B, d, d) if reduce == "none" else W.new_empty(d, d)
    return G, W.new_empty(B, dtype=torch.float64), W.new_empty(B, dtype=torch.int64)


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------

def lm_logsumexp(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None, *,
                 chunk: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Log-normalizer of the LM head, streamed over the vocabulary.

        lse_i = log Σ_v exp(w_v·h_i + b_v)

    Args:
        h: (B,d) or (d,) hidden states (head input after the final norm).
        W: (V,d) unembedding; b: optional (V,) bias. Same dtype and device.
        chunk: V-chunk length (default: from a 4 MiB temporaries budget).
        backend: force "reference", "cpu", "triton" or "cuda" (default: fastest available).

    Returns:
        (B,) (or 0-dim for 1-D h) in h's dtype.

    Cost: 2·B·V·d flops (one read of W); extra memory O(B) + one B×chunk tile.
    """
    B, squeeze = _check_head(h, W, b, None, allow_logits=False)
    _check_chunk(chunk)
    out = torch.ops.fisherfast.lm_logsumexp(h.reshape(B, -1) if squeeze else h, W, b, backend or "", chunk or 0)
    return out[0] if squeeze else out


def softmax_fisher_matmat(h: torch.Tensor | None, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor | None = None,
                          *, logits: torch.Tensor | None = None, chunk: int | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Head-metric matrix product G_head(h_i) U_i for every token (docs/design.md §3).

        G_head(h_i) U_i = Wᵀ (p_i ⊙ (W U_i) − p_i (p_iᵀ W U_i)),  p_i = softmax(W h_i + b),

    computed in centered form Σ_v p_iv (w_v − μ_i) ((w_v − μ_i)ᵀ U_i), μ_i = Wᵀp_i.

    Args:
        h: (B,d) or (d,) hidden states, or None when ``logits`` is given.
        W: (V,d) unembedding; b: optional (V,) bias.
        U: (d,k) shared by all tokens or (B,d,k) per token.
        logits: (B,V) precomputed W h + b, replacing h and b.
        chunk: V-chunk length (default: from a 4 MiB temporaries budget).
        backend: force "reference", "cpu", "triton" or "cuda" (cuda: shared U from h;
            other cases run the reference).

    Returns:
        (B,d,k) (or (d,k) for 1-D h), W's dtype.

    Cost: about 2·V·d·(B(k+2) + k) flops for shared U (logits, W U, and the Wᵀ
    accumulation of [p ⊙ ŷ | p]); extra memory O(B·d·k) + one chunk.
    """
    B, squeeze = _check_head(h, W, b, logits, allow_logits=True)
    _check_U(U, W, B, squeeze)
    _check_chunk(chunk)
    h2 = h.reshape(B, -1) if (h is not None and squeeze) else h
    z2 = logits.reshape(B, -1) if (logits is not None and squeeze) else logits
    out = torch.ops.fisherfast.softmax_fisher_matmat(h2, W, U, b, z2, backend or "", chunk or 0)
    return out[0] if squeeze else out


def softmax_fisher_quad(h: torch.Tensor | None, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor | None = None,
                        *, logits: torch.Tensor | None = None, chunk: int | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """Head-metric quadratic form U_iᵀ G_head(h_i) U_i for every token.

        U_iᵀ G_head U_i = Cov_{y∼p_i}[U_iᵀ w_y] = Σ_v p_iv (y_v − ȳ)(y_v − ȳ)ᵀ,
        y_v = U_iᵀ w_v, ȳ = Σ_v p_iv y_v  (centered: no Wᵀ accumulation at all).

    Args: as ``softmax_fisher_matmat``.

    Returns:
        (B,k,k) symmetric PSD (or (k,k) for 1-D h), W's dtype.

    Cost: about 2·V·d·(B + k) flops for shared U (2·V·d·B(k+1) per-token U),
    plus O(B·V·k²); extra memory O(B·k²) + one chunk.
    """
    B, squeeze = _check_head(h, W, b, logits, allow_logits=True)
    _check_U(U, W, B, squeeze)
    _check_chunk(chunk)
    h2 = h.reshape(B, -1) if (h is not None and squeeze) else h
    z2 = logits.reshape(B, -1) if (logits is not None and squeeze) else logits
    out = torch.ops.fisherfast.softmax_fisher_quad(h2, W, U, b, z2, backend or "", chunk or 0)
    return out[0] if squeeze else out


def softmax_fisher_gram(h: torch.Tensor | None, W: torch.Tensor, b: torch.Tensor | None = None, *,
                        reduce: str = "none", tail_tol: float | None = None, logits: torch.Tensor | None = None,
                        chunk: int | None = None, backend: str | None = None):
    """The dense d×d head metric per token, or averaged over tokens.

        G_i = Wᵀ (diag p_i − p_i p_iᵀ) W = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ,  μ_i = Wᵀ p_i.

    reduce="none" returns (B,d,d) (cost B·V·d² + 4·B·V·d flops); reduce="mean"
    returns (1/B) Σ_i G_i in a centered two-term form with no cancellation
    (see ``gram_mean_chunked``) that needs one SYRK over V, not B: cost
    V·d² + O(B·V·(d + B)). Extra memory: the output + one chunk.

    With ``tail_tol`` in (0,1), each token keeps only its smallest set S_i of
    largest-p rows with tail mass τ_i = 1 − Σ_{v∈S_i} p_iv ≤ tail_tol and uses
    G_S = Σ_{v∈S} p_v (w_v − μ_S)(w_v − μ_S)ᵀ (μ_S the p-weighted mean of the
    kept rows): 0 ⪯ G_S ⪯ G and ‖G − G_S‖₂ ≤ τ/(1−τ) · max_{v∉S} ‖w_v − μ‖².
    Cost 4·B·V·d + Σ_i |S_i|·d². Returns ``TruncatedGram(G, tau, n_kept)``:
    tau (float64) is (B,) per token for reduce="none" and the mean over tokens
    (0-dim) for reduce="mean"; n_kept is (B,) int64 in both cases.

    Args:
        h: (B,d) or (d,) hidden states, or None when ``logits`` is given.
        W: (V,d) unembedding; b: optional (V,) bias.
        reduce: "none" or "mean".
        tail_tol: None (exact) or a float in (0,1).
        logits: (B,V) precomputed W h + b, replacing h and b.
        chunk, backend: as the other ops.

    Returns:
        G ((B,d,d), (d,d) for reduce="mean" or 1-D h), or a TruncatedGram.
    """
    B, squeeze = _check_head(h, W, b, logits, allow_logits=True)
    if reduce not in ("none", "mean"):
        raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
    if tail_tol is not None:
        if isinstance(tail_tol, bool) or not isinstance(tail_tol, (int, float)) or not 0.0 < float(tail_tol) < 1.0:
            raise ValueError(f"tail_tol must be None or a float in (0, 1), got {tail_tol!r}")
    _check_chunk(chunk)
    h2 = h.reshape(B, -1) if (h is not None and squeeze) else h
    z2 = logits.reshape(B, -1) if (logits is not None and squeeze) else logits
    G, tau, n_kept = torch.ops.fisherfast.softmax_fisher_gram(
        h2, W, b, z2, reduce, float(tail_tol) if tail_tol is not None else -1.0, backend or "", chunk or 0)
    if squeeze and reduce == "none":
        G = G[0]
    if tail_tol is None:
        return G
    if reduce == "mean":
        tau = tau.mean()
    elif squeeze:
        tau, n_kept = tau[0], n_kept[0]
    return TruncatedGram(G, tau, n_kept)
