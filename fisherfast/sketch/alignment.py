"""Head-Fisher alignment between tasks from their sketches (docs/design.md §7).

A(i, j) = ⟨F̂_i, F̂_j⟩ / (‖F̂_i‖‖F̂_j‖) ≈ cos(μ_i, μ_j), μ the signatures. The
debiased variant replaces ‖μ_i‖² by the U-statistic (‖S_i‖² − Σ_j Q_ij)/(n(n−1))
(S the sum, Q the sum of squares of ψ), which drops the x = x′ pairs and so
estimates the alignment of the population Fishers; it is noisy, even
undefined (NaN), when the diagonal dominates (large d·K, small n).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fisherfast.sketch.state import KINDS, SketchState


class AlignmentResult(NamedTuple):
    A: torch.Tensor  # (n, n) float64 cosines
    stderr: torch.Tensor | None  # (n, n) delta-method standard errors (states only)
    names: list[str]


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
        specs = {x.spec for x in items}
        if len(specs) != 1:
            raise ValueError(f"cannot align states of different specs: {sorted(map(str, specs))}")
    elif all(isinstance(x, torch.Tensor) for x in items):
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"signatures must be 1-D tensors of one length, got shapes {sorted(shapes)}")
    else:
        raise TypeError("expected all SketchStates or all signature tensors")
    return names, items


def alignment(signatures_or_states, *, kind: str = "joint", debiased: bool = False) -> AlignmentResult:
    """Matrix of head-Fisher alignments (cosines of signatures).

    Args:
        signatures_or_states: list or {name: ·} of SketchStates (one spec) or of
            signature tensors (m,).
        kind: "joint" (head Fisher), "activation" or "error" (the marginals).
        debiased: U-statistic norms (states only; see the module docstring).

    Returns:
        AlignmentResult(A, stderr, names). ``stderr`` (states only) is the
        delta-method standard error of each cosine from the per-coordinate
        variances (coordinates treated as uncorrelated), 0 on the diagonal.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names, items = _items(signatures_or_states)
    states = isinstance(items[0], SketchState)
    if debiased and not states:
        raise ValueError("debiased=True needs SketchStates (the sums of squares), not signatures")
    if states:
        mu = torch.stack([s.sums[kind].double().cpu() / max(s.count, 1) for s in items])
        if any(s.count == 0 for s in items):
            raise ValueError("every state must hold at least one sample")
    else:
        mu = torch.stack([x.double().cpu() for x in items])
    G = mu @ mu.T  # ⟨μ_i, μ_j⟩: unbiased for ⟨F_i, F_j⟩ when i ≠ j
    if debiased:
        sq = torch.tensor([
            (float(s.sums[kind].double().square().sum()) - float(s.sumsqs[kind].double().sum())) / (s.count * (s.count - 1))
            if s.count > 1 else float("nan") for s in items], dtype=torch.float64)
        norms = sq.clamp(min=0).sqrt().where(sq > 0, torch.tensor(float("nan"), dtype=torch.float64))
    else:
        norms = G.diagonal().sqrt()
    A = G / (norms[:, None] * norms[None, :])
    A.fill_diagonal_(1.0)
    stderr = None
    if states:
        var = torch.stack([s.variance(kind).cpu() / s.count if s.count > 1 else torch.full_like(mu[0], float("nan"))
                           for s in items])  # Var of each μ coordinate
        nrm = mu.norm(dim=1)
        # ∂cos/∂μ_i = μ_j/(‖μ_i‖‖μ_j‖) − cos μ_i/‖μ_i‖²; Var ≈ Σ_k (∂/∂μ_ik)² Var μ_ik + (same for j)
        unit = mu / nrm[:, None]
        cos = unit @ unit.T
        n = len(items)
        stderr = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                gi = (unit[j] - cos[i, j] * unit[i]) / nrm[i]
                gj = (unit[i] - cos[i, j] * unit[j]) / nrm[j]
                stderr[i, j] = ((gi.square() * var[i]).sum() + (gj.square() * var[j]).sum()).sqrt()
    return AlignmentResult(A, stderr, names)


def marginals(states) -> Marginals:
    """S_a, S_e (activation and error sketch alignments) and ρ = A / (S_a S_e).

    Under independence of a and e within each task, F = M_a ⊗ Γ_e and A = S_a S_e
    exactly, so ρ ≠ 1 measures the coupling of activations and errors."""
    A = alignment(states, kind="joint").A
    S_a = alignment(states, kind="activation").A
    S_e = alignment(states, kind="error").A
    return Marginals(S_a, S_e, A / (S_a * S_e))
