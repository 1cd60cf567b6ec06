"""cpu backend of the softmax-Fisher ops (the C++ extension fisherfast._C;
same signatures as ``softmax_fisher_reference``).

One-pass streaming. Per chunk: one MKL GEMM [a; Uᵀ] W_cᵀ gives the logit tile
and the projection tile from one read of W_c; one C++ sweep per token forms
the chunk-local moments (max m_c, mass l_c, means, centered co-moments) and
merges them into the running ones by Chan's parallel update, rescaled by
e^{m_c − m′} as in flash attention (csrc/include/fisherfast/softmax_fisher.h);
matmat adds the GEMM X W_c for the Wᵀ accumulation and a merge sweep.
Centered within each chunk, so no cancellation; one read of W per call; the
chunk buffers are allocated once. Soft-capping: the logit tile is capped in
torch (z′ = c·tanh(z/c), s = 1 − tanh²(z/c)), the projections are scaled to
ỹ = s y per token, and the matmat sweep weights the GEMM rows by s. W arrives as a float32/float64 copy (the
kernels take float32/float64 pointers). The running state merged across chunks
(m, l, μ, ȳ and the co-moments) is float64 whatever W's dtype: one rounding
per merge in float32 cost up to 1.7e-4 of lse with short chunks on a real
head; the results are rounded to W's dtype once at the end.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends
from fisherfast.ops.softmax_fisher_common import (LSE_CHUNK_ELEMENTS, cap_logits, chunk_size,
                                                  raise_nonfinite_normalizer, reduction_chunk)
from fisherfast.ops.softmax_fisher_reference import gram_mean_chunked, gram_none_chunked, gram_truncated_chunked

# A C++ sweep runs on more than one thread only with at least this many
# element-operations per thread: waking the OpenMP team costs microseconds on
# an idle machine and milliseconds on a loaded one, and the sweeps are O(k) to
# O(k²) per logit against the GEMM's O(d).
SWEEP_WORK_PER_THREAD = 1 << 22


def _sweep_threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // SWEEP_WORK_PER_THREAD))


def _dl(x):
    """The C++ side's tensor view: a DLPack capsule (None stays None)."""
    return None if x is None else to_dlpack(x)


def _cpu_chunks(a, W, U, b, logits, C):
    """Yield (W_c, Z_c (B,c), Y_c (B,k,c) or None, b_c or None) over V. With a,
    the logits and the projections y = Uᵀw come from one GEMM [a; Uᵀ] W_cᵀ
    into a reused buffer (U shared: k rows, seen by every token through a
    stride-0 view; per token: B·k rows, token b's at B + b·k); given logits
    are read in place (a strided view)."""
    V, d = W.shape
    B = (logits if logits is not None else a).shape[0]
    k = 0 if U is None else U.shape[-1]
    parts = [] if logits is not None else [a]
    if U is not None:
        parts.append(U.T if U.dim() == 2 else U.transpose(1, 2).reshape(B * k, d))
    rows = torch.cat(parts) if len(parts) > 1 else (parts[0].contiguous() if parts else None)
    n = 0 if rows is None else rows.shape[0]
    buf = torch.empty(n * C, dtype=W.dtype, device=W.device)
    y0 = 0 if logits is not None else B  # first projection row
    for start in range(0, V, C):
        c = min(C, V - start)
        Wc = W[start:start + c]
        R = buf[:n * c].view(n, c)
        if n:
            torch.mm(rows, Wc.T, out=R)
        Z = logits[:, start:start + c] if logits is not None else R[:B]
        if k == 0:
            Y = None
        elif U.dim() == 2:
            Y = R[y0:y0 + k].unsqueeze(0).expand(B, k, c)
        else:
            Y = R[y0:].view(B, k, c)
        yield Wc, Z, Y, (None if b is None else b[start:start + c])


def _capped_chunks(a, W, U, b, logits, C, softcap):
    """``_cpu_chunks`` plus the soft-cap factors: (W_c, Z_c, Y_c, b_c, S_c);
    with a cap, Z_c = c·tanh((z + b)/c) (bias folded in, b_c None), Y_c = s ⊙ y
    per token and S_c = s (B,c); without, S_c is None."""
    for Wc, Z, Y, b_c in _cpu_chunks(a, W, U, b, logits, C):
        if softcap is None:
            yield Wc, Z, Y, b_c, None
            continue
        Z, S = cap_logits(Z if b_c is None else Z + b_c, softcap)
        yield Wc, Z, (None if Y is None else Y * S[:, None, :]), None, S


F64 = torch.float64


def _running(B, dev):
    """The running (m, l) per token, float64 (merged across chunks)."""
    return torch.full((B,), -math.inf, dtype=F64, device=dev), torch.zeros(B, dtype=F64, device=dev)


