"""Pullback Fisher metric of the next-token distribution at a layer (docs/design.md §4).

For a hidden state h ∈ R^d at layer ℓ (one position, the context held fixed,
see ``fisherfast.split``), the upper map sends h to the head input a (after
the final norm) and to logits z = W a + b, p = softmax(z). With
B = ∂a/∂h (d×d) and the head metric G_head(a) = Wᵀ(diag p − p pᵀ)W (§3),

    G_ℓ(h) = Jᵀ F J = Bᵀ G_head B        (d×d, PSD, rank ≤ min(d, V−1)),
    KL(p(h) ‖ p(h+δ)) = ½ δᵀ G_ℓ δ + O(‖δ‖³).

``pullback_fisher`` computes it in one of six modes (they agree where they
overlap) and averages over contexts; the result is a ``PullbackMetric``, a
small linear operator with ``@``, ``dense()``, ``to_scipy()``, ``eig(k)`` and
``diagnostics()``. Every head contraction goes through the softmax-Fisher ops
(``fisherfast.ops.softmax_fisher``); the model is reached only through
``SplitModel`` (jvp / vjp / jacobian / head_input / logits).

Diagnostics of a metric with eigenvalues λ₁ ≥ … ≥ λ_d ≥ 0 (§4):
    PR = (Σλ)² / Σλ², reported as PR/d;
    rank at 90% / 99% of the trace: the fewest leading eigenvalues whose sum
    reaches 0.9 / 0.99 · Σλ;
    relative spectral deviation from Euclidean: ‖G − λ̄I‖₂ / ‖G‖₂, λ̄ = tr(G)/d.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from fisherfast.ops.softmax_fisher import softmax_fisher_gram, softmax_fisher_matmat

MODES = ("exact", "matrix_free", "low_rank", "topk", "monte_carlo", "concept")

# Which keyword options each mode reads; an option given to another mode is an error.
_MODE_OPTIONS = {
    "k": ("low_rank",),
    "trace_probes": ("low_rank",),
    "tail_tol": ("topk",),
    "n_samples": ("monte_carlo",),
    "seed": ("monte_carlo", "low_rank"),
    "generator": ("monte_carlo", "low_rank"),
    "concepts": ("concept",),
}
DEFAULT_K = 64
DEFAULT_TRACE_PROBES = 16
DEFAULT_TAIL_TOL = 1e-3
DEFAULT_N_SAMPLES = 256


# --------------------------------------------------------------------------- diagnostics

@dataclasses.dataclass(frozen=True)
class MetricDiagnostics:
    """Spectrum summary of a metric G with eigenvalues λ₁ ≥ … ≥ λ_d ≥ 0 (docs/design.md §4).

    Attributes:
        d: dimension.
        trace: Σλ = tr(G).
        lambda_max: λ₁ = ‖G‖₂.
        participation_ratio: PR = (Σλ)² / Σλ² ∈ [1, d], the effective rank.
        pr_over_d: PR / d.
        rank90, rank99: the fewest leading eigenvalues whose sum reaches
            90% / 99% of the trace.
        rel_spectral_deviation: ‖G − λ̄I‖₂ / ‖G‖₂ with λ̄ = tr(G)/d; 0 for a
            multiple of the identity (Euclidean), → 1 for a strongly
            anisotropic metric (FishBack reports > 0.97 on GPT-2).
    """
    d: int
    trace: float
    lambda_max: float
    participation_ratio: float
    pr_over_d: float
    rank90: int
    rank99: int
    rel_spectral_deviation: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def spectrum_diagnostics(eigenvalues) -> MetricDiagnostics:
    """``MetricDiagnostics`` from all d eigenvalues of a PSD metric (any order).

    Round-off negatives (a PSD matrix computed in floating point) are clamped
    to 0 first. Cost O(d log d)."""
    lam = torch.as_tensor(eigenvalues).detach().to("cpu", torch.float64).flatten()
    if lam.numel() == 0:
        raise ValueError("eigenvalues must be non-empty")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("eigenvalues contain NaN or Inf values")
    lam = lam.clamp_min(0).sort(descending=True).values
    d, total = lam.numel(), float(lam.sum())
    if total <= 0:
        raise ValueError("the metric is zero: its diagnostics are undefined")
    pr = total ** 2 / float((lam ** 2).sum())
    cumulative = torch.cumsum(lam, 0) / total

    def rank_at(fraction: float) -> int:
        # Tolerance: the last partial sum is 1 only up to rounding.
        return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1

    lam_bar = total / d
    # G − λ̄I has eigenvalues λ_i − λ̄; its 2-norm is the larger end.
    deviation = max(abs(float(lam[0]) - lam_bar), abs(float(lam[-1]) - lam_bar)) / float(lam[0])
    return MetricDiagnostics(d=d, trace=total, lambda_max=float(lam[0]), participation_ratio=pr,
                             pr_over_d=pr / d, rank90=rank_at(0.90), rank99=rank_at(0.99),
                             rel_spectral_deviation=deviation)


# --------------------------------------------------------------------------- the operator

class PullbackMetric:
    """A d×d pullback metric as a symmetric PSD linear operator (curvlinops style).

    It is its own torch view: ``G @ v`` for v of shape (d,) or (d, k), ``.T``
    (itself), ``.shape``, ``.dtype``, ``.device``. ``to_scipy()`` gives a
    ``scipy.sparse.linalg.LinearOperator``; ``dense()`` the matrix;
    ``eig(k)`` the top eigenpairs; ``diagnostics()`` the §4 spectrum summary.

    One of three representations backs it: a dense matrix (exact, topk,
    monte_carlo, concept), a factor U diag(λ) Uᵀ (low_rank), or a product
    function (matrix_free, where every product costs a JVP, a fused head
    product and a VJP per context).

    Attributes:
        mode: the ``pullback_fisher`` mode that built it.
        n_points: how many (context, h) points it averages.
        info: mode details: ``tau``/``n_kept`` (topk, per point),
            ``n_samples``/``std_error_fro`` (monte_carlo), ``k``/
            ``trace_fraction``/``trace_fraction_se`` (low_rank), ``concepts``/
            ``q`` (concept).
    """

    def __init__(self, d: int, *, dtype: torch.dtype, device: torch.device, mode: str, n_points: int,
                 dense: torch.Tensor | None = None, factor: tuple[torch.Tensor, torch.Tensor] | None = None,
                 matmat: Callable[[torch.Tensor], torch.Tensor] | None = None, info: Mapping | None = None):
        if sum(x is not None for x in (dense, factor, matmat)) != 1:
            raise ValueError("exactly one of dense, factor, matmat must be given")
        self.d, self.dtype, self.device = d, dtype, torch.device(device)
        self.mode, self.n_points = mode, n_points
        self.info = dict(info or {})
        self._dense, self._factor, self._matmat = dense, factor, matmat

    # -- linear-operator surface
    @property
    def shape(self) -> tuple[int, int]:
        return (self.d, self.d)

    @property
    def T(self) -> "PullbackMetric":
        return self

    @property
    def is_matrix_free(self) -> bool:
        return self._matmat is not None

    def __repr__(self) -> str:
        kind = "dense" if self._dense is not None else "low-rank" if self._factor is not None else "matrix-free"
        return f"PullbackMetric(d={self.d}, mode={self.mode!r}, {kind}, n_points={self.n_points}, dtype={self.dtype})"

    def matmat(self, U: torch.Tensor) -> torch.Tensor:
        """G U for U of shape (d,) or (d, k), in the metric's dtype and device."""
        if not isinstance(U, torch.Tensor):
            raise TypeError(f"U must be a torch.Tensor, got {type(U).__name__}")
        if U.dim() not in (1, 2) or U.shape[0] != self.d:
            raise ValueError(f"U must have shape ({self.d},) or ({self.d}, k), got {tuple(U.shape)}")
        if not U.is_floating_point():
            raise TypeError(f"U must be a floating tensor, got {U.dtype}")
        vector = U.dim() == 1
        U2 = U.to(self.device, self.dtype).reshape(self.d, -1)
        if self._dense is not None:
            out = self._dense @ U2
        elif self._factor is not None:
            Q, lam = self._factor
            out = Q @ (lam[:, None] * (Q.T @ U2))
        else:
            out = self._matmat(U2)
        return out[:, 0] if vector else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v for v of shape (d,)."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise ValueError(f"v must be a 1-D tensor of length {self.d}")
        return self.matmat(v)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matmat(other)

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
        """The d×d matrix. Matrix-free: d products (columns of I in chunks),
        i.e. the cost of the exact mode; the result is cached."""
        if self._dense is None:
            if self._factor is not None:
                Q, lam = self._factor
                G = (Q * lam) @ Q.T
            else:
                G = self._matmat(torch.eye(self.d, dtype=self.dtype, device=self.device))
            self._dense = 0.5 * (G + G.T)
        return self._dense

    def trace(self) -> float:
        """tr(G) (exact for the stored representation)."""
        if self._factor is not None:
            return float(self._factor[1].sum())
        return float(torch.diagonal(self.dense()).sum())

    def eigenvalues(self) -> torch.Tensor:
        """All d eigenvalues, descending (float64, CPU). Low-rank: the k
        Nyström eigenvalues and d − k zeros; matrix-free: via ``dense()``."""
        if self._factor is not None:
            lam = self._factor[1].detach().to("cpu", torch.float64)
            lam = torch.cat([lam, lam.new_zeros(self.d - lam.numel())])
        else:
            lam = torch.linalg.eigvalsh(self.dense().detach().to("cpu", torch.float64))
        return lam.sort(descending=True).values

    def eig(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k eigenpairs (values (k,) descending, vectors (d, k)).

        Dense and low-rank: ``torch.linalg.eigh`` (O(d³)). Matrix-free:
        ``scipy.sparse.linalg.eigsh`` on ``to_scipy()`` (Lanczos, a few·k
        products), unless k ≥ d − 1, where it materializes."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.d:
            raise ValueError(f"k must be an int in [1, {self.d}], got {k!r}")
        if self._matmat is not None and self._dense is None and k < self.d - 1:
            from scipy.sparse.linalg import eigsh

            values, vectors = eigsh(self.to_scipy(), k=k, which="LA")
            order = np.argsort(values)[::-1].copy()
            return (torch.from_numpy(values[order]).to(self.dtype),
                    torch.from_numpy(vectors[:, order]).to(self.device, self.dtype))
        if self._factor is not None and k <= self._factor[1].numel():
            Q, lam = self._factor
            order = torch.argsort(lam, descending=True)[:k]
            return lam[order].to("cpu"), Q[:, order]
        values, vectors = torch.linalg.eigh(self.dense())
        return values.flip(0)[:k].to("cpu"), vectors.flip(1)[:, :k]

    def diagnostics(self) -> MetricDiagnostics:
        """PR/d, rank at 90%/99% of the trace and ‖G − λ̄I‖₂/‖G‖₂ (λ̄ = tr G / d)
        of this metric; see ``MetricDiagnostics``. Needs all eigenvalues
        (matrix-free: materializes, d products)."""
        return spectrum_diagnostics(self.eigenvalues())


# --------------------------------------------------------------------------- construction

def pullback_fisher(split, contexts, *, mode: str = "exact", h: torch.Tensor | None = None,
                    k: int | None = None, trace_probes: int | None = None, tail_tol: float | None = None,
                    n_samples: int | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, concepts=None, chunk: int = 256,
                    progress: bool = True) -> PullbackMetric:
    """The pullback Fisher metric G_ℓ = Bᵀ G_head B at layer ``split.layer`` (docs/design.md §4),
    averaged over points: G = (1/n) Σ_i G_ℓ(h_i; context_i).

    Args:
        split: a ``fisherfast.split.SplitModel``.
        contexts: one ``SplitContext`` or a non-empty list of them (from
            ``split.context`` / ``split.contexts``).
        mode: one of
            "exact": B = ∂a/∂h from d reverse products (``split.vjp`` of the
                identity rows; on CPU 2–3× faster than forward mode through the
                Hugging Face blocks, measured on SmolLM2), the head metric
                G_head(a) from the fused centered Gram op (§3), then
                G = Bᵀ G_head B. Cost per point: d VJPs + one V·d² head pass.
            "matrix_free": nothing is computed up front; G v = Bᵀ G_head (B v)
                costs one JVP, one fused head product (``softmax_fisher_matmat``)
                and one VJP per point and product.
            "low_rank": randomized Nyström approximation from ``k`` Gaussian
                probes Ω (one batched matrix-free product G Ω): with
                Y_ν = GΩ + νΩ, L Lᵀ = Ωᵀ Y_ν, Y_ν L⁻ᵀ = U Σ Vᵀ, the approximation is
                Ĝ = U diag(max(Σ² − ν, 0)) Uᵀ ≼ G (Tropp et al. 2017). ``info``
                reports ``trace_fraction`` = tr Ĝ / tr G with tr G − tr Ĝ
                estimated by Hutchinson on G − Ĝ from ``trace_probes`` extra
                Rademacher probes, and its standard error.
            "topk": the head metric restricted to the fewest most probable
                tokens whose tail mass τ = 1 − Σ_{kept} p is ≤ ``tail_tol`` (§3),
                G = Bᵀ G_head^top B; τ and the kept count are in ``info``. The
                restricted head metric has rank r ≤ n_kept, so with r < d it
                is written Q Λ Qᵀ and G = Σ_j λ_j (Bᵀq_j)(Bᵀq_j)ᵀ from r VJPs
                instead of d.
            "monte_carlo": the Fisher–Stein estimator: y_s ∼ p,
                g_s = Jᵀ(e_{y_s} − p) = Bᵀ(w_{y_s} − μ) with μ = Wᵀp,
                G ≈ (1/S) Σ_s g_s g_sᵀ, S = ``n_samples`` VJPs per point.
                ``info["std_error_fro"]`` estimates E‖Ĝ − G‖_F from the samples.
            "concept": the pullback Hellinger metric of the concept
                distribution q = (Σ_{t∈c} p_t)_{c∈C} ∪ {q_other = 1 − Σ_c q_c}:
                G_H = J_sᵀ J_s = ¼ J_qᵀ diag(1/q) J_q with s = √q, rank ≤ K,
                from K+1 VJPs (∇_h q_c = Bᵀ Σ_{t∈c} p_t (w_t − μ)). Bins with
                q = 0 contribute 0 (their gradient vanishes with them).
        h: the points; default each context's own state ``ctx.h``. A (d,)
            tensor (one context), or (n, d) with n contexts (paired) or one
            context (n candidate states for the same context).
        k: low_rank probes (default 64, ≤ d).
        trace_probes: low_rank Hutchinson probes for the trace claim (default 16).
        tail_tol: topk tail-mass tolerance in (0, 1) (default 1e-3).
        n_samples: monte_carlo samples per point (default 256).
        seed, generator: the random source of low_rank / monte_carlo (at most one).
        concepts: concept schema: a non-empty sequence (or a mapping name →
            entry) whose entries are a token id or a sequence of token ids;
            concepts must be disjoint; the "other" bin is every other token.
        chunk: tangents / cotangents per vmapped batch.
        progress: show a tqdm bar over the points (when there are several).

    Returns:
        A ``PullbackMetric`` in the model's dtype and device.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    given = {"k": k, "trace_probes": trace_probes, "tail_tol": tail_tol, "n_samples": n_samples,
             "seed": seed, "generator": generator, "concepts": concepts}
    for name, value in given.items():
        if value is not None and mode not in _MODE_OPTIONS[name]:
            users = " or ".join(repr(m) for m in _MODE_OPTIONS[name])
            raise ValueError(f"{name} is only used by mode={users}, not mode={mode!r}")
    if getattr(split, "logit_softcap", None) is not None:
        raise ValueError(f"split: the model soft-caps its logits (c = {split.logit_softcap}); the pullback metric "
                         "here assumes z = W a + b (docs/design.md §2), so soft-capped heads are not supported")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    points = _points(split, contexts, h)
    d, dtype, device = split.d, split.W.dtype, split.W.device
    common = dict(dtype=dtype, device=device, mode=mode, n_points=len(points))

    if mode == "matrix_free":
        return PullbackMetric(d, matmat=_matrix_free_matmat(split, points, chunk), **common)
    if mode == "low_rank":
        k = DEFAULT_K if k is None else _positive_int("k", k, upper=d)
        trace_probes = DEFAULT_TRACE_PROBES if trace_probes is None else _positive_int("trace_probes", trace_probes)
        generator = _generator(seed, generator, device)
        return _nystrom(split, points, k, trace_probes, generator, chunk, progress, common)

    if mode == "exact":
        point_metric, info = (lambda ctx, x: _exact(split, ctx, x, chunk)), {}
    elif mode == "topk":
        tail_tol = DEFAULT_TAIL_TOL if tail_tol is None else tail_tol
        if isinstance(tail_tol, bool) or not isinstance(tail_tol, (int, float)) or not 0 < tail_tol < 1:
            raise ValueError(f"tail_tol must be a float in (0, 1), got {tail_tol!r}")
        info = {"tail_tol": float(tail_tol), "tau": [], "n_kept": []}
        point_metric = lambda ctx, x: _topk(split, ctx, x, float(tail_tol), chunk, info)  # noqa: E731
    elif mode == "monte_carlo":
        n_samples = DEFAULT_N_SAMPLES if n_samples is None else _positive_int("n_samples", n_samples)
        generator = _generator(seed, generator, device)
        info = {"n_samples": n_samples, "_sq": []}
        point_metric = lambda ctx, x: _monte_carlo(split, ctx, x, n_samples, generator, chunk, info)  # noqa: E731
    else:
        names, token_sets = concept_schema(concepts, split.V)
        info = {"concepts": names, "q": []}
        point_metric = lambda ctx, x: _concept(split, ctx, x, token_sets, chunk, info)  # noqa: E731

    G = torch.zeros(d, d, dtype=dtype, device=device)
    for ctx, x in _progress(points, progress, mode):
        G += point_metric(ctx, x)
    G = G / len(points)
    G = 0.5 * (G + G.T)
    if mode == "monte_carlo":
        # E‖Ĝ − G‖_F² = (E‖g‖⁴ − ‖G‖_F²)/S per point; the point means are averaged.
        per_point = torch.tensor(info.pop("_sq"), dtype=torch.float64)
        info["std_error_fro"] = float(per_point.clamp_min(0).sum().sqrt()) / len(points)
    return PullbackMetric(d, dense=G, info=info, **common)


def _points(split, contexts, h):
    """[(ctx, h_i)] from one context or a list, and the optional points h."""
    ctx_list = [contexts] if hasattr(contexts, "h") else contexts
    if not isinstance(ctx_list, (list, tuple)) or not ctx_list:
        raise TypeError("contexts must be a SplitContext or a non-empty list of them "
                        f"(from SplitModel.context / contexts), got {type(contexts).__name__}")
    for i, ctx in enumerate(ctx_list):
        if not hasattr(ctx, "h"):
            raise TypeError(f"contexts[{i}] must be a SplitContext, got {type(ctx).__name__}")
    if h is None:
        return [(ctx, ctx.h) for ctx in ctx_list]
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor or None, got {type(h).__name__}")
    if h.dtype != split.W.dtype:
        raise TypeError(f"h must have the model's dtype {split.W.dtype}, got {h.dtype}")
    if h.dim() == 1 and h.shape[0] == split.d and len(ctx_list) == 1:
        return [(ctx_list[0], h)]
    if h.dim() == 2 and h.shape[1] == split.d and len(ctx_list) in (1, h.shape[0]) and h.shape[0] > 0:
        ctx_list = list(ctx_list) * h.shape[0] if len(ctx_list) == 1 else ctx_list
        return list(zip(ctx_list, h))
    raise ValueError(f"h must have shape ({split.d},) with one context or (n, {split.d}) with 1 or n contexts; "
                     f"got shape {tuple(h.shape)} with {len(ctx_list)} context(s)")


def _positive_int(name, value, upper=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" and ≤ {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be an int ≥ 1{bound}, got {value!r}")
    return value


def _generator(seed, generator, device):
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return torch.Generator(device=device).manual_seed(seed)
    return None


def _progress(points, progress, mode):
    from tqdm.auto import tqdm

    return tqdm(points, desc=f"pullback_fisher[{mode}]", disable=not progress or len(points) < 2, leave=False)


def _head(split, ctx, x):
    """a = N(r_L(h)) and the head's W, b."""
    return split.head_input(ctx, x), split.W, split.b


def _jacobian(split, ctx, x, chunk):
    """B = ∂a/∂h (d×d): row i is e_iᵀB, one reverse product per row."""
    return split.vjp(ctx, x, torch.eye(split.d, dtype=x.dtype, device=x.device), chunk=chunk)


def _exact(split, ctx, x, chunk):
    B = _jacobian(split, ctx, x, chunk)
    a, W, b = _head(split, ctx, x)
    G_head = softmax_fisher_gram(a[None], W, b)[0]   # centered form (§3)
    return B.T @ G_head @ B


def _topk(split, ctx, x, tail_tol, chunk, info):
    a, W, b = _head(split, ctx, x)
    truncated = softmax_fisher_gram(a[None], W, b, tail_tol=tail_tol)
    G_top = truncated.G[0]
    n_kept = int(torch.as_tensor(truncated.n_kept).flatten()[0])
    info["tau"].append(float(torch.as_tensor(truncated.tau).flatten()[0]))
    info["n_kept"].append(n_kept)
    if n_kept >= split.d:
        B = _jacobian(split, ctx, x, chunk)
        return B.T @ G_top @ B
    # rank(G_top) ≤ n_kept < d: G = Σ_j λ_j (Bᵀq_j)(Bᵀq_j)ᵀ, n_kept VJPs instead of d JVPs.
    lam, Q = torch.linalg.eigh(G_top)
    lam, Q = lam[-n_kept:].clamp_min(0), Q[:, -n_kept:]
    R = split.vjp(ctx, x, (Q * lam.sqrt()).T.contiguous(), chunk=chunk)   # rows √λ_j Bᵀq_j
    return R.T @ R


def _monte_carlo(split, ctx, x, n_samples, generator, chunk, info):
    a, W, b = _head(split, ctx, x)
    z = a @ W.T if b is None else a @ W.T + b
    p = torch.softmax(z.double(), -1)
    y = torch.multinomial(p, n_samples, replacement=True, generator=generator)
    mu = p.to(W.dtype) @ W                                  # μ = Wᵀp
    g = split.vjp(ctx, x, (W[y] - mu).contiguous(), chunk=chunk)   # rows g_s = Bᵀ(w_{y_s} − μ)
    G = g.T @ g / n_samples
    g2 = (g.double() ** 2).sum(1)
    info["_sq"].append(float(((g2 ** 2).mean() - (G.double() ** 2).sum()) / n_samples))
    return G


def _concept(split, ctx, x, token_sets, chunk, info):
    a, W, b = _head(split, ctx, x)
    z = a @ W.T if b is None else a @ W.T + b
    p = torch.softmax(z.double(), -1)
    mu = (p.to(W.dtype) @ W).double()                       # μ = Wᵀp
    rows, q = [], []
    for tokens in token_sets:
        p_c = p[tokens]
        q.append(p_c.sum())
        rows.append(p_c @ W[tokens].double() - p_c.sum() * mu)   # Σ_{t∈c} p_t (w_t − μ)
    covered = torch.cat(token_sets)
    q_other = p.sum() - p[covered].sum()
    rows.append(-torch.stack(rows).sum(0))                  # q_other = 1 − Σ q_c
    q = torch.stack(q + [q_other.clamp_min(0)])
    J_q = split.vjp(ctx, x, torch.stack(rows).to(W.dtype), chunk=chunk)   # (K+1, d) rows ∇_h q_j
    inv_q = torch.where(q > 0, 1.0 / q, torch.zeros_like(q)).to(W.dtype)
    info["q"].append(q.tolist())
    return 0.25 * (J_q.T * inv_q) @ J_q                     # G_H = ¼ J_qᵀ diag(1/q) J_q


def concept_schema(concepts, V):
    """(names, [LongTensor of token ids per concept]) after validation."""
    if concepts is None:
        raise ValueError("mode='concept' needs concepts: a sequence (or mapping name → entry) of token ids "
                         "or token-id sequences")
    if isinstance(concepts, Mapping):
        names, entries = [str(n) for n in concepts], list(concepts.values())
    elif isinstance(concepts, (list, tuple)):
        names, entries = [str(i) for i in range(len(concepts))], list(concepts)
    else:
        raise TypeError(f"concepts must be a sequence or mapping of token ids, got {type(concepts).__name__}")
    if not entries:
        raise ValueError("concepts must name at least one concept")
    seen: dict[int, int] = {}
    token_sets = []
    for i, entry in enumerate(entries):
        ids = list(entry) if isinstance(entry, (list, tuple, range)) else [entry]
        if isinstance(entry, torch.Tensor):
            ids = entry.flatten().tolist()
        if not ids:
            raise ValueError(f"concept {names[i]!r} has no token ids")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"concept {names[i]!r}: token ids must be ints in [0, {V}), got {t!r}")
            if t in seen:
                raise ValueError(f"token {t} is in concepts {names[seen[t]]!r} and {names[i]!r}; "
                                 "concepts must be disjoint")
            seen[t] = i
        token_sets.append(torch.tensor(ids, dtype=torch.long))
    return names, token_sets


