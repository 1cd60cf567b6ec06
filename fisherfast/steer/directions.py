"""Steering directions at a layer and their Fisher cost (docs/design.md §5).

FishBack (minimum distortion): among all δ with first-order concept change
qᵀδ = ρ, the one of least Fisher cost ½ δᵀGδ (to second order the KL between
the steered and unsteered next-token distributions):

    δ* = ρ G⁺q / (qᵀG⁺q).

G is singular (F has the all-ones kernel and rank ≤ d), so the solve is a
choice, ``solve=``:

- ``"damped"`` (default): x = G_λ⁻¹q, G_λ = G + λI with λ = damping · qᵀGq / qᵀq
  (the curvature along q: a scale that follows G, costs one product, and
  leaves the answer unchanged when G is scaled). As damping → 0, G_λ⁻¹q → G⁺q
  for q in the range of G. The default damping 1e-3 comes from SmolLM2 (layer
  15, raising p(" London") after "The capital of France is" from 0.012 to
  0.5): at 1e-6 the first step runs along near-null directions of G where the
  quadratic model fails (actual KL 2.6 for a predicted 0.05); at 1e-3 the
  target is reached at a total KL of 0.65 against 0.94 for Euclidean steps.
- ``"pinv"``: the paper's x = G⁺q, G⁺ = Σ_{λ_i > rcond·λ_max} u_i u_iᵀ/λ_i from
  the eigendecomposition of the dense G in float64 (default rcond 1e-4).

Measured on that prompt at layers 15 and 24 (``bench/bench_steer.py
--solves``): G⁺q at a rounding-level cutoff (rcond 1e-9; 516 / 573 of 576
eigenvalues kept) has cosine 0.06 / 0.11 with G_λ⁻¹q and barely raises the
concept along its ray (best p 0.044 / 0.033 from 0.012); iterated, it fails
to reach 0.5 in 20 steps at layer 15 and costs KL 1.25 (off-target 0.64) at
layer 24, against 0.63 (0.003) damped. Cutoffs 1e-6 / 1e-4 / 1e-2 keep
336 / 124 / 13 eigenvalues at layer 15 (cosine with damped 0.41 / 0.91 /
0.36): iterated to 0.5 they cost total KL 1.04 / 0.76 / 0.78 and off-target
KL 0.42 / 0.13 / 0.16, against 0.65 and 0.024 damped; at layer 24 rcond 1e-4
matches damped (0.63, off-target 0.0034 vs 0.0029). Frozen at h₀ and scaled
to a probability both rays reach, every pseudo-inverse direction costs more
off-target KL than the damped one (layer 15, rcond 1e-4: 0.14 vs 0.015 at
p = 0.27; layer 24: 0.0053 vs 0.0040 at p = 0.5). The damped solve is the
default because it is never worse and often far better; 1e-4 is the best
pseudo-inverse cutoff found.

Every solver takes a ``PullbackMetric`` (``fisherfast.metric``; a (d, d)
tensor is wrapped once as a ``DenseMetric`` by ``as_metric``) and uses its
surface: ``G.damped(λ)``, then Cholesky of its ``dense()`` in float64, or,
when it ``is_matrix_free``, conjugate gradients (scipy) on its
``to_scipy()``, one metric product per iteration, optionally preconditioned
by a randomized Nyström approximation (a ``LowRankMetric``) (on SmolLM2 layer 24:
228 CG iterations plain, 53 with a rank-64 Nyström preconditioner built in
0.14 s, 33 with rank 128).

Baselines: Euclidean gradient ascent δ = ρ q/‖q‖²; CAA, the mean of h⁺ − h⁻
over contrastive pairs; ActAdd, h⁺ − h⁻ of one pair; an ITI-style direction,
the normal of an L2-regularized logistic probe separating the two classes.

Cost ratio of any direction d scaled to the same first-order change:

    R(d) = (dᵀG_λd)(qᵀG_λ⁻¹q) / (qᵀd)² ≥ 1   (Cauchy–Schwarz in the G_λ inner product),

with equality exactly for d ∝ G_λ⁻¹q, the FishBack direction (with
``solve="pinv"``: (dᵀGd)(qᵀG⁺q)/(qᵀd)²).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fisherfast.checks import check_choice, check_finite, check_points, check_real, check_vector, expected
from fisherfast.metric import DenseMetric, LowRankMetric, PullbackMetric

DEFAULT_DAMPING = 1e-3
DEFAULT_RCOND = 1e-4
SOLVES = ("damped", "pinv")
DEFAULT_SOLVE = "damped"


def as_metric(G) -> PullbackMetric:
    """G as a ``PullbackMetric``: a metric as it is, a (d, d) floating tensor wrapped
    once as a ``DenseMetric`` (after checking it is finite). The one boundary
    where the steering solvers accept a plain tensor."""
    if isinstance(G, PullbackMetric):
        return G
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1] or not G.is_floating_point():
        raise ValueError(expected("G", "a PullbackMetric or a square floating (d, d) tensor",
                                  G if isinstance(G, torch.Tensor) else type(G)))
    return DenseMetric(check_finite("G", G))


def check_rho(rho) -> float:
    """ρ as a float: a finite real number (bools and strings rejected)."""
    return check_real("rho", rho)


def _matvec(G: PullbackMetric, v: torch.Tensor) -> torch.Tensor:
    """G v in float64 on v's device."""
    return (G @ v.to(G.device, G.dtype)).to(v.device, torch.float64)


