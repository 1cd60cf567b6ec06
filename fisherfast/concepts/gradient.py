"""Concept gradients q = ∇_h φ at layer ℓ (docs/design.md §5)."""
from __future__ import annotations

import torch

from fisherfast.concepts.scores import check_concept

__all__ = ["concept_gradient"]


def concept_gradient(split, ctx, h: torch.Tensor, concept) -> tuple[torch.Tensor, float]:
    """(q, φ) at h: q = ∇_h φ(h) (d,) for the context ``ctx`` of ``split``.

    ``concept``: a ConceptScore (φ of the next-token logits at t) or a
    SequenceConcept (φ = log p(y₁…y_n | prompt); ``ctx`` built with
    ``continuation=concept.tokens``). Computed with ``torch.func.grad`` through
    the upper map, so it works inside ``torch.inference_mode()`` and
    ``torch.no_grad()`` as well as outside.

    Cost: one forward and one reverse pass of the upper map (n tokens for a
    sequence) and the head.
    Raises TypeError for another kind of concept, ValueError for token ids
    outside the vocabulary or a context without the sequence's continuation.
    """
    check_concept(concept, split, ctx)
    q, phi = torch.func.grad_and_value(lambda x: concept.score(split, ctx, x))(h)
    return q.detach(), float(phi)
