"""The pullback metric as a symmetric PSD linear operator (docs/design.md §4).

``PullbackMetric`` is the base type every metric of ``pullback_fisher`` has,
in the manner of curvlinops: a small object that knows how to multiply, with
the dense matrix one view among others. Code that consumes a metric (solvers,
steering, surveys) takes a ``PullbackMetric`` and uses only this surface:

    G @ U, G.matmat(U)      U (d,) or (d, k) → G U, in ``G.dtype`` on ``G.device``
    G.matvec(v)             v (d,) → G v
    v @ G                   (d,) or (k, d) → vᵀG (G is symmetric)
    G.T                     G itself (symmetric)
    G.shape, G.d, G.dtype, G.device
    G.damped(λ)             the operator G + λI (a ``DampedMetric``; λ ≥ 0)
    G.to_scipy()            scipy.sparse.linalg.LinearOperator, float64 numpy in/out
    G.dense()               the d×d matrix (cached)
    G.trace()               tr G
    G.eigenvalues()         all d eigenvalues, descending, float64 on the CPU
    G.eig(k)                top-k eigenpairs: values (k,) on the CPU, vectors (d, k)
    G.diagnostics()         ``MetricDiagnostics`` (PR/d, rank90/99, deviation)
    G.is_matrix_free        True when a product costs model passes (then dense(),
                            trace() and diagnostics() cost d products)
    G.report, G.info        what the mode reports (``MetricReport``; ``info`` is
                            its dict view), G.mode, G.n_points

Implementations: ``DenseMetric`` (a stored d×d matrix: exact, topk,
monte_carlo, concept), ``LowRankMetric`` (a Nyström factor U diag(λ) Uᵀ:
low_rank), ``MatrixFreeMetric`` (a product function: matrix_free) and
``DampedMetric`` (G + λI over any of them).

A solver of G_λ x = q takes the base type and needs no other branch:
``A = G.damped(λ)``; if ``A.is_matrix_free``, conjugate gradients on
``A.to_scipy()`` (one product per iteration; a ``LowRankMetric`` of the same
points gives a Nyström preconditioner through ``eig``), else Cholesky of
``A.dense()``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from fisherfast.checks import check_int, check_real, expected
from fisherfast.metric.diagnostics import MetricDiagnostics, spectrum_diagnostics

__all__ = ["MetricReport", "PullbackMetric", "DenseMetric", "LowRankMetric", "MatrixFreeMetric", "DampedMetric"]


@dataclasses.dataclass(frozen=True)
class MetricReport:
    """What a ``pullback_fisher`` mode reports beside the metric.

    Every field but ``mode`` and ``n_points`` is None unless the mode sets it.

    Attributes:
        mode: the mode that built the metric.
        n_points: how many (context, h) points the metric averages.
        world_size: processes whose points were all-reduced (1: one process).
        tail_tol: topk: the tail-mass tolerance.
        tau: topk: per point, the tail mass τ = 1 − Σ_{kept} p (docs/design.md §3).
        n_kept: topk: per point, the number of kept tokens.
        k: low_rank: Nyström probes.
        trace_probes: low_rank: Rademacher probes of the Hutchinson estimate.
        trace_captured: low_rank: tr Ĝ.
        trace_estimate: low_rank: tr Ĝ + the Hutchinson estimate of tr(G − Ĝ).
        trace_fraction: low_rank: trace_captured / trace_estimate.
        trace_fraction_se: low_rank: the standard error of trace_fraction.
        n_samples: monte_carlo: samples per point.
        std_error_fro: monte_carlo: estimated E‖Ĝ − G‖_F.
        concepts: concept: the concept names, in order.
        q: concept: per point, the concept distribution (K concepts, then "other").
    """
    mode: str
    n_points: int
    world_size: int = 1
    tail_tol: float | None = None
    tau: tuple[float, ...] | None = None
    n_kept: tuple[int, ...] | None = None
    k: int | None = None
    trace_probes: int | None = None
    trace_captured: float | None = None
    trace_estimate: float | None = None
    trace_fraction: float | None = None
    trace_fraction_se: float | None = None
    n_samples: int | None = None
    std_error_fro: float | None = None
    concepts: tuple[str, ...] | None = None
    q: tuple[tuple[float, ...], ...] | None = None

    def as_dict(self) -> dict:
        """The fields this mode set, besides mode / n_points / world_size (tuples as lists)."""
        def plain(x):
            return [plain(y) for y in x] if isinstance(x, tuple) else x

        skip = ("mode", "n_points", "world_size")
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


class PullbackMetric:
    """Base type of a d×d pullback metric: a symmetric PSD linear operator.

    The module docstring lists the whole surface. Subclasses implement
    ``_matmat(U)`` for U (d, k) in the metric's dtype and device and may
    override ``dense``, ``trace``, ``eigenvalues`` and ``eig`` with cheaper
    forms; the defaults materialize G through products with the identity.

    Args:
        d: dimension; dtype, device: of products and of ``dense()``;
        report: ``MetricReport`` (mode, n_points, mode details).
    """

    is_matrix_free = False

    def __init__(self, d: int, *, dtype: torch.dtype, device, report: MetricReport):
        d = check_int("d", d, minimum=1)
        if not isinstance(report, MetricReport):
            raise TypeError(expected("report", "a MetricReport", type(report)))
        self.d, self.dtype, self.device = d, dtype, torch.device(device)
        self.report = report
        self._dense_cache: torch.Tensor | None = None

    # -- what it is
    @property
    def mode(self) -> str:
        return self.report.mode

    @property
    def n_points(self) -> int:
        return self.report.n_points

    @property
    def info(self) -> dict:
        """``report.as_dict()``: the mode details as a plain dict."""
        return self.report.as_dict()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d, self.d)

    @property
    def T(self) -> "PullbackMetric":
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(d={self.d}, mode={self.mode!r}, n_points={self.n_points}, "
                f"dtype={self.dtype})")

    # -- products
    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmat(self, U: torch.Tensor) -> torch.Tensor:
        """G U for U of shape (d,) or (d, k), returned in the metric's dtype and device.

        Raises:
            TypeError: U is not a floating tensor.
            ValueError: U has the wrong shape.
        """
        if not isinstance(U, torch.Tensor):
            raise TypeError(expected("U", "a torch.Tensor", type(U)))
        if U.dim() not in (1, 2) or U.shape[0] != self.d:
            raise ValueError(expected("U", f"shape ({self.d},) or ({self.d}, k)", U))
        if not U.is_floating_point():
            raise TypeError(expected("U", "a floating tensor", U.dtype))
        vector = U.dim() == 1
        out = self._matmat(U.to(self.device, self.dtype).reshape(self.d, -1))
        return out[:, 0] if vector else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v for v of shape (d,)."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise ValueError(expected("v", f"a tensor of shape ({self.d},)", v if isinstance(v, torch.Tensor)
                                      else type(v)))
        return self.matmat(v)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matmat(other)

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor:
        """vᵀG = (G v)ᵀ: (d,) → (d,), (k, d) → (k, d)."""
        if isinstance(other, torch.Tensor) and other.dim() == 2:
            return self.matmat(other.T).T
        return self.matmat(other)

    def damped(self, damping: float) -> "DampedMetric":
        """The operator G + λI with λ = ``damping`` (a number ≥ 0, absolute, in G's units)."""
        return DampedMetric(self, damping)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def apply(x):
            x = np.asarray(x)
            out = self.matmat(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))
            return out.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        return LinearOperator((self.d, self.d), matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply,
                              dtype=np.float64)

    # -- materialized views
    def dense(self) -> torch.Tensor:
        """The d×d matrix (symmetrized, cached). Default: products with I (d products)."""
        if self._dense_cache is None:
            G = self._matmat(torch.eye(self.d, dtype=self.dtype, device=self.device))
            self._dense_cache = 0.5 * (G + G.T)
        return self._dense_cache

    def trace(self) -> float:
        """tr G."""
        return float(torch.diagonal(self.dense()).sum())

    def eigenvalues(self) -> torch.Tensor:
        """All d eigenvalues, descending (float64, CPU)."""
        lam = torch.linalg.eigvalsh(self.dense().detach().to("cpu", torch.float64))
        return lam.flip(0)

    def eig(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k eigenpairs: values (k,) descending on the CPU, vectors (d, k) on the metric's device.

        Default: ``torch.linalg.eigh`` of ``dense()`` (O(d³))."""
        self._check_k(k)
        values, vectors = torch.linalg.eigh(self.dense())
        return values.flip(0)[:k].to("cpu"), vectors.flip(1)[:, :k]

    def diagnostics(self) -> MetricDiagnostics:
        """PR/d, rank at 90%/99% of the trace and ‖G − λ̄I‖₂/‖G‖₂ (λ̄ = tr G / d)
        of this metric (``MetricDiagnostics``, docs/design.md §4); needs all eigenvalues."""
        return spectrum_diagnostics(self.eigenvalues())

    def _check_k(self, k) -> None:
        check_int("k", k, minimum=1, maximum=self.d)


class DenseMetric(PullbackMetric):
    """A metric stored as its d×d matrix G (symmetrized on construction).

    Args:
        G: (d, d) floating tensor; report: a ``MetricReport`` (default: mode
            "dense", one point).
    """

    def __init__(self, G: torch.Tensor, *, report: MetricReport | None = None):
        if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or not G.is_floating_point():
            raise ValueError(expected("G", "a square floating (d, d) tensor", G if isinstance(G, torch.Tensor)
                                      else type(G)))
        super().__init__(G.shape[0], dtype=G.dtype, device=G.device,
                         report=report or MetricReport(mode="dense", n_points=1))
        self._dense_cache = 0.5 * (G + G.T)

    def _matmat(self, U):
        return self._dense_cache @ U


class LowRankMetric(PullbackMetric):
    """A metric stored as a factor Ĝ = U diag(λ) Uᵀ (U (d, r) orthonormal, λ ≥ 0):
    products cost O(d r), ``trace`` is Σλ, ``eigenvalues`` are λ and d − r zeros."""

    def __init__(self, U: torch.Tensor, lam: torch.Tensor, *, report: MetricReport):
        if U.dim() != 2 or lam.shape != (U.shape[1],):
            raise ValueError(expected("U, lam", "shapes (d, r) and (r,)", (tuple(U.shape), tuple(lam.shape))))
        super().__init__(U.shape[0], dtype=U.dtype, device=U.device, report=report)
        self.factor = (U, lam)

    def _matmat(self, X):
        U, lam = self.factor
        return U @ (lam[:, None] * (U.T @ X))

    def dense(self):
        if self._dense_cache is None:
            U, lam = self.factor
            G = (U * lam) @ U.T
            self._dense_cache = 0.5 * (G + G.T)
        return self._dense_cache

    def trace(self):
        return float(self.factor[1].sum())

    def eigenvalues(self):
        lam = self.factor[1].detach().to("cpu", torch.float64)
        return torch.cat([lam, lam.new_zeros(self.d - lam.numel())]).sort(descending=True).values

    def eig(self, k):
        self._check_k(k)
        U, lam = self.factor
        if k > lam.numel():
            return super().eig(k)
        order = torch.argsort(lam, descending=True)[:k]
        return lam[order].to("cpu"), U[:, order]


class MatrixFreeMetric(PullbackMetric):
    """A metric known only through a product function U (d, k) ↦ G U.

    ``dense()`` costs d products (cached); ``eig(k)`` for k < d − 1 runs
    Lanczos (``scipy.sparse.linalg.eigsh``, a few·k products) unless G is
    already materialized.

    Args:
        matmat: U (d, k) in ``dtype`` on ``device`` → G U, same dtype/device.
        d, dtype, device, report: as ``PullbackMetric``.
    """

    is_matrix_free = True

    def __init__(self, matmat: Callable[[torch.Tensor], torch.Tensor], d: int, *, dtype, device,
                 report: MetricReport):
        if not callable(matmat):
            raise TypeError(expected("matmat", "a callable", type(matmat)))
        super().__init__(d, dtype=dtype, device=device, report=report)
        self._product = matmat

    def _matmat(self, U):
        return self._product(U)

    def eig(self, k):
        self._check_k(k)
        if self._dense_cache is not None or k >= self.d - 1:
            return super().eig(k)
        from scipy.sparse.linalg import eigsh

        # A fixed start vector: the same products on every call (and every rank, see distributed).
        v0 = np.random.default_rng(0).standard_normal(self.d)
        values, vectors = eigsh(self.to_scipy(), k=k, which="LA", v0=v0)
        order = np.argsort(values)[::-1].copy()
        return (torch.from_numpy(values[order]).to(self.dtype),
                torch.from_numpy(vectors[:, order]).to(self.device, self.dtype))


class DampedMetric(PullbackMetric):
    """G + λI over a ``PullbackMetric`` G (λ ≥ 0 absolute); matrix-free exactly when G is.

    Attributes:
        base: G; damping: λ. ``report`` is G's.
    """

    def __init__(self, base: PullbackMetric, damping: float):
        if not isinstance(base, PullbackMetric):
            raise TypeError(expected("base", "a PullbackMetric", type(base)))
        super().__init__(base.d, dtype=base.dtype, device=base.device, report=base.report)
        self.base, self.damping = base, _check_damping(damping)
        self.is_matrix_free = base.is_matrix_free

    def __repr__(self) -> str:
        return f"DampedMetric({self.base!r}, damping={self.damping:g})"

    def _matmat(self, U):
        return self.base._matmat(U) + self.damping * U

    def damped(self, damping):
        """(G + λI) + μI = G + (λ + μ)I, over the same base."""
        return DampedMetric(self.base, self.damping + _check_damping(damping))

    def dense(self):
        if self._dense_cache is None:
            self._dense_cache = self.base.dense() + self.damping * torch.eye(self.d, dtype=self.dtype,
                                                                              device=self.device)
        return self._dense_cache

    def trace(self):
        return self.base.trace() + self.damping * self.d

    def eigenvalues(self):
        return self.base.eigenvalues() + self.damping

    def eig(self, k):
        values, vectors = self.base.eig(k)
        return values + self.damping, vectors


def _check_damping(damping) -> float:
    return check_real("damping", damping, minimum=0)
