"""The metric operator types against numpy on known matrices (independent of any model),
and the report record of each mode."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fisherfast.metric import (DampedMetric, DenseMetric, LowRankMetric, MatrixFreeMetric, MetricReport,
                               PullbackMetric, pullback_fisher)

D = 12


def known_metric(rank: int = 7, seed: int = 0):
    """A PSD matrix Q diag(λ) Qᵀ of the given rank with distinct eigenvalues, as (G, Q, λ)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    lam = np.zeros(D)
    lam[:rank] = np.exp(-np.arange(rank) / 2.0) * 3.0
    return Q @ np.diag(lam) @ Q.T, Q[:, :rank], lam[:rank]


def implementations():
    G, Q, lam = known_metric()
    Gt = torch.from_numpy(G)
    report = MetricReport(mode="exact", n_points=1)
    return G, {
        "dense": DenseMetric(Gt),
        "low_rank": LowRankMetric(torch.from_numpy(Q.copy()), torch.from_numpy(lam.copy()), report=report),
        "matrix_free": MatrixFreeMetric(lambda U: Gt @ U, D, dtype=torch.float64, device="cpu", report=report),
    }


@pytest.mark.parametrize("kind", ["dense", "low_rank", "matrix_free"])
@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_every_view_matches_numpy(kind, damping):
    G_np, ops = implementations()
    G = ops[kind] if damping == 0 else ops[kind].damped(damping)
    A = G_np + damping * np.eye(D)
    assert isinstance(G, PullbackMetric) and G.shape == (D, D) and G.T is G
    assert G.is_matrix_free == (kind == "matrix_free")
    rng = np.random.default_rng(1)
    U = rng.standard_normal((D, 3))
    np.testing.assert_allclose((G @ torch.from_numpy(U)).numpy(), A @ U, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(G.matvec(torch.from_numpy(U[:, 0])).numpy(), A @ U[:, 0], atol=1e-12)
    np.testing.assert_allclose((torch.from_numpy(U.T) @ G).numpy(), U.T @ A, atol=1e-12)      # (k, d) @ G
    np.testing.assert_allclose((torch.from_numpy(U[:, 0]) @ G).numpy(), U[:, 0] @ A, atol=1e-12)
    np.testing.assert_allclose(G.to_scipy() @ U, A @ U, atol=1e-12)
    np.testing.assert_allclose(G.to_scipy().matvec(U[:, 0]), A @ U[:, 0], atol=1e-12)
    np.testing.assert_allclose(G.dense().numpy(), A, atol=1e-12)
    assert G.trace() == pytest.approx(np.trace(A), rel=1e-12)
    ev = np.linalg.eigvalsh(A)[::-1]
    np.testing.assert_allclose(G.eigenvalues().numpy(), ev, atol=1e-12)
    values, vectors = G.eig(3)
    np.testing.assert_allclose(values.numpy(), ev[:3], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(vectors.numpy() * np.linalg.eigh(A)[1][:, ::-1][:, :3], 0)),
                               np.ones(3), atol=1e-8)                              # same vectors up to sign
    diag = G.diagnostics()
    assert diag.trace == pytest.approx(ev.sum(), rel=1e-12)
    assert diag.participation_ratio == pytest.approx(ev.sum() ** 2 / (ev ** 2).sum(), rel=1e-10)
    assert diag.rel_spectral_deviation == pytest.approx(
        np.linalg.norm(A - ev.mean() * np.eye(D), 2) / np.linalg.norm(A, 2), rel=1e-10)


def test_damped_composes_and_keeps_the_base():
    G_np, ops = implementations()
    G = ops["matrix_free"]
    twice = G.damped(0.1).damped(0.15)
    assert isinstance(twice, DampedMetric) and twice.base is G and twice.damping == pytest.approx(0.25)
    assert twice.is_matrix_free and twice.report is G.report and twice.mode == "exact"
    np.testing.assert_allclose(twice.dense().numpy(), G_np + 0.25 * np.eye(D), atol=1e-12)
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises((ValueError, TypeError), match="damping"):
            G.damped(bad)


