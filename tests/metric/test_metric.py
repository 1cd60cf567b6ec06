"""Tests of fisherfast.metric against independent oracles on tiny random-init models.

Oracles: torch.func.jacrev of the full logits (J, V×d) contracted densely as
Jᵀ(diag p − p pᵀ)J in float64; second-order KL finite differences; the exact
second moment of the Fisher–Stein samples; the explicit pullback-Hellinger
formula from jacrev of the concept distribution; numpy eigvalsh for the
diagnostics.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherfast.metric import (DenseMetric, MetricDiagnostics, PullbackMetric, plot_spectra, pullback_fisher, spectrum_diagnostics,
                               spectrum_survey, survey_table)
from fisherfast.split import SplitModel

V, D, LAYERS = 61, 32, 3
# The split computes float64 models in float64 throughout (attention and norms included),
# so two float64 routes to the same quantity (jacrev vs. jvp/vjp, the head ops vs. a dense
# Jᵀ F J, Nyström with k ≥ rank) agree to float64 round-off: measured ≤ 1.6e-14 relative
# (low_rank, whose shift ν ≈ ε·√d·‖G‖ is the largest term); TOL leaves a factor > 60.
TOL = 1e-12


HEAD_SCALE = 25.0   # a peaked p (random init alone gives an almost uniform one)


PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1, 8]]


def oracle_metric(split, ctx, h=None):
    """Dense float64 Jᵀ F(p) J with J = jacrev of the full logits h ↦ z (V×d)."""
    h = ctx.h if h is None else h
    J = torch.func.jacrev(lambda x: split.logits(ctx, x))(h).double()
    p = torch.softmax(split.logits(ctx, h).double(), -1)
    F = torch.diag(p) - torch.outer(p, p)
    return J.T @ F @ J


def rel_fro(A, B):
    return float(torch.linalg.matrix_norm(A.double() - B.double()) / torch.linalg.matrix_norm(B.double()))


@pytest.fixture(scope="module")
def llama(tiny_lm):
    split = SplitModel(tiny_lm("llama", head_scale=HEAD_SCALE), layer=1)
    contexts = split.contexts(PROMPTS)
    oracles = [oracle_metric(split, ctx) for ctx in contexts]
    return split, contexts, oracles


# ----------------------------------------------------------------------------- exact

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox", "gemma3_text"])
def test_exact_matches_jacrev_of_full_logits(tiny_lm, arch):
    split = SplitModel(tiny_lm(arch, head_scale=HEAD_SCALE), layer=1)
    ctx = split.context(PROMPTS[1])
    G = pullback_fisher(split, ctx, mode="exact")
    assert isinstance(G, PullbackMetric) and G.shape == (D, D)
    G_ref = oracle_metric(split, ctx)
    assert rel_fro(G.dense(), G_ref) < TOL
    U = torch.randn(D, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_fro(pullback_fisher(split, ctx, mode="matrix_free") @ U, G_ref @ U) < TOL


def test_exact_averages_over_contexts_and_points(llama):
    split, contexts, oracles = llama
    G = pullback_fisher(split, contexts, mode="exact", progress=False)
    assert G.n_points == 3
    assert rel_fro(G.dense(), sum(oracles) / 3) < TOL
    # n candidate states for one context: the mean of the metric at each
    torch.manual_seed(1)
    H = contexts[0].h + 0.3 * torch.randn(2, D, dtype=torch.float64)
    G_points = pullback_fisher(split, contexts[0], mode="exact", h=H, progress=False)
    expected = (oracle_metric(split, contexts[0], H[0]) + oracle_metric(split, contexts[0], H[1])) / 2
    assert rel_fro(G_points.dense(), expected) < TOL


def test_exact_at_the_last_layer_is_the_norm_and_head_alone(tiny_lm):
    split = SplitModel(tiny_lm("llama", head_scale=HEAD_SCALE), layer=LAYERS)
    ctx = split.context(PROMPTS[0])
    assert rel_fro(pullback_fisher(split, ctx).dense(), oracle_metric(split, ctx)) < TOL


def test_exact_float32_is_within_1e4_of_float64(tiny_lm):
    model64 = tiny_lm("llama", head_scale=HEAD_SCALE)
    model32 = tiny_lm("llama", head_scale=HEAD_SCALE).float()
    split64, split32 = SplitModel(model64, layer=1), SplitModel(model32, layer=1)
    G64 = oracle_metric(split64, split64.context(PROMPTS[1]))
    G32 = pullback_fisher(split32, split32.context(PROMPTS[1])).dense()
    assert G32.dtype == torch.float32
    assert rel_fro(G32, G64) < 1e-4


def test_second_order_kl_matches_the_quadratic_form(llama):
    """KL(p(h) ‖ p(h+εv)) = ½ε² vᵀGv + O(ε³): the relative gap shrinks linearly in ε."""
    split, contexts, _ = llama
    ctx = contexts[2]
    G = pullback_fisher(split, ctx).dense()
    torch.manual_seed(2)
    v = torch.randn(D, dtype=torch.float64)
    v /= v.norm()
    logp = torch.log_softmax(split.logits(ctx, ctx.h), -1)
    quad = float(v @ G @ v)
    gaps = []
    for eps in (1e-2, 1e-3):
        logq = torch.log_softmax(split.logits(ctx, ctx.h + eps * v), -1)
        kl = float((logp.exp() * (logp - logq)).sum())
        gaps.append(abs(kl - 0.5 * eps ** 2 * quad) / (0.5 * eps ** 2 * quad))
    assert gaps[1] < 1e-2
    assert gaps[1] < 0.2 * gaps[0]   # O(ε) relative gap: 10× smaller ε, ~10× smaller gap


# ----------------------------------------------------------------------------- matrix-free

def test_matrix_free_products_scipy_and_dense_match_the_oracle(llama):
    split, contexts, oracles = llama
    G_ref = sum(oracles[:2]) / 2
    G = pullback_fisher(split, contexts[:2], mode="matrix_free")
    assert G.is_matrix_free
    torch.manual_seed(3)
    U = torch.randn(D, 5, dtype=torch.float64)
    assert torch.allclose(G @ U, G_ref @ U, rtol=TOL, atol=TOL * float(G_ref.abs().max()))
    assert torch.allclose(G.matvec(U[:, 0]), G_ref @ U[:, 0], rtol=TOL, atol=TOL * float(G_ref.abs().max()))
    op = G.to_scipy()
    x = np.random.default_rng(0).standard_normal(D)
    np.testing.assert_allclose(op @ x, (G_ref @ torch.from_numpy(x)).numpy(), rtol=TOL,
                               atol=TOL * float(G_ref.abs().max()))
    assert rel_fro(G.dense(), G_ref) < TOL


def test_eig_matrix_free_lanczos_matches_dense_eigh(llama):
    split, contexts, oracles = llama
    values, vectors = pullback_fisher(split, contexts[0], mode="matrix_free").eig(4)
    ref = np.linalg.eigh(oracles[0].numpy())
    np.testing.assert_allclose(values.numpy(), ref[0][::-1][:4], rtol=TOL)
    for j in range(4):   # eigenvectors up to sign
        assert abs(abs(float(vectors[:, j] @ torch.from_numpy(ref[1][:, -1 - j]))) - 1) < 1e-6
    dense_values, _ = pullback_fisher(split, contexts[0]).eig(4)
    np.testing.assert_allclose(dense_values.numpy(), ref[0][::-1][:4], rtol=TOL)


# ----------------------------------------------------------------------------- low-rank

def test_low_rank_is_exact_when_k_exceeds_the_rank(tiny_lm):
    """With V − 1 < d the metric has rank ≤ V − 1; Nyström from k ≥ rank probes recovers it."""
    split = SplitModel(tiny_lm("llama", vocab=12, head_scale=HEAD_SCALE), layer=1)
    ctx = split.context([3, 1, 4, 1, 5])
    G_ref = oracle_metric(split, ctx)
    assert int(torch.linalg.matrix_rank(G_ref, rtol=TOL)) <= 11
    G = pullback_fisher(split, ctx, mode="low_rank", k=16, seed=0)
    assert rel_fro(G.dense(), G_ref) < TOL
    assert abs(G.info["trace_fraction"] - 1) < TOL


def test_low_rank_is_below_the_metric_and_captures_the_trace_it_claims(llama):
    split, contexts, oracles = llama
    G_ref = oracles[1]
    G = pullback_fisher(split, contexts[1], mode="low_rank", k=8, trace_probes=64, seed=0)
    G_hat = G.dense()
    # Nyström: Ĝ ≼ G (the remainder is PSD up to rounding), rank ≤ k
    assert float(torch.linalg.eigvalsh(G_ref - G_hat).min()) > -TOL * float(torch.linalg.matrix_norm(G_ref, 2))
    assert int(torch.linalg.matrix_rank(G_hat, rtol=TOL)) <= 8
    true_fraction = float(G_hat.trace() / G_ref.trace())
    assert true_fraction < 1 - 1e-3   # k < rank: something is missed, so the claim is a real estimate
    se = G.info["trace_fraction_se"]
    assert 0 < se < 0.05
    assert abs(G.info["trace_fraction"] - true_fraction) < 4 * se
    assert math.isclose(G.info["trace_captured"], float(G_hat.trace()), rel_tol=1e-10)
    # the low-rank eigenvalues are those of Ĝ, padded with zeros
    np.testing.assert_allclose(G.eigenvalues().numpy(), np.linalg.eigvalsh(G_hat.numpy())[::-1],
                               atol=1e-10 * float(G_ref.trace()))


# ----------------------------------------------------------------------------- top-k

def test_topk_with_tiny_tail_matches_exact_and_reports_tau(llama):
    split, contexts, oracles = llama
    G = pullback_fisher(split, contexts[:2], mode="topk", tail_tol=1e-12, progress=False)
    assert len(G.info["tau"]) == 2 and all(t <= 1e-12 for t in G.info["tau"])
    assert rel_fro(G.dense(), sum(oracles[:2]) / 2) < TOL


def test_topk_low_rank_route_equals_b_transpose_gtop_b(llama):
    """With n_kept < d the metric is built from n_kept VJPs; it must equal Bᵀ G_top B
    (B from jacrev of the head input, G_top from the op), and the error vs exact
    shrinks with the tail mass τ."""
    from fisherfast.ops.softmax_fisher import softmax_fisher_gram_topk

    split, contexts, oracles = llama
    ctx = contexts[0]
    B = torch.func.jacrev(lambda x: split.head_input(ctx, x))(ctx.h)
    a = split.head_input(ctx, ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h), -1)
    errors = []
    for tol in (1e-1, 1e-3):
        G = pullback_fisher(split, ctx, mode="topk", tail_tol=tol)
        assert G.info["n_kept"][0] < D and G.info["tau"][0] <= tol
        G_top = softmax_fisher_gram_topk(a[None], split.W, split.b, tail_tol=tol).G[0]
        assert rel_fro(G.dense(), B.T @ G_top @ B) < TOL
        # ‖G_head − G_S‖₂ ≤ τ/(1−τ) · max_{v∉S} ‖w_v − μ‖² (the op's bound), pulled back through B
        tau = G.info["tau"][0]
        bound = tau / (1 - tau) * float(((split.W - p @ split.W) ** 2).sum(1).max()) * float(
            torch.linalg.matrix_norm(B, 2)) ** 2
        assert 0 < float(torch.linalg.matrix_norm(oracles[0] - G.dense(), 2)) <= bound
        errors.append(rel_fro(G.dense(), oracles[0]))
    assert errors[1] < errors[0]


# ----------------------------------------------------------------------------- Monte-Carlo

def test_monte_carlo_converges_to_exact_within_its_standard_error(llama):
    """E‖Ĝ − G‖_F² = (E_y‖g_y‖⁴ − ‖G‖_F²)/S with g_y = Bᵀ(w_y − μ); the oracle
    computes E_y‖g_y‖⁴ exactly over the whole (tiny) vocabulary."""
    split, contexts, oracles = llama
    ctx, G_ref = contexts[1], oracles[1]
    B = torch.func.jacrev(lambda x: split.head_input(ctx, x))(ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h), -1)
    g_all = (split.W - p @ split.W) @ B                  # (V, d) rows Bᵀ(w_y − μ)
    fourth = float((p * (g_all ** 2).sum(1) ** 2).sum())
    S = 2000
    mse = (fourth - float((G_ref ** 2).sum())) / S
    G = pullback_fisher(split, ctx, mode="monte_carlo", n_samples=S, seed=0, chunk=S)
    err2 = float(((G.dense() - G_ref) ** 2).sum())
    assert err2 < 9 * mse                                # 3σ-style bound in Frobenius
    assert 0.7 < G.info["std_error_fro"] / math.sqrt(mse) < 1.3   # the estimator's self-reported error
    # 16× more samples: error ≈ 4× smaller; the seed is fixed, so compare to the bound, not to one draw
    G_big = pullback_fisher(split, ctx, mode="monte_carlo", n_samples=16 * S, seed=1, chunk=S)
    assert float(((G_big.dense() - G_ref) ** 2).sum()) < 9 * mse / 16


def test_monte_carlo_seed_and_generator_are_reproducible(llama):
    split, contexts, _ = llama
    a = pullback_fisher(split, contexts[0], mode="monte_carlo", n_samples=32, seed=5).dense()
    b = pullback_fisher(split, contexts[0], mode="monte_carlo", n_samples=32,
                        generator=torch.Generator().manual_seed(5)).dense()
    c = pullback_fisher(split, contexts[0], mode="monte_carlo", n_samples=32, seed=6).dense()
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- concept (Hellinger)

def test_concept_matches_the_explicit_pullback_hellinger_formula(llama):
    split, contexts, _ = llama
    ctx = contexts[0]
    schema = {"a": [1, 2], "b": 7, "c": [10, 11, 12]}
    sets = [[1, 2], [7], [10, 11, 12]]
    covered = sorted(sum(sets, []))
    other = [t for t in range(V) if t not in covered]

    def q_of(x):
        p = torch.softmax(split.logits(ctx, x), -1)
        return torch.stack([p[s].sum() for s in sets] + [p[other].sum()])

    q = q_of(ctx.h)
    J_q = torch.func.jacrev(q_of)(ctx.h)                 # (K+1, d)
    G_ref = 0.25 * J_q.T @ torch.diag(1 / q) @ J_q
    G = pullback_fisher(split, ctx, mode="concept", concepts=schema)
    assert rel_fro(G.dense(), G_ref) < TOL
    assert int(torch.linalg.matrix_rank(G.dense(), rtol=TOL)) <= 3      # rank ≤ K
    assert G.info["concepts"] == ["a", "b", "c"]
    np.testing.assert_allclose(G.info["q"][0], q.numpy(), rtol=TOL)
    # Hellinger coordinates s = √q: ‖s(h+εv) − s(h−εv)‖² / 4 = ε² vᵀG_H v (1 + O(ε²))
    v = torch.linspace(-1, 1, D, dtype=torch.float64)
    v /= v.norm()
    eps = 1e-3
    ds = q_of(ctx.h + eps * v).sqrt() - q_of(ctx.h - eps * v).sqrt()
    assert math.isclose(float((ds ** 2).sum()) / 4, eps ** 2 * float(v @ G.dense() @ v), rel_tol=1e-3)


# ----------------------------------------------------------------------------- diagnostics

def test_diagnostics_match_numpy_on_a_dense_matrix():
    rng = np.random.default_rng(0)
    d = 40
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.exp(-np.arange(d) / 4.0)
    G = torch.from_numpy((Q * lam) @ Q.T)
    diag = DenseMetric(G).diagnostics()
    ev = np.linalg.eigvalsh(G.numpy())[::-1]
    pr = ev.sum() ** 2 / (ev ** 2).sum()
    assert math.isclose(diag.participation_ratio, pr, rel_tol=1e-10)
    assert math.isclose(diag.pr_over_d, pr / d, rel_tol=1e-10)
    frac = np.cumsum(ev) / ev.sum()
    assert diag.rank90 == int(np.argmax(frac >= 0.9)) + 1
    assert diag.rank99 == int(np.argmax(frac >= 0.99)) + 1
    lam_bar = ev.sum() / d
    assert math.isclose(diag.rel_spectral_deviation,
                        np.linalg.norm(G.numpy() - lam_bar * np.eye(d), 2) / np.linalg.norm(G.numpy(), 2),
                        rel_tol=1e-9)
    assert math.isclose(diag.trace, ev.sum(), rel_tol=1e-12)


def test_diagnostics_of_identity_and_rank_one():
    iso = spectrum_diagnostics(torch.full((10,), 2.0))
    assert iso.pr_over_d == pytest.approx(1.0) and iso.rel_spectral_deviation == pytest.approx(0.0)
    assert iso.rank90 == 9 and iso.rank99 == 10
    one = spectrum_diagnostics(torch.tensor([3.0] + [0.0] * 9))
    assert one.participation_ratio == pytest.approx(1.0) and one.rank90 == one.rank99 == 1
    assert one.rel_spectral_deviation == pytest.approx(1 - 1 / 10)
    assert isinstance(one, MetricDiagnostics) and one.as_dict()["d"] == 10


def test_diagnostics_agree_across_representations(llama):
    split, contexts, oracles = llama
    exact = pullback_fisher(split, contexts[0]).diagnostics()
    free = pullback_fisher(split, contexts[0], mode="matrix_free").diagnostics()
    ref = spectrum_diagnostics(torch.linalg.eigvalsh(oracles[0]))
    for diag in (exact, free):
        assert diag.rank90 == ref.rank90 and diag.rank99 == ref.rank99
        assert diag.pr_over_d == pytest.approx(ref.pr_over_d, rel=TOL)
        assert diag.rel_spectral_deviation == pytest.approx(ref.rel_spectral_deviation, rel=TOL)


def test_spectrum_survey_per_prompt_and_mean(llama, tmp_path):
    split, contexts, oracles = llama
    survey = spectrum_survey(split, contexts, progress=False)
    assert survey.layer == 1 and survey.eigenvalues.shape == (3, D)
    assert rel_fro(survey.mean_metric.dense(), sum(oracles) / 3) < TOL
    for diag, G_ref in zip(survey.per_point, oracles):
        ref = spectrum_diagnostics(torch.linalg.eigvalsh(G_ref))
        assert diag.rank90 == ref.rank90 and diag.pr_over_d == pytest.approx(ref.pr_over_d, rel=TOL)
    summary = survey.summary()
    prs = [spectrum_diagnostics(torch.linalg.eigvalsh(G)).pr_over_d for G in oracles]
    assert summary["pr_over_d"] == pytest.approx((sum(prs) / 3, min(prs), max(prs)), rel=TOL)
    table = survey_table([survey])
    assert table.count("\n") == 2 and table.splitlines()[2].startswith("| 1 | 3 |")
    path = tmp_path / "spectrum.png"
    plot_spectra([survey], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- bad inputs

# Heads that are not z = W a + b: Gemma's final soft-capping (c = 3, strong at head_scale 25: most
# logits sit in tanh's bend) and Cohere's linear logit scale (s = 0.5). The oracle differentiates the
# model's own logits, so a metric that ignored c or s would be off by O(1). Error model as TOL (above);
# monte_carlo at S = 20,000 samples has a relative Frobenius error ~ √(E‖g‖⁴/S)/‖G‖ (≤ 0.1 measured at
# S = 4,000 on these heads), so it is held to 0.05 and checked against its own reported std_error_fro.
@pytest.mark.parametrize("arch, options", [("gemma3_text", dict(logit_softcap=3.0)), ("cohere", {})],
                         ids=["gemma3_softcap", "cohere_scale"])
def test_scaled_and_soft_capped_heads_match_jacrev_of_the_models_logits(tiny_lm, arch, options):
    split = SplitModel(tiny_lm(arch, head_scale=HEAD_SCALE, **options), layer=1)
    assert split.head.softcap is not None or split.head.scale != 1.0
    ctx = split.context(PROMPTS[1])
    G_ref = oracle_metric(split, ctx)
    assert rel_fro(pullback_fisher(split, ctx, mode="exact").dense(), G_ref) < TOL
    U = torch.randn(D, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_fro(pullback_fisher(split, ctx, mode="matrix_free") @ U, G_ref @ U) < TOL
    top = pullback_fisher(split, ctx, mode="topk", tail_tol=1e-12)
    assert rel_fro(top.dense(), G_ref) < TOL
    mc = pullback_fisher(split, ctx, mode="monte_carlo", n_samples=20000, seed=0, chunk=20000)
    err = float(torch.linalg.matrix_norm(mc.dense() - G_ref))
    assert err / float(torch.linalg.matrix_norm(G_ref)) < 0.05 and err < 4 * mc.info["std_error_fro"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="nope"), ValueError, "mode: expected one of"),
    (dict(mode="exact", k=4), ValueError, "k: expected None with mode='exact' \\(it is read by mode='low_rank'\\)"),
    (dict(mode="topk", n_samples=4), ValueError, "n_samples: expected None with mode='topk'"),
    (dict(mode="low_rank", k=0), ValueError, "k: expected an int ≥ 1 and ≤"),
    (dict(mode="low_rank", k=D + 1), ValueError, "k: expected an int ≥ 1 and ≤"),
    (dict(mode="topk", tail_tol=1.5), ValueError, "tail_tol: expected a finite number > 0 and < 1"),
    (dict(mode="monte_carlo", n_samples=0), ValueError, "n_samples: expected an int ≥ 1"),
    (dict(mode="monte_carlo", seed=1, generator=torch.Generator()), ValueError, "seed, generator: expected one of them"),
    (dict(mode="concept"), ValueError, "concepts: expected a ConceptSchema"),
    (dict(mode="concept", concepts=[]), ValueError, "concepts: expected at least one concept"),
    (dict(mode="concept", concepts=[[1, 2], [2]]), ValueError, "concepts: expected disjoint concepts"),
    (dict(mode="concept", concepts=[V]), ValueError, r"concept '0': expected token ids in \[0, "),
    (dict(mode="concept", concepts=[[]]), ValueError, "concept '0': expected a non-empty sequence of token ids"),
    (dict(chunk=0), ValueError, "chunk: expected an int ≥ 1"),
    (dict(h=torch.zeros(D + 1, dtype=torch.float64)), ValueError, "h: expected shape"),
    (dict(h=torch.zeros(D)), TypeError, "h: expected the model's dtype"),
])
def test_bad_options_raise_clear_errors(llama, kwargs, error, match):
    split, contexts, _ = llama
    with pytest.raises(error, match=match):
        pullback_fisher(split, contexts[0], **kwargs)


def test_bad_contexts_and_products_raise(llama):
    split, contexts, _ = llama
    with pytest.raises(TypeError, match="contexts: expected a SplitContext"):
        pullback_fisher(split, [])
    with pytest.raises(TypeError, match=r"contexts\[1\]: expected a SplitContext"):
        pullback_fisher(split, [contexts[0], "text"])
    G = pullback_fisher(split, contexts[0])
    with pytest.raises(ValueError, match=r"U: expected shape"):
        G @ torch.zeros(D + 1)
    with pytest.raises(ValueError, match="k: expected an int ≥ 1 and ≤"):
        G.eig(0)
    with pytest.raises(ValueError, match="eigenvalues: expected a nonzero metric"):
        spectrum_diagnostics(torch.zeros(4))


# ----------------------------------------------------------------------------- half-precision models

# Unit roundoff of the model's dtype; G passes through a few roundings per block, so a right
# result is within a small multiple of it (measured 1.5–4 u), a wrong one is off by O(1).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
HALF_MODES = [("exact", {}), ("matrix_free", {}), ("low_rank", dict(k=16, seed=0)), ("topk", dict(tail_tol=1e-6)),
              ("monte_carlo", dict(n_samples=4000, seed=0, chunk=4000)), ("concept", dict(concepts=[[1, 2], [7]]))]


@pytest.fixture(scope="module")
def half_models(tiny_lm):
    """{dtype: (split of the half model, its float64 twin with the same rounded weights)}; V = 12 so
    the metric's rank (≤ V − 1 = 11) is below low_rank's k = 16 and Nyström is exact too."""
    out = {}
    for dtype in UNIT_ROUNDOFF:
        half = tiny_lm("llama", vocab=12, head_scale=10.0).to(dtype)
        twin = tiny_lm("llama", vocab=12, head_scale=10.0)
        twin.load_state_dict({name: w.double() for name, w in half.state_dict().items()})
        out[dtype] = (SplitModel(half, layer=1), SplitModel(twin, layer=1))
    return out


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode, options", HALF_MODES, ids=[m for m, _ in HALF_MODES])
def test_half_precision_models_run_every_mode_in_float32(half_models, dtype, mode, options):
    split, twin = half_models[dtype]
    ctx, ctx64 = split.context(PROMPTS[1]), twin.context(PROMPTS[1])
    h64 = ctx.h.double()   # the half model's own state, so both metrics are taken at one point
    if mode == "concept":
        sets = [[1, 2], [7]]
        other = [t for t in range(12) if t not in (1, 2, 7)]

        def q_of(x):
            p = torch.softmax(twin.logits(ctx64, x), -1)
            return torch.stack([p[s].sum() for s in sets] + [p[other].sum()])

        J_q = torch.func.jacrev(q_of)(h64)
        G_ref = 0.25 * J_q.T @ torch.diag(1 / q_of(h64)) @ J_q
    else:
        G_ref = oracle_metric(twin, ctx64, h64)
    G = pullback_fisher(split, ctx, mode=mode, **options)
    assert G.dtype == torch.float32
    bound = 8 * UNIT_ROUNDOFF[dtype]
    if mode == "monte_carlo":   # sampling error on top: within 3 of its own standard errors
        bound += 3 * G.info["std_error_fro"] / float(torch.linalg.matrix_norm(G_ref))
    assert rel_fro(G.dense(), G_ref) < bound


# ----------------------------------------------------------------------------- auto

def test_auto_mode_chooses_exact_at_small_d_and_matrix_free_at_large_d(llama, monkeypatch):
    from fisherfast.metric import auto_mode
    from fisherfast.metric import pullback as pullback_module

    split, contexts, oracles = llama
    assert auto_mode(576) == "exact" and auto_mode(4096) == "matrix_free"
    G = pullback_fisher(split, contexts[0], mode="auto")
    assert G.mode == "exact" and not G.is_matrix_free and rel_fro(G.dense(), oracles[0]) < TOL
    monkeypatch.setattr(pullback_module, "AUTO_EXACT_MAX_D", D - 1)
    G = pullback_fisher(split, contexts[0], mode="auto")
    assert G.mode == "matrix_free" and G.is_matrix_free and rel_fro(G.dense(), oracles[0]) < TOL
