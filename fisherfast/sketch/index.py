"""A signature index: many domains' FisherSketch signatures under one spec,
queried by head-Fisher alignment (docs/design.md §7; issue 21).

Each domain is one row of a matrix per kind: its signatures μ (float32, (m,))
of the joint, activation, error and first-moment ("mean") sketches and, when
added from a state, the sampling variance of each coordinate of μ,
Var μ_f = s_f² / n (float32), from which the sampling part of the error bars
comes. A domain added from a bare joint signature has only its joint row
(the others are NaN) and gets the projection part of the error bar only. The
NaN rows are each domain's availability (``kinds``, ``has_variances``), saved
with it: every domain is scored with what it holds, whatever the others hold.

``query(target, k)`` computes the alignment A of the target with every
domain at once (one matrix-vector product over the joint matrix, N·m
multiply-adds), takes the k largest, and scores those k exactly as
``rank_sources`` does (A, S_a, S_e, ρ and the first-moment cosine G, each
± its standard error: projection jackknife plus sampling delta method) from
states rebuilt from the stored μ and Var μ (sums nμ, sums of squares
n(n−1)Var μ + nμ², exact up to the float32 storage). Domains whose alignment
is undefined (a zero joint signature) rank after every defined one.

Size: 8·4·m bytes per domain from a state (128 KB at m = 4096), 4·4·m with
``variances=False`` (no sampling error bars), 4·m from a bare signature.
Files: safetensors, format "fisherfast.sketch.index" version 1, the spec and
the names in the metadata, checked on load; written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from fisherfast.checks import check_int
from fisherfast.persist import atomic_write, read_versioned
from fisherfast.sketch.select import SourceScore, rank_sources
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import ALL_KINDS, KINDS, MEAN, SketchState

FORMAT = "fisherfast.sketch.index"
INDEX_VERSION = 1


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"name: expected a non-empty string without surrounding spaces, got {name!r}")
    return name


class SignatureIndex:
    """Signatures of many domains under one SketchSpec, queried top-k by alignment.

    Args:
        spec: the SketchSpec every added state or signature was sketched under.
        variances: store each domain's Var μ (sampling error bars; doubles the size).
    """

    def __init__(self, spec: SketchSpec, *, variances: bool = True):
        if not isinstance(spec, SketchSpec):
            raise TypeError(f"spec: expected a SketchSpec, got {type(spec).__name__}")
        if not isinstance(variances, bool):
            raise TypeError(f"variances: expected a bool, got {type(variances).__name__}")
        self.spec, self.variances = spec, variances
        self._names: list[str] = []
        self._positions: dict[str, int] = {}
        self._counts: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {k: [] for k in self._tensor_names()}
        self._matrices: dict[str, torch.Tensor] | None = None  # stacked rows, rebuilt after an add
        self._joint_norms: torch.Tensor | None = None

    def _tensor_names(self) -> list[str]:
        return [f"mu.{k}" for k in ALL_KINDS] + ([f"var.{k}" for k in ALL_KINDS] if self.variances else [])

    # -- building ----------------------------------------------------------------------------------------------
    def add(self, name: str, item: SketchState | torch.Tensor) -> None:
        """Append a domain: a SketchState (all kinds it holds, with Var μ) or a joint
        signature tensor (m,) (e.g. ``state.signature()``).

        Raises ValueError for a duplicate or empty name, another spec, an empty
        state, a state or signature with NaN/Inf, a signature of another length;
        TypeError otherwise."""
        _check_name(name)
        if name in self._positions:
            raise ValueError(f"the index already holds a domain named {name!r}")
        m = self.spec.m
        nan = torch.full((m,), math.nan, dtype=torch.float32)
        if isinstance(item, SketchState):
            if item.spec != self.spec:
                raise ValueError(f"{name!r} was sketched under {item.spec}; the index holds {self.spec}")
            if item.count == 0:
                raise ValueError(f"the state of {name!r} holds no samples")
            if not all(bool(torch.isfinite(t).all()) for t in item.sums.values()):
                raise ValueError(f"the state of {name!r} contains NaN or Inf (a NaN row means a kind it lacks)")
            rows = {f"mu.{k}": (item.sums[k].double().cpu() / item.count).float() if k in item.sums else nan
                    for k in ALL_KINDS}
            if self.variances:
                rows.update({f"var.{k}": (item.variance(k).cpu() / item.count).float()
                             if k in item.sums and item.count > 1 else nan for k in ALL_KINDS})
            count = item.count
        elif isinstance(item, torch.Tensor):
            if item.dim() != 1 or item.shape[0] != m or not item.is_floating_point():
                raise ValueError(f"a signature must be a real float tensor of shape (m = {m},), "
                                 f"got {item.dtype} {tuple(item.shape)}")
            if not bool(torch.isfinite(item).all()):
                raise ValueError(f"the signature of {name!r} contains NaN or Inf")
            rows = {key: nan for key in self._tensor_names()}
            rows["mu.joint"] = item.detach().float().cpu()
            count = 0  # unknown: a bare signature carries no count
        else:
            raise TypeError(f"item: expected a SketchState or a signature tensor, got {type(item).__name__}")
        for key, row in rows.items():
            self._rows[key].append(row)
        self._positions[name] = len(self._names)
        self._names.append(name)
        self._counts.append(count)
        self._matrices = self._joint_norms = None

    def merge(self, other: "SignatureIndex") -> "SignatureIndex":
        """A new index: this one's domains, then ``other``'s. Specs and the variances
        setting must match and the names be disjoint (ValueError naming the first clash)."""
        if not isinstance(other, SignatureIndex):
            raise TypeError(f"can only merge a SignatureIndex, got {type(other).__name__}")
        if other.spec != self.spec:
            raise ValueError(f"cannot merge indexes of different specs: {self.spec} vs {other.spec}")
        if other.variances != self.variances:
            raise ValueError("cannot merge an index with variances and one without")
        clash = next((n for n in other._names if n in self._positions), None)
        if clash is not None:
            raise ValueError(f"both indexes hold a domain named {clash!r}")
        merged = SignatureIndex(self.spec, variances=self.variances)
        for source in (self, other):
            mats = source.matrices()
            for key in merged._rows:
                merged._rows[key].extend(mats[key].unbind(0))
            merged._counts.extend(source._counts)
            for name in source._names:
                merged._positions[name] = len(merged._names)
                merged._names.append(name)
        return merged

    __add__ = merge

    # -- views -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def counts(self) -> list[int]:
        """Sample counts (0 for a domain added from a bare signature)."""
        return list(self._counts)

    def matrices(self) -> dict[str, torch.Tensor]:
        """{"mu.<kind>" | "var.<kind>": (N, m) float32}: the stored rows, stacked (cached)."""
        if self._matrices is None:
            empty = torch.empty(0, self.spec.m, dtype=torch.float32)
            self._matrices = {k: torch.stack(rows) if rows else empty for k, rows in self._rows.items()}
            self._rows = {k: list(v.unbind(0)) for k, v in self._matrices.items()}
        return self._matrices

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.matrices().values())

    def kinds(self, name: str) -> tuple[str, ...]:
        """The kinds whose μ a domain holds (its stored availability: a kind it lacks is a NaN
        row in the file): all four from a state, three from a state without the first moment,
        ("joint",) from a bare signature. KeyError for an unknown name."""
        i, mats = self._positions[name], self.matrices()
        return tuple(k for k in ALL_KINDS if not bool(torch.isnan(mats[f"mu.{k}"][i]).any()))

    def has_variances(self, name: str) -> bool:
        """Whether a domain holds Var μ (the sampling part of its error bars): False for a bare
        signature, a state of one sample or an index built with ``variances=False``."""
        i = self._positions[name]
        return self.variances and self._counts[i] > 1 and not bool(torch.isnan(self.matrices()["var.joint"][i]).any())

    def state(self, name: str) -> SketchState | None:
        """The state rebuilt from a domain's μ and Var μ (None without them: a bare
        signature, ``variances=False``, or a count below 2)."""
        if not self.has_variances(name):
            return None
        i, kinds = self._positions[name], self.kinds(name)
        n, mats = self._counts[i], self.matrices()
        mu = {k: mats[f"mu.{k}"][i].double() for k in kinds}
        var = {k: mats[f"var.{k}"][i].double() for k in kinds}
        return SketchState(self.spec, n, {k: n * mu[k] for k in kinds},
                           {k: n * (n - 1) * var[k] + n * mu[k].square() for k in kinds})

    # -- queries -----------------------------------------------------------------------------------------------
    def scores(self, target: SketchState | torch.Tensor) -> torch.Tensor:
        """(N,) float64: A of ``target`` with every domain, cos(μ_target, μ_j) over the
        joint matrix (NaN for a zero signature). Cost: N·m multiply-adds."""
        mu_t = self._target_signature(target)
        M = self.matrices()["mu.joint"]
        if self._joint_norms is None:
            self._joint_norms = M.double().norm(dim=1)
        inner = (M @ mu_t.float()).double()
        denominator = self._joint_norms * mu_t.norm()
        return torch.where(denominator > 0, inner / denominator, torch.tensor(math.nan, dtype=torch.float64))

    def _target_signature(self, target) -> torch.Tensor:
        if isinstance(target, SketchState):
            if target.spec != self.spec:
                raise ValueError(f"the target was sketched under {target.spec}; the index holds {self.spec}")
            if target.count == 0:
                raise ValueError("the target state holds no samples")
            mu = target.sums["joint"].double().cpu() / target.count
        elif isinstance(target, torch.Tensor):
            if target.dim() != 1 or target.shape[0] != self.spec.m or not target.is_floating_point():
                raise ValueError(f"target: expected a SketchState or a float signature of shape (m = {self.spec.m},), "
                                 f"got {target.dtype} {tuple(target.shape)}")
            if not bool(torch.isfinite(target).all()):
                raise ValueError("the target signature contains NaN or Inf")
            mu = target.double().cpu()
        else:
            raise TypeError(f"target: expected a SketchState or a signature tensor, got {type(target).__name__}")
        if not bool(mu.any()):
            raise ValueError("the target's joint signature is zero (zero head Fisher): every alignment is undefined")
        return mu

    def query(self, target: SketchState | torch.Tensor, k: int = 5) -> list[SourceScore]:
        """The ``k`` domains best aligned with ``target`` (a SketchState, e.g. of a new
        domain or of a single prompt, or a joint signature (m,)), best first.

        Each hit is a SourceScore as from ``rank_sources``: A, S_a, S_e, ρ, G (the
        first-moment cosine), each ± its standard error. Each hit is scored on its
        own, with what it and the target hold, so adding a domain never changes
        another's scores: when the target or that hit has no state to rebuild (a
        bare signature, ``variances=False``, n < 2) its error bars are the
        projection part only, and a kind that the target or that hit lacks (a bare
        joint signature holds only A; a version-1 state no G) is NaN in its row.

        Raises ValueError for an empty index, k < 1, another spec or a zero target."""
        k = check_int("k", k, minimum=1)
        if not self._names:
            raise ValueError("the index is empty")
        A = self.scores(target)
        # largest first, undefined (NaN) last in insertion order: a stable sort of −A with NaN → +inf
        order = torch.sort(torch.nan_to_num(-A, nan=math.inf), stable=True).indices[:k]
        hits = [self._names[j] for j in order.tolist()]
        # each hit is scored with what it and the target hold, independently of the other hits
        states = {name: self.state(name) for name in hits}
        full = {n: s for n, s in states.items() if s is not None} if (
            isinstance(target, SketchState) and target.count > 1) else {}
        scores = rank_sources(target.to("cpu"), full) if full else []
        scores += [score for name in hits if name not in full for score in self._signature_scores(target, [name])]
        scores.sort(key=lambda s: hits.index(s.name))  # the index's order, then as rank_sources orders:
        scores.sort(key=lambda s: (bool(s.undefined), -s.A if not s.undefined else 0.0))  # stable
        return [dataclasses.replace(s, rank=r) for r, s in enumerate(scores, start=1)]

    def _signature_scores(self, target, hits: list[str]) -> list[SourceScore]:
        """Scores from signatures alone: each kind that the target and every hit hold, ± the
        projection jackknife (no sampling part: no variances to use)."""
        from fisherfast.sketch.alignment import jackknife_stderr, leave_one_feature_out

        mats, rows = self.matrices(), [self._positions[n] for n in hits]
        values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        loo: dict[str, torch.Tensor] = {}
        for kind in ALL_KINDS:
            if isinstance(target, SketchState):
                if kind not in target.sums:
                    continue
                mu_t = target.sums[kind].double().cpu() / target.count
            elif kind == "joint":
                mu_t = target.double().cpu()
            else:
                continue
            mu = torch.cat([mu_t[None], mats[f"mu.{kind}"][rows].double()])
            if bool(torch.isnan(mu).any()):
                continue
            norms = mu.norm(dim=1)
            A = (mu[1:] @ mu[0]) / (norms[1:] * norms[0])
            A = torch.where(norms[1:] * norms[0] > 0, A, torch.tensor(math.nan, dtype=torch.float64))
            loo[kind] = leave_one_feature_out(mu, mu.square(), 0)[1:]  # (k, m)
            values[kind] = (A, jackknife_stderr(loo[kind]))
        nan = torch.full((len(hits),), math.nan, dtype=torch.float64)
        get = lambda kind: values.get(kind, (nan, nan))  # noqa: E731
        if all(k in values for k in KINDS):
            rho = get("joint")[0] / (get("activation")[0] * get("error")[0])
            rho_se = jackknife_stderr(loo["joint"] / (loo["activation"] * loo["error"]))
        else:
            rho, rho_se = nan, nan
        scores = []
        for i, name in enumerate(hits):
            a = float(get("joint")[0][i])
            scores.append(dict(
                name=name, A=a, A_stderr=float(get("joint")[1][i]), S_a=float(get("activation")[0][i]),
                S_a_stderr=float(get("activation")[1][i]), S_e=float(get("error")[0][i]),
                S_e_stderr=float(get("error")[1][i]), rho=float(rho[i]), rho_stderr=float(rho_se[i]),
                G=float(get(MEAN)[0][i]), G_stderr=float(get(MEAN)[1][i]), count=self._counts[self._positions[name]],
                undefined="" if math.isfinite(a) else
                "the domain's joint signature is zero (zero head Fisher), so A = 0/0"))
        scores.sort(key=lambda s: (bool(s["undefined"]), -s["A"] if not s["undefined"] else 0.0))
        return [SourceScore(rank=r, **s) for r, s in enumerate(scores, start=1)]

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (umask permissions): the (N, m) matrices and
        counts, with format, version, spec, names and the variances flag in the metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.matrices().items()}
        tensors["count"] = torch.tensor(self._counts, dtype=torch.int64)
        meta = {"format": FORMAT, "version": str(INDEX_VERSION), "spec": self.spec.to_json(),
                "names": json.dumps(self._names), "variances": str(self.variances).lower()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, spec: SketchSpec | None = None) -> "SignatureIndex":
        """Read a file written by :meth:`save`; with ``spec``, the file's spec must equal it.

        Raises ValueError for another format, version or spec, or a corrupted file
        (bad header, names, shapes, dtypes or counts); FileNotFoundError when absent."""
        meta, tensors = read_versioned(path, FORMAT, INDEX_VERSION, "signature index")
        try:
            file_spec = SketchSpec.from_json(meta["spec"])
            names = json.loads(meta["names"])
            variances = {"true": True, "false": False}[meta["variances"]]
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} has a corrupted signature-index header: {err!r}") from None
        if spec is not None and file_spec != spec:
            raise ValueError(f"{path} holds signatures sketched under {file_spec}, expected {spec}")
        index = cls(file_spec, variances=variances)
        expected = set(index._tensor_names()) | {"count"}
        if not isinstance(names, list) or set(tensors) != expected:
            raise ValueError(f"{path} is corrupted: tensors {sorted(tensors)}, expected {sorted(expected)}")
        N, m = len(names), file_spec.m
        count = tensors["count"]
        if count.dtype != torch.int64 or tuple(count.shape) != (N,) or bool((count < 0).any()):
            raise ValueError(f"{path} is corrupted: count must be {N} non-negative int64")
        for key in index._tensor_names():
            t = tensors[key]
            if t.dtype != torch.float32 or tuple(t.shape) != (N, m):
                raise ValueError(f"{path} is corrupted: {key} must be float32 of shape ({N}, {m})")
        try:
            for name in names:
                _check_name(name)
        except ValueError as err:
            raise ValueError(f"{path} is corrupted: {err}") from None
        if len(set(names)) != N:
            raise ValueError(f"{path} is corrupted: repeated domain names")
        index._names = list(names)
        index._positions = {n: i for i, n in enumerate(names)}
        index._counts = count.tolist()
        index._rows = {k: list(tensors[k].unbind(0)) for k in index._tensor_names()}
        return index

    def __repr__(self) -> str:
        return f"SignatureIndex({self.spec}, {len(self)} domains)"
