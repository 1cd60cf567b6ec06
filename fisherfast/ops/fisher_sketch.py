"""Fused FisherSketch update (docs/design.md §7).

For each sample (row) with head input a ∈ R^d, logits z ∈ R^K and label y
(given, or drawn y ∼ p from a uniform u), with p = softmax(z) and the logit
error e = p − e_y, the op forms the SRHT projections

    u^a = rᵃ·a,  v^a = sᵃ·a     (plans ra, sa over d)
    u^e = rᵉ·e,  v^e = sᵉ·e     (plans re, se over K; rᵉ·e = srht(p) − srht(e_y),
                                  the one-hot part in closed form)

and the three m-dimensional degree-2 random features

    ψ_joint = u^a u^e v^a v^e / √m,   ψ_act = u^a v^a / √m,   ψ_err = u^e v^e / √m,

and adds Σ_rows ψ and Σ_rows ψ² (float64) into rows (joint, activation, error)
of the state buffers ``sums`` and ``sumsqs`` (3, m). E[ψ(g)·ψ(g′)] = (g·g′)²
for g = e ⊗ a, so the running mean of ψ is a sketch of the empirical head
Fisher (1/n) Σ g gᵀ. Given (4, m) buffers, the fourth row gets the first
moment φ = u^a u^e / √m (E[φ(g)·φ(g′)] = g·g′: a projection of the mean head
gradient) from the same projections, at no extra transform.

Soft-capped heads (``softcap=c``, Gemma-2/3): the logits are z′ = c·tanh(z/c)
of the linear logits z = W a + b, p = softmax(z′), and the error is taken in
z's coordinates, e = s ⊙ (p − e_y) with s = 1 − tanh²(z/c) = 1 − (z′/c)², so
g = e ⊗ a is exactly ∂(−log p_y)/∂W (chain rule through the cap), streamed
over the vocabulary like p itself; the one-hot part is s_y times its closed form.

Pipeline per chunk of rows: (logits GEMM when given W, b) → softmax → signs →
FWHT → gather → feature products → float64 accumulation. The C++ backend runs
the whole pipeline per row (one row of transform scratch per thread, OpenMP
over rows, fwht.h kernels); the triton and cuda backends run a prepare kernel
(softmax → signed error buffers), the fwht op of the same backend, and a
features kernel (gather → one-hot → ψ → float64 sums, no atomics). Error rows
exist only for one chunk of rows at a time (or one row per thread). Cost per row: 2⌈m/N_e⌉ FWHTs of size N_e = 2^⌈log₂K⌉ plus
2⌈m/N_a⌉ of size N_a = 2^⌈log₂d⌉, plus the K·d logits GEMM when given W.
All features are computed in float32; accumulation is float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fisherfast.ops import _backends
from fisherfast.checks import check_same_device, check_tensor
from fisherfast.ops.fisher_sketch_common import N_KINDS
from fisherfast.ops.srht import SRHTPlan

LOGITS_CHUNK_BYTES = 64 << 20  # float32 logits (or transform scratch) held per chunk of rows


_IMPLS = {name: _backends.lazy_impl("fisher_sketch", name, "update") for name in _backends.BACKENDS}


def _check_op_inputs(sums, sumsqs, a, logits, y, u, plan_tensors, softcap=None) -> None:
    """Shapes and dtypes the op (and its fake) accept: (3, m) or (4, m) float64 sums,
    a (R, d), logits (R, K), exactly one of y (R,) int / u (R,) float, four
    (signs (n_blocks, N), idx (m,) int64) plan pairs."""
    check_tensor("a", a, ndim=2)
    check_tensor("logits", logits, ndim=2)
    R = a.shape[0]
    if logits.shape[0] != R:
        raise ValueError(f"logits must have R = {R} rows like a, got shape {tuple(logits.shape)}")
    if (y is None) == (u is None):
        raise ValueError("give exactly one of y (labels) or u (uniforms for y ∼ p)")
    if y is not None and (y.dtype not in (torch.int32, torch.int64) or tuple(y.shape) != (R,)):
        raise TypeError(f"y must be an int32/int64 tensor of shape ({R},), got {y.dtype} {tuple(y.shape)}")
    if u is not None:
        check_tensor("u", u, ndim=1)
        if u.shape[0] != R:
            raise ValueError(f"u must have shape ({R},), got {tuple(u.shape)}")
    m = plan_tensors[1].shape[0]
    n_rows = sums.shape[0] if sums.dim() == 2 else 0
    for name, buf in (("sums", sums), ("sumsqs", sumsqs)):
        if buf.dtype != torch.float64 or buf.dim() != 2 or tuple(buf.shape) != (n_rows, m) \
                or n_rows not in (N_KINDS, N_KINDS + 1):
            raise TypeError(f"{name} must be float64 of shape ({N_KINDS} or {N_KINDS + 1}, {m}) like sums, "
                            f"got {buf.dtype} {tuple(buf.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    n_in = (a.shape[1], a.shape[1], logits.shape[1], logits.shape[1])
    for plan, (signs, idx), n in zip("ra sa re se".split(), zip(plan_tensors[::2], plan_tensors[1::2]), n_in):
        check_tensor(f"{plan}_signs", signs, ndim=2)
        if signs.shape[1] < n or idx.dtype != torch.int64 or tuple(idx.shape) != (m,):
            raise ValueError(f"plan {plan} must have signs (n_blocks, N ≥ {n}) and int64 idx ({m},), "
                             f"got {tuple(signs.shape)} and {idx.dtype} {tuple(idx.shape)}")
    check_same_device(sums=sums, sumsqs=sumsqs, a=a, logits=logits, y=y, u=u, signs=plan_tensors[0])


@torch.library.custom_op("fisherfast::fisher_sketch_update_", mutates_args=("sums", "sumsqs"))
def _fisher_sketch_op(sums: torch.Tensor, sumsqs: torch.Tensor, a: torch.Tensor, logits: torch.Tensor,
                      y: Optional[torch.Tensor], u: Optional[torch.Tensor], ra_signs: torch.Tensor,
                      ra_idx: torch.Tensor, sa_signs: torch.Tensor, sa_idx: torch.Tensor, re_signs: torch.Tensor,
                      re_idx: torch.Tensor, se_signs: torch.Tensor, se_idx: torch.Tensor,
                      backend: Optional[str], softcap: Optional[float] = None) -> None:
    plan_tensors = (ra_signs, ra_idx, sa_signs, sa_idx, re_signs, re_idx, se_signs, se_idx)
    _check_op_inputs(sums, sumsqs, a, logits, y, u, plan_tensors, softcap)
    impl = _backends.select("fisher_sketch_update", _IMPLS, a.device, backend or None)
    if a.shape[0] == 0:
        return
    a = a.to(torch.float32).contiguous()
    logits = logits.to(torch.float32).contiguous()
    y = None if y is None else y.to(torch.int64).contiguous()
    u = None if u is None else u.to(torch.float64).contiguous()
    impl(sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=softcap)


@_fisher_sketch_op.register_fake
def _(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx, re_signs, re_idx, se_signs, se_idx, backend,
      softcap=None):
    _check_op_inputs(sums, sumsqs, a, logits, y, u, (ra_signs, ra_idx, sa_signs, sa_idx, re_signs, re_idx, se_signs,
                                                     se_idx), softcap)
    return None


def _check_plans(plans, d: int, K: int) -> int:
    if not (isinstance(plans, (tuple, list)) and len(plans) == 4 and all(isinstance(p, SRHTPlan) for p in plans)):
        raise TypeError("plans must be a tuple of four SRHTPlan (ra, sa, re, se), e.g. SketchSpec.plans()")
    ra, sa, re, se = plans
    if ra.n_in != d or sa.n_in != d:
        raise ValueError(f"plans ra, sa must have n_in = d = {d}, got {ra.n_in}, {sa.n_in}")
    if re.n_in != K or se.n_in != K:
        raise ValueError(f"plans re, se must have n_in = K = {K}, got {re.n_in}, {se.n_in}")
    if len({p.m for p in plans}) != 1:
        raise ValueError(f"plans must share one m, got {[p.m for p in plans]}")
    return ra.m


def fisher_sketch_update(sums: torch.Tensor, sumsqs: torch.Tensor, a: torch.Tensor, plans, *,
                         logits: torch.Tensor | None = None, W: torch.Tensor | None = None,
                         b: torch.Tensor | None = None, y: torch.Tensor | None = None, u: torch.Tensor | None = None,
                         softcap: float | None = None, chunk_rows: int | None = None,
                         backend: str | None = None) -> None:
    """Add the FisherSketch features of a batch into float64 running sums, in place.

    Args:
        sums, sumsqs: (3, m) float64 contiguous buffers on a's device; rows are
            the joint, activation and error sketches; Σψ and Σψ² are added.
            With (4, m) buffers the fourth row also gets the first moment
            φ = u^a u^e / √m (Σφ, Σφ²) from the same projections.
        a: (B, d) head inputs.
        plans: (ra, sa, re, se) SRHTPlans; ra, sa over d and re, se over K, one m.
        logits: (B, K) logits, or give ``W`` (K, d) and optional ``b`` (K,)
            instead: z = a Wᵀ + b is then computed chunk by chunk of rows.
        softcap: the final soft-cap c > 0 of a capped head (Gemma-2/3):
            the distribution is p = softmax(z′), z′ = c·tanh(z/c), and the
            sketched error is the gradient of −log p_y with respect to the
            linear logits z, e = s ⊙ (p − e_y), s = 1 − tanh²(z/c), so that
            g = e ⊗ a is exactly the gradient with respect to W. Given
            ``logits``, they are the capped z′ (|z′| ≤ c, −inf a mask) and
            s = 1 − (z′/c)²; given W, the op caps z = a Wᵀ + b itself.
        y: (B,) int labels in [0, K) (empirical Fisher), or ``u``: (B,) uniforms
            in [0, 1) from which y ∼ p is drawn by inverse CDF (true Fisher).
        chunk_rows: rows per chunk (default: as many as fit 64 MB of float32
            logits/transform scratch).
        backend: force "reference", "cpu", "triton" or "cuda".

    Cost: see the module docstring; memory beyond inputs is one chunk of logits
    (W path) plus the transform scratch of one chunk (or one row per thread).
    """
    check_tensor("a", a, ndim=2)
    B, d = a.shape
    for name, buf in (("sums", sums), ("sumsqs", sumsqs)):
        check_tensor(name, buf, ndim=2)
        if buf.dtype != torch.float64 or not buf.is_contiguous():
            raise TypeError(f"{name} must be a contiguous float64 tensor, got {buf.dtype}")
    if (logits is None) == (W is None):
        raise ValueError("give exactly one of logits (B, K) or W (K, d)")
    if logits is not None:
        if b is not None:
            raise ValueError("b is only used with W; add it to the logits instead")
        check_tensor("logits", logits, ndim=2)
        if logits.shape[0] != B:
            raise ValueError(f"logits must have B = {B} rows like a, got shape {tuple(logits.shape)}")
        K = logits.shape[1]
    else:
        check_tensor("W", W, ndim=2)
        if W.shape[1] != d:
            raise ValueError(f"W must have shape (K, d = {d}), got {tuple(W.shape)}")
        K = W.shape[0]
        if b is not None:
            check_tensor("b", b, ndim=1)
            if b.shape[0] != K:
                raise ValueError(f"b must have shape (K = {K},), got {tuple(b.shape)}")
    m = _check_plans(plans, d, K)
    for name, buf in (("sums", sums), ("sumsqs", sumsqs)):
        if tuple(buf.shape) not in ((N_KINDS, m), (N_KINDS + 1, m)) or buf.shape[0] != sums.shape[0]:
            raise ValueError(f"{name} must have shape ({N_KINDS}, m = {m}), or ({N_KINDS + 1}, m) with the first "
                             f"moment, like sums; got {tuple(buf.shape)}")
    if (y is None) == (u is None):
        raise ValueError("give exactly one of y (labels) or u (uniforms for y ∼ p)")
    if y is not None:
        check_tensor("y", y, ndim=1, float_only=False)
        if y.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"y must be an int32/int64 tensor of labels, got {y.dtype}")
        if y.shape[0] != B:
            raise ValueError(f"y must have shape (B = {B},), got {tuple(y.shape)}")
        if B and (int(y.min()) < 0 or int(y.max()) >= K):
            raise ValueError(f"y must hold labels in [0, K = {K}), got range [{int(y.min())}, {int(y.max())}]")
    else:
        check_tensor("u", u, ndim=1)
        if u.shape[0] != B:
            raise ValueError(f"u must have shape (B = {B},), got {tuple(u.shape)}")
        if B and (float(u.min()) < 0 or float(u.max()) >= 1):
            raise ValueError("u must hold uniforms in [0, 1)")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
                or softcap <= 0:
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
        softcap = float(softcap)
        if logits is not None and B and bool((logits.abs() > softcap).logical_and(~torch.isneginf(logits)).any()):
            raise ValueError(f"logits must be the capped logits c·tanh(z/c), |z′| ≤ softcap = {softcap} (or −inf "
                             f"as a mask), got max |z′| = {float(logits[torch.isfinite(logits)].abs().max())}")
    device = check_same_device(sums=sums, sumsqs=sumsqs, a=a, logits=logits, W=W, b=b, y=y, u=u)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if B == 0:
        return
    ra, sa, re, se = plans
    if chunk_rows is None:
        per_row = 4 * max(K, 2 * re.n_blocks * re.N)
        chunk_rows = max(1, LOGITS_CHUNK_BYTES // per_row)
    tensors = [t for plan in plans for t in plan.tensors(device)]
    for start in range(0, B, chunk_rows):
        rows = slice(start, min(B, start + chunk_rows))
        a_rows = a[rows]
        if W is not None:
            z = a_rows.to(W.dtype) @ W.T if b is None else torch.addmm(b, a_rows.to(W.dtype), W.T)
            if softcap is not None:  # the capped logits z′ = c·tanh(z/c)
                z = torch.tanh(z.float() / softcap).mul_(softcap)
        else:
            z = logits[rows]
        torch.ops.fisherfast.fisher_sketch_update_(
            sums, sumsqs, a_rows, z, None if y is None else y[rows], None if u is None else u[rows], *tensors,
            backend, softcap)
