"""Paths between hidden states, T waypoints x_0..x_{T−1} (docs/design.md §6).

Closed form:
- ``chord_path``: the straight chord x_t = h₀ + (t/(T−1))(h₁ − h₀).
- ``spline_path``: a cubic spline through class centroids c_0..c_{K−1}
  (``scipy.interpolate.CubicSpline``; bc_type "periodic" for cyclic concepts
  — weekdays, months — where the curve closes through c_0 again, "natural"
  otherwise), parametrized by cumulative chord length between consecutive
  centroids and resampled at T parameter values equally spaced between two
  of the centroids.

Free waypoints (``lbfgs_path``), endpoints fixed, starting on the chord, on
one of two energies of a metric M = JᵀJ + εI (``fisherfast.geodesic.metrics``;
a relative ε is resolved on the chord first, ``metric.resolved``):

``energy="embedded"`` (the default; finds geodesics). Every metric here is
the pullback of a feature map s (J = ∂s/∂x), so the path minimizes

    E_s(x) = Σ_{i<T−1} ‖s(x_{i+1}) − s(x_i)‖² + ε‖x_{i+1} − x_i‖²

with its exact gradient by autograd (``torch.optim.LBFGS``, strong-Wolfe line
search). For the concept Hellinger metric E_s is the sum of squared Hellinger
distances between neighbouring waypoints (+ the ε term); a minimizer is a
discrete minimum-energy path and tends to the geodesic as T grows, ∇_x M
terms included. Measured on M = diag(cosh² x) (s = sinh, ε = 0): the
minimizer is the exact geodesic x_i = asinh(lerp(sinh h₀, sinh h₁)).
Converged means: the last L-BFGS run changed E_s by ≤ rtol relative AND the
scale-free gradient norm ‖∇E_s‖·‖h₁ − h₀‖/E_s at the returned path is ≤ gtol.

``energy="frozen"`` (docs/design.md §6: the seed paper's headline solver). Each
outer step evaluates J_i = J(x_i) at the current path, freezes it, and
minimizes the convex quadratic Σ_i ‖J_i Δ_i‖² + ε‖Δ_i‖² by L-BFGS. What it
finds: a fixed point satisfies the discrete conservation law
M(x_{i−1})(x_i − x_{i−1}) = M(x_i)(x_{i+1} − x_i), i.e. d/dt(M ẋ) = 0. That
is the geodesic only when M is constant along the path; otherwise it drops
the ½∇_x(ẋᵀMẋ) term of the geodesic equation. What it does not find:
geodesics of a curved metric (on diag(cosh² x) its fixed point lies 0.14 away
from the geodesic at T = 9, 0.08 at T = 17, with a higher E_s than the
chord), and its iteration need not settle at all: on SmolLM2 at layer 24 the
fresh-factor energies oscillate and its low proxy energy comes with a true
Σ d_H² 2.5–5× the chord's. The path returned is the iterate with the lowest
fresh-factor energy (never worse than the chord on that proxy). Converged
means: the fresh-factor energy changed by ≤ rtol relative AND no waypoint
moved more than xtol·‖h₁ − h₀‖ in the last outer step.

``GeodesicResult`` reports the energy history, the iterations, the ε used,
and ``converged`` only when its stated criterion held.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from tqdm.auto import tqdm

from fisherfast.checks import check_finite, check_int, check_real
from fisherfast.geodesic.metrics import GeodesicMetric

__all__ = ["chord_path", "centroid_spline", "spline_path", "path_energy", "embedded_energy", "lbfgs_path",
           "GeodesicResult"]


def _check_T(T, minimum: int) -> int:
    return check_int("T", T, minimum=minimum)


def _check_endpoints(h0, h1) -> None:
    for name, h in (("h0", h0), ("h1", h1)):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != 1 or h.numel() == 0:
            raise TypeError(f"{name}: expected a floating 1-D tensor (d,), got "
                            f"{type(h).__name__ if not isinstance(h, torch.Tensor) else tuple(h.shape)}")
    if h0.shape != h1.shape or h0.dtype != h1.dtype or h0.device != h1.device:
        raise ValueError(f"h0, h1: expected the same shape, dtype and device, got {tuple(h0.shape)} {h0.dtype} "
                         f"{h0.device} and {tuple(h1.shape)} {h1.dtype} {h1.device}")
    for name, h in (("h0", h0), ("h1", h1)):
        check_finite(name, h)


def chord_path(h0: torch.Tensor, h1: torch.Tensor, T: int) -> torch.Tensor:
    """(T, d): x_t = h₀ + (t/(T−1))(h₁ − h₀) (``torch.lerp``: x_0 = h₀, x_{T−1} = h₁ exactly)."""
    _check_endpoints(h0, h1)
    T = _check_T(T, 2)
    w = torch.linspace(0.0, 1.0, T, dtype=h0.dtype, device=h0.device)[:, None]
    return torch.lerp(h0[None], h1[None], w)


def centroid_spline(knots: torch.Tensor, *, periodic: bool) -> tuple[CubicSpline, np.ndarray]:
    """The cubic spline through ``knots`` (K, d) and its knot parameters u.

    u_0 = 0, u_{k+1} = u_k + ‖c_{k+1} − c_k‖ (cumulative chord length). With
    ``periodic`` the curve closes: knot K is c_0 again at u_K = u_{K−1} +
    ‖c_0 − c_{K−1}‖, bc_type "periodic" (value, first and second derivative
    match at u_0 and u_K; evaluation wraps around with period u_K);
    otherwise bc_type "natural" (second derivative 0 at both ends). Computed
    in float64 numpy.

    Returns:
        (spline, u) with u of length K + 1 (periodic) or K.
    """
    if not isinstance(knots, torch.Tensor) or not knots.is_floating_point() or knots.ndim != 2:
        raise TypeError(f"knots: expected a floating tensor (K, d) of centroids, got "
                        f"{type(knots).__name__ if not isinstance(knots, torch.Tensor) else tuple(knots.shape)}")
    if not isinstance(periodic, bool):
        raise TypeError(f"periodic: expected a bool, got {type(periodic).__name__}")
    minimum = 3 if periodic else 2
    check_finite("knots", knots)
    if knots.shape[0] < minimum:
        raise ValueError(f"knots: expected at least {minimum} centroids for a "
                         f"{'periodic' if periodic else 'natural'} spline, got {knots.shape[0]}")
    Y = knots.detach().to("cpu", torch.float64).numpy()
    if periodic:
        Y = np.concatenate([Y, Y[:1]])
    steps = np.linalg.norm(np.diff(Y, axis=0), axis=1)
    if not np.all(steps > 0):
        k = int(np.argmin(steps))
        raise ValueError(f"knots: centroids {k} and {(k + 1) % knots.shape[0]} coincide; the chord-length "
                         "parametrization needs distinct consecutive centroids")
    u = np.concatenate([[0.0], np.cumsum(steps)])
    return CubicSpline(u, Y, bc_type="periodic" if periodic else "natural"), u


def spline_path(knots: torch.Tensor, start: int, stop: int, T: int, *, periodic: bool) -> torch.Tensor:
    """(T, d): the ``centroid_spline`` of ``knots`` from centroid ``start`` to centroid ``stop``.

    Samples the spline at T parameters equally spaced from u_start to u_stop.
    Non-periodic: the direction is whichever way ``stop`` lies (start < stop
    runs forward). Periodic (cyclic concepts): always forward through
    increasing indices, wrapping past the last centroid to the first (from 5
    to 1 of 7 passes 6, 0); reverse the result for the other way round.
    Endpoints are the centroids themselves, up to float64 round-off; the path
    is in the knots' dtype and device.
    """
    spline, u = centroid_spline(knots, periodic=periodic)
    T = _check_T(T, 2)
    K = knots.shape[0]
    for name, value in (("start", start), ("stop", stop)):
        check_int(name, value, minimum=0, maximum=K - 1)
    if start == stop:
        raise ValueError(f"start, stop: expected two different centroids, got {start} twice")
    u_start, u_stop = u[start], u[stop]
    if periodic and stop < start:
        u_stop = u_stop + u[-1]            # one period further: the spline wraps
    path = spline(np.linspace(u_start, u_stop, T))
    return torch.from_numpy(path).to(knots.device, knots.dtype)


def _check_metric_path(metric, path) -> torch.Tensor:
    if not isinstance(metric, GeodesicMetric):
        raise TypeError(f"metric: expected a GeodesicMetric (FlatMetric, ConceptHellingerMetric, EncoderMetric), "
                        f"got {type(metric).__name__}")
    if not isinstance(path, torch.Tensor) or not path.is_floating_point():
        raise TypeError(f"path: expected a floating tensor (T, d), got {type(path).__name__}")
    if path.ndim != 2 or path.shape[0] < 2 or path.shape[1] != metric.d:
        raise ValueError(f"path: expected shape (T, {metric.d}) with T ≥ 2, got {tuple(path.shape)}")
    return path


def _frozen_energy(J: torch.Tensor, eps: float, path: torch.Tensor) -> torch.Tensor:
    """Σ_i ‖J_i Δ_i‖² + ε‖Δ_i‖², Δ_i = x_{i+1} − x_i, for factors J (T−1, m, d)."""
    delta = path[1:] - path[:-1]
    return (torch.einsum("imd,id->im", J, delta) ** 2).sum() + eps * (delta ** 2).sum()


def path_energy(metric: GeodesicMetric, path: torch.Tensor) -> float:
    """E(x) = Σ_{i<T−1} ‖J(x_i)Δ_i‖² + ε‖Δ_i‖² with the factor at each segment's start
    (the frozen-factor energy). ε must be absolute (``metric.resolved``).

    Cost: ``metric.factor`` at T − 1 points."""
    path = _check_metric_path(metric, path).detach()
    eps = metric.require_eps()
    return float(_frozen_energy(metric.factor(path[:-1]), eps, path))


@dataclasses.dataclass(frozen=True)
class GeodesicResult:
    """The outcome of ``lbfgs_path``.

    Attributes:
        path: (T, d) the returned waypoints (endpoints h₀, h₁ bit for bit):
            the last iterate (embedded) or the lowest-energy iterate (frozen).
        energy: its energy (E_s for "embedded", the fresh-factor E for "frozen").
        energies: the energy after each outer step (energies[0]: the initial path).
        converged: whether ``criterion`` held at the end.
        criterion: the convergence criterion, in words with its tolerances.
        iterations: outer steps taken; inner_iterations: L-BFGS iterations in all.
        eps: the ε used (resolved from the chord when the metric's was relative).
        energy_kind: "embedded" or "frozen".
        last_path: the last iterate (frozen: the fixed point when converged; it
            can have a higher energy than ``path``).
    """

    path: torch.Tensor
    energy: float
    energies: list[float]
    converged: bool
    criterion: str
    iterations: int
    inner_iterations: int
    eps: float
    energy_kind: str
    last_path: torch.Tensor


def embedded_energy(metric: GeodesicMetric, path: torch.Tensor) -> torch.Tensor:
    """E_s(x) = Σ_{i<T−1} ‖s(x_{i+1}) − s(x_i)‖² + ε‖x_{i+1} − x_i‖² (0-dim, differentiable):
    ``metric.segment_energy(path)`` plus the ε term (a metric without a feature map, such as
    the conformal ``DensityMetric``, supplies its own discrete energy). ε must be absolute
    (``metric.resolved``).

    Cost: ``metric.features`` at T points."""
    path = _check_metric_path(metric, path)
    eps = metric.require_eps()
    return metric.segment_energy(path) + eps * ((path[1:] - path[:-1]) ** 2).sum()


ENERGIES = ("embedded", "frozen")


def lbfgs_path(metric: GeodesicMetric, h0: torch.Tensor, h1: torch.Tensor, T: int = 16, *,
               init: torch.Tensor | None = None, energy: str = "embedded", outer_steps: int = 10,
               inner_steps: int = 100, history_size: int = 20, rtol: float = 1e-4, gtol: float = 1e-3,
               xtol: float = 1e-3, progress: bool = False) -> GeodesicResult:
    """Free-waypoint path from h₀ to h₁ on the embedded or frozen energy (module docstring).

    Args:
        metric: a ``GeodesicMetric``; a relative ε (None) is resolved on the
            T-point chord (``metric.resolved``) and reported as ``result.eps``.
        h0, h1: (d,) endpoints (kept fixed, bit for bit).
        T: number of waypoints (≥ 3).
        init: (T, d) starting path whose first and last rows are h₀, h₁
            (default: ``chord_path(h0, h1, T)``).
        energy: "embedded" (default: exact gradient, finds geodesics) or
            "frozen" (the frozen-factor iteration).
        outer_steps: embedded: L-BFGS runs; frozen: factor evaluations after
            the initial one (at most).
        inner_steps: L-BFGS iterations per outer step (``max_iter``); energies
            are divided by their starting value, so L-BFGS tolerances are relative.
        history_size: L-BFGS memory.
        rtol: relative energy change of an outer step below which it may stop.
        gtol: embedded: the scale-free gradient norm required for convergence.
        xtol: frozen: the largest waypoint move, relative to ‖h₁ − h₀‖,
            required for convergence.
        progress: a tqdm bar over the outer steps.

    Raises:
        TypeError / ValueError for a bad argument, before any work.

    Cost per outer step: embedded, up to ``inner_steps`` × (``metric.features``
    at T points + its backward); frozen, ``metric.factor`` at T − 1 points plus
    up to ``inner_steps`` L-BFGS iterations of O(T·m·d).
    """
    if not isinstance(metric, GeodesicMetric):
        raise TypeError(f"metric: expected a GeodesicMetric (FlatMetric, ConceptHellingerMetric, EncoderMetric), "
                        f"got {type(metric).__name__}")
    _check_endpoints(h0, h1)
    if h0.shape[0] != metric.d:
        raise ValueError(f"h0, h1: expected length {metric.d} (the metric's d), got {h0.shape[0]}")
    T = _check_T(T, 3)
    for name, value in (("outer_steps", outer_steps), ("inner_steps", inner_steps), ("history_size", history_size)):
        check_int(name, value, minimum=1)
    for name, value in (("rtol", rtol), ("gtol", gtol), ("xtol", xtol)):
        check_real(name, value, minimum=0)
    if energy not in ENERGIES:
        raise ValueError(f"energy: expected one of {ENERGIES}, got {energy!r}")
    if init is None:
        path = chord_path(h0, h1, T)
    else:
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (T, h0.shape[0]) or init.dtype != h0.dtype:
            raise ValueError(f"init: expected a ({T}, {h0.shape[0]}) tensor of dtype {h0.dtype}, got "
                             f"{tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__}")
        if not (torch.equal(init[0], h0) and torch.equal(init[-1], h1)):
            raise ValueError("init: expected first and last waypoints equal to h0 and h1, got others")
        check_finite("init", init)
        path = init.detach().to(h0.device).clone()
    h0, h1 = h0.detach(), h1.detach()
    metric = metric.resolved(h0, h1, T)
    if energy == "embedded":
        return _lbfgs_embedded(metric, h0, h1, path, outer_steps, inner_steps, history_size, rtol, gtol, progress)
    return _lbfgs_frozen(metric, h0, h1, path, outer_steps, inner_steps, history_size, rtol, xtol, progress)


def _lbfgs(params, inner_steps, history_size, dtype):
    # Tolerances at round-off: each run stops at the precision of the dtype or after ``inner_steps``.
    tiny = torch.finfo(dtype).eps
    return torch.optim.LBFGS(params, lr=1.0, max_iter=inner_steps, history_size=history_size,
                             tolerance_grad=10 * tiny, tolerance_change=tiny, line_search_fn="strong_wolfe")


def _n_iter(optimizer) -> int:
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    return int(state.get("n_iter", 0))


def _lbfgs_embedded(metric, h0, h1, path, outer_steps, inner_steps, history_size, rtol, gtol, progress):
    """Minimize E_s over the interior waypoints: up to ``outer_steps`` L-BFGS runs."""
    with torch.no_grad():
        energies = [float(embedded_energy(metric, path))]
    scale = energies[0] if energies[0] > 0 else 1.0
    interior = path[1:-1].clone().requires_grad_(True)
    optimizer = _lbfgs([interior], inner_steps, history_size, path.dtype)

    def closure():
        optimizer.zero_grad()
        loss = embedded_energy(metric, torch.cat([h0[None], interior, h1[None]])) / scale
        loss.backward()
        return loss

    small_change = False
    for _ in tqdm(range(outer_steps), desc="geodesic L-BFGS (embedded)", unit="run", disable=not progress):
        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            energies.append(float(embedded_energy(metric, torch.cat([h0[None], interior, h1[None]]))))
        small_change = abs(energies[-1] - energies[-2]) <= rtol * abs(energies[-2])
        if small_change:
            break
    path = torch.cat([h0[None], interior.detach(), h1[None]])
    g = _relative_gradient(metric, h0, h1, path)
    criterion = (f"|ΔE_s| ≤ {rtol:g}·E_s in the last run and ‖∇E_s‖·‖h1 − h0‖/E_s ≤ {gtol:g} "
                 f"(measured {g:.2e})")
    return GeodesicResult(path=path, energy=energies[-1], energies=energies, converged=small_change and g <= gtol,
                          criterion=criterion,
                          iterations=len(energies) - 1, inner_iterations=_n_iter(optimizer), eps=metric.eps,
                          energy_kind="embedded", last_path=path)


def _relative_gradient(metric, h0, h1, path) -> float:
    """‖∇_interior E_s‖ · ‖h₁ − h₀‖ / E_s: scale-free (invariant under x → a·x, flat metric)."""
    interior = path[1:-1].clone().requires_grad_(True)
    with torch.enable_grad():
        E = embedded_energy(metric, torch.cat([h0[None], interior, h1[None]]))
        (grad,) = torch.autograd.grad(E, interior)
    E = float(E.detach())
    return float(grad.norm() * (h1 - h0).norm()) / E if E > 0 else 0.0


def _lbfgs_frozen(metric, h0, h1, path, outer_steps, inner_steps, history_size, rtol, xtol, progress):
    eps, span = metric.eps, float((h1 - h0).norm())
    J = metric.factor(path[:-1])
    energy = float(_frozen_energy(J, eps, path))
    energies, best, best_energy = [energy], path, energy
    converged, inner, move = False, 0, float("inf")
    for _ in tqdm(range(outer_steps), desc="geodesic L-BFGS (frozen)", unit="outer step", disable=not progress):
        new_path, n_iter = _minimize_frozen(J, eps, h0, h1, path, inner_steps, history_size)
        inner += n_iter
        move = float((new_path - path).norm(dim=-1).max())
        path = new_path
        J = metric.factor(path[:-1])
        new_energy = float(_frozen_energy(J, eps, path))
        energies.append(new_energy)
        if new_energy < best_energy:
            best, best_energy = path, new_energy
        if abs(new_energy - energy) <= rtol * abs(energy) and move <= xtol * span:
            converged = True
            break
        energy = new_energy
    criterion = (f"|ΔE| ≤ {rtol:g}·E with fresh factors and max waypoint move ≤ {xtol:g}·‖h1 − h0‖ "
                 f"in the last outer step (last move {move / span if span else 0.0:.2e})")
    return GeodesicResult(path=best, energy=best_energy, energies=energies, converged=converged,
                          criterion=criterion,
                          iterations=len(energies) - 1, inner_iterations=inner, eps=eps, energy_kind="frozen",
                          last_path=path)


def _minimize_frozen(J, eps, h0, h1, path, inner_steps, history_size):
    """argmin over the interior waypoints of the frozen energy (J fixed), by L-BFGS from ``path``;
    returns the path and the L-BFGS iterations taken."""
    interior = path[1:-1].clone().requires_grad_(True)
    with torch.no_grad():
        scale = float(_frozen_energy(J, eps, path))
    if scale == 0.0:
        return path, 0
    optimizer = _lbfgs([interior], inner_steps, history_size, path.dtype)

    def closure():
        optimizer.zero_grad()
        loss = _frozen_energy(J, eps, torch.cat([h0[None], interior, h1[None]])) / scale
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return torch.cat([h0[None], interior.detach(), h1[None]]), _n_iter(optimizer)
