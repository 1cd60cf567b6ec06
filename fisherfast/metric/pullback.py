"""``pullback_fisher``: the pullback Fisher metric at a layer in one of its modes (docs/design.md §4).

For a hidden state h ∈ R^d at layer ℓ (one position, the context held fixed,
see ``fisherfast.split``), the upper map sends h to the head input a (after
the final norm) and to logits z = W a + b, p = softmax(z). With
B = ∂a/∂h (d×d) and the head metric G_head(a) = Wᵀ(diag p − p pᵀ)W (§3),

    G_ℓ(h) = Jᵀ F J = Bᵀ G_head B        (d×d, PSD, rank ≤ min(d, V−1)),
    KL(p(h) ‖ p(h+δ)) = ½ δᵀ G_ℓ δ + O(‖δ‖³).

Every head contraction goes through the model's head, ``split.head``
(``fisherfast.split.Head``: its ``gram``, ``gram_topk`` and ``matmat`` run the
fused softmax-Fisher ops with the head's logit scale s and soft-capping c
folded in exactly, so G_head = (∂z/∂a)ᵀ F (∂z/∂a) for z = softcap(s(W a + b)));
the model is reached only through ``SplitModel``. The result is a ``PullbackMetric`` (``fisherfast.metric.operator``).

Precision: products with the model run in the model's dtype; everything the
metric accumulates or factorizes (B, the sum over points, the Nyström
probes, QR, Cholesky, SVD) runs in float32 for bfloat16/float16 models and in
the model's dtype otherwise; that "work dtype" is the metric's dtype.
"""
from __future__ import annotations

import math

import torch

from fisherfast.metric import distributed as _dist
from fisherfast.metric.operator import (DenseMetric, LowRankMetric, MatrixFreeMetric, MetricReport,
                                        PullbackMetric)
from fisherfast.checks import check_choice, check_int, check_real, compute_dtype, expected
from fisherfast.concepts import ConceptSchema, hellinger_rows
from fisherfast.metric.points import paired_points

METRIC_MODES = ("exact", "matrix_free", "low_rank", "topk", "monte_carlo", "concept", "auto")

