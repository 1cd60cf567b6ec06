"""Behaviour-space evaluation of a path of hidden states (docs/design.md §6).

Each waypoint x_t (t = 0..T−1) is injected at the layer's position of every
carrier context (``split.logits(ctx, x_t)``: the state of the context's last
position is replaced), giving next-token probabilities p_{t,c} and concept
distributions q_{t,c} over B = K + 1 bins (``fisherfast.concepts.ConceptSchema``).
With the package's Hellinger convention

    d_H(q, r)² = ½ Σ_b (√q_b − √r_b)² ∈ [0, 1],
    D_B(q, r) = −log(1 − d_H²) = −log Σ_b √(q_b r_b)   (Bhattacharyya distance),

the measures, each computed per context and then averaged over contexts, are:

- Bhattacharyya energy: Σ_t min_m D_B(q_t, r_m), the summed distance of each
  waypoint to the nearest point of the behaviour manifold. The behaviour
  manifold is the finite set {r_m} of concept distributions of the given
  reference points (e.g. the class centroids) injected into the same context.
- Hellinger arc length: Σ_{t<T−1} d_H(q_t, q_{t+1}).
- Legibility: the fraction of waypoints whose concept argmax holds a strict
  majority of the concept mass: with k* = argmax_{k≤K} q_k (the "other" bin
  excluded), waypoint t is legible when q_{k*} > ½ Σ_{k≤K} q_k (never when
  the concept mass is 0).
- Target probability: q_target at the last waypoint (the summed probability
  of the target concept's tokens); target top-1: whether the most probable
  token of the whole vocabulary at the last waypoint is one of the target
  concept's tokens (a fraction over contexts after averaging).

The distribution-level functions take float tensors whose last axis holds
distributions; the ones over paths take time as the first axis.
"""
from __future__ import annotations

import dataclasses

import torch

from fisherfast.checks import check_contexts, check_points
from fisherfast.concepts import ConceptSchema, check_schema, concept_distributions

__all__ = ["hellinger_distance", "bhattacharyya_distance", "hellinger_arc_length", "bhattacharyya_energy",
           "legibility", "PathEvaluation", "evaluate_path"]

_SUM_TOL = 1e-6


def check_distributions(q, name: str, min_ndim: int = 1) -> torch.Tensor:
    """q as float64 after checking: floating, last axis ≥ 2 bins, entries ≥ 0, sums 1 (± 1e-6)."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor of distributions, got {type(q).__name__}")
    if q.ndim < min_ndim or q.shape[-1] < 2:
        raise ValueError(f"{name}: expected at least {min_ndim} axes with ≥ 2 bins on the last one, "
                         f"got shape {tuple(q.shape)}")
    q = q.double()
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError(f"{name}: expected finite entries ≥ 0, got NaN, Inf or negative ones")
    if bool(((q.sum(-1) - 1).abs() > _SUM_TOL).any()):
        raise ValueError(f"{name}: expected distributions (last axis) summing to 1 within {_SUM_TOL}, got other sums")
    return q


def hellinger_distance(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """d_H(q, r) = √(½ Σ_b (√q_b − √r_b)²) over the last axis (broadcasting), float64 in [0, 1]."""
    q, r = check_distributions(q, "q"), check_distributions(r, "r")
    if q.shape[-1] != r.shape[-1]:
        raise ValueError(f"q, r: expected the same number of bins, got {q.shape[-1]} and {r.shape[-1]}")
    return (0.5 * ((q.sqrt() - r.sqrt()) ** 2).sum(-1)).clamp(max=1.0).sqrt()


def bhattacharyya_distance(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """D_B(q, r) = −log(1 − d_H(q, r)²) over the last axis (broadcasting); +inf for disjoint supports."""
    return -torch.log1p(-hellinger_distance(q, r) ** 2)


def hellinger_arc_length(Q: torch.Tensor) -> torch.Tensor:
    """Σ_{t<T−1} d_H(Q_t, Q_{t+1}) for Q (T, ..., B) → (...)."""
    Q = check_distributions(Q, "Q", min_ndim=2)
    return hellinger_distance(Q[:-1], Q[1:]).sum(0)


def bhattacharyya_energy(Q: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Σ_t min_m D_B(Q_t, R_m) for a path Q (T, ..., B) and manifold points R (M, ..., B) → (...)."""
    Q = check_distributions(Q, "Q", min_ndim=2)
    R = check_distributions(R, "R", min_ndim=2)
    if Q.shape[1:] != R.shape[1:]:
        raise ValueError(f"Q, R: expected matching shapes after the first axis, got {tuple(Q.shape)} and "
                         f"{tuple(R.shape)}")
    return bhattacharyya_distance(Q[:, None], R[None]).min(1).values.sum(0)