def damping_value(G, q: torch.Tensor, damping: float = DEFAULT_DAMPING) -> float:
    """λ = damping · qᵀGq / qᵀq."""
    G = as_metric(G)
    damping = check_real("damping", damping, minimum=0)
    q64 = q.to(torch.float64)
    curvature = float(q64 @ _matvec(G, q64))
    if not math.isfinite(curvature):
        raise ValueError(f"G: expected finite values, got NaN or Inf (qᵀGq = {curvature})")
    return damping * curvature / float(q64 @ q64)


def _nystrom_preconditioner(preconditioner, lam: float, d: int):
    """P⁻¹ for G_λ from a low-rank Ĝ = U diag(λ̂) Uᵀ ≈ G (randomized Nyström PCG,
    Frangella, Tropp & Udell 2023): P⁻¹ = (λ̂_min + λ) U diag(1/(λ̂ + λ)) Uᵀ + (I − UUᵀ),
    which maps the captured eigenvalues of G_λ to about λ̂_min + λ and leaves the rest.
    A scipy LinearOperator, or None when Ĝ has no positive eigenvalue."""
    from scipy.sparse.linalg import LinearOperator

    if not isinstance(preconditioner, LowRankMetric):
        raise TypeError(expected("preconditioner", "a LowRankMetric (pullback_fisher(mode='low_rank')) of the "
                                 "same points", type(preconditioner)))
    if preconditioner.d != d:
        raise ValueError(expected("preconditioner", f"d = {d} (the metric's)", f"d = {preconditioner.d}", raw=True))
    U, values = preconditioner.factor
    values, U = values.to("cpu", torch.float64), U.to("cpu", torch.float64)
    keep = values > 0
    values, U = values[keep], U[:, keep]
    if values.numel() == 0:
        return None
    weights = (float(values.min()) + lam) / (values + lam) - 1.0  # P⁻¹ = I + U diag(weights) Uᵀ

    def apply(x):
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        return (v + U @ (weights * (U.T @ v))).numpy()

    return LinearOperator((d, d), matvec=apply, dtype=np.float64)


def check_solve(solve: str, rcond: float) -> None:
    check_choice("solve", solve, SOLVES)
    check_real("rcond", rcond, minimum=0, maximum=1, min_open=True, max_open=True)


def _dense64(A: PullbackMetric, device) -> torch.Tensor:
    dense = check_finite("G", A.dense().to(device, torch.float64))
    return 0.5 * (dense + dense.T)


def _pinv_solve(G: PullbackMetric, q64: torch.Tensor, rcond: float) -> torch.Tensor:
    """G⁺q with G⁺ = Σ_{λ_i > rcond·λ_max} u_i u_iᵀ / λ_i (eigh of the symmetrized dense G, float64)."""
    values, U = torch.linalg.eigh(_dense64(G, q64.device))
    top = float(values[-1])
    if not top > 0:
        raise ValueError("G: expected a positive eigenvalue, got none (the pseudo-inverse is zero)")
    keep = values > rcond * top
    U, values = U[:, keep], values[keep]
    return U @ ((U.T @ q64) / values)


