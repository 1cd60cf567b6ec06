"""Apply steering vectors inside a Hugging Face model's forward pass or generation
through removable hooks (docs/design.md §5, the steering-vectors / TransformerLens
convention).

Layer convention (as in ``fisherfast.split``): the hidden state at layer ℓ < L
is the input of decoder block ℓ (a forward pre-hook edits it), at ℓ = L the
output of the last block before the final norm (a forward hook edits it). So
a vector δ found with ``SplitModel(model, ℓ)`` at the prompt's last position
has, applied here with ``positions="last"``, exactly the effect the split
model predicts: ``model(ids).logits[:, -1] == split.logits(ctx, ctx.h + δ)``.

Positions index the sequence of each forward call: "all", "last", or a list
of ints (negative from the end). During ``generate`` with a KV cache, the first
call is the whole prompt and every later call is the one new token, so "last"
steers the prompt's last token and then every generated token.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch

from fisherfast.split import decoder_blocks

MODES = ("add", "replace")


def _positions(positions) -> slice | list[int]:
    if positions == "all":
        return slice(None)
    if positions == "last":
        return [-1]
    if isinstance(positions, Sequence) and not isinstance(positions, str) and positions and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions):
        return list(positions)
    raise ValueError(f'positions must be "all", "last" or a non-empty list of ints, got {positions!r}')


def _edit(hidden: torch.Tensor, vector: torch.Tensor, where, mode: str) -> torch.Tensor:
    if hidden.dim() != 3:
        raise RuntimeError(f"expected hidden states of shape (batch, seq, d), got {tuple(hidden.shape)}")
    if isinstance(where, list) and any(not -hidden.shape[1] <= p < hidden.shape[1] for p in where):
        raise IndexError(f"steering positions {where} are outside a sequence of length {hidden.shape[1]}")
    edited = hidden.clone()
    v = vector.to(hidden.dtype)
    if mode == "add":
        edited[:, where] += v
    else:
        edited[:, where] = v
    return edited


@contextlib.contextmanager
def steering(model, vectors: Mapping[int, torch.Tensor], *, positions="last", mode: str = "add"):
    """Within the block, every forward pass of ``model`` has its hidden states at
    each layer ℓ in ``vectors`` edited: h ← h + v_ℓ ("add") or h ← v_ℓ
    ("replace") at ``positions``. Hooks are removed on exit, also on error.

    Args:
        model: a supported Hugging Face causal LM (``fisherfast.split``).
        vectors: {layer ℓ ∈ [0, L]: (d,) vector}.
        positions: "all", "last" or a list of sequence indices.
        mode: "add" or "replace".

    Example::

        with steering(model, {12: delta}):
            out = model.generate(**inputs, max_new_tokens=20)
    """
    blocks = decoder_blocks(model)
    L = len(blocks)
    where = _positions(positions)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty mapping {layer: (d,) tensor}")
    d = model.get_output_embeddings().weight.shape[1]
    for layer, v in vectors.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= L:
            raise ValueError(f"vectors: layer must be an int in [0, {L}], got {layer!r}")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (d,) or not v.is_floating_point():
            raise ValueError(f"vectors[{layer}] must be a floating tensor of shape ({d},), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"vectors[{layer}] contains NaN or Inf")

    def pre_hook(vector):
        def hook(module, args, kwargs):
            if args:
                return (_edit(args[0], vector, where, mode), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _edit(kwargs["hidden_states"], vector, where, mode)}
        return hook

    def post_hook(vector):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (_edit(output[0], vector, where, mode), *output[1:])
            return _edit(output, vector, where, mode)
        return hook

    handles = []
    try:
        for layer, v in vectors.items():
            v = v.detach()
            if layer < L:
                handles.append(blocks[layer].register_forward_pre_hook(pre_hook(v), with_kwargs=True))
            else:
                handles.append(blocks[L - 1].register_forward_hook(post_hook(v)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