def _matrix_free_matmat(split, points, chunk):
    """U (d, k) ↦ (1/n) Σ_i B_iᵀ G_head(a_i) B_i U: per point one JVP, one fused
    head product, one VJP (docs/design.md §4, matrix-free)."""
    heads = [_head(split, ctx, x)[0] for ctx, x in points]
    W, b = split.W, split.b

    def matmat(U):
        out = torch.zeros_like(U)
        for (ctx, x), a in zip(points, heads):
            _, BU = split.jvp(ctx, x, U.T.contiguous(), chunk=chunk)            # (k, d) rows B u_j
            HBU = softmax_fisher_matmat(a[None], W, BU.T.contiguous(), b)[0]      # (d, k) G_head B U
            out += split.vjp(ctx, x, HBU.T.contiguous(), chunk=chunk).T          # Bᵀ G_head B U
        return out / len(points)

    return matmat


def _nystrom(split, points, k, trace_probes, generator, chunk, progress, common):
    """Randomized Nyström (Tropp, Yurtsever, Udell & Cevher 2017, stable variant)
    from k probes, plus a Hutchinson estimate of the trace it misses."""
    d, dtype, device = split.d, common["dtype"], common["device"]
    Omega = torch.linalg.qr(torch.randn(d, k, dtype=dtype, device=device, generator=generator)).Q
    R = torch.randint(0, 2, (d, trace_probes), generator=generator, device=device).to(dtype) * 2 - 1
    matmat = _matrix_free_matmat(split, points, chunk)
    probes = torch.cat([Omega, R], 1)
    Y_all = torch.zeros_like(probes)
    for start in _progress(range(0, probes.shape[1], chunk), progress, "low_rank"):
        Y_all[:, start:start + chunk] = matmat(probes[:, start:start + chunk])
    Y, GR = Y_all[:, :k], Y_all[:, k:]
    # Shift ν: Ωᵀ(Y + νΩ) = ΩᵀY + νI must be positive definite. Round-off in the
    # products (float32 models: ~1e-7·‖G‖) can make ΩᵀY slightly indefinite when
    # k exceeds the rank, so ν also covers its most negative eigenvalue; the
    # eigenvalues below ν are clamped to 0 at the end.
    M = Omega.T @ Y
    M = 0.5 * (M + M.T)
    nu = torch.finfo(dtype).eps * math.sqrt(d) * float(torch.linalg.matrix_norm(Y, 2))
    nu = max(nu, -2.0 * float(torch.linalg.eigvalsh(M)[0]))
    Y_nu = Y + nu * Omega
    L = torch.linalg.cholesky(M + nu * torch.eye(k, dtype=dtype, device=device))
    F = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T             # Y_ν L⁻ᵀ
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    lam = (S ** 2 - nu).clamp_min(0)
    # Hutchinson on the PSD remainder: E[rᵀ(G − Ĝ)r] = tr(G − Ĝ) for Rademacher r.
    resid = (R * GR).sum(0) - ((U.T @ R) ** 2 * lam[:, None]).sum(0)
    captured = float(lam.sum())
    tail = float(resid.mean().clamp_min(0))
    tail_se = float(resid.std() / math.sqrt(trace_probes)) if trace_probes > 1 else float("nan")
    total = captured + tail
    info = {"k": k, "trace_probes": trace_probes, "trace_captured": captured, "trace_estimate": total,
            "trace_fraction": captured / total if total > 0 else float("nan"),
            "trace_fraction_se": captured * tail_se / total ** 2 if total > 0 else float("nan")}
    return PullbackMetric(d, factor=(U, lam), info=info, **common)


