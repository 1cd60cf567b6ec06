"""Where each supported Hugging Face causal LM keeps its decoder blocks, final
norm, KV-cache keyword and rotary embedding."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class _Arch:
    base: str            # attribute of the *ForCausalLM holding the decoder stack
    blocks: str          # attribute of base: the ModuleList of decoder blocks
    norm: str            # attribute of base: the final norm
    cache_kwarg: str     # keyword under which a block takes its KV cache
    rotary: str | None   # attribute of base: the rotary embedding module, if any
    rotary_per_layer_type: bool = False  # Gemma3: rotary_emb(x, pos, layer_type)
    softmax_fp32: bool = True  # the model's eager attention takes its softmax in float32


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("model", "layers", "norm", "past_key_values", "rotary_emb"),
    "qwen2": _Arch("model", "layers", "norm", "past_key_values", "rotary_emb"),
    "gpt2": _Arch("transformer", "h", "ln_f", "past_key_values", None, softmax_fp32=False),
    "gpt_neox": _Arch("gpt_neox", "layers", "final_layer_norm", "layer_past", "rotary_emb"),
    "gemma3_text": _Arch("model", "layers", "norm", "past_key_values", "rotary_emb",
                         rotary_per_layer_type=True),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHS)


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a supported causal LM (h at layer ℓ < L is the input
    of block ℓ; layer L is the last block's output), for hooks that read or
    edit hidden states."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHS:
        raise ValueError(f"model: unsupported architecture {model_type!r} ({type(model).__name__}); "
                         f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    arch = _ARCHS[model_type]
    return getattr(getattr(model, arch.base), arch.blocks)
