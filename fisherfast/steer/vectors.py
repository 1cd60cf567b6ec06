"""Steering vectors as files (docs/design.md §5): a set of per-layer vectors with the
model, method and settings that produced them, saved and loaded with
safetensors, and exported to llama.cpp's control-vector GGUF so that llama.cpp
or ollama can serve them.

Layer index ℓ follows ``fisherfast.split``: the hidden state at ℓ < L is the
input of decoder block ℓ (= the output of block ℓ − 1, counting blocks from
0), at ℓ = L the output of the last block; ℓ = 0 is the embeddings.

llama.cpp's control-vector file (read by ``common_control_vector_load`` and
applied by ``llama_adapter_cvec``) has ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` (the model the vectors belong
to; informational) and ``controlvector.layer_count`` (the number of direction
tensors; informational), and one 1-D float32 tensor ``direction.N`` of length
d per steered layer. llama.cpp adds ``direction.N`` (times the user's scale) to
the output of block N, counting blocks from 0 (the model graph calls
``build_cvec(cur, il)`` on each block's output ``l_out-il``), at every token
position; N = 0 is refused by the loader and N ≥ L is never applied, so N runs
over 1 … L − 1. The output of block N is fisherfast's layer ℓ = N + 1, hence

    direction.N  ←  vector at layer ℓ = N + 1,   ℓ ∈ [2, L].

ℓ = 0 (the embeddings) and ℓ = 1 (the first block's output) have no llama.cpp
counterpart and are refused by :meth:`SteeringVectors.export_gguf`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any, Mapping

import torch

from fisherfast._persist import atomic_write, read_versioned

FORMAT = "fisherfast.steering_vectors"
VERSION = 1
SPEC = ("layer ℓ: ℓ < L is the input of decoder block ℓ, ℓ = L the output of the last block, ℓ = 0 the "
        "embeddings (fisherfast.split); tensor 'layer.<ℓ>' is the (d,) vector added at layer ℓ")


def _write(path, write) -> None:
    """``atomic_write`` with a missing folder reported by the path the user gave."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(path)}: folder {folder} does not exist")
    atomic_write(path, write)