# --------------------------------------------------------------------------- surveys over prompts

@dataclasses.dataclass
class SpectrumSurvey:
    """Per-point spectra of the metric at one layer and their mean metric.

    Attributes:
        layer: ℓ.
        mode: the ``pullback_fisher`` mode used per point.
        per_point: ``MetricDiagnostics`` of G_ℓ at each point (context).
        eigenvalues: (n, d) float64, each point's eigenvalues, descending.
        mean_metric: (1/n) Σ_i G_ℓ(point i) as a dense ``PullbackMetric``.
    """
    layer: int
    mode: str
    per_point: list
    eigenvalues: torch.Tensor
    mean_metric: PullbackMetric

    def summary(self) -> dict:
        """{field: (mean, min, max)} of the per-point diagnostics, plus
        ``mean_metric``: the diagnostics of the averaged metric."""
        out = {}
        for field in ("pr_over_d", "rank90", "rank99", "rel_spectral_deviation"):
            values = [getattr(diag, field) for diag in self.per_point]
            out[field] = (sum(values) / len(values), min(values), max(values))
        out["mean_metric"] = self.mean_metric.diagnostics()
        return out


def spectrum_survey(split, contexts, *, mode: str = "exact", progress: bool = True, **options) -> SpectrumSurvey:
    """G_ℓ at each context (``pullback_fisher(split, ctx, mode=mode, **options)``),
    its diagnostics, and the mean metric over the contexts. Cost: one
    ``pullback_fisher`` per context plus a d×d eigendecomposition each."""
    ctx_list = [contexts] if hasattr(contexts, "h") else contexts
    if not isinstance(ctx_list, (list, tuple)) or not ctx_list:
        raise TypeError(f"contexts must be a SplitContext or a non-empty list of them, got {type(contexts).__name__}")
    per_point, spectra, total = [], [], None
    for ctx in _progress(ctx_list, progress, f"survey {mode}, layer {split.layer}"):
        G = pullback_fisher(split, ctx, mode=mode, progress=False, **options)
        lam = G.eigenvalues()
        per_point.append(spectrum_diagnostics(lam))
        spectra.append(lam)
        total = G.dense().clone() if total is None else total + G.dense()
    mean = PullbackMetric(split.d, dense=total / len(ctx_list), dtype=total.dtype, device=total.device,
                          mode=mode, n_points=len(ctx_list))
    return SpectrumSurvey(layer=split.layer, mode=mode, per_point=per_point, eigenvalues=torch.stack(spectra),
                          mean_metric=mean)


