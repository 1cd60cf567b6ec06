"""Steering a hidden state to a target concept score, and what it costs
(docs/design.md §5).

``steer_to_target`` iterates: at the current h, the concept gradient q and
(for FishBack) the pullback metric G are recomputed and a step with
first-order change ρ = φ* − φ is taken, until |φ − φ*| ≤ ``tol``. Both
methods share one trust region on the actual step KL(p(h) ‖ p(h + δ)) ≤
``max_step_kl``: a step beyond it is halved until it fits (one upper-map
forward per trial); FishBack first clips |ρ| to the budget its quadratic model
predicts, ½ρ²/(qᵀxq) ≤ ``max_step_kl`` (x = G_λ⁻¹q or G⁺q). A step that
crosses φ* (from either side) is shortened by a line search: Brent's method
on the step scale c ∈ [0, 1] solves φ(h + cδ) = φ*, so every method ends
within ``tol`` of the target — matched probability, not "at least".

Matched probability for a fixed direction or INNSteer: ``scale_to_target``
(``fisherfast.steer.scale``).

One KL convention everywhere: KL(p_base ‖ p_steered) = E_{y∼p_base}[log
p_base(y) − log p_steered(y)], the expected increase of the log-loss on the
model's own predictions — for the total KL of the full next-token
distributions and for ``off_target_kl``, the same with the concept's tokens
removed from both and the rest renormalized. Both are taken on the
next-token distribution at the edited position t; for a SequenceConcept the
removed token is y₁. FishBack's metric is the next-token pullback metric at
t for every concept (for a sequence, the cost of the edit is measured where
it is made).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fisherfast.checks import check_choice, check_finite, check_int, check_real, expected
from fisherfast.concepts import check_concept, check_logits, check_target_score, concept_gradient
from fisherfast.steer.directions import (DEFAULT_DAMPING, DEFAULT_RCOND, DEFAULT_SOLVE, check_solve,
                                         euclidean_direction, solve_metric)
from fisherfast.steer.scale import TargetNotReached, check_start, scale_to_target

__all__ = ["SteeringResult", "MethodResult", "steer_to_target", "compare_methods", "evaluate_delta",
           "off_target_kl", "scale_to_target", "TargetNotReached", "METHODS"]

METHODS = ("fishback", "euclidean")
_MAX_HALVINGS = 40


@dataclasses.dataclass(frozen=True)
class SteeringResult:
    """The outcome of ``steer_to_target``.

    Attributes:
        h: (d,) the steered hidden state; delta: h − h₀.
        scores: φ after each step (scores[0] at h₀).
        step_kls: per step, the exact KL(p(h_t) ‖ p(h_{t+1})) of the full
            next-token distributions (each ≤ max_step_kl).
        reached: |scores[-1] − target_score| ≤ tol.
        target_score, tol: φ* and the tolerance the run was held to.
    """

    h: torch.Tensor
    delta: torch.Tensor
    scores: tuple[float, ...]
    step_kls: tuple[float, ...]
    reached: bool
    target_score: float
    tol: float

    @property
    def steps(self) -> int:
        return len(self.step_kls)


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method's displacement δ from h₀ and what it costs (``compare_methods``,
    ``evaluate_delta``).

    Attributes:
        method: its name; reached: whether it met the target (within tol);
        steps: steps taken (0 for a scaled direction);
        score: φ at h₀ + δ; target_prob: the concept's probability there
            (Σ_{v∈T} p_v, or p(y₁…y_n) for a sequence);
        kl: KL(p₀ ‖ p) of the full next-token distributions at t;
        off_target_kl: the same with the concept's tokens removed (``off_target_kl``);
        delta_norm: ‖δ‖; delta: δ (d,).
    """

    method: str
    reached: bool
    steps: int
    score: float
    target_prob: float
    kl: float
    off_target_kl: float
    delta_norm: float
    delta: torch.Tensor


