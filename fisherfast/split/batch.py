"""Whole batches through a causal LM without its head: the final normed hidden
states of every position (FisherSketch over corpora, docs/design.md §7); the
head itself is ``fisherfast.split.head.Head``."""
from __future__ import annotations

import contextlib

import torch

from fisherfast.split.architectures import architecture
from fisherfast.split.head import Head, head_of
from fisherfast.split.positions import check_positions
from fisherfast.split.precision import keep_float64

__all__ = ["final_head_inputs", "output_head", "OutputHead"]

OutputHead = Head  # the former name of the head type


def output_head(model) -> Head:
    """The ``Head`` of a causal LM whose blocks can be found (ValueError naming ``model`` otherwise)."""
    arch = architecture(model)
    return head_of(model, arch.head)


def final_head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """a = N(r_L) at every position of a batch: (B, T) ids (and 0/1 mask) → (B, T, d).

    The model's own forward through its decoder stack and final norm, without
    the LM head (so no B·T·V logits); ``output_head(model).logits(a)`` gives
    the model's logits. Runs under ``torch.no_grad``; a float64 model in float64
    throughout (``fisherfast.split.precision``), as SplitModel.

    Raises:
        ValueError naming ``model`` for a model in training mode, and
        ``input_ids`` for prompts longer than the model's positions."""
    arch = architecture(model)
    if model.training:
        raise ValueError("model: is in training mode (dropout makes its outputs random); call model.eval()")
    check_positions(model, input_ids.shape[-1], "input_ids")
    float64 = next(arch.blocks.parameters()).dtype == torch.float64
    with torch.no_grad(), keep_float64() if float64 else contextlib.nullcontext():
        out = arch.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state