def survey_table(surveys: Sequence[SpectrumSurvey]) -> str:
    """A markdown table of surveys, one row per layer: per-prompt mean [min–max]
    of PR/d and of ‖G − λ̄I‖₂/‖G‖₂, mean ranks at 90/99% of the trace, and the
    same diagnostics of the prompt-averaged metric."""
    lines = ["| layer | prompts | PR/d per prompt, mean [min–max] | rank90 / rank99 (mean) "
             "| ‖G−λ̄I‖₂/‖G‖₂ per prompt, mean [min–max] | averaged G: PR/d | averaged G: rank90 / rank99 "
             "| averaged G: ‖G−λ̄I‖₂/‖G‖₂ |",
             "|---|---|---|---|---|---|---|---|"]
    for survey in surveys:
        s = survey.summary()
        m = s["mean_metric"]
        pr, dev = s["pr_over_d"], s["rel_spectral_deviation"]
        lines.append(f"| {survey.layer} | {len(survey.per_point)} | {pr[0]:.2%} [{pr[1]:.2%}–{pr[2]:.2%}] "
                     f"| {s['rank90'][0]:.1f} / {s['rank99'][0]:.1f} | {dev[0]:.4f} [{dev[1]:.4f}–{dev[2]:.4f}] "
                     f"| {m.pr_over_d:.2%} | {m.rank90} / {m.rank99} | {m.rel_spectral_deviation:.4f} |")
    return "\n".join(lines)


