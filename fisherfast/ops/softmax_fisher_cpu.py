"""cpu backend of the softmax-Fisher ops (the C++ extension fisherfast._C;
same signatures as ``softmax_fisher_reference``).

One-pass streaming. Per chunk: one MKL GEMM [a; Uᵀ] W_cᵀ gives the logit tile
and the projection tile from one read of W_c; one C++ sweep per token forms
the chunk-local moments (max m_c, mass l_c, means, centered co-moments) and
merges them into the running ones by Chan's parallel update, rescaled by
e^{m_c − m′} as in flash attention (csrc/include/fisherfast/softmax_fisher.h);
matmat adds the GEMM X W_c for the Wᵀ accumulation and a merge sweep.
Centered within each chunk, so no cancellation; one read of W per call; the
chunk buffers are allocated once. W arrives as a float32/float64 copy (the
kernels take float32/float64 pointers).
"""
from __future__ import annotations

import functools
import math

import torch

from fisherfast.ops import _backends
from fisherfast.ops.softmax_fisher_common import LSE_CHUNK_ELEMENTS, chunk_size, raise_nonfinite_normalizer
from fisherfast.ops.softmax_fisher_reference import gram_mean_chunked, gram_none_chunked, gram_truncated_chunked

# A C++ sweep runs on more than one thread only with at least this many
# element-operations per thread: waking the OpenMP team costs microseconds on
# an idle machine and milliseconds on a loaded one, and the sweeps are O(k) to
# O(k²) per logit against the GEMM's O(d).
SWEEP_WORK_PER_THREAD = 1 << 22


def _sweep_threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // SWEEP_WORK_PER_THREAD))


def _addr(x):
    return 0 if x is None else x.data_ptr()


def _cpu_chunks(a, W, U, logits, C):
    """Yield (W_c, Z address, row stride of Z, Y address, ysb, ysj, bias
    offset) over V. With a, the logits and the projections y = Uᵀw come from
    one GEMM [a; Uᵀ] W_cᵀ into a reused buffer (U shared: k rows; per token:
    B·k rows, token b's at B + b·k); given logits are read in place."""
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


def _moments(a, W, U, b, logits, C):
    """One pass: the normalizer (m, l) per token, μ = Wᵀp (B,d) and, with U,
    the centered cross-moment Σ_v p_v (w_v − μ)(y_v − ȳ)ᵀ = G U (B,d,k)."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else a).shape[0]
    V, d = W.shape
    k = 0 if U is None else U.shape[-1]
    dt, dev, name = W.dtype, W.device, str(W.dtype).removeprefix("torch.")
    new = functools.partial(torch.empty, dtype=dt, device=dev)
    m, l = _running(B, dt, dev)
    mu, ybar, M = torch.zeros(B, d, dtype=dt), torch.zeros(B, k, dtype=dt), torch.zeros(B, d, k, dtype=dt)
    m_c, l_c, ybar_c, t_c = new(B), new(B), new(B, k), new(B, k)
    X, A = new(B * (k + 1) * C), new(B * (k + 1), d)
    merge_threads = _sweep_threads(B * d * (k + 1))
    for start, Wc, z, zsb, y, ysb, ysj in _cpu_chunks(a, W, U, logits, C):
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


def matmat(a, W, U, b, logits, chunk):
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    n_proj = k if U.dim() == 2 else B * k
    C = chunk_size(W.shape[0], (0 if logits is not None else B) + n_proj + B * (k + 1), chunk)
    _, l, _, M = _moments(a, W, U, b, logits, C)
    return M / l[:, None, None]


def quad(a, W, U, b, logits, chunk):
    """U_iᵀ G U_i as the p-weighted covariance of y_v = U_iᵀ w_v: one GEMM
    and one C++ sweep (moments and merge) per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else a).shape[0]
    k = U.shape[-1]
    C = chunk_size(W.shape[0], (0 if logits is not None else B) + (k if U.dim() == 2 else B * k), chunk)
    dt, name = W.dtype, str(W.dtype).removeprefix("torch.")
    m, l = _running(B, dt, W.device)
    ybar, M = torch.zeros(B, k, dtype=dt), torch.zeros(B, k, k, dtype=dt)
    for start, Wc, z, zsb, y, ysb, ysj in _cpu_chunks(a, W, U, logits, C):
        c = Wc.shape[0]
        ext.softmax_fisher_quad_update(name, z, zsb, _bias_addr(b, start), y, ysb, ysj, B, c, k, m.data_ptr(),
                                       l.data_ptr(), ybar.data_ptr(), M.data_ptr(),
                                       _sweep_threads(B * c * (k + 1) * (k + 4) // 2))
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return M / l[:, None, None]  # symmetric by construction (both triangles written from one sum)


def _normalizer(a, W, b, logits, C):
    """(m, l) per token: one GEMM and one C++ sweep per chunk."""
    ext = _backends.cpu_extension()
    B = (logits if logits is not None else a).shape[0]
    name = str(W.dtype).removeprefix("torch.")
    m, l = _running(B, W.dtype, W.device)
    for start, Wc, z, zsb, _, _, _ in _cpu_chunks(a, W, None, logits, C):
        c = Wc.shape[0]
        ext.softmax_fisher_lse_update(name, z, zsb, _bias_addr(b, start), B, c, m.data_ptr(), l.data_ptr(),
                                      _sweep_threads(4 * B * c))
    return m, l


def lm_logsumexp(a, W, b, chunk):
    m, l = _normalizer(a, W, b, None, chunk_size(W.shape[0], a.shape[0], chunk, LSE_CHUNK_ELEMENTS))
    lse = m + torch.log(l)
    raise_nonfinite_normalizer(lse, False)
    return lse


def gram(a, W, b, logits, reduce, chunk):
    """Pass 1 (normalizer and μ) on the C++ path; pass 2, the p-weighted SYRK,
    as the reference's (GEMM-bound) chunked torch."""
    B = (logits if logits is not None else a).shape[0]
    m, l, mu, _ = _moments(a, W, None, b, logits, chunk_size(W.shape[0], 2 * B, chunk))
    return (gram_none_chunked if reduce == "none" else gram_mean_chunked)(a, W, b, logits, chunk, (m, torch.log(l)), mu)


def gram_topk(a, W, b, logits, reduce, tail_tol, chunk):
    """The normalizer on the C++ path, then the reference's candidate selection."""
    B = (logits if logits is not None else a).shape[0]
    m, l = _normalizer(a, W, b, logits, chunk_size(W.shape[0], B, chunk, LSE_CHUNK_ELEMENTS))
    raise_nonfinite_normalizer(m + torch.log(l), logits is not None)
    return gram_truncated_chunked(a, W, b, logits, chunk, (m, torch.log(l)), tail_tol, reduce)