def solve_metric(G, q: torch.Tensor, *, solve: str = DEFAULT_SOLVE, damping: float = DEFAULT_DAMPING,
                 rcond: float = DEFAULT_RCOND, rtol: float = 1e-10, maxiter: int | None = None,
                 preconditioner=None, callback=None) -> torch.Tensor:
    """x = G_λ⁻¹ q (``solve="damped"``) or x = G⁺q (``solve="pinv"``), float64 on q's device.

    G: a ``PullbackMetric`` (a (d, d) tensor is wrapped as a ``DenseMetric``).
    damped: A = ``G.damped(λ)``, λ = damping · qᵀGq/qᵀq. If A is not
    matrix-free: Cholesky of ``A.dense()`` in float64. Matrix-free: conjugate
    gradients on ``A.to_scipy()`` to relative residual ``rtol`` (at most
    ``maxiter`` products, default 10·d); raises RuntimeError if it stalls.
    ``preconditioner``: a ``LowRankMetric`` of the same points
    (``pullback_fisher(..., mode="low_rank", k=64)``, one batched product of
    k probes) for Nyström-preconditioned CG: the metric's fast-decaying
    spectrum (PR/d of a few %) is what makes plain CG slow. ``callback(x)`` is
    called after every CG iteration (scipy's convention).

    pinv: the paper's G⁺q from the eigendecomposition of the dense G
    (``G.dense()``: d products if matrix-free), keeping the eigenvalues above
    ``rcond``·λ_max. ``damping`` and the CG options do not apply."""
    G = as_metric(G)
    q = check_vector("q", q, G.d)
    check_solve(solve, rcond)
    if not bool((q != 0).any()):
        raise ValueError("q: expected a nonzero gradient, got zero (the concept score is flat at this point, "
                         "there is no direction to steer)")
    q64 = q.to(torch.float64)
    if solve == "pinv":
        if preconditioner is not None or callback is not None:
            raise ValueError("preconditioner, callback: expected None with solve='pinv' (they apply to "
                             "conjugate gradients)")
        return _pinv_solve(G, q64, rcond)
    A = G.damped(damping_value(G, q, damping))
    if not A.is_matrix_free:
        A64 = _dense64(A, q.device)
        L, info = torch.linalg.cholesky_ex(A64)
        if int(info) == 0:
            return torch.cholesky_solve(q64[:, None], L)[:, 0]
        return torch.linalg.lstsq(A64, q64[:, None]).solution[:, 0]  # singular G_λ (damping 0): least squares
    from scipy.sparse.linalg import cg

    d = G.d
    M = None if preconditioner is None else _nystrom_preconditioner(preconditioner, A.damping, d)
    maxiter = maxiter or 10 * d
    x, info = cg(A.to_scipy(), q64.cpu().numpy(), rtol=rtol, atol=0.0, maxiter=maxiter, M=M, callback=callback)
    if info != 0:
        raise RuntimeError(f"conjugate gradients did not reach rtol={rtol} in {maxiter} products "
                           f"(raise damping or maxiter)")
    return torch.from_numpy(x).to(q.device)


def fishback_direction(G, q: torch.Tensor, rho: float = 1.0, *, solve: str = DEFAULT_SOLVE,
                       damping: float = DEFAULT_DAMPING, rcond: float = DEFAULT_RCOND, **solver) -> torch.Tensor:
    """δ* = ρ x / (qᵀx), x = G_λ⁻¹q (``solve="damped"``) or G⁺q (``solve="pinv"``):
    the least-Fisher-cost step with qᵀδ = ρ (module docstring).

    Args:
        G: the pullback metric at the point (a (d, d) tensor or a PullbackMetric).
        q: (d,) gradient of the concept score there.
        rho: the first-order concept change qᵀδ.
        solve, damping, rcond: the solve (module docstring); ``solver``: rtol,
            maxiter, preconditioner, callback for conjugate gradients (``solve_metric``).
    Returns:
        δ (d,) in q's dtype. Its Fisher cost is ½ δᵀG_λδ = ½ ρ² / (qᵀG_λ⁻¹q)
        (damped), ½ δᵀGδ = ½ ρ² / (qᵀG⁺q) (pinv, q in the kept eigenspace).
    Raises:
        ValueError when qᵀx = 0 (pinv: q orthogonal to every kept eigenvector).
    """
    rho = check_rho(rho)
    G = as_metric(G)
    x = solve_metric(G, q, solve=solve, damping=damping, rcond=rcond, **solver)
    qx = float(q.to(torch.float64) @ x)
    if not qx > 0:
        raise ValueError("q: expected a component in the kept eigenspace of G, got qᵀG⁺q = 0 (lower rcond)")
    return (rho * x / qx).to(q.dtype)