def legibility(Q: torch.Tensor) -> torch.Tensor:
    """Fraction of t with max_{k≤K} Q_{t,k} > ½ Σ_{k≤K} Q_{t,k} for Q (T, ..., K+1) → (...).

    The last bin is "other" and is excluded from the concept mass."""
    Q = check_distributions(Q, "Q", min_ndim=2)
    concept = Q[..., :-1]
    legible = concept.max(-1).values > 0.5 * concept.sum(-1)
    return legible.double().mean(0)


@dataclasses.dataclass
class PathEvaluation:
    """``evaluate_path``'s measures (module docstring); scalars are means over contexts.

    Attributes:
        q: (T, C, B) concept distributions of the waypoints per context.
        reference_q: (M, C, B) the behaviour manifold's points per context.
        bhattacharyya_energy, arc_length, legibility, target_probability,
        target_top1: floats (target_top1 is the fraction of contexts).
        per_context: the same five measures as (C,) float64 tensors.
    """

    q: torch.Tensor
    reference_q: torch.Tensor
    bhattacharyya_energy: float
    arc_length: float
    legibility: float
    target_probability: float
    target_top1: float
    per_context: dict

    def as_dict(self) -> dict:
        """The five scalar measures."""
        return {name: getattr(self, name) for name in
                ("bhattacharyya_energy", "arc_length", "legibility", "target_probability", "target_top1")}


def evaluate_path(split, contexts, schema: ConceptSchema, path: torch.Tensor, reference: torch.Tensor,
                  target) -> PathEvaluation:
    """Evaluate waypoints ``path`` (T, d) in carrier ``contexts`` (module docstring).

    Args:
        split: a ``SplitModel``; contexts: a ``SplitContext`` or a list of them.
        schema: a ``ConceptSchema`` (V = split.V).
        path: (T, d) waypoints at layer ``split.layer``, in the model's dtype.
        reference: (M, d) or (d,) the points whose concept distributions are
            the behaviour manifold (e.g. class centroids).
        target: the target concept, a name or an index into ``schema.names``.

    Cost: one batched upper-map forward of T + M + 1 tokens per context.
    """
    contexts = check_contexts(split, contexts)
    check_schema(split, schema)
    X = check_points("path", path, split.d, dtype=split.W.dtype, finite=True)
    if path.ndim != 2:
        raise ValueError(f"path: expected shape (T, {split.d}), got {tuple(path.shape)}")
    reference = check_points("reference", reference, split.d, dtype=split.W.dtype, finite=True)
    k = schema.index(target, "target")
    Q = concept_distributions(split, contexts, schema, X)                    # (T, C, B)
    R = concept_distributions(split, contexts, schema, reference)
    tokens = schema.token_sets[k]
    with torch.no_grad():
        top1 = torch.tensor([float(int(split.logits(ctx, X[-1]).argmax()) in set(tokens.tolist()))
                             for ctx in contexts], dtype=torch.float64)
    per_context = {"bhattacharyya_energy": bhattacharyya_energy(Q, R), "arc_length": hellinger_arc_length(Q),
                   "legibility": legibility(Q), "target_probability": Q[-1, :, k], "target_top1": top1}
    means = {name: float(value.mean()) for name, value in per_context.items()}
    return PathEvaluation(q=Q, reference_q=R, per_context=per_context, **means)
