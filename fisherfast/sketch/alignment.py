"""Head-Fisher alignment between tasks from their sketches (docs/design.md §7).

A(i, j) = ⟨F̂_i, F̂_j⟩ / (‖F̂_i‖‖F̂_j‖) ≈ cos(μ_i, μ_j), μ the signatures. The
debiased variant replaces ‖μ_i‖² by the U-statistic (‖S_i‖² − Σ_j Q_ij)/(n(n−1))
(S the sum, Q the sum of squares of ψ), which drops the x = x′ pairs and so
estimates the alignment of the population Fishers; it is noisy, even
undefined (NaN), when the diagonal dominates (large d·K, small n).

Standard errors have two parts, reported separately and combined:

- projection (``stderr_projection``): the error of the random features about
  the exact alignment of the *sampled* data's Fishers (the kernel identity).
  Every cosine is a ratio of sums over the m features, Σ_f c_ij[f] /
  √(Σ_f c_ii[f] Σ_f c_jj[f]) with c_ij[f] = μ_if μ_jf; given the SRHT signs,
  the features' index draws are exchangeable and each feature's products have
  the exact kernel value as their mean, so the delete-one-feature jackknife,
  SE² = (m−1)/m Σ_f (A_(−f) − Ā)², estimates the projection variance (checked
  in tests/sketch/test_alignment.py: over 24 sketch seeds the z-scores of
  the joint, activation and error kinds have standard deviation 0.78–0.96, and ρ 1.06).
- sampling (``stderr_sampling``, states only): the delta-method error of the
  cosine from the per-coordinate sample variances of μ (coordinates treated
  as uncorrelated), the data-to-data part when the sampled data stand for a
  population.
- ``stderr`` = √(projection² + sampling²): the error bar to report.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from fisherfast.sketch.state import ALL_KINDS, KINDS, SketchState, check_nonempty


@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    """Cosines and their standard errors (see the module docstring), all (n, n)
    float64 with 0 on the diagonal of every stderr.

    Attributes:
        A: the alignments (cosines; 1 on the diagonal).
        stderr: √(stderr_projection² + stderr_sampling²); the projection part
            alone for signatures (no sums of squares).
        names: the task names, in order.
        stderr_projection: delete-one-feature jackknife over the m features.
        stderr_sampling: delta method from the sample variances (None for signatures).
    """

    A: torch.Tensor
    stderr: torch.Tensor | None
    names: list[str]
    stderr_projection: torch.Tensor | None = None
    stderr_sampling: torch.Tensor | None = None


class Marginals(NamedTuple):
    S_a: torch.Tensor  # activation-sketch alignment (second moments of a)
    S_e: torch.Tensor  # error-sketch alignment (Γ_e)
    rho: torch.Tensor  # A / (S_a S_e): 1 when a and e are independent within each task


def _items(signatures_or_states) -> tuple[list[str], list]:
    if isinstance(signatures_or_states, dict):
        names, items = [str(k) for k in signatures_or_states], list(signatures_or_states.values())
    elif isinstance(signatures_or_states, (list, tuple)):
        names, items = [str(i) for i in range(len(signatures_or_states))], list(signatures_or_states)
    else:
        raise TypeError("expected a list/tuple or a {name: signature or state} dict")
    if not items:
        raise ValueError("need at least one signature or state")
    if all(isinstance(x, SketchState) for x in items):
        check_nonempty("states", names, items)
        specs = {x.spec for x in items}
        if len(specs) != 1:
            raise ValueError(f"cannot align states of different specs: {sorted(map(str, specs))}")
    elif all(isinstance(x, torch.Tensor) for x in items):
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] == 0:
            raise ValueError(f"signatures: expected non-empty 1-D tensors of one length, got shapes {sorted(shapes)}")
        if not all(x.is_floating_point() for x in items):
            raise TypeError(f"signatures: expected real floating tensors, got dtypes {sorted({str(x.dtype) for x in items})}")
        bad = [name for name, x in zip(names, items) if not bool(torch.isfinite(x).all())]
        if bad:
            raise ValueError(f"signatures contain NaN or Inf: {bad}")
    else:
        raise TypeError("expected all SketchStates or all signature tensors")
    return names, items


def _contributions(items, kind: str, debiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (n, m), diag (n, m)): per-feature terms of ⟨μ_i, μ_j⟩ (μ_if μ_jf, i ≠ j) and of ‖·‖²
    (μ_if², or the U-statistic term (S_if² − Q_if)/(n(n−1)) when debiased)."""
    if isinstance(items[0], SketchState):
        mu = torch.stack([s.sums[kind].double().cpu() / s.count for s in items])
    else:
        mu = torch.stack([x.double().cpu() for x in items])
    if not debiased:
        return mu, mu.square()
    diag = torch.stack([(s.sums[kind].double().cpu().square() - s.sumsqs[kind].double().cpu()) / (s.count * (s.count - 1))
                        if s.count > 1 else torch.full_like(mu[0], float("nan")) for s in items])
    return mu, diag