def plot_spectra(surveys: Sequence[SpectrumSurvey], path) -> None:
    """PNG of the normalized eigenvalue spectra λ_i/λ₁ (log scale) per layer:
    the median over prompts (band: 10–90% quantiles) and the averaged metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for survey in surveys:
        lam = survey.eigenvalues.clamp_min(0)
        norm = lam / lam[:, :1]
        floor = 1e-12
        idx = np.arange(1, lam.shape[1] + 1)
        q10, q50, q90 = (torch.quantile(norm, q, dim=0).clamp_min(floor).numpy() for q in (0.1, 0.5, 0.9))
        line, = ax.semilogy(idx, q50, label=f"layer {survey.layer} (median of {lam.shape[0]} prompts)")
        ax.fill_between(idx, q10, q90, color=line.get_color(), alpha=0.2,
                        label=f"layer {survey.layer}, 10–90% of prompts")
        mean_lam = survey.mean_metric.eigenvalues().clamp_min(0)
        ax.semilogy(idx, (mean_lam / mean_lam[0]).clamp_min(floor).numpy(), "--", color=line.get_color(),
                    label=f"layer {survey.layer}, averaged G")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("λ_i / λ_1")
    ax.set_title("Pullback Fisher metric spectrum")
    ax.set_ylim(bottom=1e-8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
