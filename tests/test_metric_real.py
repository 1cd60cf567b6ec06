"""The pullback Fisher metric on the embedded SmolLM2-135M (slow: loads the model).

One prompt at layer 24 (six upper blocks), to stay short; the full table over
layers {6, 12, 18, 24} and 36 prompts is `fisherfast spectrum --layer 6 12 18 24`.
"""
from __future__ import annotations

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


def test_real_exact_metric_predicts_the_kl_of_small_moves(real):
    """KL(p(h) ‖ p(h+εv)) = ½ε² vᵀGv + O(ε³) along the top eigenvector and a random direction."""
    split, ctx, G = real
    _, top = G.eig(1)
    rand = torch.randn(split.d, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(split.logits(ctx, ctx.h).double(), -1)
    for v in (top[:, 0], rand / rand.norm()):
        quad = float(v @ (G @ v))
        eps = 0.02 / quad ** 0.5          # a move with KL ≈ 2e-4 nats: float32 noise ≪ signal, O(ε³) small
        logq = torch.log_softmax(split.logits(ctx, ctx.h + eps * v).double(), -1)
        kl = float((logp.exp() * (logp - logq)).sum())
        assert kl == pytest.approx(0.5 * eps ** 2 * quad, rel=0.05)


def test_real_topk_is_within_the_truncation_bound(real):
    split, ctx, G = real
    G_top = pullback_fisher(split, ctx, mode="topk", tail_tol=1e-3)
    tau = G_top.info["tau"][0]
    assert tau <= 1e-3 and G_top.info["n_kept"][0] < split.V
    B = split.jacobian(ctx, ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h).double(), -1)
    spread = float(((split.W.double() - p @ split.W.double()) ** 2).sum(1).max())
    bound = tau / (1 - tau) * spread * float(torch.linalg.matrix_norm(B.double(), 2)) ** 2
    assert float(torch.linalg.matrix_norm((G.dense() - G_top.dense()).double(), 2)) <= bound


def test_real_diagnostics_are_anisotropic_and_consistent(real):
    split, ctx, G = real
    survey = spectrum_survey(split, [ctx], progress=False)
    diag = survey.per_point[0]
    assert diag == G.diagnostics()
    assert diag.d == split.d and 1 <= diag.rank90 <= diag.rank99 <= split.d
    assert 0 < diag.pr_over_d < 1 and 0 < diag.rel_spectral_deviation < 1
    assert torch.allclose(survey.mean_metric.dense(), G.dense())


def test_cli_spectrum_prints_the_table_and_writes_the_png(capsys, tmp_path):
    from fisherfast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nQ: What is two plus two?\\nA:\n", encoding="utf-8")
    out = tmp_path / "spectrum.png"
    assert main(["spectrum", "--layer", "28", "--prompts", str(prompts), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| 28 | 2 |" in text and "PR/d" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
