"""Checks of ``pullback_fisher``'s inputs: its points (concept schemas are
checked by ``fisherfast.concepts.concept_schema``)."""
from __future__ import annotations

import torch


def check_points(split, contexts, h) -> list:
    """[(ctx, h_i)] from one context or a list, and the optional points h.

    Raises:
        TypeError: contexts is not a SplitContext or a non-empty list of them;
            h is not a tensor of the model's dtype.
        ValueError: h has a shape that does not pair with the contexts.
    """
    ctx_list = [contexts] if hasattr(contexts, "h") else contexts
    if not isinstance(ctx_list, (list, tuple)) or not ctx_list:
        raise TypeError("contexts must be a SplitContext or a non-empty list of them "
                        f"(from SplitModel.context / contexts), got {type(contexts).__name__}")
    for i, ctx in enumerate(ctx_list):
        if not hasattr(ctx, "h"):
            raise TypeError(f"contexts[{i}] must be a SplitContext, got {type(ctx).__name__}")
    if h is None:
        return [(ctx, ctx.h) for ctx in ctx_list]
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor or None, got {type(h).__name__}")
    if h.dtype != split.W.dtype:
        raise TypeError(f"h must have the model's dtype {split.W.dtype}, got {h.dtype}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("h contains NaN or Inf")
    if h.dim() == 1 and h.shape[0] == split.d and len(ctx_list) == 1:
        return [(ctx_list[0], h)]
    if h.dim() == 2 and h.shape[1] == split.d and len(ctx_list) in (1, h.shape[0]) and h.shape[0] > 0:
        ctx_list = list(ctx_list) * h.shape[0] if len(ctx_list) == 1 else ctx_list
        return list(zip(ctx_list, h))
    raise ValueError(f"h must have shape ({split.d},) with one context or (n, {split.d}) with 1 or n contexts; "
                     f"got shape {tuple(h.shape)} with {len(ctx_list)} context(s)")