# Which keyword options each mode reads; an option given to another mode is an error.
MODE_OPTIONS = {
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
# mode="auto": exact up to this d, matrix-free above (see ``auto_mode``).
AUTO_EXACT_MAX_D = 2048


def check_mode_options(mode: str, options: dict, *, mode_name: str = "mode") -> str:
    """``mode`` if it is one of ``METRIC_MODES`` and every option in ``options``
    that is not None is one that mode reads (``MODE_OPTIONS``); names outside
    ``MODE_OPTIONS`` are not judged here. ``mode_name``: the argument's name
    in the caller (e.g. "metric_mode"). Raises ValueError naming the option."""
    check_choice(mode_name, mode, METRIC_MODES)
    for name, value in options.items():
        if value is not None and name in MODE_OPTIONS and mode not in MODE_OPTIONS[name]:
            users = " or ".join(repr(m) for m in MODE_OPTIONS[name])
            raise ValueError(expected(name, f"None with {mode_name}={mode!r} (it is read by {mode_name}={users})",
                                      value))
    return mode


def auto_mode(d: int) -> str:
    """The mode ``mode="auto"`` picks at dimension d: "exact" for d ≤
    ``AUTO_EXACT_MAX_D`` (2,048), else "matrix_free".

    Why by d: the exact build costs d reverse products plus a V·d² head Gram;
    one matrix-free product costs a few passes of one token through the upper
    blocks plus about one read of W. Measured with bench/bench_metric.py
    ``--auto`` (two random-init Llama blocks shaped like SmolLM2, TinyLlama
    and Llama-2-7B, V = 8,192, one thread; on a shared, loaded machine), the
    exact build cost as much as 17 / 119 / 545 matrix-free products at
    d = 576 / 2,048 / 4,096. A damped CG solve takes 50–250 products (fewer
    with a Nyström preconditioner, which itself costs k products), so exact
    wins up to d ≈ 2,048 and matrix-free beyond. The head's share grows with
    V (V·d² for the exact Gram, about V·d per product) and leaves the ratio
    about the same. Ask for "exact" when you need the spectrum: dense(),
    trace() and diagnostics() of a matrix-free metric cost d products.
    """
    return "exact" if d <= AUTO_EXACT_MAX_D else "matrix_free"


def pullback_fisher(split, contexts, *, mode: str = "exact", h: torch.Tensor | None = None,
                    k: int | None = None, trace_probes: int | None = None, tail_tol: float | None = None,
                    n_samples: int | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, concepts=None, chunk: int = 256,
                    progress: bool = True, distributed=None) -> PullbackMetric:
    """The pullback Fisher metric G_ℓ = Bᵀ G_head B at layer ``split.layer`` (docs/design.md §4),
    averaged over points: G = (1/n) Σ_i G_ℓ(h_i; context_i).

    Args:
        split: a ``fisherfast.split.SplitModel``.
        contexts: one ``SplitContext`` or a non-empty list of them (from
            ``split.context`` / ``split.contexts``).
        mode: one of
            "exact": B = ∂a/∂h from ``split.jacobian`` (d reverse products),
                the head metric G_head(a) from the fused centered Gram op (§3),
                then G = Bᵀ G_head B. Cost per point: d VJPs + one V·d² head pass.
                Returns a ``DenseMetric``.
            "matrix_free": G v = Bᵀ G_head (B v) per point, from one recorded
                forward (``split.linearize``: B v and Bᵀ u by reverse passes
                over it, no forward re-run) and one fused head product
                (``split.head.matmat`` on the cached logits). Cost per
                product and point: two reverse passes of one token through the
                upper blocks and about one read of W, measured at 3.3× one
                forward of the upper blocks on SmolLM2 (layer 15, one thread;
                8.2× when every product re-ran the forward); k probes at once
                cost less per probe (0.6× a forward each at k = 8). Up front:
                one recorded forward per point, at the first product. Returns a
                ``MatrixFreeMetric``.
            "low_rank": randomized Nyström approximation from ``k`` Gaussian
                probes Ω (one batched matrix-free product G Ω): with
                Y_ν = GΩ + νΩ, L Lᵀ = Ωᵀ Y_ν, Y_ν L⁻ᵀ = U Σ Vᵀ, the approximation is
                Ĝ = U diag(max(Σ² − ν, 0)) Uᵀ ≼ G (Tropp et al. 2017). The report
                gives ``trace_fraction`` = tr Ĝ / tr G with tr G − tr Ĝ
                estimated by Hutchinson on G − Ĝ from ``trace_probes`` extra
                Rademacher probes, and its standard error. Returns a ``LowRankMetric``.
            "topk": the head metric restricted to the fewest most probable
                tokens whose tail mass τ = 1 − Σ_{kept} p is ≤ ``tail_tol`` (§3),
                G = Bᵀ G_head^top B; τ and the kept count per point are in the
                report. The restricted head metric has rank r ≤ n_kept, so with
                r < d it is written Q Λ Qᵀ and G = Σ_j λ_j (Bᵀq_j)(Bᵀq_j)ᵀ from r
                VJPs instead of d.
            "monte_carlo": the Fisher–Stein estimator: y_s ∼ p,
                g_s = Jᵀ(e_{y_s} − p) = Bᵀ s (c′_{y_s} w_{y_s} − μ) with
                μ = Wᵀ(c′ ⊙ p) (s the head's logit scale, c′ = 1 − tanh²(z_lin/c)
                its soft-cap derivative; s = c′ = 1 for z = W a + b),
                G ≈ (1/S) Σ_s g_s g_sᵀ, S = ``n_samples`` VJPs per point. The
                report's ``std_error_fro`` estimates E‖Ĝ − G‖_F from the samples.
            "concept": the pullback Hellinger metric of the concept
                distribution q = (Σ_{t∈c} p_t)_{c∈C} ∪ {q_other = 1 − Σ_c q_c}:
                G_H = J_sᵀ J_s = ¼ J_qᵀ diag(1/q) J_q with s = √q, rank ≤ n_c,
                from the Hellinger rows J_s of ``fisherfast.concepts.hellinger_rows``
                (n_c+1 reverse products through the head, n_c+1 VJPs; the
                geodesic concept metric uses the same rows). Bins with q = 0
                contribute 0 (their gradient vanishes with them). The report's
                ``q`` per point is q in float64.
            "auto": "exact" or "matrix_free" by d (``auto_mode``); the report
                names the mode chosen.
        h: the points; default each context's own state ``ctx.h``. A (d,)
            tensor (one context), or (n, d) with n contexts (paired) or one
            context (n candidate states for the same context).
        k: low_rank probes (default 64, ≤ d).
        trace_probes: low_rank Hutchinson probes for the trace claim (default 16).
        tail_tol: topk tail-mass tolerance in (0, 1) (default 1e-3).
        n_samples: monte_carlo samples per point (default 256).
        seed, generator: the random source of low_rank / monte_carlo (at most one).
        concepts: a ``fisherfast.concepts.ConceptSchema`` over ``split.V``, or
            what its constructor takes: a non-empty sequence (or a mapping
            name → entry) whose entries are a token id or a sequence of token
            ids; concepts must be disjoint; the "other" bin is every other token.
        chunk: tangents / cotangents per vmapped batch.
        progress: show a tqdm bar over the points (when there are several).
        distributed: None/False (default): this process computes every point.
            True or a ProcessGroup: every rank passes the same contexts, each
            computes its share of the points and G is all-reduced, so every
            rank returns the same metric, equal to the single-process one up
            to summation order (``fisherfast.metric.distributed``). A
            matrix-free metric's products are then collective (every rank must
            apply the same products); low_rank probes come from the first rank;
            monte_carlo draws from each rank's own generator (an equally valid
            estimate, not the single-process draw).

    Returns:
        A ``PullbackMetric`` of the work dtype (the model's, float32 for
        half-precision models) on the model's device, with ``report``.

    Raises:
        ValueError / TypeError: a bad mode, option, context or point (before any work).
        RuntimeError: ``distributed`` without an initialized process group.
    """
    check_mode_options(mode, {"k": k, "trace_probes": trace_probes, "tail_tol": tail_tol, "n_samples": n_samples,
                              "seed": seed, "generator": generator, "concepts": concepts})
    from fisherfast.split import SplitModel

    if not isinstance(split, SplitModel):
        raise TypeError(expected("split", "a fisherfast.split.SplitModel (SplitModel(model, layer))",
                                 type(split)))
    chunk = check_int("chunk", chunk, minimum=1)
    if mode == "auto":
        mode = auto_mode(split.d)
    if mode == "concept":
        if concepts is None:
            raise ValueError(expected("concepts", "a ConceptSchema or token-id sets with mode='concept'", None))
        schema = ConceptSchema.of(concepts, split.V)
    if mode == "topk":
        tail_tol = DEFAULT_TAIL_TOL if tail_tol is None else \
            check_real("tail_tol", tail_tol, minimum=0, maximum=1, min_open=True, max_open=True)
    points = paired_points(split, contexts, h)
    group, rank, world = _dist.resolve_group(distributed)
    run = _Run(split, points, chunk, progress, mode, group, rank, world)

    if mode == "matrix_free":
        return MatrixFreeMetric(_matrix_free_matmat(run), split.d, dtype=run.dtype, device=run.device,
                                report=run.report())
    if mode == "low_rank":
        k = DEFAULT_K if k is None else check_int("k", k, minimum=1, maximum=split.d)
        trace_probes = DEFAULT_TRACE_PROBES if trace_probes is None else \
            check_int("trace_probes", trace_probes, minimum=1)
        return _nystrom(run, k, trace_probes, _generator(seed, generator, run.device))
    if mode == "exact":
        G, _ = run.accumulate(lambda ctx, x: (_exact(split, ctx, x, chunk, run.dtype), None))
        return DenseMetric(G, report=run.report())
    if mode == "topk":
        G, records = run.accumulate(lambda ctx, x: _topk(split, ctx, x, tail_tol, chunk, run.dtype))
        return DenseMetric(G, report=run.report(tail_tol=tail_tol, tau=tuple(r[0] for r in records),
                                                n_kept=tuple(r[1] for r in records)))
    if mode == "monte_carlo":
        n_samples = DEFAULT_N_SAMPLES if n_samples is None else check_int("n_samples", n_samples, minimum=1)
        gen = _generator(seed, generator, run.device)
        G, records = run.accumulate(lambda ctx, x: _monte_carlo(split, ctx, x, n_samples, gen, chunk, run.dtype))
        # E‖Ĝ − G‖_F² = (E‖g‖⁴ − ‖G‖_F²)/S per point; the point means are averaged.
        std_error = float(torch.tensor(records, dtype=torch.float64).clamp_min(0).sum().sqrt()) / len(points)
        return DenseMetric(G, report=run.report(n_samples=n_samples, std_error_fro=std_error))
    G, records = run.accumulate(lambda ctx, x: _concept(split, ctx, x, schema, chunk, run.dtype))
    return DenseMetric(G, report=run.report(concepts=schema.names, q=tuple(records)))


# --------------------------------------------------------------------------- the loop over points

class _Run:
    """One call's points, this rank's share of them and the work dtype."""

    def __init__(self, split, points, chunk, progress, mode, group, rank, world):
        self.split, self.points, self.chunk, self.progress, self.mode = split, points, chunk, progress, mode
        self.group, self.rank, self.world = group, rank, world
        self.dtype = compute_dtype(split.W.dtype)
        self.device = split.W.device
        self.mine = list(range(rank, len(points), world))   # this rank's point indices

    def report(self, **fields) -> MetricReport:
        return MetricReport(mode=self.mode, n_points=len(self.points), world_size=self.world, **fields)

    def iterate(self):
        from tqdm.auto import tqdm

        return tqdm(self.mine, desc=f"pullback_fisher[{self.mode}]", leave=False,
                    disable=not self.progress or len(self.mine) < 2)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else _dist.all_reduce_sum(x, self.group)

    def accumulate(self, point_metric):
        """(1/n) Σ_i G_i over all points (all-reduced across ranks) and the per-point
        records in point order; ``point_metric(ctx, x)`` → (G_i, record)."""
        d = self.split.d
        G = torch.zeros(d, d, dtype=self.dtype, device=self.device)
        records = []
        for i in self.iterate():
            ctx, x = self.points[i]
            G_i, record = point_metric(ctx, x)
            G += G_i
            records.append((i, record))
        G = self.all_sum(G) / len(self.points)
        ordered = [r for _, r in records] if self.world == 1 else \
            _dist.gather_in_order(records, self.group, len(self.points))
        return G, ordered


def _vjp(split, ctx, x, C, chunk, dtype):
    """Rows Bᵀ c_i for cotangents C (k, d) given in any dtype; the result in ``dtype``."""
    return split.vjp(ctx, x, C.to(split.W.dtype).contiguous(), chunk=chunk).to(dtype)




# --------------------------------------------------------------------------- per-point modes

def _exact(split, ctx, x, chunk, dtype):
    B = split.jacobian(ctx, x, chunk=chunk).to(dtype)
    a = split.head_input(ctx, x)
    G_head = split.head.gram(a[None])[0].to(dtype)                   # centered form (§3)
    return B.T @ G_head @ B


def _topk(split, ctx, x, tail_tol, chunk, dtype):
    a = split.head_input(ctx, x)
    truncated = split.head.gram_topk(a[None], tail_tol=tail_tol)
    G_top = truncated.G[0].to(dtype)
    n_kept = int(torch.as_tensor(truncated.n_kept).flatten()[0])
    record = (float(torch.as_tensor(truncated.tau).flatten()[0]), n_kept)
    if n_kept >= split.d:
        B = split.jacobian(ctx, x, chunk=chunk).to(dtype)
        return B.T @ G_top @ B, record
    # rank(G_top) ≤ n_kept < d: G = Σ_j λ_j (Bᵀq_j)(Bᵀq_j)ᵀ, n_kept VJPs instead of d.
    lam, Q = torch.linalg.eigh(G_top)
    lam, Q = lam[-n_kept:].clamp_min(0), Q[:, -n_kept:]
    R = _vjp(split, ctx, x, (Q * lam.sqrt()).T, chunk, dtype)   # rows √λ_j Bᵀq_j
    return R.T @ R, record


def _head_rows(head, a, dtype):
    """(p, c′, μ) for the head's score rows: with z = softcap(s(W a + b)),
    (∂z/∂a)ᵀ(e_y − p) = s (c′_y w_y − μ), μ = Wᵀ(c′ ⊙ p), c′ = 1 − tanh²(z_lin/c)
    (1 without soft-capping); p float64, c′ and μ in ``dtype``."""
    z_lin = head.linear_logits(a)
    z = z_lin if head.softcap is None else torch.tanh(z_lin / head.softcap) * head.softcap
    p = torch.softmax(z.double(), -1)
    cap = None if head.softcap is None else (1 - torch.tanh(z_lin.double() / head.softcap) ** 2).to(dtype)
    weights = p.to(dtype) if cap is None else p.to(dtype) * cap
    return p, cap, weights @ head.W.to(dtype)


def _monte_carlo(split, ctx, x, n_samples, generator, chunk, dtype):
    head = split.head
    p, cap, mu = _head_rows(head, split.head_input(ctx, x), dtype)
    y = torch.multinomial(p, n_samples, replacement=True, generator=generator)
    W_y = head.W[y].to(dtype) if cap is None else head.W[y].to(dtype) * cap[y, None]
    g = _vjp(split, ctx, x, head.scale * (W_y - mu), chunk, dtype)   # rows g_s = Bᵀ(∂z/∂a)ᵀ(e_{y_s} − p)
    G = g.T @ g / n_samples
    g2 = (g.double() ** 2).sum(1)
    return G, float(((g2 ** 2).mean() - (G.double() ** 2).sum()) / n_samples)


def _concept(split, ctx, x, schema, chunk, dtype):
    J_s, q = hellinger_rows(split, ctx, x, schema, chunk=chunk)     # (n_c+1, d) rows ∂√q_b/∂h
    J_s = J_s.to(dtype)
    return J_s.T @ J_s, tuple(q.tolist())                           # G_H = J_sᵀ J_s = ¼ J_qᵀ diag(1/q) J_q


# --------------------------------------------------------------------------- matrix-free and Nyström

def _matrix_free_matmat(run: _Run):
    """U (d, k) ↦ (1/n) Σ_i B_iᵀ G_head(a_i) B_i U: per point one fused head
    product between two reverse passes over the point's recorded forward
    (docs/design.md §4, matrix-free). The forwards are recorded at the first product."""
    split, chunk = run.split, run.chunk
    cache: list = []

    def linearizations():
        if not cache:
            for i in run.mine:
                ctx, x = run.points[i]
                lin = split.linearize(ctx, x)
                cache.append((lin, split.head.linear_logits(lin.a.detach())))
        return cache

    def matmat(U):
        out = torch.zeros_like(U)
        Ut = U.T.to(split.W.dtype).contiguous()
        for lin, z in linearizations():
            BU = lin.jvp(Ut, chunk=chunk)                                                     # (k, d) rows B u_j
            HBU = split.head.matmat(None, BU.T.contiguous(), logits=z[None])[0]  # (d, k) G_head B U
            out += lin.vjp(HBU.T.contiguous(), chunk=chunk).T.to(U.dtype)                    # Bᵀ G_head B U
        return run.all_sum(out) / len(run.points)

    return matmat


def _nystrom(run: _Run, k, trace_probes, generator):
    """Randomized Nyström (Tropp, Yurtsever, Udell & Cevher 2017, stable variant)
    from k probes, plus a Hutchinson estimate of the trace it misses. Probes
    and factorizations in the work dtype (float32 for half models: LAPACK has
    no bfloat16 QR)."""
    d, dtype, device = run.split.d, run.dtype, run.device
    Omega = torch.linalg.qr(torch.randn(d, k, dtype=dtype, device=device, generator=generator)).Q
    R = torch.randint(0, 2, (d, trace_probes), generator=generator, device=device).to(dtype) * 2 - 1
    probes = torch.cat([Omega, R], 1)
    if run.world > 1:
        probes = _dist.broadcast_from_first(probes, run.group)
        Omega, R = probes[:, :k], probes[:, k:]
    from tqdm.auto import tqdm

    matmat = _matrix_free_matmat(run)
    Y_all = torch.zeros_like(probes)
    starts = range(0, probes.shape[1], run.chunk)
    for start in tqdm(starts, desc="pullback_fisher[low_rank]", leave=False,
                      disable=not run.progress or len(starts) < 2):
        Y_all[:, start:start + run.chunk] = matmat(probes[:, start:start + run.chunk])
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
    report = run.report(k=k, trace_probes=trace_probes, trace_captured=captured, trace_estimate=total,
                        trace_fraction=captured / total if total > 0 else float("nan"),
                        trace_fraction_se=captured * tail_se / total ** 2 if total > 0 else float("nan"))
    return LowRankMetric(U, lam, report=report)


# --------------------------------------------------------------------------- option checks

def _generator(seed, generator, device):
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: expected one of them, got both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(expected("generator", "a torch.Generator", type(generator)))
        return generator
    if seed is not None:
        return torch.Generator(device=device).manual_seed(check_int("seed", seed, minimum=0))
    return None
