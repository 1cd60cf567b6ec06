"""Tests of fisherfast.geodesic.encoder (GAGA-Out).

Oracles: the target distance written out per pair (Hellinger, and the RMS over
contexts); the distance-matching loss recomputed by a double loop; training
measured against its own initial loss (it must fall several-fold) and against
a second run with the same seed (bit-identical) and another seed (different).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherfast.geodesic import EncoderMetric, distance_matching_loss, target_distances, train_gaga_encoder

DT = torch.float64


def data(n=40, d=5, contexts=None, seed=0):
    """Points and concept distributions q = softmax(x W_c) (4 bins per context)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=DT, generator=g)
    if contexts is None:
        return X, torch.softmax(X @ torch.randn(d, 4, dtype=DT, generator=g), -1)
    return X, torch.stack([torch.softmax(X @ torch.randn(d, 4, dtype=DT, generator=g), -1)
                           for _ in range(contexts)], 1)


def np_hellinger(q, r):
    return np.sqrt(0.5 * ((np.sqrt(q) - np.sqrt(r)) ** 2).sum())


def test_target_distances_are_hellinger_and_rms_over_contexts():
    X, q = data()
    i, j = torch.tensor([0, 3, 7]), torch.tensor([1, 5, 2])
    expected = [np_hellinger(q[a].numpy(), q[b].numpy()) for a, b in zip(i, j)]
    np.testing.assert_allclose(target_distances(q, i, j).numpy(), expected, rtol=1e-13)
    X, q2 = data(contexts=2)
    expected = [np.sqrt(np.mean([np_hellinger(q2[a, c].numpy(), q2[b, c].numpy()) ** 2 for c in range(2)]))
                for a, b in zip(i, j)]
    np.testing.assert_allclose(target_distances(q2, i, j).numpy(), expected, rtol=1e-13)


def test_distance_matching_loss_is_the_mean_over_pairs():
    X, q = data(n=6)
    encoder = torch.nn.Linear(5, 3).double()
    E = encoder(X).detach().numpy()
    terms = [(np.linalg.norm(E[a] - E[b]) - np_hellinger(q[a].numpy(), q[b].numpy())) ** 2
             for a in range(6) for b in range(a + 1, 6)]
    assert distance_matching_loss(encoder, X, q) == pytest.approx(np.mean(terms), rel=1e-12)


def test_training_reduces_the_loss_and_is_deterministic_under_a_seed():
    X, q = data(contexts=2)
    kwargs = dict(width=32, out_dim=6, steps=300, batch_pairs=128, lr=3e-3, progress=False)
    fit = train_gaga_encoder(X, q, seed=0, **kwargs)
    assert fit.final_loss < 0.2 * fit.initial_loss
    assert len(fit.losses) == 300 and np.mean(fit.losses[-20:]) < 0.2 * np.mean(fit.losses[:20])
    assert isinstance(fit.metric, EncoderMetric) and fit.metric.eps is None and fit.metric.d == 5
    assert not any(p.requires_grad for p in fit.encoder.parameters())
    # the metric factor is the encoder's Jacobian
    J = fit.metric.factor(X[:3])
    torch.testing.assert_close(J[1], torch.func.jacrev(fit.encoder)(X[1]))
    again = train_gaga_encoder(X, q, seed=0, **kwargs)
    assert again.losses == fit.losses
    for a, b in zip(fit.encoder.state_dict().values(), again.encoder.state_dict().values()):
        assert torch.equal(a, b)
    other = train_gaga_encoder(X, q, seed=1, **kwargs)
    assert other.losses != fit.losses


def test_training_leaves_the_global_random_state_alone():
    X, q = data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_gaga_encoder(X, q, width=8, out_dim=2, steps=3, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs():
    X, q = data()
    with pytest.raises(ValueError, match="points: expected shape"):
        train_gaga_encoder(X[:1], q[:1], progress=False)
    with pytest.raises(ValueError, match="q: expected shape"):
        train_gaga_encoder(X, q[:10], progress=False)
    with pytest.raises(ValueError, match="q: each distribution"):
        train_gaga_encoder(X, 2 * q, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_gaga_encoder(X, q, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_gaga_encoder(X, q, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        train_gaga_encoder(X, q, seed=-1, progress=False)
    with pytest.raises(ValueError, match="eps"):
        train_gaga_encoder(X, q, eps=float("nan"), progress=False)
    with pytest.raises(ValueError, match="all points coincide"):
        train_gaga_encoder(torch.zeros_like(X), q, progress=False)
    with pytest.raises(TypeError, match="points"):
        train_gaga_encoder(X.numpy(), q, progress=False)
