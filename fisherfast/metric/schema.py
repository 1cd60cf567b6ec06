"""Checks of ``pullback_fisher``'s inputs: its points and concept schemas."""
from __future__ import annotations

from typing import Mapping

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
    if h.dim() == 1 and h.shape[0] == split.d and len(ctx_list) == 1:
        return [(ctx_list[0], h)]
    if h.dim() == 2 and h.shape[1] == split.d and len(ctx_list) in (1, h.shape[0]) and h.shape[0] > 0:
        ctx_list = list(ctx_list) * h.shape[0] if len(ctx_list) == 1 else ctx_list
        return list(zip(ctx_list, h))
    raise ValueError(f"h must have shape ({split.d},) with one context or (n, {split.d}) with 1 or n contexts; "
                     f"got shape {tuple(h.shape)} with {len(ctx_list)} context(s)")


def concept_schema(concepts, V: int):
    """(names, [LongTensor of token ids per concept]) after validation.

    Args:
        concepts: a non-empty sequence (or mapping name → entry) whose entries
            are a token id or a sequence (list, tuple, range, tensor) of ids;
            unnamed concepts are named "0", "1", ….
        V: the vocabulary size.

    Raises:
        ValueError: no concepts, an empty concept, an id outside [0, V), or a
            token in two concepts (concepts must be disjoint).
        TypeError: concepts is neither a sequence nor a mapping.
    """
    if concepts is None:
        raise ValueError("mode='concept' needs concepts: a sequence (or mapping name → entry) of token ids "
                         "or token-id sequences")
    if isinstance(concepts, Mapping):
        names, entries = [str(n) for n in concepts], list(concepts.values())
    elif isinstance(concepts, (list, tuple)):
        names, entries = [str(i) for i in range(len(concepts))], list(concepts)
    else:
        raise TypeError(f"concepts must be a sequence or mapping of token ids, got {type(concepts).__name__}")
    if not entries:
        raise ValueError("concepts must name at least one concept")
    seen: dict[int, int] = {}
    token_sets = []
    for i, entry in enumerate(entries):
        ids = list(entry) if isinstance(entry, (list, tuple, range)) else [entry]
        if isinstance(entry, torch.Tensor):
            ids = entry.flatten().tolist()
        if not ids:
            raise ValueError(f"concept {names[i]!r} has no token ids")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"concept {names[i]!r}: token ids must be ints in [0, {V}), got {t!r}")
            if t in seen:
                raise ValueError(f"token {t} is in concepts {names[seen[t]]!r} and {names[i]!r}; "
                                 "concepts must be disjoint")
            seen[t] = i
        token_sets.append(torch.tensor(ids, dtype=torch.long))
    return names, token_sets