def _kl(z_p: torch.Tensor, z_q: torch.Tensor) -> float:
    """KL(softmax z_p ‖ softmax z_q) in float64."""
    lp = torch.log_softmax(z_p.to(torch.float64), -1)
    lq = torch.log_softmax(z_q.to(torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum())


def _check_metric_options(metric_options: dict, metric_mode: str) -> None:
    """Names ``pullback_fisher`` accepts besides those steer_to_target sets itself,
    and that ``metric_mode`` uses (the metric's own ``check_mode_options``;
    checked before any work)."""
    import inspect

    from fisherfast.metric import check_mode_options, pullback_fisher

    check_mode_options(metric_mode, metric_options, mode_name="metric_mode")
    own = {"split", "contexts", "mode", "h", "progress"}
    known = set(inspect.signature(pullback_fisher).parameters) - own
    unknown = sorted(set(metric_options) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}: steer_to_target passes extra options to "
                        f"pullback_fisher, which takes {sorted(known)}")


def steer_to_target(split, ctx, concept, target_score: float, *, method: str = "fishback",
                    h: torch.Tensor | None = None, max_steps: int = 20, max_step_kl: float = 0.5,
                    solve: str = DEFAULT_SOLVE, damping: float = DEFAULT_DAMPING, rcond: float = DEFAULT_RCOND,
                    metric_mode: str = "exact", tol: float = 1e-3, **metric_options) -> SteeringResult:
    """Move h (default ``ctx.h``) until |φ(h) − ``target_score``| ≤ ``tol`` (module docstring).

    Args:
        split, ctx: a ``SplitModel`` and one of its contexts.
        concept: a ConceptScore or SequenceConcept φ; ``target_score`` φ*
            (e.g. log 0.9 for a log-probability concept to reach p(T) = 0.9).
        method: "fishback" (δ ∝ x, x = G_λ⁻¹q or G⁺q by ``solve``, G recomputed
            at every step with ``pullback_fisher(mode=metric_mode,
            **metric_options)``) or "euclidean" (δ ∝ q).
        max_steps: step budget; max_step_kl: the KL one step may cost.
        solve, damping, rcond: FishBack's solve (``fisherfast.steer.directions``).
        tol: the tolerance on φ (log-probability units: 1e-3 is 0.1% relative in p).
    Returns:
        a frozen ``SteeringResult``; ``reached`` is False when ``max_steps``
        ran out first.
    Works inside ``torch.inference_mode()`` (gradients by torch.func).
    """
    from scipy.optimize import brentq

    from fisherfast.metric import pullback_fisher

    check_choice("method", method, METHODS)
    check_real("max_step_kl", max_step_kl, minimum=0, min_open=True, finite=False)
    check_real("tol", tol, minimum=0, min_open=True)
    _check_metric_options(metric_options, metric_mode)
    check_int("max_steps", max_steps, minimum=1)
    check_solve(solve, rcond)
    check_concept(concept, split, ctx)
    target_score = check_target_score(concept, target_score)
    h0 = check_start(split, ctx, h)

    def score(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(concept.score(split, ctx, x))

    h = h0.detach().clone()
    z = split.logits(ctx, h)
    scores, kls = [score(h)], []
    for _ in range(max_steps):
        if abs(scores[-1] - target_score) <= tol:
            break
        q, _ = concept_gradient(split, ctx, h, concept)
        rho = target_score - scores[-1]
        if method == "fishback":
            G = pullback_fisher(split, ctx, h=h, mode=metric_mode, progress=False, **metric_options)
            x = solve_metric(G, q, solve=solve, damping=damping, rcond=rcond)  # solved once per step
            budget = float(q.to(torch.float64) @ x)  # qᵀG_λ⁻¹q or qᵀG⁺q
            if not budget > 0:
                raise RuntimeError("qᵀG⁺q = 0 at this point: q lies in the discarded eigenspace (lower rcond)")
            rho = math.copysign(min(abs(rho), math.sqrt(2 * max_step_kl * budget)), rho)  # ½ρ²/qᵀxq ≤ max_step_kl
            delta = (rho / budget * x).to(q.dtype)  # FishBack δ* = ρ x / qᵀx
        else:
            delta = euclidean_direction(q, rho)
        for _ in range(_MAX_HALVINGS):
            z_next = split.logits(ctx, h + delta)
            step_kl = _kl(z, z_next)
            if step_kl <= max_step_kl:
                break
            delta = delta / 2
        else:
            raise RuntimeError(f"no step of KL ≤ max_step_kl={max_step_kl} found after {_MAX_HALVINGS} halvings")
        s_next = score(h + delta)
        before, after = scores[-1] - target_score, s_next - target_score
        if before * after < 0 and abs(after) > tol:  # crossed φ*: shorten the step to land on it
            c = brentq(lambda c: score(h + c * delta) - target_score, 0.0, 1.0, xtol=1e-12)
            delta = c * delta
            z_next = split.logits(ctx, h + delta)
            step_kl, s_next = _kl(z, z_next), score(h + delta)
        kls.append(step_kl)
        h, z = h + delta, z_next
        scores.append(s_next)
    return SteeringResult(h=h, delta=h - h0, scores=tuple(scores), step_kls=tuple(kls),
                          reached=abs(scores[-1] - target_score) <= tol, target_score=float(target_score),
                          tol=float(tol))


def off_target_kl(concept, base_logits: torch.Tensor, steered_logits: torch.Tensor) -> torch.Tensor:
    """KL(p̃_base ‖ p̃_steered) (...,) in float64, p̃ the next-token distribution
    (logits (..., V)) with ``concept.removed_tokens`` (T and S of a
    ConceptScore, y₁ of a SequenceConcept) removed and the rest renormalized.
    The direction is the total KL's: the expected log-loss increase on the
    base model's own predictions (module docstring)."""
    check_concept(concept)
    removed = concept.removed_tokens
    for name, logits in (("base_logits", base_logits), ("steered_logits", steered_logits)):
        try:
            check_logits(logits, int(removed.max()))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    if base_logits.shape != steered_logits.shape:
        raise ValueError(expected("steered_logits", f"the shape of base_logits {tuple(base_logits.shape)}",
                                  steered_logits))
    keep = torch.ones(base_logits.shape[-1], dtype=torch.bool, device=base_logits.device)
    keep[removed.to(keep.device)] = False
    lp = torch.log_softmax(base_logits[..., keep].to(torch.float64), -1)
    lq = torch.log_softmax(steered_logits[..., keep].to(torch.float64), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def evaluate_delta(split, ctx, concept, delta: torch.Tensor, *, method: str, reached: bool = True,
                   steps: int = 0, h: torch.Tensor | None = None) -> MethodResult:
    """The ``MethodResult`` of displacing h (default ``ctx.h``) by ``delta`` (d,):
    score, probability, total and off-target KL from the base next-token
    distribution at h."""
    check_concept(concept, split, ctx)
    h = check_start(split, ctx, h)
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(h.shape) or not delta.is_floating_point():
        raise ValueError(expected("delta", f"a floating tensor of shape {tuple(h.shape)}",
                                  delta if isinstance(delta, torch.Tensor) else type(delta)))
    check_finite("delta", delta)
    delta = delta.to(h.dtype)
    with torch.no_grad():
        z0, z = split.logits(ctx, h), split.logits(ctx, h + delta)
        score = float(concept.score(split, ctx, h + delta))
        prob = float(concept.probability(split, ctx, h + delta))
    return MethodResult(method=method, reached=bool(reached), steps=int(steps), score=score, target_prob=prob,
                        kl=_kl(z0, z), off_target_kl=float(off_target_kl(concept, z0, z)),
                        delta_norm=float(delta.norm()), delta=delta.detach())


def compare_methods(split, ctx, concept, target_score: float, *, methods: tuple[str, ...] = METHODS,
                    **options) -> list[MethodResult]:
    """Steer with each method (``steer_to_target``, ``options`` passed on: solve,
    tol, max_step_kl, …) from ``ctx.h`` to ``target_score`` and return one
    frozen ``MethodResult`` per method, in order: all compared within ``tol``
    of the same score, with one KL convention (module docstring)."""
    if isinstance(methods, str) or not methods or any(m not in METHODS for m in methods):
        raise ValueError(expected("methods", f"a non-empty tuple of {METHODS}", methods))
    results = []
    for method in methods:
        run = steer_to_target(split, ctx, concept, target_score, method=method, **options)
        results.append(evaluate_delta(split, ctx, concept, run.delta, method=method, reached=run.reached,
                                      steps=run.steps, h=options.get("h")))
    return results
