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
Fisher (1/n) Σ g gᵀ.

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

import torch

from fisherfast.ops import _backends
from fisherfast.ops._checks import check_same_device, check_tensor
from fisherfast.ops.fwht import fwht
from fisherfast.ops.srht import SRHTPlan, parity, srht_reference

N_KINDS = 3  # rows of the state buffers: joint, activation, error
LOGITS_CHUNK_BYTES = 64 << 20  # float32 logits (or transform scratch) held per chunk of rows


def _onehot_features(y: torch.Tensor, signs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """srht(e_y) rows for labels y (R,): D_b[y]·(−1)^popcount(i & y) at each gathered (b, i)."""
    n = signs.shape[1]
    block, i = idx // n, idx % n
    y = y.long().unsqueeze(-1)
    return signs[block, y] * (1 - 2 * parity(i & y)).to(signs.dtype)


def sample_labels(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y = min{k : Σ_{i≤k} p_i > u·Σ_i p_i} per row (inverse CDF, float64 running sum)."""
    c = torch.cumsum(p.double(), dim=-1)
    y = torch.searchsorted(c, (u.double() * c[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return y.clamp_(max=p.shape[-1] - 1)


def fisher_sketch_reference(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx,
                            re_signs, re_idx, se_signs, se_idx) -> None:
    """Pure-PyTorch oracle: the formula of the module docstring, one chunk of rows."""
    m = ra_idx.shape[0]
    p = torch.softmax(logits, dim=-1)
    if y is None:
        y = sample_labels(p, u)
    u_a = srht_reference(a, ra_signs, ra_idx, backend="reference")
    v_a = srht_reference(a, sa_signs, sa_idx, backend="reference")
    u_e = srht_reference(p, re_signs, re_idx, backend="reference") - _onehot_features(y, re_signs, re_idx)
    v_e = srht_reference(p, se_signs, se_idx, backend="reference") - _onehot_features(y, se_signs, se_idx)
    psi_act = u_a.double() * v_a.double() / math.sqrt(m)
    psi_err = u_e.double() * v_e.double() / math.sqrt(m)
    psi_joint = psi_act * psi_err * math.sqrt(m)
    for k, psi in enumerate((psi_joint, psi_act, psi_err)):
        sums[k] += psi.sum(0)
        sumsqs[k] += psi.square().sum(0)


def _plan_args(plan_tensors) -> list:
    args = []
    for signs, idx in zip(plan_tensors[::2], plan_tensors[1::2]):
        args += [signs.data_ptr(), idx.data_ptr(), signs.shape[0], signs.shape[1]]
    return args


def _fisher_sketch_cpu(sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    ext = _backends.cpu_extension()
    (rows, d), K, m = a.shape, logits.shape[1], plan_tensors[1].shape[0]
    threads = max(1, min(ext.fisher_sketch_max_threads(), rows))
    per_thread = sum(signs.numel() for signs in plan_tensors[::2])  # one row's transform buffers
    scratch = torch.empty(threads, per_thread, dtype=torch.float32)
    acc = torch.empty(threads, 2 * N_KINDS, m, dtype=torch.float64)
    ext.fisher_sketch_update(
        sums.data_ptr(), sumsqs.data_ptr(), a.data_ptr(), logits.data_ptr(), 0 if y is None else y.data_ptr(),
        0 if u is None else u.data_ptr(), rows, d, K, m, *_plan_args(plan_tensors), scratch.data_ptr(),
        acc.data_ptr(), threads)


def _signed_padded(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """(R, n_blocks·N): D_b x̃ for every sign block (x zero-padded to N), ready for the FWHT."""
    n_blocks, n = signs.shape
    out = x.new_zeros(x.shape[0], n_blocks, n)
    out[:, :, : x.shape[1]] = x.unsqueeze(1) * signs[:, : x.shape[1]]
    return out.view(x.shape[0], n_blocks * n)


def _staged(backend: str, prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    """GPU pipeline of one chunk: prepare (softmax → signed error buffers, Z) → FWHT (the fwht op,
    same backend) → sample y ∼ p when given u → features (gather, one-hot, ψ, float64 sums)."""
    ra_s, ra_i, sa_s, sa_i, re_s, re_i, se_s, se_i = plan_tensors
    rows, K = logits.shape
    er = logits.new_zeros(rows, re_s.numel())
    es = logits.new_zeros(rows, se_s.numel())
    Z = logits.new_empty(rows)
    prepare(logits, re_s, se_s, er, es, Z)
    if y is None:  # before the transform, block 0 of er holds ±q = ±exp(z − z_max)
        y = sample_labels(er[:, :K].abs(), u)
    a_r, a_s = _signed_padded(a, ra_s), _signed_padded(a, sa_s)
    for buf, n in ((a_r, ra_s.shape[1]), (a_s, sa_s.shape[1]), (er, re_s.shape[1]), (es, se_s.shape[1])):
        fwht(buf.view(-1, n), inplace=True, backend=backend)
    features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s)


def _fisher_sketch_cuda(sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    ext = _backends.cuda_extension()
    stream = torch.cuda.current_stream(a.device).cuda_stream
    addr = lambda t: t.data_ptr()  # noqa: E731

    def prepare(logits, re_s, se_s, er, es, Z):
        ext.fisher_sketch_prepare(addr(logits), logits.shape[0], logits.shape[1], addr(er), addr(es), addr(re_s),
                                  re_s.shape[0], re_s.shape[1], addr(se_s), se_s.shape[0], se_s.shape[1], addr(Z),
                                  stream)

    def features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s):
        ext.fisher_sketch_features(addr(sums), addr(sumsqs), addr(a_r), addr(a_s), addr(er), addr(es), addr(Z),
                                   addr(y), addr(ra_i), addr(sa_i), addr(re_i), addr(se_i), addr(re_s), addr(se_s),
                                   a_r.shape[1], a_s.shape[1], er.shape[1], es.shape[1], re_s.shape[1],
                                   se_s.shape[1], Z.shape[0], ra_i.shape[0], stream)

    with torch.cuda.device(a.device):
        _staged("cuda", prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors)


def _fisher_sketch_triton(sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    from fisherfast.ops.fisher_sketch_triton import features_triton, prepare_triton

    _staged("triton", prepare_triton, features_triton, sums, sumsqs, a, logits, y, u, *plan_tensors)


_IMPLS = {"reference": fisher_sketch_reference, "cpu": _fisher_sketch_cpu, "triton": _fisher_sketch_triton,
          "cuda": _fisher_sketch_cuda}


@torch.library.custom_op("fisherfast::fisher_sketch_update_", mutates_args=("sums", "sumsqs"))
def _fisher_sketch_op(sums: torch.Tensor, sumsqs: torch.Tensor, a: torch.Tensor, logits: torch.Tensor,
                      y: torch.Tensor | None, u: torch.Tensor | None, ra_signs: torch.Tensor, ra_idx: torch.Tensor,
                      sa_signs: torch.Tensor, sa_idx: torch.Tensor, re_signs: torch.Tensor, re_idx: torch.Tensor,
                      se_signs: torch.Tensor, se_idx: torch.Tensor, backend: str) -> None:
    impl = _backends.select("fisher_sketch_update", _IMPLS, a.device, backend or None)
    a = a.to(torch.float32).contiguous()
    logits = logits.to(torch.float32).contiguous()
    y = None if y is None else y.to(torch.int64).contiguous()
    u = None if u is None else u.to(torch.float64).contiguous()
    impl(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx, re_signs, re_idx, se_signs, se_idx)


@_fisher_sketch_op.register_fake
def _(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx, re_signs, re_idx, se_signs, se_idx, backend):
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
                         chunk_rows: int | None = None, backend: str | None = None) -> None:
    """Add the FisherSketch features of a batch into float64 running sums, in place.

    Args:
        sums, sumsqs: (3, m) float64 contiguous buffers on a's device; rows are
            the joint, activation and error sketches; Σψ and Σψ² are added.
        a: (B, d) head inputs.
        plans: (ra, sa, re, se) SRHTPlans; ra, sa over d and re, se over K, one m.
        logits: (B, K) logits, or give ``W`` (K, d) and optional ``b`` (K,)
            instead: z = a Wᵀ + b is then computed chunk by chunk of rows.
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
        if tuple(buf.shape) != (N_KINDS, m):
            raise ValueError(f"{name} must have shape ({N_KINDS}, m = {m}), got {tuple(buf.shape)}")
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
        else:
            z = logits[rows]
        torch.ops.fisherfast.fisher_sketch_update_(
            sums, sumsqs, a_rows, z, None if y is None else y[rows], None if u is None else u[rows], *tensors,
            backend or "")
