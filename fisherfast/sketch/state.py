"""Streaming FisherSketch state: running sums and sums of squares of the
features, mergeable exactly across shards (docs/design.md §7).

Kinds: the three second-moment sketches (joint, activation, error) and,
from state file version 2, the first moment "mean": φ_j(g) = (r_jᵃ·a)(r_jᵉ·e)/√m,
whose running mean sketches the mean head gradient ḡ = E[e ⊗ a]
(E[φ(g)·φ(g′)] = g·g′ over the projections). Files of version 1 (before the
first moment) still load, without the "mean" kind."""
from __future__ import annotations

import os

import torch

from fisherfast.checks import check_int
from fisherfast.persist import atomic_write, read_versioned
from fisherfast.sketch.spec import SKETCH_VERSION, SketchSpec

KINDS = ("joint", "activation", "error")  # the second-moment sketches (the fused op's three rows)
MEAN = "mean"  # the first moment: a random projection of the mean head gradient
ALL_KINDS = (*KINDS, MEAN)
FORMAT = "fisherfast.sketch.state"
STATE_VERSIONS = (1, 2)  # file versions read: 1 = the three kinds; 2 = optionally the first moment too
STATE_VERSION = 2  # the file version written


def read_state_file(path: str | os.PathLike, fmt: str,
                    versions: tuple[int, ...] = (SKETCH_VERSION,)) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a sketch file of format ``fmt`` at one of ``versions``
    (``fisherfast.persist.read_versioned``; an unknown version names the newest)."""
    version = _file_version(path)
    return read_versioned(path, fmt, version if version in versions else max(versions), "sketch state")


def _file_version(path) -> int | None:
    """The metadata's version of a safetensors file, or None (unreadable: read_versioned says why)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return int((f.metadata() or {}).get("version"))
    except Exception:  # any unreadable header or version: left to read_versioned's messages
        return None


def check_sum_buffers(path, tensors: dict[str, torch.Tensor], names: set[str], m: int, count: int) -> None:
    """Raise ValueError naming ``path`` unless ``tensors`` are exactly ``names``, each
    finite float64 of shape (m,), sums of squares ("sumsq…") non-negative, count ≥ 0."""
    if set(tensors) != names:
        raise ValueError(f"{path} is corrupted: tensors {sorted(tensors)}, expected {sorted(names)}")
    for name, t in tensors.items():
        if t.dtype != torch.float64 or tuple(t.shape) != (m,) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path} is corrupted: {name} must be finite float64 of shape ({m},)")
    if count < 0 or any(bool((t < 0).any()) for name, t in tensors.items() if name.startswith("sumsq")):
        raise ValueError(f"{path} is corrupted: negative count or sum of squares")


def check_nonempty(argument: str, names, states) -> None:
    """Raise ValueError naming ``argument`` and the states (by ``names``) that hold no samples."""
    empty = [name for name, state in zip(names, states) if state.count == 0]
    if empty:
        raise ValueError(f"{argument}: expected at least one sample in every state, got none in {empty}")


def _check_kind(kind: str) -> None:
    if kind not in ALL_KINDS:
        raise ValueError(f"kind: expected one of {ALL_KINDS}, got {kind!r}")


