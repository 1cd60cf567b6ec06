"""Tests of fisherfast.geodesic.solvers.

Oracles: numpy.linspace (the chord); interpolation, periodicity and natural
end conditions checked at the knots (the spline); the flat and constant
metrics, whose discrete energy is minimized by the chord; for the non-flat
metric M(x) = diag(cosh² x) (the pullback of Euclidean through sinh, applied
per coordinate): the dense block-tridiagonal linear solve of one frozen
quadratic, and the fixed point of the frozen iteration computed by shooting
(scipy brentq) on its conservation law (cosh²(x_i) + ε)(x_{i+1} − x_i) = c;
for the embedded energy, the exact geodesic of that metric at ε = 0,
x_i = asinh(lerp(sinh h₀, sinh h₁, i/(T−1))) (straight in sinh coordinates).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from fisherfast.geodesic import (FlatMetric, GeodesicMetric, centroid_spline, chord_path, embedded_energy, lbfgs_path,
                                 path_energy, spline_path)

DT = torch.float64


class SinhMetric(GeodesicMetric):
    """J(x) = diag(cosh x): ‖J(x)δ‖ is the first-order length of sinh(x + δ) − sinh(x)."""

    def __init__(self, d, eps):
        self.d, self.eps = d, eps

    def _factor(self, X):
        return torch.diag_embed(torch.cosh(X))

    def _features(self, X):
        return torch.sinh(X)


class ConstantMetric(GeodesicMetric):
    def __init__(self, A, eps):
        self.A, self.d, self.eps = A, A.shape[1], eps

    def _factor(self, X):
        return self.A.expand(X.shape[0], *self.A.shape)

    def _features(self, X):
        return X @ self.A.T


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def perturbed_chord(h0, h1, T, seed=3):
    init = chord_path(h0, h1, T) + 0.3 * randn(T, h0.shape[0], seed=seed)
    init[0], init[-1] = h0, h1
    return init


# --------------------------------------------------------------------------- closed form

def test_chord_is_linear_interpolation():
    h0, h1 = randn(5, seed=1), randn(5, seed=2)
    path = chord_path(h0, h1, 9)
    oracle = np.linspace(h0.numpy(), h1.numpy(), 9)
    np.testing.assert_allclose(path.numpy(), oracle, rtol=0, atol=1e-15)
    assert torch.equal(path[0], h0) and torch.equal(path[-1], h1)


def test_periodic_spline_passes_through_the_centroids_and_closes_smoothly():
    knots = randn(7, 3)
    spline, u = centroid_spline(knots, periodic=True)
    assert len(u) == 8
    np.testing.assert_allclose(np.diff(u), np.linalg.norm(np.diff(np.vstack([knots, knots[:1]]), axis=0), axis=1),
                               rtol=1e-14)
    np.testing.assert_allclose(spline(u[:7]), knots.numpy(), rtol=0, atol=1e-13)
    for order in (0, 1, 2):
        np.testing.assert_allclose(spline(u[0], order), spline(u[-1], order), rtol=1e-10, atol=1e-12)
    # the first derivative is not trivially zero at the seam
    assert np.abs(spline(u[0], 1)).max() > 0.1


def test_natural_spline_has_zero_curvature_at_the_ends():
    knots = randn(5, 3)
    spline, u = centroid_spline(knots, periodic=False)
    np.testing.assert_allclose(spline(u), knots.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(spline(u[[0, -1]], 2), 0.0, atol=1e-12)


def test_spline_path_endpoints_and_wrap_around():
    knots = randn(7, 3, seed=4) + 3 * torch.stack([torch.tensor([np.cos(a), np.sin(a), 0.0], dtype=DT)
                                                   for a in np.linspace(0, 2 * np.pi, 7, endpoint=False)])
    path = spline_path(knots, 5, 1, 801, periodic=True)
    assert path.shape == (801, 3) and path.dtype == DT
    torch.testing.assert_close(path[0], knots[5], rtol=0, atol=1e-12)
    torch.testing.assert_close(path[-1], knots[1], rtol=0, atol=1e-12)
    # forward through 6 and 0, not back through 4, 3, 2
    distance = torch.cdist(knots, path).min(1).values
    assert float(distance[[6, 0]].max()) < 0.05 and float(distance[[2, 3, 4]].min()) > 0.5
    backward = spline_path(knots, 3, 1, 801, periodic=False)
    torch.testing.assert_close(backward[[0, -1]], knots[[3, 1]], rtol=0, atol=1e-12)
    assert float(torch.cdist(knots[2:3], backward).min()) < 0.05


# --------------------------------------------------------------------------- L-BFGS

def test_lbfgs_on_the_flat_metric_returns_the_chord():
    h0, h1 = randn(4, seed=1), randn(4, seed=2)
    result = lbfgs_path(FlatMetric(4), h0, h1, 9, init=perturbed_chord(h0, h1, 9), energy="frozen", rtol=0.0)
    chord = chord_path(h0, h1, 9)
    # energy minimization pins x to ~√(machine ε)·scale
    torch.testing.assert_close(result.path, chord, rtol=0, atol=1e-6)
    assert result.energy == pytest.approx(float(((h1 - h0) ** 2).sum()) / 8, rel=1e-12)
    assert result.energies[0] > result.energy


def test_lbfgs_on_a_constant_anisotropic_metric_returns_the_chord():
    A = torch.eye(4, dtype=DT) + 0.3 * randn(4, 4, seed=5)
    h0, h1 = randn(4, seed=1), randn(4, seed=2)
    for energy in ("frozen", "embedded"):
        result = lbfgs_path(ConstantMetric(A, 1e-3), h0, h1, 9, init=perturbed_chord(h0, h1, 9), energy=energy,
                            rtol=0.0 if energy == "frozen" else 1e-14)
        torch.testing.assert_close(result.path, chord_path(h0, h1, 9), rtol=0, atol=1e-6)


def frozen_quadratic_minimizer(J, eps, h0, h1):
    """argmin of Σ_i Δ_iᵀ M_i Δ_i (M_i = J_iᵀJ_i + εI) over the interior: a dense
    block-tridiagonal solve H x = b."""
    M = J.transpose(1, 2) @ J + eps * torch.eye(J.shape[2], dtype=DT)
    n, d = M.shape[0] - 1, M.shape[1]
    H = torch.zeros(n * d, n * d, dtype=DT)
    b = torch.zeros(n * d, dtype=DT)
    for k in range(n):                       # interior waypoint k + 1, between segments k and k + 1
        H[k * d:(k + 1) * d, k * d:(k + 1) * d] = M[k] + M[k + 1]
        if k + 1 < n:
            H[k * d:(k + 1) * d, (k + 1) * d:(k + 2) * d] = -M[k + 1]
            H[(k + 1) * d:(k + 2) * d, k * d:(k + 1) * d] = -M[k + 1]
    b[:d] += M[0] @ h0
    b[-d:] += M[n] @ h1
    return torch.cat([h0[None], torch.linalg.solve(H, b).reshape(n, d), h1[None]])


H0, H1 = torch.tensor([-1.0, 0.5], dtype=DT), torch.tensor([1.2, -0.8], dtype=DT)


def test_one_outer_step_solves_the_frozen_quadratic():
    metric = SinhMetric(2, 1e-2)
    result = lbfgs_path(metric, H0, H1, 9, energy="frozen", outer_steps=1)
    chord = chord_path(H0, H1, 9)
    oracle = frozen_quadratic_minimizer(metric.factor(chord[:-1]), metric.eps, H0, H1)
    torch.testing.assert_close(result.last_path, oracle, rtol=0, atol=1e-6)


def shooting_fixed_point(h0, h1, T, eps):
    """Per coordinate, the x_0..x_{T−1} with (cosh²(x_i) + ε)(x_{i+1} − x_i) = c from h0 to h1."""
    out = np.zeros((T, h0.shape[0]))
    for k in range(h0.shape[0]):
        def walk(c):
            x = [float(h0[k])]
            for _ in range(T - 1):
                x.append(x[-1] + c / (np.cosh(x[-1]) ** 2 + eps))
            return np.array(x)
        c = brentq(lambda c: walk(c)[-1] - float(h1[k]), -50.0, 50.0, xtol=1e-15)
        out[:, k] = walk(c)
    return out


def test_lbfgs_on_a_curved_metric_lowers_the_energy_and_reaches_the_documented_fixed_point():
    metric = SinhMetric(2, 1e-2)
    T = 9
    result = lbfgs_path(metric, H0, H1, T, energy="frozen", outer_steps=100, rtol=1e-13, xtol=1e-9)
    chord_energy = path_energy(metric, chord_path(H0, H1, T))
    assert result.energies[0] == chord_energy
    assert result.energy < chord_energy * (1 - 1e-3)
    assert result.energy == pytest.approx(path_energy(metric, result.path), rel=1e-12)
    assert torch.equal(result.path[0], H0) and torch.equal(result.path[-1], H1)
    assert result.converged and result.energy_kind == "frozen" and result.iterations == len(result.energies) - 1
    np.testing.assert_allclose(result.last_path.numpy(), shooting_fixed_point(H0, H1, T, metric.eps), atol=1e-6)
    # The true geodesic asinh(lerp(sinh h0, sinh h1)) is a different curve: the frozen iteration drops ∇M.
    geodesic = torch.asinh(torch.lerp(torch.sinh(H0)[None], torch.sinh(H1)[None],
                                      torch.linspace(0, 1, T, dtype=DT)[:, None]))
    assert float((result.last_path - geodesic).abs().max()) > 0.05


def test_embedded_energy_finds_the_exact_geodesic_of_a_curved_metric():
    """With s = sinh and ε = 0 the minimizer of Σ‖s(x_{i+1}) − s(x_i)‖² is straight in sinh
    coordinates: the exact geodesic of M = diag(cosh² x), which the frozen iteration misses."""
    metric = SinhMetric(2, 0.0)
    T = 9
    result = lbfgs_path(metric, H0, H1, T, init=perturbed_chord(H0, H1, T), energy="embedded", outer_steps=20,
                        rtol=1e-14)
    geodesic = torch.asinh(torch.lerp(torch.sinh(H0)[None], torch.sinh(H1)[None],
                                      torch.linspace(0, 1, T, dtype=DT)[:, None]))
    np.testing.assert_allclose(result.path.numpy(), geodesic.numpy(), atol=1e-7)  # ~√(energy round-off)
    assert torch.equal(result.path[0], H0) and torch.equal(result.path[-1], H1)
    assert result.energy == pytest.approx(float(embedded_energy(metric, result.path)), rel=1e-12)
    assert result.converged and result.eps == 0.0
    frozen = lbfgs_path(metric, H0, H1, T, energy="frozen", outer_steps=100, rtol=1e-13)
    for other in (chord_path(H0, H1, T), frozen.last_path):
        assert result.energy < float(embedded_energy(metric, other)) * (1 - 1e-3)


def test_embedded_energy_on_the_flat_metric_returns_the_chord():
    h0, h1 = randn(5, seed=1), randn(5, seed=2)
    result = lbfgs_path(FlatMetric(5), h0, h1, 7, init=perturbed_chord(h0, h1, 7), energy="embedded", rtol=1e-14)
    # An optimizer stopped at energy round-off (~1e-16 relative) places x only to ~√1e-16 = 1e-8.
    np.testing.assert_allclose(result.path.numpy(), chord_path(h0, h1, 7).numpy(), atol=1e-7)


def test_convergence_is_reported_only_when_its_criterion_held():
    metric = SinhMetric(2, 1e-2)
    # one frozen outer step from the chord moves the waypoints by O(0.1): not a fixed point
    one = lbfgs_path(metric, H0, H1, 9, energy="frozen", outer_steps=1)
    assert not one.converged and one.iterations == 1 and "max waypoint move" in one.criterion
    # an embedded run capped at 2 L-BFGS iterations from a perturbed chord: gradient far from 0
    init = perturbed_chord(H0, H1, 9)
    capped = lbfgs_path(SinhMetric(2, 0.0), H0, H1, 9, init=init, outer_steps=1, inner_steps=2, rtol=1.0)
    assert not capped.converged and 1 <= capped.inner_iterations <= 2
    full = lbfgs_path(SinhMetric(2, 0.0), H0, H1, 9, init=init, outer_steps=20, rtol=1e-14)
    assert full.converged and full.energies[-1] <= full.energies[0]


class ScaledSinh(SinhMetric):
    """s(x) = a·sinh(x) with a relative ε."""

    def __init__(self, a, eps_fraction):
        self.a, self.d, self.eps, self.eps_fraction = a, 2, None, eps_fraction

    def _features(self, X):
        return self.a * torch.sinh(X)


def test_relative_eps_is_a_fraction_of_the_chords_metric_energy():
    T = 7
    metric = ScaledSinh(3.0, 0.05)
    chord = chord_path(H0, H1, T)
    E_J = float(((3.0 * torch.sinh(chord[1:]) - 3.0 * torch.sinh(chord[:-1])) ** 2).sum())
    steps2 = float(((H1 - H0) ** 2).sum()) / (T - 1)
    eps = metric.chord_eps(H0, H1, T)
    assert eps == pytest.approx(0.05 * E_J / steps2, rel=1e-12)
    resolved = metric.resolved(H0, H1, T)
    assert resolved.eps == eps and metric.eps is None
    # ε·Σ‖Δ‖² is 5% of the metric part on the chord
    assert float(embedded_energy(resolved, chord)) == pytest.approx(1.05 * E_J, rel=1e-12)
    result = lbfgs_path(metric, H0, H1, T, outer_steps=2)
    assert result.eps == eps
    with pytest.raises(ValueError, match="relative to a chord"):
        embedded_energy(metric, chord)
    with pytest.raises(ValueError, match="relative to a chord"):
        path_energy(metric, chord)


def test_path_energy_is_the_discrete_formula():
    metric = SinhMetric(2, 0.3)
    path = randn(5, 2, seed=7)
    expected = sum(float((torch.cosh(path[i]) ** 2 * (path[i + 1] - path[i]) ** 2).sum()
                         + 0.3 * ((path[i + 1] - path[i]) ** 2).sum()) for i in range(4))
    assert path_energy(metric, path) == pytest.approx(expected, rel=1e-13)


def test_bad_inputs_energy():
    with pytest.raises(ValueError, match="energy"):
        lbfgs_path(FlatMetric(2), randn(2), randn(2, seed=1), 4, energy="exact")


def test_bad_inputs():
    h0, h1 = randn(3, seed=1), randn(3, seed=2)
    with pytest.raises(ValueError, match="T: expected an int ≥ 2"):
        chord_path(h0, h1, 1)
    with pytest.raises(ValueError, match="h0, h1: expected the same shape"):
        chord_path(h0, randn(4), 5)
    with pytest.raises(TypeError, match="h0"):
        chord_path([0.0], h1, 5)
    with pytest.raises(ValueError, match="T: expected an int ≥ 3"):
        lbfgs_path(FlatMetric(3), h0, h1, 2)
    with pytest.raises(TypeError, match="metric: expected a GeodesicMetric"):
        lbfgs_path(object(), h0, h1, 5)
    with pytest.raises(ValueError, match="metric's d"):
        lbfgs_path(FlatMetric(4), h0, h1, 5)
    with pytest.raises(ValueError, match="init: expected first and last waypoints equal to h0 and h1"):
        lbfgs_path(FlatMetric(3), h0, h1, 5, init=torch.zeros(5, 3, dtype=DT))
    with pytest.raises(ValueError, match="init: expected a"):
        lbfgs_path(FlatMetric(3), h0, h1, 5, init=torch.zeros(4, 3, dtype=DT))
    with pytest.raises(ValueError, match="outer_steps"):
        lbfgs_path(FlatMetric(3), h0, h1, 5, outer_steps=0)
    with pytest.raises(ValueError, match="path: expected shape"):
        path_energy(FlatMetric(3), torch.zeros(1, 3, dtype=DT))
    knots = randn(4, 3)
    with pytest.raises(ValueError, match="coincide"):
        centroid_spline(torch.cat([knots, knots[-1:]]), periodic=False)
    with pytest.raises(ValueError, match="at least 3 centroids"):
        centroid_spline(knots[:2], periodic=True)
    with pytest.raises(TypeError, match="periodic"):
        centroid_spline(knots, periodic=1)
    with pytest.raises(ValueError, match="stop: expected an int ≥ 0 and ≤ 3"):
        spline_path(knots, 0, 4, 5, periodic=True)
    with pytest.raises(ValueError, match="two different centroids"):
        spline_path(knots, 2, 2, 5, periodic=True)


def test_non_finite_inputs_are_named():
    """Review: a NaN endpoint surfaced as "eps: expected a finite float" (from the
    relative ε), a NaN chord came back silently, NaN knots read as "centroids
    coincide", a NaN init ran to converged=False, and gtol=inf made any path
    "converged"."""
    from fisherfast.geodesic.gaga import gaga_phate

    d = 4
    h0, h1 = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    bad = h0.clone()
    bad[1] = float("nan")
    metric = FlatMetric(d)
    with pytest.raises(ValueError, match="h0: expected finite values"):
        chord_path(bad, h1, 5)
    with pytest.raises(ValueError, match="h1: expected finite values"):
        lbfgs_path(metric, h0, h1 * float("inf"), T=4)
    knots = torch.eye(3, d, dtype=torch.float64)
    knots[2, 0] = float("nan")
    with pytest.raises(ValueError, match="knots: expected finite values"):
        spline_path(knots, 0, 2, 5, periodic=False)
    init = chord_path(h0, h1, 4)
    init[1, 0] = float("nan")
    with pytest.raises(ValueError, match="init: expected finite values"):
        lbfgs_path(metric, h0, h1, T=4, init=init)
    for name in ("rtol", "gtol", "xtol"):
        with pytest.raises(ValueError, match=f"{name}: expected a finite number ≥ 0"):
            lbfgs_path(metric, h0, h1, T=4, **{name: float("inf")})
    points = torch.randn(20, d)
    points[3, 2] = float("nan")
    with pytest.raises(ValueError, match="points: expected finite values"):
        gaga_phate(points, steps=1)
    from fisherfast.geodesic import DensityMetric

    with pytest.raises(ValueError, match="centers: expected finite values"):  # review: gave NaN weights silently
        DensityMetric(knots, sigma=1.0)
    # the chord itself (independent oracle: the straight line)
    torch.testing.assert_close(chord_path(h0, h1, 5)[2], torch.full((d,), 0.5, dtype=torch.float64))
