"""Steering a hidden state to a target concept score, and what it costs
(docs/design.md §5).

``steer_to_target`` iterates: at the current h, the concept gradient q and
(for FishBack) the pullback metric G are recomputed and a step with
first-order change ρ = φ* − φ is taken, until the score reaches φ* or
``max_steps`` run out. Both methods share one trust region on the actual
step KL(p(h) ‖ p(h + δ)) ≤ ``max_step_kl``: a step beyond it is halved until
it fits (one upper-map forward per trial). FishBack first clips ρ to the
budget its quadratic model predicts, ½ρ²/(qᵀG_λ⁻¹q) ≤ ``max_step_kl``.

``scale_to_target`` finds, for a fixed direction v (CAA, ActAdd, a probe, a
FishBack direction frozen at the start), the α with φ(h + α v) = φ* by
bracketing and Brent's method (scipy), so that methods are compared at
matched concept probability.

``off_target_kl`` is the distortion outside the concept: with the concept's
tokens T (and S) removed from both distributions and the rest renormalized,
KL(p̃_steered ‖ p̃_base).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fisherfast.steer.concept import ConceptScore, concept_gradient
from fisherfast.steer.directions import DEFAULT_DAMPING, check_vector, euclidean_direction, solve_metric

METHODS = ("fishback", "euclidean")
_MAX_HALVINGS = 40


@dataclasses.dataclass
class SteeringResult:
    """The outcome of ``steer_to_target``.

    Attributes:
        h: (d,) the steered hidden state; delta: h − h₀.
        scores: φ after each step (scores[0] at h₀); reached: whether φ* was met.
        step_kls: per step, the exact KL(p(h_t) ‖ p(h_{t+1})) of the full
            next-token distributions (each ≤ max_step_kl).
    """

    h: torch.Tensor
    delta: torch.Tensor
    scores: list[float]
    step_kls: list[float]
    reached: bool


def _kl(z_p: torch.Tensor, z_q: torch.Tensor) -> float:
    """KL(softmax z_p ‖ softmax z_q) in float64."""
    lp = torch.log_softmax(z_p.to(torch.float64), -1)
    lq = torch.log_softmax(z_q.to(torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum())


def steer_to_target(split, ctx, concept: ConceptScore, target_score: float, *, method: str = "fishback",
                    h: torch.Tensor | None = None, max_steps: int = 20, max_step_kl: float = 0.5,
                    damping: float = DEFAULT_DAMPING, metric_mode: str = "exact", tol: float = 1e-3,
                    **metric_options) -> SteeringResult:
    """Move h (default ``ctx.h``) until φ(h) ≥ ``target_score`` − ``tol``.

    Args:
        split, ctx: a ``SplitModel`` and one of its contexts.
        concept: the ConceptScore φ; ``target_score`` φ* (e.g. log 0.9 for a
            log-probability concept to reach p(T) = 0.9).
        method: "fishback" (δ ∝ G_λ⁻¹q, G recomputed at every step with
            ``pullback_fisher(mode=metric_mode, **metric_options)``) or
            "euclidean" (δ ∝ q).
        max_steps: step budget; max_step_kl: the KL one step may cost.
        damping: G's relative regularization (``fisherfast.steer.directions``).
        tol: how close to φ* counts as reached.
    """
    from fisherfast.metric import pullback_fisher

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("max_step_kl", max_step_kl), ("tol", tol)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not math.isfinite(target_score):
        raise ValueError(f"target_score must be finite, got {target_score!r}")
    h0 = ctx.h if h is None else h
    h = h0.detach().clone()
    z = split.logits(ctx, h)
    scores, kls = [float(concept(z))], []
    for _ in range(max_steps):
        if scores[-1] >= target_score - tol:
            break
        q, _ = concept_gradient(split, ctx, h, concept)
        rho = target_score - scores[-1]
        if method == "fishback":
            G = pullback_fisher(split, ctx, h=h, mode=metric_mode, progress=False, **metric_options)
            x = solve_metric(G, q, damping=damping)  # G_λ⁻¹q, solved once per step
            budget = float(q.to(torch.float64) @ x)  # qᵀG_λ⁻¹q
            rho = min(rho, math.sqrt(2 * max_step_kl * budget))  # ½ρ²/qᵀG_λ⁻¹q ≤ max_step_kl
            delta = (rho / budget * x).to(q.dtype)  # FishBack δ* = ρ G_λ⁻¹q / qᵀG_λ⁻¹q
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
        kls.append(step_kl)
        h, z = h + delta, z_next
        scores.append(float(concept(z)))
    return SteeringResult(h=h, delta=h - h0, scores=scores, step_kls=kls, reached=scores[-1] >= target_score - tol)


def scale_to_target(split, ctx, concept: ConceptScore, direction: torch.Tensor, target_score: float, *,
                    h: torch.Tensor | None = None, max_scale: float = 1e3, xtol: float = 1e-10) -> float:
    """α ≥ 0 with φ(h + α·direction) = ``target_score`` (Brent's method on a
    bracket grown by doubling from α = 1 up to ``max_scale``).

    Raises ValueError when φ at h already exceeds the target or no α ≤
    ``max_scale`` reaches it."""
    from scipy.optimize import brentq

    h = ctx.h if h is None else h
    direction = check_vector("direction", direction, h.shape[-1])

    def gap(alpha: float) -> float:
        return float(concept(split.logits(ctx, h + alpha * direction))) - target_score

    if gap(0.0) > 0:
        raise ValueError("the concept score already exceeds target_score at h")
    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
        if hi > max_scale:
            raise ValueError(f"no scale ≤ max_scale={max_scale} reaches target_score along this direction")
    return brentq(gap, 0.0, hi, xtol=xtol)


def off_target_kl(concept: ConceptScore, base_logits: torch.Tensor, steered_logits: torch.Tensor) -> torch.Tensor:
    """KL(p̃_steered ‖ p̃_base) (...,) with the concept's tokens (T and S)
    removed from both next-token distributions and the rest renormalized."""
    concept._check(base_logits)
    concept._check(steered_logits)
    if base_logits.shape != steered_logits.shape:
        raise ValueError(f"base_logits and steered_logits must have one shape, got {tuple(base_logits.shape)} "
                         f"and {tuple(steered_logits.shape)}")
    keep = torch.ones(base_logits.shape[-1], dtype=torch.bool, device=base_logits.device)
    keep[concept.target.to(keep.device)] = False
    if concept.source is not None:
        keep[concept.source.to(keep.device)] = False
    lp = torch.log_softmax(steered_logits[..., keep].to(torch.float64), -1)
    lq = torch.log_softmax(base_logits[..., keep].to(torch.float64), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def compare_methods(split, ctx, concept: ConceptScore, target_score: float, *,
                    methods: tuple[str, ...] = METHODS, **options) -> list[dict]:
    """Steer with each method to ``target_score`` from ``ctx.h`` and report, per
    method: reached, steps, the final target probability, KL(p₀ ‖ p) of the
    full distributions, the off-target KL, ‖δ‖ and the steered δ itself
    (``options`` go to ``steer_to_target``)."""
    z0 = split.logits(ctx, ctx.h)
    rows = []
    for method in methods:
        result = steer_to_target(split, ctx, concept, target_score, method=method, **options)
        z = split.logits(ctx, result.h)
        rows.append({"method": method, "reached": result.reached, "steps": len(result.step_kls),
                     "target_prob": float(concept.target_probability(z)), "kl": _kl(z0, z),
                     "off_target_kl": float(off_target_kl(concept, z0, z)),
                     "delta_norm": float(result.delta.norm()), "delta": result.delta})
    return rows