class SketchState:
    """Per kind (joint, activation, error and, when sketched, the first moment
    "mean"): Σψ and Σψ² over samples (float64, (m,)) and the sample count n.
    ``signature = Σψ / n``; states add exactly.

    Args:
        spec: the SketchSpec the features were drawn under.
        count: number of samples n.
        sums, sumsqs: {kind: (m,) float64} with keys KINDS, or ALL_KINDS with the
            first moment; zeros when omitted.
        device: where zero buffers are allocated (default CPU).
        mean: with sums omitted, whether the zero state holds the first moment (default True).
    """

    def __init__(self, spec: SketchSpec, count: int = 0, sums: dict | None = None, sumsqs: dict | None = None,
                 device=None, mean: bool = True):
        if not isinstance(spec, SketchSpec):
            raise TypeError(f"spec: expected a SketchSpec, got {type(spec).__name__}")
        count = check_int("count", count, minimum=0)
        self.spec, self.count = spec, count
        kinds = ALL_KINDS if mean else KINDS
        self.sums = self._buffers("sums", sums, device, kinds)
        self.sumsqs = self._buffers("sumsqs", sumsqs, device, kinds)
        if set(self.sums) != set(self.sumsqs):
            raise ValueError("sums and sumsqs must hold the same kinds")

    @property
    def has_mean(self) -> bool:
        """Whether the state holds the first moment (False for files of version 1)."""
        return MEAN in self.sums

    @property
    def kinds(self) -> tuple[str, ...]:
        return ALL_KINDS if self.has_mean else KINDS

    def _buffers(self, name: str, given: dict | None, device, kinds) -> dict[str, torch.Tensor]:
        if given is None:
            return {kind: torch.zeros(self.spec.m, dtype=torch.float64, device=device) for kind in kinds}
        if not isinstance(given, dict) or set(given) not in (set(KINDS), set(ALL_KINDS)):
            raise ValueError(f"{name}: expected a dict with keys {KINDS} or {ALL_KINDS}")
        for kind, t in given.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or tuple(t.shape) != (self.spec.m,):
                raise ValueError(f"{name}[{kind!r}] must be a float64 tensor of shape (m = {self.spec.m},)")
        return dict(given)

    # -- algebra -------------------------------------------------------------------------------------------------
    def merge(self, other: "SketchState") -> "SketchState":
        """Exact, order-independent merge of two shards (sums add). Specs must match."""
        if not isinstance(other, SketchState):
            raise TypeError(f"can only merge a SketchState, got {type(other).__name__}")
        if other.spec != self.spec:
            raise ValueError(f"cannot merge states of different specs: {self.spec} vs {other.spec}")
        if other.has_mean != self.has_mean:
            raise ValueError("cannot merge a state with the first moment and one without (a version-1 file); "
                             "drop it from the other with .without_mean()")
        device = self.sums["joint"].device
        return SketchState(self.spec, self.count + other.count,
                           {k: self.sums[k] + other.sums[k].to(device) for k in self.kinds},
                           {k: self.sumsqs[k] + other.sumsqs[k].to(device) for k in self.kinds})

    def without_mean(self) -> "SketchState":
        """The same state without the first moment (to merge with a version-1 state)."""
        return SketchState(self.spec, self.count, {k: self.sums[k] for k in KINDS},
                           {k: self.sumsqs[k] for k in KINDS})

    __add__ = merge

    def as_tensor(self) -> torch.Tensor:
        """(6, m) float64 (or (8, m) with the first moment): sums of (joint, activation,
        error[, mean]), then their sums of squares (e.g. for one torch.distributed all-reduce)."""
        return torch.stack([self.sums[k] for k in self.kinds] + [self.sumsqs[k] for k in self.kinds])

    @classmethod
    def from_tensor(cls, spec: SketchSpec, count: int, buffers: torch.Tensor) -> "SketchState":
        """Inverse of :meth:`as_tensor`."""
        if not isinstance(buffers, torch.Tensor) or buffers.dim() != 2 \
                or tuple(buffers.shape) not in ((2 * len(KINDS), spec.m), (2 * len(ALL_KINDS), spec.m)) \
                or buffers.dtype != torch.float64:
            raise ValueError(f"buffers: expected a float64 tensor of shape (6 or 8, m = {spec.m})")
        kinds = KINDS if buffers.shape[0] == 2 * len(KINDS) else ALL_KINDS
        n = len(kinds)
        return cls(spec, count, {k: buffers[i].clone() for i, k in enumerate(kinds)},
                   {k: buffers[n + i].clone() for i, k in enumerate(kinds)})

    def to(self, device) -> "SketchState":
        return SketchState(self.spec, self.count, {k: v.to(device) for k, v in self.sums.items()},
                           {k: v.to(device) for k, v in self.sumsqs.items()})

    # -- statistics ----------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the float64 buffers: 3 kinds (4 with the first moment) × (sum, sumsq) × 8 B × m
        (196,608 at m = 4096; 262,144 with the first moment)."""
        return sum(t.numel() * t.element_size() for t in (*self.sums.values(), *self.sumsqs.values()))

    def _need_samples(self, at_least: int) -> None:
        if self.count < at_least:
            raise ValueError(f"the state holds {self.count} samples; need at least {at_least}")

    def _need_kind(self, kind: str) -> None:
        _check_kind(kind)
        if kind not in self.sums:
            raise ValueError("this state has no first moment (kind 'mean'): it was saved before version 2 "
                             "or built without it")

    def signature(self, kind: str = "joint") -> torch.Tensor:
        """μ = Σψ / n as float32 (m,): the 16 KB signature at m = 4096."""
        self._need_kind(kind)
        self._need_samples(1)
        return (self.sums[kind] / self.count).float()

    def variance(self, kind: str = "joint") -> torch.Tensor:
        """Per-feature sample variance (Σψ² − nμ²)/(n − 1), float64 (m,)."""
        self._need_kind(kind)
        self._need_samples(2)
        n = self.count
        return ((self.sumsqs[kind] - self.sums[kind].square() / n) / (n - 1)).clamp_(min=0)

    def stderr(self, kind: str = "joint") -> torch.Tensor:
        """Standard error of each signature coordinate over the samples, √(variance / n), float64 (m,).

        This is the sampling part only: for fixed projections each coordinate is
        a mean over samples. The random projections' error enters quantities
        built from many coordinates (inner products, norms, alignments); their
        standard errors, with both parts, come from ``alignment`` (jackknife
        over the features)."""
        return (self.variance(kind) / self.count).sqrt()

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically, with the umask's permissions); spec, version and count go in
        the metadata."""
        from safetensors.torch import save_file

        tensors = {f"sum.{k}": self.sums[k].detach().cpu().contiguous() for k in self.kinds}
        tensors.update({f"sumsq.{k}": self.sumsqs[k].detach().cpu().contiguous() for k in self.kinds})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
            "format": FORMAT, "version": str(STATE_VERSION), "spec": self.spec.to_json(), "count": str(self.count)}))

    @classmethod
    def load(cls, path: str | os.PathLike, spec: SketchSpec | None = None, device=None) -> "SketchState":
        """Read a file written by :meth:`save`. With ``spec``, the file's spec must equal it.

        Reads file versions 1 (no first moment) and 2. Raises ValueError for a
        file of another format, version or spec, or a corrupted one;
        FileNotFoundError when absent. Never unpickles."""
        meta, tensors = read_state_file(path, FORMAT, STATE_VERSIONS)
        try:
            file_spec = SketchSpec.from_json(meta["spec"])
            count = int(meta["count"])
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} has a corrupted sketch header: {err}") from None
        if spec is not None and file_spec != spec:
            raise ValueError(f"{path} was sketched under {file_spec}, expected {spec}")
        kinds = ALL_KINDS if meta["version"] != "1" and f"sum.{MEAN}" in tensors else KINDS
        check_sum_buffers(path, tensors, {f"{part}.{k}" for part in ("sum", "sumsq") for k in kinds}, file_spec.m,
                          count)
        return cls(file_spec, count, {k: tensors[f"sum.{k}"].to(device) for k in kinds},
                   {k: tensors[f"sumsq.{k}"].to(device) for k in kinds})

    def __repr__(self) -> str:
        return f"SketchState({self.spec}, count={self.count}{'' if self.has_mean else ', no first moment'})"