def euclidean_direction(q: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    """δ = ρ q / ‖q‖²: gradient ascent with qᵀδ = ρ."""
    q, rho = check_vector("q", q), check_rho(rho)
    norm2 = float(q.to(torch.float64) @ q.to(torch.float64))
    if norm2 == 0:
        raise ValueError("q: expected a nonzero gradient, got zero (the concept score is flat at this point)")
    return (float(rho) / norm2) * q


def scale_to_first_order(direction: torch.Tensor, q: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    """ρ d / (qᵀd): any direction scaled to the first-order concept change ρ."""
    direction, q = check_vector("direction", direction), check_vector("q", q, direction.shape[0])
    rho = check_rho(rho)
    dq = float(q.to(torch.float64) @ direction.to(torch.float64))
    if dq == 0:
        raise ValueError("direction: expected a component along q, got one orthogonal to q (no first-order change)")
    return (float(rho) / dq) * direction


def cost_ratio(G, q: torch.Tensor, direction: torch.Tensor, *, solve: str = DEFAULT_SOLVE,
               damping: float = DEFAULT_DAMPING, rcond: float = DEFAULT_RCOND, **solver) -> float:
    """R(d) = (dᵀG_λd)(qᵀG_λ⁻¹q) / (qᵀd)² ≥ 1 (``solve="damped"``), 1 only for
    FishBack's direction; with ``solve="pinv"``, R(d) = (dᵀGd)(qᵀG⁺q) / (qᵀd)²,
    which is ≥ 1 when q lies in the kept eigenspace of G (with the rank cutoff
    it can fall below 1 for d with a component along discarded eigenvectors)."""
    G = as_metric(G)
    direction = check_vector("direction", direction, G.d)
    q = check_vector("q", q, G.d)
    check_solve(solve, rcond)
    lam = damping_value(G, q, damping) if solve == "damped" else 0.0
    d64, q64 = direction.to(torch.float64), q.to(torch.float64)
    dq = float(q64 @ d64)
    if dq == 0:
        raise ValueError("direction: expected a component along q, got one orthogonal to q (infinite cost ratio)")
    quad = float(d64 @ _matvec(G, d64)) + lam * float(d64 @ d64)
    qGq = float(q64 @ solve_metric(G, q, solve=solve, damping=damping, rcond=rcond, **solver))
    return quad * qGq / dq ** 2


def _paired(h_pos, h_neg) -> tuple[torch.Tensor, torch.Tensor]:
    for name, h in (("h_pos", h_pos), ("h_neg", h_neg)):
        if not isinstance(h, torch.Tensor) or h.dim() != 2:
            raise ValueError(expected(name, "a floating (n, d) tensor", h if isinstance(h, torch.Tensor)
                                      else type(h)))
        check_points(name, h, finite=True)
    if h_pos.shape[1] != h_neg.shape[1]:
        raise ValueError(expected("h_neg", f"d = {h_pos.shape[1]} (that of h_pos)", f"d = {h_neg.shape[1]}", raw=True))
    return h_pos, h_neg


def caa_direction(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """CAA: mean over contrastive pairs of h⁺ − h⁻ (h_pos[i] pairs with h_neg[i])."""
    h_pos, h_neg = _paired(h_pos, h_neg)
    if h_pos.shape != h_neg.shape:
        raise ValueError(expected("h_neg", f"shape {tuple(h_pos.shape)} (paired with h_pos)", h_neg))
    return (h_pos - h_neg).mean(dim=0)


def actadd_direction(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """ActAdd: h⁺ − h⁻ of one contrastive pair ((d,) each)."""
    h_pos, h_neg = check_vector("h_pos", h_pos), check_vector("h_neg", h_neg, h_pos.shape[0])
    return h_pos - h_neg


def probe_direction(h_pos: torch.Tensor, h_neg: torch.Tensor, *, l2: float = 1e-3) -> torch.Tensor:
    """ITI-style: the unit normal w of a logistic probe σ(wᵀ(h − m) + c) separating
    h_pos (label 1) from h_neg (label 0), m the mean of all activations, fitted
    by L-BFGS (scipy) in float64 on the mean log-loss + ``l2``·‖w‖²·mean‖h − m‖²
    (the last factor makes the penalty independent of the activations' scale).
    Oriented towards the positive class."""
    from scipy.optimize import minimize

    h_pos, h_neg = _paired(h_pos, h_neg)
    l2 = check_real("l2", l2, minimum=0, min_open=True)
    X = torch.cat([h_pos, h_neg]).to(torch.float64).cpu().numpy()
    y = np.concatenate([np.ones(len(h_pos)), np.zeros(len(h_neg))])
    X = X - X.mean(axis=0)
    scale = float((X ** 2).sum(axis=1).mean()) or 1.0
    sign = 2 * y - 1

    def loss(theta):
        w, c = theta[:-1], theta[-1]
        margin = sign * (X @ w + c)
        value = np.logaddexp(0.0, -margin).mean() + l2 * (w @ w) * scale
        s = -sign * 0.5 * (1 - np.tanh(margin / 2)) / len(y)  # ∂/∂(Xw + c) of the mean log-loss
        return value, np.concatenate([X.T @ s + 2 * l2 * scale * w, [s.sum()]])

    result = minimize(loss, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B")
    w = torch.from_numpy(result.x[:-1])
    norm = float(w.norm())
    if norm == 0:
        raise ValueError("h_pos, h_neg: expected two separable classes, got coinciding ones (the probe found no "
                         "separating direction)")
    return (w / norm).to(h_pos.dtype).to(h_pos.device)
