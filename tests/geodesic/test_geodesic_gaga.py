"""Tests of fisherfast.geodesic.gaga on synthetic manifolds with known answers.

Oracles: the Hellinger formula written out (numpy) for the GAGA-Out targets;
points on a circle in R^4, whose neighbour order (i ± 1) PHATE's potential
distances and GAGA-PHATE's latent must preserve; the points themselves for the
decoder's reconstruction; √(q/2) of class probabilities that are a known
function of the angle for GAGA-Out's latent; central differences of the
encoder for its metric factor; the cloud's own kNN spacing for the density
penalty of latent paths.

The PHATE tests need the optional ``phate`` package (the ``geodesic`` extra);
they are skipped, with that reason, when it is absent.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherfast.geodesic import EncoderMetric
from fisherfast.geodesic.density import knn_sq_distance
from fisherfast.geodesic.gaga import GagaAutoencoder, gaga_out, gaga_phate, hellinger_targets, latent_path, \
    phate_distances

DT = torch.float64
N = 48
ROTATION = torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(0)))[0]
ANGLES = torch.arange(N, dtype=DT) * (2 * math.pi / N)
CIRCLE = torch.stack([ANGLES.cos(), ANGLES.sin(), torch.zeros(N, dtype=DT), torch.zeros(N, dtype=DT)], -1) \
    @ ROTATION.T * 3.0 + 1.0


def neighbour_order(D: torch.Tensor) -> float:
    """Fraction of points whose nearest other point under distances D (n, n) is i ± 1 (mod n)."""
    D = D.clone()
    D.fill_diagonal_(float("inf"))
    nearest = D.argmin(1)
    steps = (nearest - torch.arange(len(D))) % len(D)
    return float(((steps == 1) | (steps == len(D) - 1)).double().mean())


def class_probabilities(K=4, beta=3.0, other=0.01):
    logits = beta * torch.cos(ANGLES[:, None] - 2 * math.pi * torch.arange(K, dtype=DT) / K)
    q = torch.softmax(logits, -1) * (1 - other)
    return torch.cat([q, torch.full((N, 1), other, dtype=DT)], -1)


def test_hellinger_targets_are_the_written_out_formula():
    q = class_probabilities()
    Q = np.stack([q.numpy(), q.roll(5, 0).numpy()], 1)           # two "contexts"
    expected = np.sqrt(np.mean([0.5 * ((np.sqrt(Q[:, None, c]) - np.sqrt(Q[None, :, c])) ** 2).sum(-1)
                                for c in range(2)], axis=0))
    np.testing.assert_allclose(hellinger_targets(torch.from_numpy(Q)).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_gaga_out_latent_is_the_outputs_hellinger_coordinates_and_decodes():
    q = class_probabilities()
    fit = gaga_out(CIRCLE, q, width=32, steps=700, batch=None, lr=5e-3, seed=0)
    ae = fit.autoencoder
    assert fit.kind == "out" and ae.latent_dim == 4 and not ae.training
    with torch.no_grad():
        Z = ae.encode(CIRCLE)
        X_hat = ae.decode(Z)
    target = (q[:, :4] / 2).sqrt()
    assert float((Z - target).abs().max()) < 0.05 and float((Z - target).abs().mean()) < 0.015
    # pairwise distances follow the Hellinger targets
    D = hellinger_targets(q)
    assert float((torch.cdist(Z, Z) - D).abs().mean()) < 0.02
    assert float((X_hat - CIRCLE).norm(dim=-1).max()) < 0.25          # radius 3
    assert fit.losses["total"][-1] < 0.1 * fit.losses["total"][0]
    # the metric is the pullback through the trained encoder: factor = central differences
    assert isinstance(fit.metric, EncoderMetric) and fit.metric.eps is None
    x, h = CIRCLE[7], 1e-6
    fd = torch.stack([(ae(x + h * e) - ae(x - h * e)) / (2 * h) for e in torch.eye(4, dtype=DT)], 1)
    torch.testing.assert_close(fit.metric.factor(x), fd, rtol=1e-6, atol=1e-8)


def test_gaga_is_deterministic_under_a_seed_and_leaves_the_global_random_state_alone():
    q = class_probabilities()
    state = torch.random.get_rng_state()
    a = gaga_out(CIRCLE, q, width=16, steps=20, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = gaga_out(CIRCLE, q, width=16, steps=20, seed=3)
    assert a.losses == b.losses
    with torch.no_grad():
        torch.testing.assert_close(a.autoencoder.encode(CIRCLE), b.autoencoder.encode(CIRCLE), rtol=0, atol=0)


def test_phate_distances_preserve_the_circles_neighbour_order():
    pytest.importorskip("phate", reason="phate is in the optional 'geodesic' extra")
    D = phate_distances(CIRCLE, knn=4)
    assert D.shape == (N, N) and D.dtype == DT
    assert neighbour_order(D) == 1.0


def test_gaga_phate_latent_preserves_neighbour_order_and_the_decoder_reconstructs():
    pytest.importorskip("phate", reason="phate is in the optional 'geodesic' extra")
    fit = gaga_phate(CIRCLE, latent_dim=2, knn=4, width=64, steps=1500, batch=None, lr=3e-3, seed=0)
    with torch.no_grad():
        Z = fit.autoencoder.encode(CIRCLE)
        X_hat = fit.autoencoder.decode(Z)
    assert fit.kind == "phate" and set(fit.final) == {"distance", "recon", "cycle", "total"}
    assert neighbour_order(torch.cdist(Z, Z)) >= 0.95
    assert float((X_hat - CIRCLE).norm(dim=-1).max()) < 0.3          # radius 3
    assert fit.final["cycle"] < 0.05


def test_latent_path_decodes_with_exact_endpoints_and_the_density_penalty_keeps_it_on_the_cloud():
    q = class_probabilities()
    fit = gaga_out(CIRCLE, q, width=32, steps=300, batch=None, lr=5e-3, seed=0)
    h0, h1 = CIRCLE[0], CIRCLE[N // 2]                                   # opposite points
    plain = latent_path(fit.autoencoder, h0, h1, 9)
    assert torch.equal(plain.path[0], h0) and torch.equal(plain.path[-1], h1) and plain.penalty is None
    with torch.no_grad():
        decoded = fit.autoencoder.decode(plain.latent[1:-1])
    torch.testing.assert_close(plain.path[1:-1], decoded)
    # the latent chord's midpoint is the mean of the endpoints' latents
    torch.testing.assert_close(plain.latent[4], 0.5 * (plain.latent[0] + plain.latent[-1]))
    free = latent_path(fit.autoencoder, h0, h1, 9, cloud=CIRCLE, density_weight=0.0)
    held = latent_path(fit.autoencoder, h0, h1, 9, cloud=CIRCLE, density_weight=100.0)
    spacing = float(knn_sq_distance(CIRCLE, CIRCLE, 3).mean()) * 3 / 2      # own point excluded
    assert held.penalty < free.penalty
    assert held.penalty < 4 * spacing


def test_bad_inputs():
    q = class_probabilities()
    with pytest.raises(ValueError, match=r"points: expected shape \(n, d\) with n ≥ 3"):
        gaga_out(CIRCLE[:2], q[:2])
    with pytest.raises(ValueError, match="q: expected shape"):
        gaga_out(CIRCLE, q[:5])
    with pytest.raises(ValueError, match="weights"):
        gaga_out(CIRCLE, q, steps=1, weights={"smooth": 1.0})
    with pytest.raises(ValueError, match="batch"):
        gaga_out(CIRCLE, q, steps=1, batch=1)
    fit = gaga_out(CIRCLE, q, width=8, steps=2)
    with pytest.raises(ValueError, match="T: expected an int ≥ 3"):
        latent_path(fit.autoencoder, CIRCLE[0], CIRCLE[1], 2)
    with pytest.raises(TypeError, match="autoencoder"):
        latent_path(torch.nn.Linear(4, 4), CIRCLE[0], CIRCLE[1], 5)
    assert isinstance(fit.autoencoder, GagaAutoencoder)
