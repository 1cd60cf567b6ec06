"""The Hellinger rows of a concept schema: the Jacobian of s = √q at a hidden state
(docs/design.md §4, concept-restricted mode; §6, the concept Hellinger metric).

For a schema's concept distribution q(h) (n_c + 1 bins, ``ConceptSchema``)
the Hellinger coordinates are s = √q, and

    J_s = ∂s/∂h = (∂s/∂a) B       ((n_c + 1) × d, B = ∂a/∂h),
    G_H = J_sᵀ J_s = ¼ J_qᵀ diag(1/q) J_q = ¼ · (the Fisher information of q),

so ‖J_s δ‖² = Σ_b (√q_b(h+δ) − √q_b(h))² + O(‖δ‖³) = 2 d_H² with the
Hellinger distance d_H² = ½ Σ_b (√q_b − √q′_b)² ∈ [0, 1]. Both consumers use
these rows: ``pullback_fisher(mode="concept")`` returns G_H, and
``fisherfast.geodesic.ConceptHellingerMetric`` uses J_s / √2 (its squared
lengths are d_H², so its JᵀJ = ½ G_H).

∂s/∂a comes from reverse mode through the model's own head map
(``split.logits_from_head_input``: bias, logit scale and soft-capping
included) and the float64 log-distribution of q, then B by n_c + 1
vector–Jacobian products through the upper blocks. A bin with q = 0 has a
zero row (its gradient vanishes with it).
"""
from __future__ import annotations

import torch

from fisherfast.concepts.schema import ConceptSchema

__all__ = ["hellinger_rows"]


def hellinger_rows(split, ctx, h: torch.Tensor, schema: ConceptSchema, *,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(J_s, q) at the hidden state h of context ``ctx`` (module docstring).

    Args:
        split: a ``SplitModel``; ctx: one of its contexts; h: (d,) in the model's dtype.
        schema: a ``ConceptSchema`` over ``split.V``.
        chunk: cotangents per vmapped VJP batch (None: all n_c + 1 at once).
    Returns:
        J_s (n_c + 1, d) in the model's dtype, rows ∂√q_b/∂h; q (n_c + 1,) float64.
    Cost: one upper-map forward, n_c + 1 reverse products through the V×d
    head and n_c + 1 VJPs through the upper blocks (batched).
    """
    def s_of_head_input(a):
        s = torch.exp(0.5 * schema.log_distribution(split.logits_from_head_input(a)))
        return s, s

    a = split.head_input(ctx, h)
    S_a, s = torch.func.jacrev(s_of_head_input, has_aux=True)(a)        # (n_c + 1, d) ∂s/∂a
    J_s = split.vjp(ctx, h, S_a.to(h.dtype).contiguous(), chunk=chunk)  # rows (∂s_b/∂a) B
    return J_s, (s.detach() ** 2)