def _moments(a, W, U, b, logits, C, softcap=None):
    """One pass: the normalizer (m, l) per token, μ = Wᵀp (B,d) and, with U,
    the centered cross-moment Σ_v p_v (w_v − μ)(y_v − ȳ)ᵀ = G U (B,d,k), all
    float64. The GEMM X W_c reduces over the chunk in float32: chunks of at
    most REDUCTION_BLOCK rows, merged in the running (Chan) statistics."""
    ext = _backends.cpu_extension()
    C = reduction_chunk(C, W.dtype)
    B = (logits if logits is not None else a).shape[0]
    V, d = W.shape
    k = 0 if U is None else U.shape[-1]
    dt, dev = W.dtype, W.device
    new = functools.partial(torch.empty, dtype=dt, device=dev)
    m, l = _running(B, dev)
    mu, ybar, M = torch.zeros(B, d, dtype=F64), torch.zeros(B, k, dtype=F64), torch.zeros(B, d, k, dtype=F64)
    m_c, l_c, ybar_c, t_c = new(B), new(B), new(B, k), new(B, k)
    X, A = new(B * (k + 1) * C), new(B * (k + 1), d)
    merge_threads = _sweep_threads(B * d * (k + 1))
    running = [_dl(x) for x in (m_c, l_c, ybar_c, t_c, m, l, mu, ybar, M)]
    for Wc, Z, Y, b_c, S in _capped_chunks(a, W, U, b, logits, C, softcap):
        c = Wc.shape[0]
        Xc = X[:B * (k + 1) * c].view(B, k + 1, c)
        if Y is None:  # k = 0: no projection rows
            Y = Z.new_empty(B, 0, c)
        ext.softmax_fisher_matmat_chunk(_dl(Z), _dl(b_c), _dl(S), _dl(Y), _dl(Xc), *running[:4],
                                        _sweep_threads(B * c * (k + 2)))
        torch.mm(Xc.view(B * (k + 1), c), Wc, out=A)
        ext.softmax_fisher_matmat_merge(_dl(A.view(B, k + 1, d)), *running, merge_threads)
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return m, l, mu, M


def matmat(a, W, U, b, logits, chunk, softcap=None):
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    n_proj = k if U.dim() == 2 and softcap is None else B * k
    C = chunk_size(W.shape[0], (0 if logits is not None else B) + n_proj + B * (k + 1), chunk)
    _, l, _, M = _moments(a, W, U, b, logits, C, softcap)
    return (M / l[:, None, None]).to(W.dtype)


def quad(a, W, U, b, logits, chunk, softcap=None):
    """U_iᵀ G U_i as the p-weighted covariance of y_v = U_iᵀ w_v: one GEMM
    and one C++ sweep (moments and merge) per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], (0 if logits is not None else B) + (k if U.dim() == 2 and softcap is None else B * k),
                   chunk)
    m, l = _running(B, W.device)
    ybar, M = torch.zeros(B, k, dtype=F64), torch.zeros(B, k, k, dtype=F64)
    running = [_dl(x) for x in (m, l, ybar, M)]
    for Wc, Z, Y, b_c, _ in _capped_chunks(a, W, U, b, logits, C, softcap):
        c = Wc.shape[0]
        ext.softmax_fisher_quad_update(_dl(Z), _dl(b_c), _dl(Y), *running,
                                       _sweep_threads(B * c * (k + 1) * (k + 4) // 2))
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return (M / l[:, None, None]).to(W.dtype)  # symmetric by construction (both triangles written from one sum)


def _normalizer(a, W, b, logits, C, softcap=None):
    """(m, l) per token (float64): one GEMM and one C++ sweep per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else a).shape[0]
    m, l = _running(B, W.device)
    running = [_dl(m), _dl(l)]
    for Wc, Z, _, b_c, _ in _capped_chunks(a, W, None, b, logits, C, softcap):
        ext.softmax_fisher_lse_update(_dl(Z), _dl(b_c), *running, _sweep_threads(4 * B * Wc.shape[0]))
    return m, l


def lm_logsumexp(a, W, b, chunk, softcap=None):
    m, l = _normalizer(a, W, b, None, chunk_size(W.shape[0], a.shape[0], chunk, LSE_CHUNK_ELEMENTS), softcap)
    lse = (m + torch.log(l)).to(W.dtype)
    raise_nonfinite_normalizer(lse, False)
    return lse


def _norm(m, l, dt):
    """The pass-2 normalizer (m, log l) in W's dtype, as the reference's pass 1
    gives it (m is a logit, exact in dt)."""
    return m.to(dt), torch.log(l).to(dt)


def gram(a, W, b, logits, reduce, chunk, softcap=None):
    """Pass 1 (normalizer and μ) on the C++ path; pass 2, the p-weighted SYRK,
    as the reference's (GEMM-bound) chunked torch."""
    B = (logits if logits is not None else a).shape[0]
    m, l, mu, _ = _moments(a, W, None, b, logits, chunk_size(W.shape[0], 2 * B, chunk), softcap)
    pass2 = gram_none_chunked if reduce == "none" else gram_mean_chunked
    return pass2(a, W, b, logits, chunk, _norm(m, l, W.dtype), mu.to(W.dtype), softcap)


def gram_topk(a, W, b, logits, reduce, tail_tol, chunk, softcap=None):
    """The normalizer on the C++ path, then the reference's candidate selection."""
    B = (logits if logits is not None else a).shape[0]
    m, l = _normalizer(a, W, b, logits, chunk_size(W.shape[0], B, chunk, LSE_CHUNK_ELEMENTS), softcap)
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return gram_truncated_chunked(a, W, b, logits, chunk, _norm(m, l, W.dtype), tail_tol, reduce, softcap)
