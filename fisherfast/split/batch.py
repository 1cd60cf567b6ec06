"""Whole batches through a supported causal LM without its head: the final
normed hidden states of every position, and the head as a small object
(FisherSketch over corpora, docs/design.md §7)."""
from __future__ import annotations

import dataclasses

import torch

from fisherfast.split.architectures import _ARCHS, decoder_blocks
from fisherfast.split.offload import materialized_parameters


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """The model's head: z = W a + b, then its logit post-processing (Gemma3's
    final soft-capping c·tanh(z/c) when ``logit_softcap`` is set).

    W: (V, d) detached; b: (V,) or None; logit_softcap: c or None."""

    W: torch.Tensor
    b: torch.Tensor | None
    logit_softcap: float | None

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """(..., d) head inputs → (..., V) logits, as the model's own forward."""
        z = a.to(self.W.dtype) @ self.W.T
        if self.b is not None:
            z = z + self.b
        if self.logit_softcap is not None:
            z = torch.tanh(z / self.logit_softcap) * self.logit_softcap
        return z


def output_head(model) -> OutputHead:
    """The OutputHead of a supported causal LM (ValueError naming ``model`` otherwise)."""
    decoder_blocks(model)  # checks the architecture
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model: expected a Linear output embedding, got {type(head).__name__}")
    params = materialized_parameters(head)  # an offloaded head (accelerate device_map) is loaded here
    return OutputHead(params["weight"], params.get("bias"), getattr(model.config, "final_logit_softcapping", None))


def final_head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """a = N(r_L) at every position of a batch: (B, T) ids (and 0/1 mask) → (B, T, d).

    The model's own forward through its decoder stack and final norm, without
    the LM head (so no B·T·V logits); ``output_head(model).logits(a)`` gives
    the model's logits. Runs under ``torch.no_grad``."""
    decoder_blocks(model)  # checks the architecture
    arch = _ARCHS[model.config.model_type]
    with torch.no_grad():
        out = getattr(model, arch.base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state
