"""The pullback Fisher metric on the embedded SmolLM2-135M (slow: loads the model).

One prompt at layer 24 (six upper blocks), to stay short; the full table over
layers {6, 12, 18, 24} and 36 prompts is `fisherfast spectrum --layer 6 12 18 24`.
Oracles: the KL of the model's own next-token distributions at small moves
(finite differences), numpy on the dense float64 matrix, and the measured
range of the spectrum at this layer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherfast.metric import pullback_fisher, spectrum_survey
from fisherfast.prompts import NATURAL_PROMPTS
from fisherfast.split import SplitModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    split = SplitModel(model, 24)
    ctx = split.context(tokenizer(NATURAL_PROMPTS[0], return_tensors="pt").input_ids[0])
    return split, ctx, pullback_fisher(split, ctx, mode="exact")


def kl_along(split, ctx, v, eps):
    """KL(p(h) ‖ p(h + εv)) from the model's logits, in float64."""
    logp = torch.log_softmax(split.logits(ctx, ctx.h).double(), -1)
    logq = torch.log_softmax(split.logits(ctx, ctx.h + eps * v).double(), -1)
    return float((logp.exp() * (logp - logq)).sum())


def test_real_exact_metric_predicts_the_kl_of_small_moves(real):
    """KL(p(h) ‖ p(h+εv)) = ½ε² vᵀGv + O(ε³) along the top eigenvector and random directions."""
    split, ctx, G = real
    _, top = G.eig(1)
    g = torch.Generator().manual_seed(0)
    directions = [top[:, 0]] + [v / v.norm() for v in torch.randn(3, split.d, generator=g)]
    for v in directions:
        quad = float(v @ (G @ v))
        eps = 0.02 / quad ** 0.5          # a move with KL ≈ 2e-4 nats: float32 noise ≪ signal, O(ε³) small
        assert kl_along(split, ctx, v, eps) == pytest.approx(0.5 * eps ** 2 * quad, rel=0.05)


def test_real_matrix_free_products_equal_the_exact_metric(real):
    """The matrix-free route (one recorded forward, reverse passes, fused head product on
    cached logits) against the exact one (reverse-mode Jacobian, dense head Gram)."""
    split, ctx, G = real
    free = pullback_fisher(split, ctx, mode="matrix_free")
    U = torch.randn(split.d, 3, generator=torch.Generator().manual_seed(1))
    expected = G @ U
    torch.testing.assert_close(free @ U, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_real_topk_is_within_the_truncation_bound(real):
    split, ctx, G = real
    G_top = pullback_fisher(split, ctx, mode="topk", tail_tol=1e-3)
    tau = G_top.report.tau[0]
    assert tau <= 1e-3 and G_top.report.n_kept[0] < split.V
    B = split.jacobian(ctx, ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h).double(), -1)
    spread = float(((split.W.double() - p @ split.W.double()) ** 2).sum(1).max())
    bound = tau / (1 - tau) * spread * float(torch.linalg.matrix_norm(B.double(), 2)) ** 2
    assert float(torch.linalg.matrix_norm((G.dense() - G_top.dense()).double(), 2)) <= bound


def test_real_diagnostics_match_numpy_and_the_kl_curvature(real):
    """Every diagnostic against numpy on the dense float64 matrix (the deviation from matrix
    2-norms, not from eigenvalues); λ₁ against the KL curvature along numpy's top
    eigenvector; tr G against a Hutchinson estimate from KL along random directions; and
    the spectrum's measured range at this layer (per-prompt PR/d 0.4–10.6%, deviation
    0.970–0.997 over 32 prompts), which an isotropic or mis-contracted metric violates."""
    split, ctx, G = real
    diag = G.diagnostics()
    A = G.dense().double().numpy()
    ev = np.linalg.eigvalsh(A)[::-1].clip(min=0)
    d = A.shape[0]
    assert diag.d == d == split.d
    assert diag.trace == pytest.approx(np.trace(A), rel=1e-6)
    assert diag.lambda_max == pytest.approx(ev[0], rel=1e-6)
    assert diag.participation_ratio == pytest.approx(ev.sum() ** 2 / (ev ** 2).sum(), rel=1e-6)
    frac = np.cumsum(ev) / ev.sum()
    assert (diag.rank90, diag.rank99) == (int(np.argmax(frac >= 0.9)) + 1, int(np.argmax(frac >= 0.99)) + 1)
    lam_bar = np.trace(A) / d
    deviation = np.linalg.norm(A - lam_bar * np.eye(d), 2) / np.linalg.norm(A, 2)
    assert diag.rel_spectral_deviation == pytest.approx(deviation, rel=1e-6)
    # λ₁ is the KL curvature along its eigenvector: KL = ½ε²λ₁
    top = torch.from_numpy(np.linalg.eigh(A)[1][:, -1].copy()).float()
    eps = 0.02 / diag.lambda_max ** 0.5
    assert 2 * kl_along(split, ctx, top, eps) / eps ** 2 == pytest.approx(diag.lambda_max, rel=0.05)
    # tr G = E[vᵀGv] for v ~ N(0, I): Hutchinson from the KL of 24 random moves
    g = torch.Generator().manual_seed(2)
    samples = []
    for v in torch.randn(24, d, generator=g):
        eps = 0.02 / diag.lambda_max ** 0.5
        samples.append(2 * kl_along(split, ctx, v, eps) / eps ** 2)
    samples = np.array(samples)
    assert abs(samples.mean() - diag.trace) < 4 * samples.std(ddof=1) / np.sqrt(len(samples))
    assert 0.002 < diag.pr_over_d < 0.15 and 0.95 < diag.rel_spectral_deviation < 0.999


def test_real_survey_of_one_prompt_is_that_prompts_metric(real):
    split, ctx, G = real
    survey = spectrum_survey(split, [ctx], progress=False)
    ev = np.linalg.eigvalsh(G.dense().double().numpy())[::-1]
    np.testing.assert_allclose(survey.eigenvalues[0].numpy(), ev, rtol=0, atol=1e-6 * ev[0])
    assert survey.per_point[0].rank99 == G.diagnostics().rank99
    torch.testing.assert_close(survey.mean_metric.dense(), G.dense())


def test_cli_spectrum_prints_the_table_and_writes_the_png(capsys, tmp_path):
    from fisherfast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nQ: What is two plus two?\\nA:\n", encoding="utf-8")
    out = tmp_path / "spectrum.png"
    assert main(["spectrum", "--layer", "28", "--prompts", str(prompts), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| 28 | 2 |" in text and "PR/d" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
