"""Full-network FisherSketch: random features of per-sample gradients of every
linear layer from forward/backward hooks (docs/design.md §7, last bullet).

For a linear layer z_t = W a_t (+ b) applied at positions t, the per-sample
gradient of a loss L_x is G = Σ_t δ_t a_tᵀ with δ_t = ∂L_x/∂z_t (and Σ_t δ_t
for b, i.e. a_t augmented with a constant 1). With a factorized random vector
r = rᵃ ⊗ rᵟ per layer and independent layers,

    r·g = Σ_layers Σ_t (rᵃ·a_t)(rᵟ·δ_t),

and the degree-2 feature ψ_j(g) = (r_j·g)(s_j·g)/√m satisfies E[ψ(g)·ψ(g′)] =
(g·g′)², so mean_x ψ sketches the empirical Fisher (1/n) Σ_x g gᵀ of all the
hooked parameters at once. The projections are SRHTs (one spec (d_in[+1],
d_out) per layer, plans ``spec.plans()``); per-sample gradients are never
formed: only a_t (saved by the forward hook) and δ_t (from one backward pass of
Σ_x L_x w.r.t. the layer outputs) are touched. Samples in a batch must be
independent (no batch-coupled layers), so that ∂(Σ_x L_x)/∂z_t of sample x is
∂L_x/∂z_t.

Cost per batch: one backward pass to the hooked outputs plus, per layer,
4 SRHTs of every position's a_t and δ_t (⌈m/N⌉ FWHTs of size N = 2^⌈log₂n⌉
each), and B·T·m multiply-adds per projection.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os

import torch
from torch import nn

from fisherfast.checks import check_int
from fisherfast.persist import atomic_write
from fisherfast.ops import srht
from fisherfast.sketch.spec import SKETCH_VERSION, SketchSpec
from fisherfast.sketch.state import check_sum_buffers, read_state_file

FORMAT = "fisherfast.sketch.fullnet_state"

try:  # GPT-2's Conv1D: y = x W + b with W stored (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional
    Conv1D = None


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a supported linear layer, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def layer_seed(seed: int, name: str) -> int:
    """Seed of a layer's spec: a hash of (seed, layer name), so layers get
    independent random structure (cross-layer terms then vanish in expectation)."""
    digest = hashlib.sha256(f"fisherfast.fullnet:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every torch.nn.Linear and transformers Conv1D in ``model``, by qualified name."""
    return [(name, module) for name, module in model.named_modules() if _linear_shape(module) is not None]


