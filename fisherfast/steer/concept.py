"""Concept scores φ of the next-token distribution and their gradients q = ∇_h φ
(docs/design.md §5).

A concept is a set T of target token ids, optionally against a set S of
source ids:

    log-probability  φ(z) = log Σ_{v∈T} p_v = logsumexp(z_T) − logsumexp(z)
    log-odds         φ(z) = log Σ_{v∈T} p_v − log Σ_{v∈S} p_v = logsumexp(z_T) − logsumexp(z_S)

with z the logits. At layer ℓ the score is a function of the hidden state h
through the upper map (``fisherfast.split``), and q = ∇_h φ = Bᵀ Wᵀ ∂φ/∂z
(the model's logit post-processing included) is one head gradient and one VJP.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _token_ids(name: str, ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, int) or not isinstance(ids, Sequence) or len(ids) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of token ids, got {ids!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name} must hold non-negative int token ids, got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} has repeated token ids: {ids!r}")
    return torch.tensor(ids, dtype=torch.long)


class ConceptScore:
    """φ over logits: the log-probability of ``target`` tokens, or with
    ``source`` their log-odds against the source tokens.

    Args:
        target: token ids T.
        source: token ids S (disjoint from T), or None for the log-probability.

    Calling it on logits (..., V) gives φ (...). ``target_probability`` gives
    Σ_{v∈T} p_v.
    """

    def __init__(self, target, source=None):
        self.target = _token_ids("target", target)
        self.source = None if source is None else _token_ids("source", source)
        if self.source is not None and set(self.target.tolist()) & set(self.source.tolist()):
            raise ValueError("target and source must be disjoint token sets")

    @property
    def kind(self) -> str:
        return "log_probability" if self.source is None else "log_odds"

    def _check(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
            raise ValueError("logits must be a floating tensor of shape (..., V)")
        V = logits.shape[-1]
        top = max(int(self.target.max()), -1 if self.source is None else int(self.source.max()))
        if top >= V:
            raise ValueError(f"token id {top} is outside the vocabulary of {V} logits")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        on_target = torch.logsumexp(logits[..., self.target.to(logits.device)], dim=-1)
        if self.source is None:
            return on_target - torch.logsumexp(logits, dim=-1)
        return on_target - torch.logsumexp(logits[..., self.source.to(logits.device)], dim=-1)

    def target_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Σ_{v∈T} p_v (...)."""
        self._check(logits)
        return torch.softmax(logits, dim=-1)[..., self.target.to(logits.device)].sum(-1)

    def __repr__(self) -> str:
        source = "" if self.source is None else f", source={self.source.tolist()}"
        return f"ConceptScore(target={self.target.tolist()}{source})"


def concept_gradient(split, ctx, h: torch.Tensor, concept: ConceptScore) -> tuple[torch.Tensor, float]:
    """(q, φ) at h: q = ∇_h φ(z(h)) (d,) for the context ``ctx`` of ``split``.

    Cost: one forward of the upper map, the head gradient g = ∂φ/∂a (one V×d
    product) and one VJP q = Bᵀ g."""
    if not isinstance(concept, ConceptScore):
        raise TypeError(f"concept must be a ConceptScore, got {type(concept).__name__}")
    a = split.head_input(ctx, h).detach().requires_grad_(True)
    with torch.enable_grad():
        phi = concept(split.logits_from_head_input(a))
        (g,) = torch.autograd.grad(phi, a)
    return split.vjp(ctx, h, g[None])[0], float(phi.detach())
