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

lm-evaluation-harness's ``steered`` model (``lm_eval/models/hf_steered.py``)
loads a ``.pt`` file {hookpoint: {steering_vector, steering_coefficient,
action, bias, head_index}} and adds coefficient × vector to the output of the
module named ``hookpoint`` in ``model.base_model.named_modules()``, at every
position. Block N's output is fisherfast's layer ℓ = N + 1, so
:meth:`SteeringVectors.to_lm_eval` writes layer ℓ under the name of block
ℓ − 1 (``layers.{ℓ−1}`` for Llama-like models, ``h.{ℓ−1}`` for GPT-2); ℓ = 0
has no counterpart.

Model identity (:func:`model_identity`): the model type, L, d, V and a short
hash of the output head's and the first decoder block's weights, plus an
optional user-given name — the same for the same weights wherever and
however they were loaded (a local path is not part of it), so vectors travel
between machines and are refused, with the difference named, for another model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from typing import Any, Mapping

import torch

from fisherfast.checks import check_int, check_real
from fisherfast.persist import atomic_write, read_versioned

FORMAT = "fisherfast.steering_vectors"
VERSION = 1
SPEC = ("layer ℓ: ℓ < L is the input of decoder block ℓ, ℓ = L the output of the last block, ℓ = 0 the "
        "embeddings (fisherfast.split); tensor 'layer.<ℓ>' is the (d,) vector added at layer ℓ")


IDENTITY_KEYS = ("model_type", "layers", "hidden_size", "vocab_size", "weights")


def model_identity(model, name: str | None = None) -> dict:
    """A stable identity of a Hugging Face causal LM, for vector files.

    {"model_type", "layers" (L), "hidden_size" (d), "vocab_size" (V), "weights"
    (the first 16 hex digits of the SHA-256 of the output head's weight and the
    first decoder block's parameters, in name order, each rounded to bfloat16
    with its shape: the same for a float32 or bfloat16 load of one checkpoint,
    on any device), "name" (``name`` or "")}. Costs one pass over V·d + one
    block's weights (0.1 s for SmolLM2-135M on a CPU).

    Raises:
        ValueError: a model whose blocks or head cannot be found; a name that
            is not a str.
    """
    from fisherfast.split import architecture

    if name is not None and not isinstance(name, str):
        raise ValueError(f"name: expected a str or None, got {type(name).__name__}")
    arch = architecture(model)
    if arch.head is None:
        raise ValueError(f"model: {type(model).__name__} has no output head to identify it by")
    digest = hashlib.sha256()
    tensors = [("head", arch.head.weight)] + sorted(arch.blocks[0].named_parameters())
    for tname, t in tensors:
        digest.update(f"{tname}:{tuple(t.shape)};".encode())
        digest.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    V, d = arch.head.weight.shape
    return {"model_type": arch.model_type, "layers": arch.num_layers, "hidden_size": int(d), "vocab_size": int(V),
            "weights": digest.hexdigest()[:16], "name": name or ""}