@dataclasses.dataclass(frozen=True)
class SteeringVectors:
    """Per-layer steering vectors {ℓ: (d,) tensor} with their provenance.

    Attributes:
        vectors: {layer ℓ ≥ 0: (d,) float tensor} (read-only mapping, sorted by
            layer; the tensors are detached CPU copies).
        hidden_size: d.
        model: name of the model they belong to (free text, e.g. the config's
            ``_name_or_path``); checked on load when asked.
        method: how they were found ("fishback", "caa", …; free text).
        settings: JSON-serializable settings of that method (layer, target, ρ, …).

    Raises:
        ValueError: an empty mapping, a layer that is not an int ≥ 0, a vector
            that is not a finite floating (d,) tensor, a hidden size < 1, or
            settings that JSON cannot write.
        TypeError: model or method not a str.

    ``fisherfast.steer.steering(model, sv)`` applies them directly.
    """

    vectors: Mapping[int, torch.Tensor]
    hidden_size: int
    model: str = ""
    method: str = ""
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        d = self.hidden_size
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"hidden_size must be an int ≥ 1, got {d!r}")
        for name in ("model", "method"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("vectors must be a non-empty mapping {layer: (d,) tensor}")
        for layer in self.vectors:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"vectors: layer must be an int ≥ 0, got {layer!r}")
        clean = {}
        for layer in sorted(self.vectors):
            v = self.vectors[layer]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (d,) or not v.is_floating_point():
                raise ValueError(f"vectors[{layer}] must be a floating tensor of shape ({d},) (hidden_size), got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"vectors[{layer}] contains NaN or Inf")
            clean[layer] = v.detach().to("cpu", copy=True)
        try:
            settings = json.loads(json.dumps(dict(self.settings)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"settings must be a JSON-serializable mapping: {err}") from None
        object.__setattr__(self, "vectors", types.MappingProxyType(clean))
        object.__setattr__(self, "settings", types.MappingProxyType(settings))

    @classmethod
    def for_model(cls, model, vectors: Mapping[int, torch.Tensor], *, method: str = "",
                  settings: Mapping[str, Any] | None = None) -> "SteeringVectors":
        """Vectors for a Hugging Face ``model``: d from its output embedding, the
        name from ``config._name_or_path`` (else its model type); layers checked
        against its number of blocks L (ℓ ∈ [0, L])."""
        from fisherfast.split import decoder_blocks

        L = len(decoder_blocks(model))
        bad = [layer for layer in vectors if not isinstance(layer, int) or not 0 <= layer <= L]
        if bad:
            raise ValueError(f"vectors: layers must be ints in [0, {L}], got {bad}")
        config = model.config
        name = getattr(config, "_name_or_path", "") or config.model_type
        return cls(dict(vectors), model.get_output_embeddings().weight.shape[1], str(name), method,
                   dict(settings or {}))

    # ---------------------------------------------------------------- safetensors

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensor ``layer.<ℓ>`` per layer (the dtype kept),
        metadata {format, version, spec, hidden_size, model, method, settings (JSON)}.

        The write is atomic (a temporary file in the same folder, then a rename)
        and the file gets the mode a plain ``open`` gives (0666 less the umask;
        safetensors alone leaves 0600). An existing ``path`` is replaced."""
        from safetensors.torch import save_file

        tensors = {f"layer.{layer}": v.contiguous() for layer, v in self.vectors.items()}
        metadata = {"format": FORMAT, "version": str(VERSION), "spec": SPEC, "hidden_size": str(self.hidden_size),
                    "model": self.model, "method": self.method, "settings": json.dumps(dict(self.settings))}
        _write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, *, hidden_size: int | None = None,
             model: str | None = None) -> "SteeringVectors":
        """Read a file written by :meth:`save`. Never unpickles.

        Args:
            hidden_size: when given, the d the vectors must have.
            model: when given, the model name they must have been saved for.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: another format or version, a damaged file, tensors that
                disagree with the metadata, or a hidden size / model other than
                the expected one (naming both).
        """
        meta, tensors = read_versioned(path, FORMAT, VERSION, "steering vectors file")
        try:
            d = int(meta["hidden_size"])
            settings = json.loads(meta["settings"])
            vectors = {int(name.removeprefix("layer.")): t for name, t in tensors.items()
                       if name.startswith("layer.")}
            if len(vectors) != len(tensors):
                raise ValueError(f"unexpected tensors {sorted(set(tensors) - {f'layer.{k}' for k in vectors})}")
            saved = cls(vectors, d, meta["model"], meta["method"], settings)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} holds corrupted steering vectors: {err}") from None
        if hidden_size is not None and hidden_size != saved.hidden_size:
            raise ValueError(f"{path} holds vectors of hidden size {saved.hidden_size}; expected hidden size "
                             f"{hidden_size}")
        if model is not None and model != saved.model:
            raise ValueError(f"{path} holds vectors for model {saved.model!r}; expected model {model!r}")
        return saved

    # ---------------------------------------------------------------- llama.cpp

    def export_gguf(self, path: str | os.PathLike, *, model_hint: str | None = None) -> None:
        """Write llama.cpp's control-vector GGUF: ``direction.N`` = the layer ℓ = N + 1
        vector as float32 (see the module docstring for why N = ℓ − 1), with
        ``general.architecture = "controlvector"``, ``controlvector.model_hint``
        (``model_hint``, default :attr:`model`), ``controlvector.layer_count``
        (the number of direction tensors), and fisherfast's method and settings
        under ``fisherfast.*`` keys (ignored by llama.cpp).

        Served as ``llama-cli -m model.gguf --control-vector file.gguf`` (or
        ``--control-vector-scaled file.gguf 0.5``), llama.cpp adds the vectors
        at every position, prompt included: ``steering(..., positions="all")``.
        Written atomically with the umask mode, like :meth:`save`.

        Raises:
            ValueError: a layer ℓ ≤ 1 (no llama.cpp counterpart) — before
                anything is written.
            ModuleNotFoundError: the ``gguf`` package is missing (``pip install
                'fisherfast[models]'``).
        """
        low = [layer for layer in self.vectors if layer <= 1]
        if low:
            raise ValueError(f"layers {low} cannot be exported to a llama.cpp control vector: llama.cpp adds "
                             f"direction.N to the output of block N ≥ 1 (= fisherfast layer N + 1 ≥ 2); layer 0 "
                             f"is the embeddings and layer 1 the first block's output, which it never steers")
        try:
            import gguf
        except ModuleNotFoundError:
            raise ModuleNotFoundError("export_gguf needs the gguf package: pip install 'fisherfast[models]'") \
                from None
        import numpy as np

        def write(tmp):
            writer = gguf.GGUFWriter(tmp, arch="controlvector")
            writer.add_string("controlvector.model_hint", self.model if model_hint is None else model_hint)
            writer.add_int32("controlvector.layer_count", len(self.vectors))
            writer.add_string("fisherfast.method", self.method)
            writer.add_string("fisherfast.settings", json.dumps(dict(self.settings)))
            for layer, v in self.vectors.items():
                writer.add_tensor(f"direction.{layer - 1}", v.to(torch.float32).numpy().astype(np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        _write(path, write)