def test_products_keep_the_metric_dtype_and_check_inputs():
    _, ops = implementations()
    G = ops["dense"]
    assert (G @ torch.ones(D, dtype=torch.float32)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"U: expected shape"):
        G @ torch.ones(D + 1)
    with pytest.raises(TypeError, match="floating"):
        G @ torch.ones(D, dtype=torch.long)
    with pytest.raises(ValueError, match="k: expected an int ≥ 1 and ≤"):
        G.eig(D + 1)
    with pytest.raises(ValueError, match="square"):
        DenseMetric(torch.ones(3, 4))
    with pytest.raises(TypeError, match="callable"):
        MatrixFreeMetric(None, D, dtype=torch.float64, device="cpu", report=MetricReport("exact", 1))


def test_report_is_frozen_and_info_is_its_dict_view():
    report = MetricReport(mode="topk", n_points=2, tail_tol=1e-3, tau=(1e-4, 2e-4), n_kept=(5, 7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.tau = ()
    assert report.as_dict() == {"tail_tol": 1e-3, "tau": [1e-4, 2e-4], "n_kept": [5, 7]}
    G = DenseMetric(torch.eye(3, dtype=torch.float64), report=report)
    assert G.info == report.as_dict() and G.mode == "topk" and G.n_points == 2


def test_each_mode_reports_its_own_fields(tiny_lm):
    from fisherfast.split import SplitModel

    split = SplitModel(tiny_lm("llama", head_scale=25.0), layer=1)
    contexts = split.contexts([[3, 14, 15, 9], [2, 7, 1, 8]])
    expected = {
        "exact": ({}, set(), DenseMetric),
        "matrix_free": ({}, set(), MatrixFreeMetric),
        "low_rank": (dict(k=4, seed=0), {"k", "trace_probes", "trace_captured", "trace_estimate", "trace_fraction",
                                          "trace_fraction_se"}, LowRankMetric),
        "topk": (dict(tail_tol=1e-2), {"tail_tol", "tau", "n_kept"}, DenseMetric),
        "monte_carlo": (dict(n_samples=8, seed=0), {"n_samples", "std_error_fro"}, DenseMetric),
        "concept": (dict(concepts=[[1, 2], [5]]), {"concepts", "q"}, DenseMetric),
    }
    for mode, (options, fields, kind) in expected.items():
        G = pullback_fisher(split, contexts, mode=mode, progress=False, **options)
        assert type(G) is kind and G.report.mode == mode and G.report.n_points == 2 and G.report.world_size == 1
        assert set(G.info) == fields, mode
        for name in ("tau", "n_kept", "q"):
            if name in fields:
                assert len(getattr(G.report, name)) == 2


def test_pullback_fisher_names_a_bad_split_and_a_non_finite_h():
    """Review: a model passed as split gave torch's AttributeError ('... has no
    attribute W'); a NaN h surfaced as "a: expected finite values, got NaN or Inf" from the head op
    after the Jacobian was computed."""
    from tiny_models import tiny_causal_lm
    from fisherfast.metric import pullback_fisher
    from fisherfast.split import SplitModel

    model = tiny_causal_lm("llama", vocab=29, d=16, layers=2, heads=2)
    split = SplitModel(model, 1)
    ctx = split.context(torch.tensor([3, 7, 11]))
    with pytest.raises(TypeError, match="split: expected a fisherfast.split.SplitModel"):
        pullback_fisher(model, ctx, progress=False)
    h = ctx.h.clone()
    h[0] = float("nan")
    with pytest.raises(ValueError, match="h: expected finite values"):
        pullback_fisher(split, ctx, h=h, progress=False)
    from fisherfast.metric.operator import DenseMetric
    from fisherfast.steer import fishback_direction

    G = DenseMetric(torch.full((3, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="G: expected finite values"):
        fishback_direction(G, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="G: expected finite values"):
        fishback_direction(G, torch.ones(3, dtype=torch.float64), solve="pinv")
