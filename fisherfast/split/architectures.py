"""Where a Hugging Face causal LM keeps its parts, discovered from the model itself.

``architecture(model)`` finds the decoder stack through transformers' base
model (``model.base_model``, else ``model.get_decoder()``): its list of
decoder blocks (the ``ModuleList`` with ``config.num_hidden_layers``
entries), the final norm (the norm module registered after the blocks),
the rotary embedding(s), the keyword under which a block takes its cache,
and the output head (``get_output_embeddings()``). No per-type table is
needed for the families tested (tests/split); a new Llama-like type works
without a code change. ``Architecture.split_refusal`` says, in words a user
can act on, why ``SplitModel`` cannot hold the context of a model fixed
(recurrent / state-space layers, attention outside transformers' attention
interface in blocks that take no cache, no linear head, bidirectional
attention); steering needs only
the blocks and works on those models too.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys

import torch

__all__ = ["Architecture", "architecture", "decoder_blocks", "SUPPORTED_MODEL_TYPES", "REFUSED_MODEL_TYPES"]

# Decoder-only types on which SplitModel and everything on it is verified by
# the architecture matrix (tests/split/test_matrix.py); other types whose
# parts are found work too, untested.
SUPPORTED_MODEL_TYPES = (
    "llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text", "mistral", "ministral", "qwen3", "qwen2_moe",
    "qwen3_moe", "mixtral", "olmo", "olmo2", "olmo3", "olmoe", "gemma", "gemma2", "phi", "phi3", "granite",
    "granitemoe", "cohere", "cohere2", "stablelm", "starcoder2", "deepseek_v3", "gpt_oss", "smollm3", "glm4",
    "exaone4", "seed_oss", "hunyuan_v1_dense", "arcee", "apertus", "helium", "bitnet", "gptj", "falcon",
)
# Types the matrix builds whose blocks are found (steering works) but which
# SplitModel refuses, with the reason ``Architecture.split_refusal`` gives.
REFUSED_MODEL_TYPES = {
    "jamba": "recurrent (state-space) layers",
    "falcon_h1": "recurrent (state-space) layers",
    "lfm2": "recurrent (short convolution) layers",
    "mamba": "recurrent (state-space) layers",
}

# Class names of modules that carry a state along the sequence besides
# attention keys/values (state-space mixers, short convolutions, linear attention).
_RECURRENT = re.compile(r"Mamba|Mixer|ShortConv|Recurrent|SSM|LinearAttention|GatedDeltaNet|RWKV|xLSTM")
_BLOCK_NAMES = ("layers", "h", "blocks", "layer")
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


@dataclasses.dataclass(frozen=True, eq=False)
class Architecture:
    """The parts of a causal LM that fisherfast uses (from ``architecture(model)``).

    Attributes:
        model_type: ``config.model_type``.
        base: the decoder stack (transformers' base model): embeddings, blocks, final norm.
        blocks: the ModuleList of L decoder blocks; h at layer ℓ < L is the input of block ℓ.
        norm: the final norm N applied after the last block (None when none is found).
        rotary: the rotary embedding module(s) of ``base`` (empty for none).
        cache_kwarg: the keyword under which a block takes its cache (None: takes none).
        head: ``model.get_output_embeddings()`` (None for a model without a head).
        recurrent: class names of the modules in the blocks that carry a state
            along the sequence besides attention keys/values (hybrid and
            state-space models; empty for pure attention models).
        attention_interface: whether the blocks' attention goes through
            transformers' ``AttentionInterface`` (what SplitModel replaces).
        split_refusal: None when ``SplitModel`` can split the model exactly,
            else why not, naming the type and what is missing.
    """

    model_type: str
    base: torch.nn.Module
    blocks: torch.nn.ModuleList
    norm: torch.nn.Module | None
    rotary: tuple
    cache_kwarg: str | None
    head: torch.nn.Module | None
    recurrent: tuple
    attention_interface: bool
    split_refusal: str | None

    @property
    def num_layers(self) -> int:
        """L, the number of decoder blocks."""
        return len(self.blocks)

    def __repr__(self) -> str:
        verdict = "splits exactly" if self.split_refusal is None else f"SplitModel refused: {self.split_refusal}"
        return (f"Architecture({self.model_type!r}: {self.num_layers} blocks, norm "
                f"{type(self.norm).__name__ if self.norm is not None else None}, rotary "
                f"{[type(r).__name__ for r in self.rotary]}, head "
                f"{type(self.head).__name__ if self.head is not None else None}; {verdict})")


def architecture(model) -> Architecture:
    """The decoder stack, final norm, rotary embedding(s), cache keyword and
    head of a Hugging Face causal LM, found from the model itself.

    Raises:
        ValueError naming ``model`` when it is not a transformers model or its
        decoder blocks cannot be found (the message says which type and what
        was looked for). A model whose blocks are found but which SplitModel
        cannot split is returned, with ``split_refusal`` set.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(model_type, str):
        raise ValueError(f"model: unsupported architecture: expected a Hugging Face transformers model (with a "
                         f".config.model_type), got {type(model).__name__}")
    L = getattr(config, "num_hidden_layers", None)
    base, blocks = None, None
    for candidate in _bases(model):
        blocks = _find_blocks(candidate, L)
        if blocks is not None:
            base = candidate
            break
    if blocks is None:
        raise ValueError(f"model: unsupported architecture {model_type!r}: cannot find the decoder blocks of "
                         f"{type(model).__name__}: expected its base model to hold a ModuleList of "
                         f"config.num_hidden_layers = {L} blocks")
    norm = _find_norm(base, blocks)
    rotary = tuple(m for _, m in base.named_children() if "rotary" in type(m).__name__.lower())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    recurrent = tuple(sorted({type(m).__name__ for m in blocks.modules()
                              if isinstance(m, torch.nn.Conv1d) or _RECURRENT.search(type(m).__name__)}))
    uses_interface = _uses_attention_interface(blocks)
    cache_kwarg = _cache_kwarg(blocks[0])
    return Architecture(model_type=model_type, base=base, blocks=blocks, norm=norm, rotary=rotary,
                        cache_kwarg=cache_kwarg, head=head, recurrent=recurrent, attention_interface=uses_interface,
                        split_refusal=_split_refusal(model, model_type, norm, head, recurrent, uses_interface,
                                                     cache_kwarg))


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``architecture(model).blocks``; any
    decoder-only type whose blocks can be found, hybrid and state-space ones
    included): h at layer ℓ < L is the input of block ℓ, layer L the last
    block's output. For hooks that read or edit hidden states.

    Raises ValueError naming ``model`` (see ``architecture``)."""
    return architecture(model).blocks


def _bases(model):
    """Where the decoder stack may live: the base model, the decoder, the model itself."""
    seen = []
    for get in (lambda: model.base_model, lambda: model.get_decoder(), lambda: model):
        try:
            candidate = get()
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            continue
        if isinstance(candidate, torch.nn.Module) and all(candidate is not s for s in seen):
            seen.append(candidate)
    return seen


def _find_blocks(base, L):
    lists = [(name, m) for name, m in base.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if L is not None:
        lists = [(name, m) for name, m in lists if len(m) == L]
    if not lists:
        return None
    lists.sort(key=lambda item: _BLOCK_NAMES.index(item[0]) if item[0] in _BLOCK_NAMES else len(_BLOCK_NAMES))
    return lists[0][1]


def _find_norm(base, blocks):
    """The final norm: the norm child of ``base`` registered after the blocks
    (else the only norm child)."""
    children = list(base.named_children())
    index = next(i for i, (_, m) in enumerate(children) if m is blocks)
    is_norm = [(name, m) for name, m in children if "norm" in type(m).__name__.lower()]
    after = [(name, m) for name, m in children[index + 1:] if "norm" in type(m).__name__.lower()]
    if len(after) == 1:
        return after[0][1]
    if len(is_norm) == 1:
        return is_norm[0][1]
    return None


def _cache_kwarg(block):
    params = inspect.signature(type(block).forward).parameters
    return next((name for name in _CACHE_KWARGS if name in params), None)


def _uses_attention_interface(blocks) -> bool:
    """Whether the modeling module of the blocks dispatches attention through
    transformers' ``ALL_ATTENTION_FUNCTIONS`` (the function SplitModel swaps)."""
    module = sys.modules.get(type(blocks[0]).__module__)
    return module is not None and hasattr(module, "ALL_ATTENTION_FUNCTIONS")


def _split_refusal(model, model_type, norm, head, recurrent, uses_interface, cache_kwarg):
    name = f"{model_type!r} ({type(model).__name__})"
    if recurrent:
        return (f"{name} has layers that carry a recurrent state along the sequence ({', '.join(recurrent)}); "
                "SplitModel holds the context fixed through attention keys and values only, and does not yet "
                "carry a prefix state for these layers (steering works on this model)")
    if not uses_interface and cache_kwarg is None:
        return (f"{name} computes attention in its own code, not through transformers' attention interface, "
                "and its blocks take no cache through which SplitModel could give them the cached prefix "
                "(steering works on this model)")
    if getattr(model.config, "use_bidirectional_attention", False):
        return f"{name} uses bidirectional attention: a position sees later ones, so the context cannot be held fixed"
    if not isinstance(head, torch.nn.Linear):
        return f"{name} has no Linear output head (get_output_embeddings() is {type(head).__name__})"
    if norm is None:
        return f"{name}: no single final norm found after the decoder blocks"
    return None