def _cosines(mu: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    sq = diag.sum(1)
    norms = sq.clamp(min=0).sqrt().where(sq > 0, torch.tensor(float("nan"), dtype=torch.float64))
    A = (mu @ mu.T) / (norms[:, None] * norms[None, :])
    return A.fill_diagonal_(1.0)


def leave_one_feature_out(mu: torch.Tensor, diag: torch.Tensor, i: int) -> torch.Tensor:
    """(n, m): cos(μ_i, μ_j) computed without feature f, for every j and f (row i of the jackknife)."""
    sq = diag.sum(1)
    inner = (mu[i] @ mu.T)[:, None] - mu[i][None, :] * mu  # (n, m)
    return inner / ((sq[i] - diag[i])[None, :] * (sq[:, None] - diag)).sqrt()


def jackknife_stderr(loo: torch.Tensor) -> torch.Tensor:
    """√((m−1)/m Σ_f (θ_(−f) − θ̄)²) over the last dimension of leave-one-out estimates θ_(−f)."""
    m = loo.shape[-1]
    return ((loo - loo.mean(-1, keepdim=True)).square().sum(-1) * (m - 1) / m).sqrt()


def _projection_stderr(mu: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    se = torch.stack([jackknife_stderr(leave_one_feature_out(mu, diag, i)) for i in range(mu.shape[0])])
    return se.fill_diagonal_(0.0)


def _sampling_stderr(items, kind: str, mu: torch.Tensor) -> torch.Tensor:
    """Delta method: ∂cos/∂μ_i = μ_j/(‖μ_i‖‖μ_j‖) − cos μ_i/‖μ_i‖², Var ≈ Σ_k (∂/∂μ_ik)² Var μ_ik + (same for j)."""
    var = torch.stack([s.variance(kind).cpu() / s.count if s.count > 1 else torch.full_like(mu[0], float("nan"))
                       for s in items])  # Var of each μ coordinate
    nrm = mu.norm(dim=1)
    unit = mu / nrm[:, None]
    cos = unit @ unit.T
    rows = []
    for i in range(len(items)):  # row i against every j at once: (n, m) terms
        gi = (unit - cos[i][:, None] * unit[i]) / nrm[i]
        gj = (unit[i] - cos[i][:, None] * unit) / nrm[:, None]
        rows.append(((gi.square() * var[i]).sum(1) + (gj.square() * var).sum(1)).sqrt())
    return torch.stack(rows).fill_diagonal_(0.0)


def alignment(signatures_or_states, *, kind: str = "joint", debiased: bool = False) -> AlignmentResult:
    """Matrix of head-Fisher alignments (cosines of signatures) with standard errors.

    Args:
        signatures_or_states: list or {name: ·} of SketchStates (one spec) or of
            signature tensors (m,).
        kind: "joint" (head Fisher), "activation" or "error" (the marginals), or
            "mean": cosines of the first moments, cos(ḡ_i, ḡ_j) of the mean head
            gradients (states of version 2).
        debiased: U-statistic norms (states only; see the module docstring).

    Returns:
        AlignmentResult(A, stderr, names, stderr_projection, stderr_sampling),
        each (n, n) float64. ``stderr`` includes the random projection (delete-
        one-feature jackknife) and, for states, the sampling part (delta
        method); see the module docstring for what each covers.

    Raises:
        ValueError: unknown kind, no items, states of different specs or with
            no samples, debiased=True with signatures.
        TypeError: a mix of states and tensors, or another container.
    """
    if kind not in ALL_KINDS:
        raise ValueError(f"kind: expected one of {ALL_KINDS}, got {kind!r}")
    if not isinstance(debiased, bool):
        raise TypeError(f"debiased: expected a bool, got {type(debiased).__name__}")
    names, items = _items(signatures_or_states)
    states = isinstance(items[0], SketchState)
    if states and kind not in KINDS:
        missing = [name for name, s in zip(names, items) if not s.has_mean]
        if missing:
            raise ValueError(f"kind {kind!r} needs the first moment, which these states lack (saved before "
                             f"state version 2): {missing}")
    if debiased and not states:
        raise ValueError("debiased=True needs SketchStates (the sums of squares), not signatures")
    mu, diag = _contributions(items, kind, debiased)
    A = _cosines(mu, diag)
    projection = _projection_stderr(mu, diag)
    sampling = _sampling_stderr(items, kind, mu) if states else None
    total = projection if sampling is None else (projection.square() + sampling.square()).sqrt()
    return AlignmentResult(A, total, names, projection, sampling)


def marginals(states) -> Marginals:
    """S_a, S_e (activation and error sketch alignments) and ρ = A / (S_a S_e).

    Under independence of a and e within each task, F = M_a ⊗ Γ_e and A = S_a S_e
    exactly, so ρ ≠ 1 measures the coupling of activations and errors.

    Needs SketchStates (TypeError for signature tensors: one signature holds
    one kind, so its three alignments would all be the same cosine)."""
    _, items = _items(states)
    if not isinstance(items[0], SketchState):
        raise TypeError("marginals needs SketchStates (each holds the joint, activation and error sums), "
                        "not signature tensors")
    A = alignment(states, kind="joint").A
    S_a = alignment(states, kind="activation").A
    S_e = alignment(states, kind="error").A
    return Marginals(S_a, S_e, A / (S_a * S_e))


def coupling_stderr(states) -> torch.Tensor:
    """(n, n) projection standard error of ρ = A / (S_a S_e): the delete-one-feature
    jackknife of the three cosines together (feature f enters all three kinds)."""
    names, items = _items(states)
    if not isinstance(items[0], SketchState):
        raise TypeError("coupling_stderr needs SketchStates")
    parts = [_contributions(items, kind, False) for kind in KINDS]
    se = torch.stack([jackknife_stderr(leave_one_feature_out(*parts[0], i)
                                       / (leave_one_feature_out(*parts[1], i) * leave_one_feature_out(*parts[2], i)))
                      for i in range(len(items))])
    return se.fill_diagonal_(0.0)