class FullNetworkSketcher:
    """Degree-2 random features of the full per-sample gradient over linear layers.

    Args:
        model: any torch module; its nn.Linear / Conv1D layers are hooked.
        m: number of features.
        seed: base seed; layer ``name`` gets ``SketchSpec(d_in(+1), d_out, m,
            layer_seed(seed, name))``.
        layers: qualified names of the layers to include (default: all linear
            layers). A layer with a bias has d_in + 1 (its input augmented by 1).

    Usage::

        sketcher = FullNetworkSketcher(model, m=4096)
        with sketcher.capture():
            losses = per_sample_losses(model(batch))   # (B,), independent samples
            sketcher.update(losses)
        state = sketcher.state

    ``capture()`` makes the hooked weights require grad for its duration (so
    the layer outputs join the autograd graph) and restores the flags on exit;
    ``update`` differentiates only w.r.t. the layer outputs, so no ``.grad`` is
    ever written.
    """

    def __init__(self, model: nn.Module, *, m: int = 4096, seed: int = 0, layers: list[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        m, seed = check_int("m", m, minimum=1), check_int("seed", seed, minimum=0)
        found = dict(linear_layers(model))
        if layers is None:
            names = list(found)
        else:
            names = list(layers)
            unknown = [name for name in names if name not in found]
            if unknown:
                raise ValueError(f"layers must name nn.Linear/Conv1D modules of model, got {unknown}; "
                                 f"linear layers are e.g. {list(found)[:5]}")
        if not names:
            raise ValueError("model has no nn.Linear or Conv1D layer to sketch")
        self.model, self.m, self.seed = model, m, seed
        self.modules = {name: found[name] for name in names}
        self.specs: dict[str, SketchSpec] = {}
        for name, module in self.modules.items():
            d_in, d_out = _linear_shape(module)
            has_bias = getattr(module, "bias", None) is not None
            self.specs[name] = SketchSpec(d=d_in + has_bias, K=d_out, m=m, seed=layer_seed(seed, name))
        self._plans = {name: spec.plans() for name, spec in self.specs.items()}
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._capturing = False
        self.state = FullNetworkState(self.specs)

    @contextlib.contextmanager
    def capture(self):
        """Hook the layers (forward: keep a_t and z_t) and let their outputs carry grad."""
        flags = {name: module.weight.requires_grad for name, module in self.modules.items()}
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        self._records = {name: [] for name in self.modules}
        self._capturing = True
        try:
            for module in self.modules.values():
                module.weight.requires_grad_(True)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for name, module in self.modules.items():
                module.weight.requires_grad_(flags[name])
            self._records = {}
            self._capturing = False

    def _hook(self, name: str):
        def hook(module, inputs, output):
            a = inputs[0].detach()
            if getattr(module, "bias", None) is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            self._records[name].append((a, output))
        return hook

    def features(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r·g, s·g) per sample, each (B, m) float64, for the per-sample losses
        of the forward passes captured since the last call."""
        if not self._capturing:
            raise RuntimeError("features/update must run inside `with sketcher.capture():`")
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            raise ValueError(f"losses: expected a 1-D floating tensor of per-sample losses, got "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        if not losses.requires_grad:
            raise ValueError("losses: expected losses computed inside capture() from the model's outputs, got a tensor with no grad graph")
        records = [(name, a, z) for name, recs in self._records.items() for a, z in recs]
        if not records:
            raise RuntimeError("no hooked layer ran since the last update; run the model inside capture()")
        B = losses.shape[0]
        for name, a, z in records:
            if a.shape[0] != B:
                raise ValueError(f"layer {name!r} saw a batch of {a.shape[0]}, losses has {B} samples; "
                                 f"inputs must be batch-first")
        deltas = torch.autograd.grad(losses.sum(), [z for _, _, z in records], allow_unused=True)
        rg = losses.new_zeros(B, self.m, dtype=torch.float64)
        sg = torch.zeros_like(rg)
        for (name, a, _), delta in zip(records, deltas):
            if delta is None:  # the layer does not reach the loss: zero gradient
                continue
            ra, sa, rd, sd = self._plans[name]
            a2, d2 = a.reshape(B, -1, a.shape[-1]), delta.detach().reshape(B, -1, delta.shape[-1])
            # Σ_t (rᵃ·a_t)(rᵟ·δ_t) per sample (docs/design.md §7), features in float32, sums in float64
            rg += torch.einsum("btm,btm->bm", srht(a2, ra), srht(d2, rd)).double()
            sg += torch.einsum("btm,btm->bm", srht(a2, sa), srht(d2, sd)).double()
        for recs in self._records.values():
            recs.clear()
        return rg, sg

    def update(self, losses: torch.Tensor) -> None:
        """Add ψ = (r·g)(s·g)/√m of every sample to the running state."""
        rg, sg = self.features(losses)
        psi = rg * sg / math.sqrt(self.m)
        self.state = self.state.merge(FullNetworkState(self.specs, psi.shape[0], psi.sum(0), psi.square().sum(0)))


class FullNetworkState:
    """Σψ, Σψ² (float64 (m,)) and the count n of full-network features, under
    per-layer specs ``specs`` ({layer name: SketchSpec}). States with equal
    specs merge exactly (sums add); ``signature() = Σψ / n`` feeds
    :func:`fisherfast.sketch.alignment` like a head signature."""

    def __init__(self, specs: dict[str, SketchSpec], count: int = 0, sum: torch.Tensor | None = None,
                 sumsq: torch.Tensor | None = None):
        if not isinstance(specs, dict) or not specs or not all(
                isinstance(name, str) and isinstance(spec, SketchSpec) for name, spec in specs.items()):
            raise TypeError("specs: expected a non-empty dict {layer name: SketchSpec}")
        ms = {spec.m for spec in specs.values()}
        if len(ms) != 1:
            raise ValueError(f"every layer's spec must share one m, got {sorted(ms)}")
        count = check_int("count", count, minimum=0)
        m = ms.pop()
        self.specs, self.count = dict(specs), count
        self.sum = torch.zeros(m, dtype=torch.float64) if sum is None else sum
        self.sumsq = torch.zeros(m, dtype=torch.float64) if sumsq is None else sumsq
        for name, t in (("sum", self.sum), ("sumsq", self.sumsq)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or tuple(t.shape) != (m,):
                raise ValueError(f"{name}: expected a float64 tensor of shape (m = {m},)")

    @property
    def m(self) -> int:
        return self.sum.numel()

    def specs_json(self) -> str:
        """The layer specs as canonical JSON {name: spec fields} (sorted keys)."""
        return json.dumps({name: json.loads(spec.to_json()) for name, spec in self.specs.items()}, sort_keys=True)

    def fingerprint(self) -> int:
        """A 62-bit hash of :meth:`specs_json`: equal for equal specs (used to check ranks agree)."""
        return int.from_bytes(hashlib.sha256(self.specs_json().encode()).digest()[:8], "little") >> 2

    def merge(self, other: "FullNetworkState") -> "FullNetworkState":
        if not isinstance(other, FullNetworkState):
            raise TypeError(f"can only merge a FullNetworkState, got {type(other).__name__}")
        if other.specs != self.specs:
            raise ValueError("cannot merge full-network states of different layers or specs")
        return FullNetworkState(self.specs, self.count + other.count, self.sum + other.sum.to(self.sum.device),
                                self.sumsq + other.sumsq.to(self.sum.device))

    __add__ = merge

    def signature(self) -> torch.Tensor:
        """μ = Σψ / n as float32 (m,)."""
        if self.count < 1:
            raise ValueError("the state holds no samples")
        return (self.sum / self.count).float()

    def stderr(self) -> torch.Tensor:
        """Standard error of each signature coordinate, √((Σψ² − nμ²)/((n − 1) n)), float64 (m,)."""
        if self.count < 2:
            raise ValueError(f"the state holds {self.count} samples; need at least 2")
        n = self.count
        return ((self.sumsq - self.sum.square() / n).clamp(min=0) / ((n - 1) * n)).sqrt()

    def as_tensor(self) -> torch.Tensor:
        """(2, m) float64: Σψ then Σψ² (e.g. for one torch.distributed all-reduce)."""
        return torch.stack([self.sum, self.sumsq])

    @classmethod
    def from_tensor(cls, specs: dict[str, SketchSpec], count: int, buffers: torch.Tensor) -> "FullNetworkState":
        """Inverse of :meth:`as_tensor`."""
        return cls(specs, count, buffers[0].clone(), buffers[1].clone())

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically, with the umask's permissions); the layer specs, version and
        count go in the metadata."""
        from safetensors.torch import save_file

        tensors = {"sum": self.sum.detach().cpu().contiguous(), "sumsq": self.sumsq.detach().cpu().contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
            "format": FORMAT, "version": str(SKETCH_VERSION), "specs": self.specs_json(), "count": str(self.count)}))

    @classmethod
    def load(cls, path: str | os.PathLike, specs: dict[str, SketchSpec] | None = None,
             device=None) -> "FullNetworkState":
        """Read a file written by :meth:`save`. With ``specs`` (e.g. ``sketcher.specs``),
        the file's layer specs must equal them.

        Raises ValueError for a file of another format, version or specs, or a
        corrupted one; FileNotFoundError when absent. Never unpickles."""
        meta, tensors = read_state_file(path, FORMAT)
        try:
            file_specs = {name: SketchSpec.from_json(json.dumps(fields))
                          for name, fields in json.loads(meta["specs"]).items()}
            count = int(meta["count"])
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} has a corrupted full-network sketch header: {err}") from None
        if not file_specs or len({spec.m for spec in file_specs.values()}) != 1:
            raise ValueError(f"{path} has a corrupted full-network sketch header: layers must share one m")
        if specs is not None and file_specs != specs:
            differ = sorted(name for name in set(file_specs) | set(specs) if file_specs.get(name) != specs.get(name))
            raise ValueError(f"{path} was sketched under other layer specs than expected; {len(differ)} layers "
                             f"differ, e.g. {differ[:4]}")
        m = next(iter(file_specs.values())).m
        check_sum_buffers(path, tensors, {"sum", "sumsq"}, m, count)
        return cls(file_specs, count, tensors["sum"].to(device), tensors["sumsq"].to(device))

    def __repr__(self) -> str:
        return f"FullNetworkState({len(self.specs)} layers, m={self.sum.numel()}, count={self.count})"