def describe_identity(identity: Mapping[str, Any]) -> str:
    """One line naming a model identity: "llama L=30 d=576 V=49152 weights 1a2b… ('name')"."""
    text = (f"{identity.get('model_type')} L={identity.get('layers')} d={identity.get('hidden_size')} "
            f"V={identity.get('vocab_size')} weights {identity.get('weights')}")
    return text + (f" ({identity['name']!r})" if identity.get("name") else "")


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
        model: name of the model they belong to (free text: a user-given name,
            else its model type); checked on load when asked.
        method: how they were found ("fishback", "caa", …; free text).
        settings: JSON-serializable settings of that method (layer, target, ρ,
            a calibration record under "calibration", …).
        identity: the model's :func:`model_identity` ({} when unknown);
            ``load(path, model=<the model>)`` checks it.

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
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        d = self.hidden_size
        check_int("hidden_size", d, minimum=1)
        for name in ("model", "method"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("vectors: expected a non-empty mapping {layer: (d,) tensor}")
        for layer in self.vectors:
            check_int("vectors: layer", layer, minimum=0)
        clean = {}
        for layer in sorted(self.vectors):
            v = self.vectors[layer]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (d,) or not v.is_floating_point():
                raise ValueError(f"vectors[{layer}]: expected a floating tensor of shape ({d},) (hidden_size), got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"vectors[{layer}] contains NaN or Inf")
            clean[layer] = v.detach().to("cpu", copy=True)
        try:
            settings = json.loads(json.dumps(dict(self.settings)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"settings: expected a JSON-serializable mapping, got one that is not ({err})") from None
        identity = dict(self.identity)
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if identity and missing:
            raise ValueError(f"identity: expected empty or a model_identity() with {IDENTITY_KEYS}, got one missing {missing}")
        if identity and identity["hidden_size"] != d:
            raise ValueError(f"identity names hidden size {identity['hidden_size']}; the vectors have {d}")
        object.__setattr__(self, "vectors", types.MappingProxyType(clean))
        object.__setattr__(self, "settings", types.MappingProxyType(settings))
        object.__setattr__(self, "identity", types.MappingProxyType(json.loads(json.dumps(identity))))

    @classmethod
    def for_model(cls, model, vectors: Mapping[int, torch.Tensor], *, method: str = "",
                  settings: Mapping[str, Any] | None = None, name: str | None = None) -> "SteeringVectors":
        """Vectors for a Hugging Face ``model``: its :func:`model_identity` (never
        a local path), d from its head, :attr:`model` = ``name`` (else its
        model type); layers checked against its number of blocks L (ℓ ∈ [0, L])."""
        identity = model_identity(model, name)
        L = identity["layers"]
        bad = [layer for layer in vectors if not isinstance(layer, int) or not 0 <= layer <= L]
        if bad:
            raise ValueError(f"vectors: expected layers in [0, {L}], got {bad}")
        return cls(dict(vectors), identity["hidden_size"], name or identity["model_type"], method,
                   dict(settings or {}), identity)

    def check_model(self, model) -> None:
        """Raise ValueError, naming both, when ``model`` is not the model these
        vectors were made for (its :func:`model_identity`: type, sizes, weights;
        the user-given name is not compared). Vectors without an identity
        (older files) are checked for their hidden size only."""
        have = model_identity(model)
        if not self.identity:
            if have["hidden_size"] != self.hidden_size:
                raise ValueError(f"these vectors have hidden size {self.hidden_size}; the model has "
                                 f"{have['hidden_size']}")
            return
        differ = [k for k in IDENTITY_KEYS if self.identity[k] != have[k]]
        if differ:
            what = ("other weights (another checkpoint or a fine-tune of it)" if differ == ["weights"]
                    else "a different " + ", ".join(differ))
            raise ValueError(f"vectors made for {describe_identity(self.identity)}; this model is "
                             f"{describe_identity(have)}: {what}")

    # ---------------------------------------------------------------- safetensors

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensor ``layer.<ℓ>`` per layer (the dtype kept),
        metadata {format, version, spec, hidden_size, model, method, settings
        (JSON), identity (JSON)}.

        The write is atomic (a temporary file in the same folder, then a rename)
        and the file gets the mode a plain ``open`` gives (0666 less the umask;
        safetensors alone leaves 0600). An existing ``path`` is replaced."""
        from safetensors.torch import save_file

        tensors = {f"layer.{layer}": v.contiguous() for layer, v in self.vectors.items()}
        metadata = {"format": FORMAT, "version": str(VERSION), "spec": SPEC, "hidden_size": str(self.hidden_size),
                    "model": self.model, "method": self.method, "settings": json.dumps(dict(self.settings)),
                    "identity": json.dumps(dict(self.identity))}
        _write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, *, hidden_size: int | None = None,
             model=None) -> "SteeringVectors":
        """Read a file written by :meth:`save`. Never unpickles.

        Args:
            hidden_size: when given, the d the vectors must have.
            model: when given, the model they must have been saved for: a
                Hugging Face model (its :func:`model_identity` is checked, see
                :meth:`check_model`) or a name (compared with :attr:`model`).

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
            identity = json.loads(meta.get("identity", "{}"))  # absent from files of earlier fisherfast versions
            saved = cls(vectors, d, meta["model"], meta["method"], settings, identity)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} holds corrupted steering vectors: {err}") from None
        if hidden_size is not None and hidden_size != saved.hidden_size:
            raise ValueError(f"{path} holds vectors of hidden size {saved.hidden_size}; expected hidden size "
                             f"{hidden_size}")
        if isinstance(model, str) and model != saved.model:
            raise ValueError(f"{path} holds vectors for model {saved.model!r}; expected model {model!r}")
        if model is not None and not isinstance(model, str):
            try:
                saved.check_model(model)
            except ValueError as err:
                raise ValueError(f"{path} holds {err}") from None
        return saved

    # ---------------------------------------------------------------- llama.cpp

    def export_gguf(self, path: str | os.PathLike, *, model_hint: str | None = None) -> None:
        """Write llama.cpp's control-vector GGUF: ``direction.N`` = the layer ℓ = N + 1
        vector as float32 (see the module docstring for why N = ℓ − 1), with
        ``general.architecture = "controlvector"``, ``controlvector.model_hint``
        (``model_hint``, default :attr:`model`), ``controlvector.layer_count``
        (the number of direction tensors), and fisherfast's method, settings
        and model identity under ``fisherfast.*`` keys (ignored by llama.cpp).

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
            writer.add_string("fisherfast.identity", json.dumps(dict(self.identity)))
            for layer, v in self.vectors.items():
                writer.add_tensor(f"direction.{layer - 1}", v.to(torch.float32).numpy().astype(np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        _write(path, write)

    # ---------------------------------------------------------------- lm-evaluation-harness

    def to_lm_eval(self, path: str | os.PathLike, model=None, *, coefficient: float = 1.0,
                   hookpoint: str = "layers.{block}") -> None:
        """Write lm-evaluation-harness's ``steered`` file (``torch.save`` of plain
        tensors, floats and strings; loads with ``weights_only=True``)::

            {hookpoint: {"steering_vector": (d,) tensor, "steering_coefficient": coefficient,
                         "action": "add", "bias": None, "head_index": None}}

        one entry per layer ℓ ≥ 1 (the vector in its own dtype; lm-eval casts it
        to the model's), hooked on the output of block ℓ − 1 and added at every
        position: ``lm_eval --model steered --model_args
        pretrained=...,steer_path=file.pt`` scores the model as
        ``steering(model, self, positions="all", scale=coefficient)`` runs it.

        Args:
            model: the Hugging Face model; when given, each hookpoint is the name
                lm-eval resolves for block ℓ − 1 (its path in
                ``model.base_model.named_modules()``) and the vectors are
                checked against the model (:meth:`check_model`).
            coefficient: lm-eval's steering_coefficient (a finite float).
            hookpoint: without ``model``, the name pattern of block ``{block}``
                = ℓ − 1 ("layers.{block}" for Llama-like models, "h.{block}"
                for GPT-2).

        Raises:
            ValueError: layer 0 (the embeddings: no block output), a
                coefficient that is not a finite number, a pattern without
                ``{block}``, vectors for another model — before anything is written.
        """
        if 0 in self.vectors:
            raise ValueError("layer 0 (the embeddings) cannot be exported to lm-eval: it steers block outputs, "
                             "layer ℓ = the output of block ℓ − 1, ℓ ≥ 1")
        check_real("coefficient", coefficient)
        if model is not None:
            from fisherfast.split import architecture

            self.check_model(model)
            names = {id(m): name for name, m in model.base_model.named_modules()}
            blocks = architecture(model).blocks
            if any(layer > len(blocks) for layer in self.vectors):
                raise ValueError(f"layers {sorted(self.vectors)} past the model's L = {len(blocks)}")
            points = {layer: names[id(blocks[layer - 1])] for layer in self.vectors}
        else:
            if "{block}" not in hookpoint:
                raise ValueError(f"hookpoint must contain '{{block}}', got {hookpoint!r}")
            points = {layer: hookpoint.format(block=layer - 1) for layer in self.vectors}
        config = {points[layer]: {"steering_vector": v.clone(),
                                  "steering_coefficient": float(coefficient), "action": "add", "bias": None,
                                  "head_index": None}
                  for layer, v in self.vectors.items()}
        _write(path, lambda tmp: torch.save(config, tmp))
