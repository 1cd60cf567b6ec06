"""The points of ``pullback_fisher``: (context, h) pairs from its ``contexts`` and ``h``
(concept schemas are checked by ``fisherfast.concepts.ConceptSchema``)."""
from __future__ import annotations

import torch

from fisherfast.checks import check_contexts, check_finite, expected

__all__ = ["paired_points"]


def paired_points(split, contexts, h) -> list:
    """[(ctx, h_i)] from one context or a list, and the optional points h.

    h: None (each context's own state ``ctx.h``), a (d,) tensor with one
    context, or (n, d) with n contexts (paired) or one context (n states for it).

    Raises:
        TypeError: contexts is not a SplitContext of ``split`` or a non-empty list
            of them; h is not a tensor of the model's dtype.
        ValueError: h has NaN / Inf or a shape that does not pair with the contexts.
    """
    ctx_list = check_contexts(split, contexts)
    if h is None:
        return [(ctx, ctx.h) for ctx in ctx_list]
    if not isinstance(h, torch.Tensor):
        raise TypeError(expected("h", "a torch.Tensor or None", type(h)))
    if h.dtype != split.W.dtype:
        raise TypeError(expected("h", f"the model's dtype {split.W.dtype}", h.dtype))
    check_finite("h", h)
    if h.dim() == 1 and h.shape[0] == split.d and len(ctx_list) == 1:
        return [(ctx_list[0], h)]
    if h.dim() == 2 and h.shape[1] == split.d and len(ctx_list) in (1, h.shape[0]) and h.shape[0] > 0:
        ctx_list = ctx_list * h.shape[0] if len(ctx_list) == 1 else ctx_list
        return list(zip(ctx_list, h))
    raise ValueError(expected("h", f"shape ({split.d},) with one context or (n, {split.d}) with 1 or n contexts",
                              f"shape {tuple(h.shape)} with {len(ctx_list)} context(s)", raw=True))
