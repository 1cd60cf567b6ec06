"""Tests of fisherfast.geodesic.density on synthetic manifolds with known answers.

Oracles: brute-force sorted distances (numpy) for the kNN penalty; the kernel
density written out in float64 numpy; for the density metric, the arc of the
unit circle through its class centroids (the geodesic when off-curve steps
cost 1 + λr²/σ² times more) and the explicit w(x)² = 1 + λ·max(0, −2 log ρ).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherfast.geodesic import chord_path, lbfgs_path
from fisherfast.geodesic.density import DensityMetric, kde_log_density, knn_sq_distance

DT = torch.float64


def circle(angles, rotation):
    """Points (cos a, sin a, 0, 0) rotated into R^4."""
    a = torch.as_tensor(angles, dtype=DT)
    flat = torch.stack([a.cos(), a.sin(), torch.zeros_like(a), torch.zeros_like(a)], -1)
    return flat @ rotation.T


ROTATION = torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(0)))[0]


def test_knn_sq_distance_matches_sorted_brute_force():
    g = torch.Generator().manual_seed(1)
    points, cloud = torch.randn(6, 3, dtype=DT, generator=g), torch.randn(20, 3, dtype=DT, generator=g)
    sq = ((points.numpy()[:, None] - cloud.numpy()[None]) ** 2).sum(-1)
    expected = np.sort(sq, axis=1)[:, :4].mean(1)
    np.testing.assert_allclose(knn_sq_distance(points, cloud, 4).numpy(), expected, rtol=1e-13)
    with pytest.raises(ValueError, match="k: expected an int ≥ 1 and ≤ 20"):
        knn_sq_distance(points, cloud, 21)
    with pytest.raises(ValueError, match="the same dimension"):
        knn_sq_distance(points, cloud[:, :2], 2)


def test_kde_log_density_is_the_written_out_formula():
    g = torch.Generator().manual_seed(2)
    points, centers = torch.randn(5, 3, dtype=DT, generator=g), torch.randn(9, 3, dtype=DT, generator=g)
    sq = ((points.numpy()[:, None] - centers.numpy()[None]) ** 2).sum(-1)
    expected = np.log(np.exp(-sq / (2 * 0.7 ** 2)).mean(1))
    np.testing.assert_allclose(kde_log_density(points, centers, 0.7).numpy(), expected, rtol=1e-12)
    # far away: no underflow to -inf
    assert bool(torch.isfinite(kde_log_density(points + 1e3, centers, 0.1)).all())


def test_density_metric_weight_and_factor():
    centers = circle(np.linspace(0, 2 * np.pi, 50, endpoint=False), ROTATION)
    metric = DensityMetric(centers, sigma=0.2, strength=0.5)
    x = torch.stack([centers[3], 0.5 * centers[10], torch.zeros(4, dtype=DT)])
    sq = ((x.numpy()[:, None] - centers.numpy()[None]) ** 2).sum(-1)
    p = np.exp(-sq / (2 * 0.04)).mean(1)
    all_sq = ((centers.numpy()[:, None] - centers.numpy()[None]) ** 2).sum(-1)
    p_max = np.exp(-all_sq / (2 * 0.04)).mean(1).max()
    expected = 1.0 + 0.5 * np.maximum(0.0, -2 * np.log(p / p_max))
    assert expected[0] < 1.01 and expected[2] > 10             # on the curve / at its centre
    np.testing.assert_allclose(metric.weight_sq(x).numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(metric.matrix(x), torch.tensor(expected)[:, None, None] * torch.eye(4, dtype=DT))


def test_density_geodesic_between_two_circle_points_follows_the_arc():
    K = 8
    knots = circle(2 * np.pi * np.arange(K) / K, ROTATION)
    metric = DensityMetric.from_centroids(knots, periodic=True, samples=400, sigma=0.1)
    T = 25
    result = lbfgs_path(metric, knots[0], knots[3], T, outer_steps=20)   # from the chord
    flat = result.path @ ROTATION                                        # back to the circle's plane
    radius = flat[:, :2].norm(dim=-1)
    angle = torch.atan2(flat[:, 1], flat[:, 0])
    chord = chord_path(knots[0], knots[3], T) @ ROTATION
    assert float((1 - chord[:, :2].norm(dim=-1)).max()) > 0.6             # the chord cuts the disc
    assert float((radius - 1).abs().max()) < 0.03                        # the geodesic stays on the circle
    assert float(flat[:, 2:].abs().max()) < 1e-6
    # ... and runs along the arc from 0 to 3π/4 at constant speed (equal w‖Δ‖ at a minimum)
    arc = torch.linspace(0, 3 * math.pi / 4, T, dtype=DT)
    assert float((angle - arc).abs().max()) < 0.03
    # energy of the arc at constant speed and w² ≈ 1: (3π/4)² / (T − 1); the chord's is > 10× that
    assert result.energy == pytest.approx((3 * math.pi / 4) ** 2 / (T - 1), rel=0.03)
    assert float(metric.segment_energy(chord_path(knots[0], knots[3], T))) > 10 * result.energy


def test_density_metric_bad_inputs():
    with pytest.raises(ValueError, match="strength"):
        DensityMetric(torch.zeros(3, 2, dtype=DT), sigma=1.0, strength=0.0)
    with pytest.raises(ValueError, match="sigma"):
        DensityMetric(torch.zeros(3, 2, dtype=DT), sigma=-1.0)
    with pytest.raises(NotImplementedError, match="no feature map"):
        DensityMetric(torch.zeros(3, 2, dtype=DT), sigma=1.0).features(torch.zeros(2, dtype=DT))
