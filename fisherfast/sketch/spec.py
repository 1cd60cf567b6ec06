"""The spec of a FisherSketch: everything that fixes its random structure (docs/design.md §7)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

from fisherfast.checks import check_int, expected
from fisherfast.ops import SRHTPlan

SKETCH_VERSION = 1
PLAN_NAMES = ("ra", "sa", "re", "se")  # activation side r, s; error side r, s


@dataclasses.dataclass(frozen=True)
class SketchSpec:
    """(d, K, m, seed, version) → the four SRHT plans of a FisherSketch.

    Activation side rᵃ, sᵃ = SRHTPlan(d, m, ·), error side rᵉ, sᵉ = SRHTPlan(K, m, ·),
    with four independent seeds derived from ``seed`` and ``version`` by SHA-256.
    Two states or signatures are comparable only under equal specs.

    Args:
        d: head input dimension (hidden size).
        K: number of classes (vocabulary size, or the verbalizer's label count).
        m: number of features; the signature is m float32 (16 KB at m = 4096).
        seed: non-negative int.
        version: the sketch construction version (only 1 exists).
    """

    d: int
    K: int
    m: int = 4096
    seed: int = 0
    version: int = SKETCH_VERSION

    def __post_init__(self):
        check_int("d", self.d, minimum=1)
        check_int("K", self.K, minimum=2)
        check_int("m", self.m, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.version != SKETCH_VERSION:
            raise ValueError(expected("version", f"{SKETCH_VERSION} (the only sketch construction)", self.version))

    def plan_seeds(self) -> tuple[int, int, int, int]:
        """The four plan seeds (ra, sa, re, se), independent 56-bit hashes of (version, seed, name)."""
        return tuple(
            int.from_bytes(hashlib.sha256(f"fisherfast.sketch/v{self.version}/{self.seed}/{name}".encode()).digest()[:7],
                           "little")
            for name in PLAN_NAMES)

    def plans(self) -> tuple[SRHTPlan, SRHTPlan, SRHTPlan, SRHTPlan]:
        """(ra, sa, re, se); built once per spec and cached."""
        return _plans(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SketchSpec":
        fields = json.loads(text)
        if not isinstance(fields, dict) or set(fields) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"not a SketchSpec: {text!r}")
        return cls(**fields)


@functools.lru_cache(maxsize=16)
def _plans(spec: SketchSpec):
    ra, sa, re, se = spec.plan_seeds()
    return (SRHTPlan(spec.d, spec.m, ra), SRHTPlan(spec.d, spec.m, sa), SRHTPlan(spec.K, spec.m, re),
            SRHTPlan(spec.K, spec.m, se))
