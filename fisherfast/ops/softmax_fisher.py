"""Softmax-Fisher contractions at vocabulary scale (docs/design.md §3): the public
ops, their validation and their ``torch.library`` registration.

For head inputs a (B×d, after the final norm), unembedding W (V×d), optional
bias b (V,) and p_i = softmax(W a_i + b), the head metric is

    G_head(a_i) = Wᵀ (diag p_i − p_i p_iᵀ) W = Cov_{y∼p_i}[w_y]      (d×d).

Every op streams over V in chunks and never holds a B×V or V×k×B tensor:
extra memory is O(B·(d + k)) plus one chunk (plus the outputs).

Where things live (one module per backend, one signature per op):
``softmax_fisher_reference`` (chunked PyTorch, the oracle), ``_cpu`` (C++),
``_triton`` (Triton kernels), ``_cuda`` (CUDA C++); ``softmax_fisher_common``
holds what they share (chunk policy, split merge, the non-finite and overflow
errors). This file imports the backends only through the dispatch table.

Numerics: everything is computed as a *centered* covariance — never as
Wᵀdiag(p)W − μμᵀ, which loses about three digits in float32 on a real model.
float16/bfloat16 inputs are computed in float32 and returned in the input
dtype; a result that overflows the input dtype raises OverflowError (never a
silent Inf; pass float32 inputs for a float32 result). Logits are shifted by
their running maximum, so logits of magnitude 1e4 are fine. A non-finite
normalizer (NaN/Inf in W, b or the logits) is detected during the pass and
raised as a ValueError naming the input; a is checked finite up front.
Every float32 sum over V runs in short blocks whose totals are added in
float64 (softmax_fisher_common.REDUCTION_BLOCK, SPLIT_ROWS), so the error does
not grow with V or the chunk length.

Soft-capping: every op takes ``softcap=c`` (None or a positive finite float):
the logits are z′ = c·tanh(z/c) and the metric is J_capᵀ (diag p − p pᵀ) J_cap
with J_cap = diag(1 − tanh²(z/c)) W (the rows w_v become s_v w_v per token).

Edge inputs: an empty batch (a of shape (0, d), or logits (0, V)) gives
empty results of the right shapes; ``reduce="mean"`` over zero tokens is a
ValueError naming a (or logits).

Logit-given variants: every op except ``lm_logsumexp`` takes ``logits=z``
(B×V, z = W a + b already computed by the caller) in place of ``a`` (pass
``a=None``, no ``b``); the chunks of z are then read instead of recomputed
(z is the logit before any soft-capping).

Backends: ``_OPS`` declares what each backend implements beyond the plain
case (given logits, a per-token U, softcap); the dispatcher, not the backend,
falls back to the reference for the rest (``capabilities``, ``_select``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fisherfast.ops import _backends
from fisherfast.checks import (cast_checked, check_finite, check_int, check_real, check_same_device, check_same_dtype,
                               check_tensor, compute_dtype)
from fisherfast.ops.softmax_fisher_common import check_softcap, raise_nonfinite_result


@dataclasses.dataclass(frozen=True)
class TruncatedGram:
    """Result of ``softmax_fisher_gram_topk``.

    G: (B,d,d), or (d,d) for reduce="mean" or a 1-D a, the truncated head
    metric in W's dtype; tau: float64 tail mass 1 − Σ_{v∈S} p_v, (B,) per
    token, or 0-dim (its mean for reduce="mean", the token's for a 1-D a);
    n_kept: int64 |S_i|, (B,) per token (0-dim for a 1-D a)."""

    G: torch.Tensor
    tau: torch.Tensor
    n_kept: torch.Tensor


# ---------------------------------------------------------------------------
# Dispatch table: op -> backends that implement it. Each backend module
# (softmax_fisher_<backend>) defines the op under this name; modules are
# imported on first call (TRITON_INTERPRET must be read when the Triton
# kernels are defined).
# ---------------------------------------------------------------------------

# Capabilities a call may need beyond the plain (a, shared U) case.
LOGITS, PER_TOKEN_U, SOFTCAP = "logits", "per_token_U", "softcap"
_ALL = frozenset((LOGITS, PER_TOKEN_U, SOFTCAP))
_NONE = frozenset()
_OPS = {
    "lm_logsumexp": {"reference": _ALL, "cpu": _ALL, "triton": frozenset((SOFTCAP,)), "cuda": frozenset((SOFTCAP,))},
    "matmat": {"reference": _ALL, "cpu": _ALL, "triton": frozenset((PER_TOKEN_U, SOFTCAP)),
               "cuda": frozenset((SOFTCAP,))},
    "quad": {"reference": _ALL, "cpu": _ALL, "triton": frozenset((PER_TOKEN_U, SOFTCAP))},
    "gram": {"reference": _ALL, "cpu": _ALL, "triton": frozenset((SOFTCAP,))},
    "gram_topk": {"reference": _ALL, "cpu": _ALL, "triton": frozenset((SOFTCAP,))},
}
# Backends that read a half-precision W as it is (the Triton kernels convert
# each tile they load; the reference casts one V-chunk at a time). The others
# get a float32 copy of W (their kernels take float32/float64 pointers).
_NATIVE_W_BACKENDS = ("reference", "triton")


_IMPLS = {op: {name: _backends.lazy_impl("softmax_fisher", name, op) for name in names} for op, names in _OPS.items()}


def capabilities(op: str) -> dict[str, frozenset[str]]:
    """What each backend of ``op`` ("lm_logsumexp", "matmat", "quad", "gram",
    "gram_topk") implements beyond the plain case: "logits" (given logits),
    "per_token_U" (a (B,d,k) U), "softcap". A call needing more than the
    chosen backend has runs the reference backend (see ``_select``)."""
    return dict(_OPS[op])


def _public_name(op: str) -> str:
    return op if op == "lm_logsumexp" else f"softmax_fisher_{op}"


def _needs(logits=None, U=None, softcap=None) -> frozenset[str]:
    return frozenset(name for name, used in ((LOGITS, logits is not None), (PER_TOKEN_U, U is not None and U.dim() == 3),
                                             (SOFTCAP, softcap is not None)) if used)


def _select(op: str, device: torch.device, backend: str | None, needs: frozenset[str] = _NONE):
    """The backend implementation for this call: the forced one (``backend`` or
    FISHERFAST_BACKEND) or the fastest that can run here and has every
    capability in ``needs``. A forced backend lacking one runs the reference,
    with a warning naming what is missing."""
    table = _OPS[op]
    return _backends.select(_public_name(op), _IMPLS[op], device, backend or None,
                            lacks=lambda name: sorted(needs - table.get(name, _NONE)))


# ---------------------------------------------------------------------------
# Validation (public functions, op bodies and fake implementations alike).
# ---------------------------------------------------------------------------

def _check_chunk(chunk):
    check_int("chunk", chunk, minimum=1, optional=True)


def _check_head(a, W, b, logits, *, allow_logits: bool, ndim=(1, 2)):
    """Validate (a | logits, W, b); returns (B, squeeze) where squeeze says a (or logits) was 1-D."""
    check_tensor("W", W, ndim=2)
    V, d = W.shape
    if V < 1 or d < 1:
        raise ValueError(f"W: expected a non-empty (V, d) matrix, got shape {tuple(W.shape)}")
    if b is not None:
        check_tensor("b", b, ndim=1)
        if b.shape[0] != V:
            raise ValueError(f"b: expected shape (V,) = ({V},) to match W, got shape {tuple(b.shape)}")
    if logits is not None:
        if not allow_logits:
            raise ValueError("logits= is not accepted here")
        if a is not None:
            raise ValueError("pass either a or logits=, not both (logits replace a W^T + b)")
        if b is not None:
            raise ValueError("b: expected None when logits= is given (the bias is already in the logits), got a tensor")
        check_tensor("logits", logits, ndim=ndim)
        if logits.shape[-1] != V:
            raise ValueError(f"logits: expected last dimension V = {V} (rows of W), got shape {tuple(logits.shape)}")
        check_same_device(logits=logits, W=W)
        check_same_dtype(logits=logits, W=W)
        return (logits.shape[0] if logits.dim() == 2 else 1), logits.dim() == 1
    if a is None:
        raise ValueError("a: expected a tensor (B,d) or (d,) (or pass logits=), got None")
    check_tensor("a", a, ndim=ndim)
    if a.shape[-1] != d:
        raise ValueError(f"a: expected last dimension d = {d} (columns of W), got shape {tuple(a.shape)}")
    check_same_device(a=a, W=W, b=b)
    check_same_dtype(a=a, W=W, b=b)
    return (a.shape[0] if a.dim() == 2 else 1), a.dim() == 1


def _check_U(U, W, B, one_token: bool):
    check_tensor("U", U, ndim=(2, 3))
    d = W.shape[1]
    if U.dim() == 2 and U.shape[0] != d:
        raise ValueError(f"U: expected shape (d,k) = ({d},k) or (B,d,k), got shape {tuple(U.shape)}")
    if U.dim() == 3:
        if one_token:
            raise ValueError(f"U: expected shape (d,k) when a is a single token (d,), got shape {tuple(U.shape)}")
        if U.shape[0] != B or U.shape[1] != d:
            raise ValueError(f"U: expected shape (B,d,k) = ({B},{d},k) or (d,k), got shape {tuple(U.shape)}")
    if U.shape[-1] < 1:
        raise ValueError(f"U: expected at least one column, got shape {tuple(U.shape)}")
    check_same_device(U=U, W=W)
    check_same_dtype(U=U, W=W)


def _check_reduce(reduce, B: int, logits):
    if reduce not in ("none", "mean"):
        raise ValueError(f"reduce: expected 'none' or 'mean', got {reduce!r}")
    if reduce == "mean" and B == 0:
        name = "logits" if logits is not None else "a"
        raise ValueError(f"reduce='mean' needs at least one token: {name} has 0 rows (a mean over no tokens)")


def _check_tail_tol(tail_tol):
    check_real("tail_tol", tail_tol, minimum=0.0, maximum=1.0, min_open=True, max_open=True)


def _prepare(a, W, b, logits, U, backend: str):
    """Contiguous compute-dtype copies (float32 for half inputs) of a, b,
    logits and U; W as it is for backends that read it natively. a (never W:
    scanning it costs as much as the op) is checked finite."""
    dt = compute_dtype(W.dtype)

    def cast(x):
        return None if x is None else x.to(dt).contiguous()

    if a is not None:
        check_finite("a", a)
    native = backend in _NATIVE_W_BACKENDS
    return cast(a), (W.contiguous() if native else cast(W)), cast(b), cast(logits), cast(U)


# ---------------------------------------------------------------------------
# torch.library ops: 2-D inputs (the public functions handle a 1-D a). Bodies
# validate, pick the backend, handle B = 0, dispatch, check, cast back; the
# fakes run the same validation and give the shapes.
# ---------------------------------------------------------------------------

@torch.library.custom_op("fisherfast::lm_logsumexp", mutates_args=())
def _lse_op(a: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], backend: Optional[str],
            chunk: Optional[int], softcap: Optional[float] = None) -> torch.Tensor:
    B, _ = _check_head(a, W, b, None, allow_logits=False, ndim=2)
    check_softcap(softcap)
    impl = _select("lm_logsumexp", W.device, backend, _needs(softcap=softcap))
    out_dtype = a.dtype
    if B == 0:
        return a.new_empty(0)
    a, W, b, _, _ = _prepare(a, W, b, None, None, impl.backend)
    return cast_checked(impl(a, W, b, chunk, softcap=softcap), out_dtype, "lm_logsumexp")


@_lse_op.register_fake
def _(a, W, b, backend, chunk, softcap=None):
    B, _ = _check_head(a, W, b, None, allow_logits=False, ndim=2)
    check_softcap(softcap)
    return a.new_empty(B)


def _contraction_shape(op: str, B: int, d: int, k: int) -> tuple[int, ...]:
    return (B, d, k) if op == "matmat" else (B, k, k)


def _register_contraction(op: str):
    """The custom op of matmat or quad (same arguments, same body; shapes differ)."""

    @torch.library.custom_op(f"fisherfast::softmax_fisher_{op}", mutates_args=())
    def body(a: Optional[torch.Tensor], W: torch.Tensor, U: torch.Tensor, b: Optional[torch.Tensor],
             logits: Optional[torch.Tensor], backend: Optional[str], chunk: Optional[int],
             softcap: Optional[float] = None) -> torch.Tensor:
        B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
        _check_U(U, W, B, False)
        check_softcap(softcap)
        impl = _select(op, W.device, backend, _needs(logits, U, softcap))
        out_dtype = W.dtype
        if B == 0:
            return W.new_empty(_contraction_shape(op, 0, W.shape[1], U.shape[-1]))
        a, W, b, logits, U = _prepare(a, W, b, logits, U, impl.backend)
        out = impl(a, W, U, b, logits, chunk, softcap=softcap)
        raise_nonfinite_result(out, logits is not None)
        return cast_checked(out, out_dtype, _public_name(op))

    @body.register_fake
    def _(a, W, U, b, logits, backend, chunk, softcap=None):
        B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
        _check_U(U, W, B, False)
        check_softcap(softcap)
        return W.new_empty(_contraction_shape(op, B, W.shape[1], U.shape[-1]))

    return body


_matmat_op = _register_contraction("matmat")
_quad_op = _register_contraction("quad")


def _gram_shape(B: int, d: int, reduce: str) -> tuple[int, ...]:
    return (B, d, d) if reduce == "none" else (d, d)


@torch.library.custom_op("fisherfast::softmax_fisher_gram", mutates_args=())
def _gram_op(a: Optional[torch.Tensor], W: torch.Tensor, b: Optional[torch.Tensor], logits: Optional[torch.Tensor],
             reduce: str, backend: Optional[str], chunk: Optional[int], softcap: Optional[float] = None) -> torch.Tensor:
    B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
    _check_reduce(reduce, B, logits)
    check_softcap(softcap)
    impl = _select("gram", W.device, backend, _needs(logits, softcap=softcap))
    out_dtype = W.dtype
    if B == 0:
        return W.new_empty(_gram_shape(0, W.shape[1], reduce))
    a, W, b, logits, _ = _prepare(a, W, b, logits, None, impl.backend)
    G = impl(a, W, b, logits, reduce, chunk, softcap=softcap)
    raise_nonfinite_result(G, logits is not None)
    return cast_checked(G, out_dtype, "softmax_fisher_gram")


@_gram_op.register_fake
def _(a, W, b, logits, reduce, backend, chunk, softcap=None):
    B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
    _check_reduce(reduce, B, logits)
    check_softcap(softcap)
    return W.new_empty(_gram_shape(B, W.shape[1], reduce))


@torch.library.custom_op("fisherfast::softmax_fisher_gram_topk", mutates_args=())
def _gram_topk_op(a: Optional[torch.Tensor], W: torch.Tensor, b: Optional[torch.Tensor],
                  logits: Optional[torch.Tensor], reduce: str, tail_tol: float, backend: Optional[str],
                  chunk: Optional[int], softcap: Optional[float] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
    _check_reduce(reduce, B, logits)
    _check_tail_tol(tail_tol)
    check_softcap(softcap)
    impl = _select("gram_topk", W.device, backend, _needs(logits, softcap=softcap))
    out_dtype, dev = W.dtype, W.device
    if B == 0:
        empty = torch.empty(0, device=dev)
        return W.new_empty(_gram_shape(0, W.shape[1], reduce)), empty.double(), empty.long()
    a, W, b, logits, _ = _prepare(a, W, b, logits, None, impl.backend)
    G, tau, n_kept = impl(a, W, b, logits, reduce, tail_tol, chunk, softcap=softcap)
    raise_nonfinite_result(G, logits is not None)
    return cast_checked(G, out_dtype, "softmax_fisher_gram_topk"), tau.to(torch.float64), n_kept.to(torch.int64)


@_gram_topk_op.register_fake
def _(a, W, b, logits, reduce, tail_tol, backend, chunk, softcap=None):
    B, _ = _check_head(a, W, b, logits, allow_logits=True, ndim=2)
    _check_reduce(reduce, B, logits)
    _check_tail_tol(tail_tol)
    check_softcap(softcap)
    return (W.new_empty(_gram_shape(B, W.shape[1], reduce)), W.new_empty(B, dtype=torch.float64),
            W.new_empty(B, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------

def _softcap(softcap) -> float | None:
    return None if softcap is None else float(softcap)


def _as_2d(a, logits, B: int, squeeze: bool):
    if not squeeze:
        return a, logits
    return (None if a is None else a.reshape(B, -1)), (None if logits is None else logits.reshape(B, -1))


def lm_logsumexp(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None, *,
                 chunk: int | None = None, backend: str | None = None, softcap: float | None = None) -> torch.Tensor:
    """Log-normalizer of the LM head, streamed over the vocabulary.

        lse_i = log Σ_v exp(z′_iv),  z′ = z (softcap None) or c·tanh(z/c),  z_iv = w_v·a_i + b_v

    Args:
        a: (B,d) or (d,) head inputs (after the final norm); B may be 0.
        W: (V,d) unembedding; b: optional (V,) bias. Same dtype and device.
        chunk: V-chunk length (default: from a 4 MiB temporaries budget).
        backend: force "reference", "cpu", "triton" or "cuda" (default: fastest available).
        softcap: None, or c > 0: logit soft-capping z′ = c·tanh(z/c) (Gemma-2 style).

    Returns:
        (B,) (or 0-dim for 1-D a) in a's dtype.

    Raises:
        ValueError/TypeError for bad shapes, dtypes, devices or NaN/Inf in a;
        ValueError for a non-finite normalizer (NaN/Inf in W or b);
        OverflowError when a half-precision result overflows its dtype.

    Cost: 2·B·V·d flops (one read of W); extra memory O(B) + one B×chunk tile.
    """
    B, squeeze = _check_head(a, W, b, None, allow_logits=False)
    _check_chunk(chunk)
    check_softcap(softcap)
    out = torch.ops.fisherfast.lm_logsumexp(a.reshape(B, -1) if squeeze else a, W, b, backend, chunk,
                                            _softcap(softcap))
    return out[0] if squeeze else out


def softmax_fisher_matmat(a: torch.Tensor | None, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor | None = None,
                          *, logits: torch.Tensor | None = None, chunk: int | None = None,
                          backend: str | None = None, softcap: float | None = None) -> torch.Tensor:
    """Head-metric matrix product G_head(a_i) U_i for every token (docs/design.md §3).

        G_head(a_i) U_i = Wᵀ (p_i ⊙ (W U_i) − p_i (p_iᵀ W U_i)),  p_i = softmax(W a_i + b),

    computed in centered form Σ_v p_iv (w_v − μ_i) ((w_v − μ_i)ᵀ U_i), μ_i = Wᵀp_i.

    Args:
        a: (B,d) or (d,) head inputs (B may be 0), or None when ``logits`` is given.
        W: (V,d) unembedding; b: optional (V,) bias.
        U: (d,k) shared by all tokens or (B,d,k) per token.
        logits: (B,V) precomputed z = W a + b (before any soft-capping), replacing a and b.
        chunk: V-chunk length (default: from a 4 MiB temporaries budget; float32
            contractions are further blocked, see the module docstring).
        backend: force "reference", "cpu", "triton" or "cuda"; a call needing what the
            backend lacks (``capabilities``) runs the reference, with a warning.
        softcap: None, or c > 0: the logits are z′ = c·tanh(z/c) and the metric is
            J_capᵀ (diag p − p pᵀ) J_cap with J_cap = diag(1 − tanh²(z/c)) W, i.e. the
            rows w_v become w̃_v = s_v w_v per token (s_v = 1 − tanh²(z_v/c)).

    Returns:
        (B,d,k) (or (d,k) for 1-D a), W's dtype.

    Raises: as ``lm_logsumexp``, and ValueError for a non-finite result.

    Cost: about 2·V·d·(B(k+2) + k) flops for shared U (logits, W U, and the Wᵀ
    accumulation of [p ⊙ ŷ | p]); extra memory O(B·d·k) + one chunk.
    """
    B, squeeze = _check_head(a, W, b, logits, allow_logits=True)
    _check_U(U, W, B, squeeze)
    _check_chunk(chunk)
    check_softcap(softcap)
    a2, z2 = _as_2d(a, logits, B, squeeze)
    out = torch.ops.fisherfast.softmax_fisher_matmat(a2, W, U, b, z2, backend, chunk, _softcap(softcap))
    return out[0] if squeeze else out


def softmax_fisher_quad(a: torch.Tensor | None, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor | None = None,
                          *, logits: torch.Tensor | None = None, chunk: int | None = None,
                          backend: str | None = None, softcap: float | None = None) -> torch.Tensor:
    """Head-metric quadratic form U_iᵀ G_head(a_i) U_i for every token.

        U_iᵀ G_head U_i = Cov_{y∼p_i}[U_iᵀ w_y] = Σ_v p_iv (y_v − ȳ)(y_v − ȳ)ᵀ,
        y_v = U_iᵀ w_v, ȳ = Σ_v p_iv y_v  (centered: no Wᵀ accumulation at all).

    Args, Raises: as ``softmax_fisher_matmat``.

    Returns:
        (B,k,k) symmetric PSD (or (k,k) for 1-D a), W's dtype.

    Cost: about 2·V·d·(B + k) flops for shared U (2·V·d·B(k+1) per-token U),
    plus O(B·V·k²); extra memory O(B·k²) + one chunk.
    """
    B, squeeze = _check_head(a, W, b, logits, allow_logits=True)
    _check_U(U, W, B, squeeze)
    _check_chunk(chunk)
    check_softcap(softcap)
    a2, z2 = _as_2d(a, logits, B, squeeze)
    out = torch.ops.fisherfast.softmax_fisher_quad(a2, W, U, b, z2, backend, chunk, _softcap(softcap))
    return out[0] if squeeze else out


def softmax_fisher_gram(a: torch.Tensor | None, W: torch.Tensor, b: torch.Tensor | None = None, *,
                        reduce: str = "none", logits: torch.Tensor | None = None, chunk: int | None = None,
                        backend: str | None = None, softcap: float | None = None) -> torch.Tensor:
    """The dense d×d head metric per token, or averaged over tokens.

        G_i = Wᵀ (diag p_i − p_i p_iᵀ) W = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ,  μ_i = Wᵀ p_i.

    reduce="none" returns (B,d,d) (cost B·V·d² + 4·B·V·d flops); reduce="mean"
    returns (1/B) Σ_i G_i in a centered two-term form with no cancellation
    (``softmax_fisher_reference.gram_mean_chunked``) that needs one SYRK over
    V, not B: cost V·d² + O(B·V·(d + B)). Extra memory: the output + one chunk.
    For the top-p truncated metric see ``softmax_fisher_gram_topk``.

    Args:
        a: (B,d) or (d,) head inputs, or None when ``logits`` is given.
        W: (V,d) unembedding; b: optional (V,) bias.
        reduce: "none" or "mean" (needs B ≥ 1: ValueError naming a otherwise).
        logits: (B,V) precomputed W a + b, replacing a and b.
        chunk, backend, softcap: as ``softmax_fisher_matmat`` (soft-capped:
            G_i = Σ_v p_iv (w̃_v − μ̃_i)(w̃_v − μ̃_i)ᵀ, w̃_v = s_iv w_v, μ̃_i = Σ_v p_iv w̃_v;
            reduce="mean" then costs B·V·d², as reduce="none").

    Returns:
        (B,d,d), or (d,d) for reduce="mean" or 1-D a; W's dtype.

    Raises: as ``softmax_fisher_matmat``.
    """
    B, squeeze = _check_head(a, W, b, logits, allow_logits=True)
    _check_reduce(reduce, B, logits)
    _check_chunk(chunk)
    check_softcap(softcap)
    a2, z2 = _as_2d(a, logits, B, squeeze)
    G = torch.ops.fisherfast.softmax_fisher_gram(a2, W, b, z2, reduce, backend, chunk, _softcap(softcap))
    return G[0] if squeeze and reduce == "none" else G


def softmax_fisher_gram_topk(a: torch.Tensor | None, W: torch.Tensor, b: torch.Tensor | None = None, *,
                             tail_tol: float, reduce: str = "none", logits: torch.Tensor | None = None,
                             chunk: int | None = None, backend: str | None = None,
                             softcap: float | None = None) -> TruncatedGram:
    """The top-p truncated head metric (docs/design.md §3).

    Each token keeps only its smallest set S_i of largest-p rows with tail
    mass τ_i = 1 − Σ_{v∈S_i} p_iv ≤ tail_tol and uses

        G_S = Σ_{v∈S} p_v (w_v − μ_S)(w_v − μ_S)ᵀ,  μ_S = Σ_S p_v w_v / Σ_S p_v,

    so 0 ⪯ G_S ⪯ G and ‖G − G_S‖₂ ≤ τ/(1−τ) · max_{v∉S} ‖w_v − μ‖².
    Cost 4·B·V·d + Σ_i |S_i|·d²; memory O(#rows with p ≥ tail_tol/V).

    Args:
        a, W, b, logits, chunk, backend, softcap: as ``softmax_fisher_gram`` (soft-capped:
            the kept rows are w̃_v = s_v w_v).
        tail_tol: float in (0, 1), the largest tail mass dropped per token.
        reduce: "none" or "mean".

    Returns:
        ``TruncatedGram(G, tau, n_kept)`` (see its docstring for the shapes).

    Raises: as ``softmax_fisher_gram``; ValueError for tail_tol outside (0, 1).
    """
    B, squeeze = _check_head(a, W, b, logits, allow_logits=True)
    _check_reduce(reduce, B, logits)
    _check_tail_tol(tail_tol)
    _check_chunk(chunk)
    check_softcap(softcap)
    a2, z2 = _as_2d(a, logits, B, squeeze)
    G, tau, n_kept = torch.ops.fisherfast.softmax_fisher_gram_topk(a2, W, b, z2, reduce, float(tail_tol), backend,
                                                                   chunk, _softcap(softcap))
    if reduce == "mean":
        tau = tau.mean()
    elif squeeze:
        G, tau, n_kept = G[0], tau[0], n_kept[0]
    return TruncatedGram(G, tau, n_kept)
