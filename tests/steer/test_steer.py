"""fisherfast.steer against independent oracles on tiny random-init models.

Oracles: explicit log-sum-exp formulas in numpy; torch.func.jacrev and
central finite differences of φ(z(h)); the model's own teacher-forced forward
with the edit applied by a plain hook (sequence concepts); the KKT system of
the constrained problem min ½δᵀG_λδ s.t. qᵀδ = ρ solved densely by numpy, and
numpy's eigendecomposition for the pseudo-inverse; Cauchy–Schwarz for the cost
ratio; the exact KL of the full distributions in float64; a synthetic ray with
a known narrow window for the matched-probability search; the split model's
own upper map for the hooks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherfast.concepts import SequenceConcept, check_token_ids
from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from fisherfast.steer import (ConceptScore, MethodResult, SteeringResult, TargetNotReached, actadd_direction,
                              caa_direction, compare_methods, concept_gradient, cost_ratio, euclidean_direction,
                              fishback_direction, off_target_kl, probe_direction, scale_to_target, steer_to_target,
                              steering)
from fisherfast.steer.directions import scale_to_first_order
from fisherfast.steer.iterate import evaluate_delta

V, D, LAYERS = 61, 32, 3
PROMPT = [3, 14, 15, 9, 2, 6]
TARGET = [5, 17]  # two mid-probability tokens at PROMPT's last position


@pytest.fixture(scope="module")
def tiny_model(tiny_lm):
    """Random-init float64 causal LMs with a scaled head (a peaked p)."""
    return lambda arch, seed=0: tiny_lm(arch, head_scale=10.0, seed=seed)


@pytest.fixture(scope="module")
def llama(tiny_model):
    model = tiny_model("llama")
    split = SplitModel(model, layer=1)
    return model, split, split.context(PROMPT)


def random_metric(d=12, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return A @ A.T, torch.randn(d, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ concept scores

def test_concept_scores_match_explicit_formulas():
    z = torch.randn(4, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = np.exp(z.numpy() - z.numpy().max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logprob = ConceptScore(TARGET)
    np.testing.assert_allclose(logprob(z).numpy(), np.log(p[:, TARGET].sum(-1)), rtol=1e-12)
    np.testing.assert_allclose(logprob.target_probability(z).numpy(), p[:, TARGET].sum(-1), rtol=1e-12)
    odds = ConceptScore(TARGET, source=[1, 2, 3])
    np.testing.assert_allclose(odds(z).numpy(), np.log(p[:, TARGET].sum(-1) / p[:, [1, 2, 3]].sum(-1)), rtol=1e-12)
    assert logprob.kind == "log_probability" and odds.kind == "log_odds"


def test_concept_gradient_matches_jacrev_and_finite_differences(llama):
    _, split, ctx = llama
    for concept in (ConceptScore(TARGET), ConceptScore(TARGET, source=[1, 2])):
        q, phi = concept_gradient(split, ctx, ctx.h, concept)
        want = torch.func.jacrev(lambda x: concept(split.logits(ctx, x)))(ctx.h)
        # the same float64 route differentiated two ways (the split is float64 end to end): measured 0
        torch.testing.assert_close(q, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
        # central differences at ε = 1e-3: rounding ~1e-16/ε is negligible, the truncation
        # ε²·|φ‴|/6 dominates (measured 3e-5 – 5e-5 of max|q|); 1e-3 leaves a factor 20.
        eps, eye = 1e-3, torch.eye(D, dtype=torch.float64)
        fd = torch.stack([(concept(split.logits(ctx, ctx.h + eps * e)) - concept(split.logits(ctx, ctx.h - eps * e)))
                          / (2 * eps) for e in eye])
        torch.testing.assert_close(q, fd, rtol=0, atol=1e-3 * float(q.abs().max()))
        assert phi == pytest.approx(float(concept(split.logits(ctx, ctx.h))), rel=1e-12)


# ------------------------------------------------------------------ directions

@pytest.mark.parametrize("damping", [1e-6, 1e-2])
def test_fishback_solves_the_kkt_system(damping):
    """δ minimizes ½δᵀG_λδ subject to qᵀδ = ρ: [[G_λ, q], [qᵀ, 0]] [δ; μ] = [0; ρ]."""
    G, q = random_metric()
    rho = 0.7
    lam = damping * float(q @ G @ q) / float(q @ q)
    G_lam = G.numpy() + lam * np.eye(len(q))
    kkt = np.block([[G_lam, q.numpy()[:, None]], [q.numpy()[None, :], np.zeros((1, 1))]])
    want = np.linalg.solve(kkt, np.concatenate([np.zeros(len(q)), [rho]]))[:-1]
    delta = fishback_direction(G, q, rho, damping=damping)
    np.testing.assert_allclose(delta.numpy(), want, rtol=1e-8, atol=1e-10)
    assert float(q @ delta) == pytest.approx(rho, rel=1e-12)


def test_cost_ratio_is_at_least_one_and_one_for_fishback():
    G, q = random_metric(seed=3)
    g = torch.Generator().manual_seed(4)
    ratios = [cost_ratio(G, q, torch.randn(len(q), generator=g, dtype=torch.float64)) for _ in range(50)]
    assert min(ratios) >= 1.0 - 1e-12
    assert cost_ratio(G, q, fishback_direction(G, q, 2.0)) == pytest.approx(1.0, abs=1e-9)
    assert cost_ratio(G, q, euclidean_direction(q)) > 1.0
    # scaling does not change R; the scaled direction has qᵀd = ρ
    d = torch.randn(len(q), generator=g, dtype=torch.float64)
    scaled = scale_to_first_order(d, q, 0.3)
    assert float(q @ scaled) == pytest.approx(0.3, rel=1e-12)
    assert cost_ratio(G, q, scaled) == pytest.approx(cost_ratio(G, q, d), rel=1e-10)


def test_matrix_free_conjugate_gradients_match_the_dense_solve(llama):
    _, split, ctx = llama
    q, _ = concept_gradient(split, ctx, ctx.h, ConceptScore(TARGET))
    dense = pullback_fisher(split, ctx, mode="exact", progress=False)
    free = pullback_fisher(split, ctx, mode="matrix_free", progress=False)
    assert free.is_matrix_free
    # CG stops at relative residual 1e-12, so its error is ≤ κ(G_λ)·1e-12 ≈ 1e-10 (κ ≈ 1e2 at
    # damping 1e-2); the two routes to G v agree to float64 round-off (the split is float64 end
    # to end). Measured 4e-14; 1e-8 leaves a factor 100 over the bound.
    want = fishback_direction(dense, q, 1.0, damping=1e-2)
    iterations = {"plain": 0, "nystrom": 0}

    def counter(name):
        return lambda x: iterations.__setitem__(name, iterations[name] + 1)

    got = fishback_direction(free, q, 1.0, damping=1e-2, rtol=1e-12, callback=counter("plain"))
    assert float((got - want).norm() / want.norm()) < 1e-8
    # Nyström-preconditioned CG: the same solution in fewer products
    low_rank = pullback_fisher(split, ctx, mode="low_rank", k=16, seed=0, progress=False)
    pcg = fishback_direction(free, q, 1.0, damping=1e-2, rtol=1e-12, preconditioner=low_rank,
                             callback=counter("nystrom"))
    assert float((pcg - want).norm() / want.norm()) < 1e-8
    assert iterations["nystrom"] < 0.7 * iterations["plain"], iterations  # 33 vs 56 (SmolLM2, k=64: 53 vs 228)
    with pytest.raises(TypeError, match="preconditioner: expected a LowRankMetric"):
        fishback_direction(free, q, preconditioner=dense)


def test_euclidean_caa_actadd():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(D, generator=g, dtype=torch.float64)
    torch.testing.assert_close(euclidean_direction(q, 0.5), 0.5 * q / float(q @ q))
    pos, neg = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
    torch.testing.assert_close(caa_direction(pos, neg), torch.stack([pos[i] - neg[i] for i in range(6)]).mean(0))
    torch.testing.assert_close(actadd_direction(pos[0], neg[0]), pos[0] - neg[0])


def test_probe_direction_separates_and_aligns_with_the_class_difference():
    """Two isotropic Gaussian classes 6σ apart along u: the probe normal ≈ u and
    classifies its training data perfectly."""
    g = torch.Generator().manual_seed(6)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u /= u.norm()
    pos = torch.randn(200, D, generator=g, dtype=torch.float64) + 3 * u
    neg = torch.randn(200, D, generator=g, dtype=torch.float64) - 3 * u
    w = probe_direction(pos, neg)
    assert float(w.norm()) == pytest.approx(1.0) and float(w @ u) > 0.9
    center = torch.cat([pos, neg]).mean(0)
    assert bool(((pos - center) @ w > 0).float().mean() > 0.99) and bool(((neg - center) @ w < 0).float().mean() > 0.99)


# ------------------------------------------------------------------ steering to a target

def _kl64(z_p, z_q):
    """Oracle: Σ p (log p − log q) of the two softmaxes, in numpy float64."""
    lp = z_p.double().numpy() - np.logaddexp.reduce(z_p.double().numpy(), axis=-1, keepdims=True)
    lq = z_q.double().numpy() - np.logaddexp.reduce(z_q.double().numpy(), axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum())


def test_fishback_reaches_the_target_with_less_kl_than_euclidean(llama):
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    phi0 = float(concept(split.logits(ctx, ctx.h)))
    target = phi0 + 0.4
    fish = steer_to_target(split, ctx, concept, target, method="fishback", max_step_kl=0.05)
    eucl = steer_to_target(split, ctx, concept, target, method="euclidean")
    assert isinstance(fish, SteeringResult) and fish.reached and eucl.reached
    for run in (fish, eucl):  # matched: within tol of the target, from either side
        assert abs(float(concept(split.logits(ctx, run.h))) - target) <= 1e-3
    assert all(kl <= 0.05 for kl in fish.step_kls)  # the trust region on the actual step KL
    z0 = split.logits(ctx, ctx.h)
    # the same concept change at a lower distortion of the full distribution
    assert _kl64(z0, split.logits(ctx, fish.h)) < _kl64(z0, split.logits(ctx, eucl.h))
    torch.testing.assert_close(fish.delta, fish.h - ctx.h)
    with pytest.raises(AttributeError):
        fish.reached = False  # frozen


def _full_step(split, ctx, concept, method, target, solve="damped"):
    """Oracle for the first undamped-by-trust-region step: δ with qᵀδ = ρ."""
    q, phi = concept_gradient(split, ctx, ctx.h, concept)
    if method == "euclidean":
        return euclidean_direction(q, target - phi)
    G = pullback_fisher(split, ctx, mode="exact", progress=False).dense()
    return fishback_direction(G, q, target - phi, solve=solve)


@pytest.mark.parametrize("method,solve", [("fishback", "damped"), ("fishback", "pinv"), ("euclidean", "damped")])
@pytest.mark.parametrize("token,direction", [(17, +1), (28, -1)])  # raise a rare token, lower the top one
def test_steer_to_target_lands_within_tol_after_an_overshooting_step(llama, method, solve, token, direction):
    """A first step that overshoots φ* (a loose trust region) is shortened by the final
    line search: the run ends within tol of φ*, from above or below."""
    _, split, ctx = llama
    concept = ConceptScore([token])
    phi0 = float(concept(split.logits(ctx, ctx.h)))
    target = phi0 + direction * 1.0
    full = float(concept(split.logits(ctx, ctx.h + _full_step(split, ctx, concept, method, target, solve))))
    assert direction * (full - target) > 0.01  # the plain step would overshoot (by 0.015–0.25)
    for tol in (1e-3, 1e-6):
        run = steer_to_target(split, ctx, concept, target, method=method, solve=solve, max_step_kl=50.0, tol=tol)
        got = float(concept(split.logits(ctx, run.h)))
        assert run.reached and abs(got - target) <= tol and run.scores[-1] == pytest.approx(got, abs=1e-12)
        assert run.steps == 1  # one step, shortened, not a second step back
        torch.testing.assert_close(run.step_kls[0], _kl64(split.logits(ctx, ctx.h), split.logits(ctx, run.h)),
                                   rtol=1e-9, atol=0)


def test_a_small_fishback_step_costs_its_predicted_kl(llama):
    """KL(p(h) ‖ p(h + δ)) = ½δᵀGδ + O(‖δ‖³): the relative gap shrinks linearly with
    the step (halving ρ halves it) and is small for small steps."""
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    q, _ = concept_gradient(split, ctx, ctx.h, concept)
    G = pullback_fisher(split, ctx, mode="exact", progress=False).dense()
    lp = torch.log_softmax(split.logits(ctx, ctx.h).double(), -1)
    gaps = []
    for rho in (0.01, 0.005, 0.0025):
        delta = fishback_direction(G, q, rho)
        lq = torch.log_softmax(split.logits(ctx, ctx.h + delta).double(), -1)
        gaps.append(float((lp.exp() * (lp - lq)).sum()) / (0.5 * float(delta @ G @ delta)) - 1)
    assert abs(gaps[-1]) < 0.02
    for big, small in zip(gaps, gaps[1:]):
        assert 1.8 < big / small < 2.2


def test_scale_to_target_matches_the_score(llama):
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    q, phi0 = concept_gradient(split, ctx, ctx.h, concept)
    v = q / q.norm()
    alpha = scale_to_target(split, ctx, concept, v, phi0 + 0.5)
    assert float(concept(split.logits(ctx, ctx.h + alpha * v))) == pytest.approx(phi0 + 0.5, abs=1e-8)
    with pytest.raises(ValueError, match="already exceeds"):
        scale_to_target(split, ctx, concept, v, phi0 - 1.0)
    with pytest.raises(TargetNotReached, match="max_scale") as err:
        scale_to_target(split, ctx, concept, -v, phi0 + 0.5, max_scale=8.0)
    assert err.value.best_score < phi0 + 0.5
    # batch_size only groups the scan's forwards: the same bracket, the same α (to Brent's xtol)
    assert scale_to_target(split, ctx, concept, v, phi0 + 0.5, batch_size=1) == pytest.approx(alpha, abs=1e-9)
    with pytest.warns(DeprecationWarning, match="batch_size"):
        assert scale_to_target(split, ctx, concept, v, phi0 + 0.5, chunk=5) == pytest.approx(alpha, abs=1e-9)


class _Ray:
    """A split-like object whose score along h = α e₀ is a chosen function:
    next-token logits (f(α), 0) over V = 2, so p₀ = σ(f(α)) (float64)."""

    V, d = 2, 3

    def __init__(self, f):
        self.f = f

    def logits(self, ctx, h):
        alpha = h[..., 0]
        return torch.stack([self.f(alpha), torch.zeros_like(alpha)], dim=-1)


class _Ctx:
    h = torch.zeros(3, dtype=torch.float64)


def _hump(center, peak_p, width):
    """f(α) = logit(peak_p) − (log(α/center)/width)²: p rises, peaks at α = center, falls."""
    return lambda a: math.log(peak_p / (1 - peak_p)) - (torch.log(a.clamp_min(1e-300) / center) / width) ** 2


@pytest.mark.parametrize("center,peak_p,width,found_by", [
    (45.0, 0.55, 0.1846 ** 0.5, "scan"),     # the reported case: p(32) = 0.394, p(64) = 0.385, 0.5 near α = 37
    (42.5, 0.502, 0.5, "refinement"),       # a window [40.6, 44.4] between two grid points
])
def test_scale_to_target_finds_a_narrow_window_above_the_target(center, peak_p, width, found_by):
    f = _hump(center, peak_p, width)
    ray, e0, target = _Ray(f), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), math.log(0.5)
    concept = ConceptScore([0])

    def p(a):
        return 1 / (1 + math.exp(-float(f(torch.tensor(a, dtype=torch.float64)))))

    assert all(p(2.0 ** k) < 0.5 for k in range(11))  # doubling α = 1, 2, …, 1024 never sees it
    grid = [1e-3 * 1.2 ** k for k in range(76)]
    assert any(p(a) >= 0.5 for a in grid) == (found_by == "scan")
    alpha = scale_to_target(ray, _Ctx(), concept, e0, target)
    assert p(alpha) == pytest.approx(0.5, abs=1e-9)
    assert alpha < center  # the first crossing, on the rising side


def test_scale_to_target_reports_how_close_it_got():
    f = _hump(20.0, 0.45, 0.3)
    with pytest.raises(TargetNotReached, match="best score") as err:
        scale_to_target(_Ray(f), _Ctx(), ConceptScore([0]), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                        math.log(0.5))
    assert err.value.best_score == pytest.approx(math.log(0.45), abs=1e-8)  # the ray's true maximum
    assert err.value.best_alpha == pytest.approx(20.0, rel=1e-3)
    assert err.value.target_score == math.log(0.5)


def test_scale_to_target_accepts_an_h_dependent_displacement(llama):
    """δ(α) = α² v: a callable is scaled like a ray (INNSteer passes α ↦ inn.delta(h, α))."""
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    q, phi0 = concept_gradient(split, ctx, ctx.h, concept)
    v = q / q.norm()
    alpha = scale_to_target(split, ctx, concept, lambda a: a * a * v, phi0 + 0.5)
    linear = scale_to_target(split, ctx, concept, v, phi0 + 0.5)
    assert alpha == pytest.approx(math.sqrt(linear), rel=1e-8)


def test_off_target_kl_is_kl_base_to_steered_without_the_concept_tokens():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, V, generator=g, dtype=torch.float64)
    concept = ConceptScore(TARGET, source=[1])
    assert torch.equal(off_target_kl(concept, base, base), torch.zeros(3, dtype=torch.float64))
    only_concept = base.clone()
    only_concept[:, TARGET + [1]] += 5.0  # moving concept tokens alone is not off-target distortion
    torch.testing.assert_close(off_target_kl(concept, base, only_concept), torch.zeros(3, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    steered = base + torch.randn(3, V, generator=g, dtype=torch.float64)
    keep = [v for v in range(V) if v not in TARGET + [1]]
    b, s_ = base[:, keep].numpy(), steered[:, keep].numpy()
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    ps = np.exp(s_) / np.exp(s_).sum(-1, keepdims=True)
    want = (pb * np.log(pb / ps)).sum(-1)  # KL(p̃_base ‖ p̃_steered)
    np.testing.assert_allclose(off_target_kl(concept, base, steered).numpy(), want, rtol=1e-12)
    reverse = (ps * np.log(ps / pb)).sum(-1)
    assert np.abs(want - reverse).max() > 1e-3  # the direction matters here
    # a sequence concept removes y₁ only
    seq = SequenceConcept([5, 5, 9])
    keep = [v for v in range(V) if v != 5]
    b, s_ = base[:, keep].numpy(), steered[:, keep].numpy()
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    ps = np.exp(s_) / np.exp(s_).sum(-1, keepdims=True)
    np.testing.assert_allclose(off_target_kl(seq, base, steered).numpy(), (pb * np.log(pb / ps)).sum(-1), rtol=1e-12)


def test_compare_methods_reports_matched_results_with_one_kl_convention(llama):
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    target = float(concept(split.logits(ctx, ctx.h))) + 0.4
    rows = compare_methods(split, ctx, concept, target, max_step_kl=5.0)
    assert [r.method for r in rows] == ["fishback", "euclidean"]
    z0 = split.logits(ctx, ctx.h)
    for r in rows:
        assert isinstance(r, MethodResult) and r.reached and abs(r.score - target) <= 1e-3
        z = split.logits(ctx, ctx.h + r.delta)
        assert r.kl == pytest.approx(_kl64(z0, z), rel=1e-10)
        keep = [v for v in range(V) if v not in TARGET]
        assert r.off_target_kl == pytest.approx(_kl64(z0[keep], z[keep]), rel=1e-10)
        assert r.target_prob == pytest.approx(float(torch.softmax(z, -1)[TARGET].sum()), rel=1e-12)
        with pytest.raises(AttributeError):
            r.kl = 0.0


# ------------------------------------------------------------------ the pseudo-inverse solve

def test_pinv_solve_matches_numpy_eigendecomposition():
    """G⁺q keeps eigenvalues above rcond·λ_max; its FishBack direction solves the KKT
    system on the kept eigenspace and has cost ratio 1 there."""
    G, q = random_metric(d=12, rank=8, seed=9)
    w, U = np.linalg.eigh(G.numpy())
    for rcond in (1e-12, 0.05):
        kept = w > rcond * w.max()
        want_x = U[:, kept] @ ((U[:, kept].T @ q.numpy()) / w[kept])
        want = 0.7 * want_x / (q.numpy() @ want_x)
        got = fishback_direction(G, q, 0.7, solve="pinv", rcond=rcond)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-12)
        assert float(q @ got) == pytest.approx(0.7, rel=1e-12)
        assert cost_ratio(G, q, got, solve="pinv", rcond=rcond) == pytest.approx(1.0, abs=1e-9)
    assert int((w > 0.05 * w.max()).sum()) < 8  # the cutoff really drops eigenvalues at 0.05
    # for q in the range of G the damped direction tends to G⁺q as damping → 0; a q with a
    # null-space component is dominated by it instead (G_λ⁻¹q ≈ q_null/λ)
    q_range = G @ q
    pinv = fishback_direction(G, q_range, 0.7, solve="pinv", rcond=1e-12)
    errors = [float((fishback_direction(G, q_range, 0.7, damping=damping) - pinv).norm() / pinv.norm())
              for damping in (1e-6, 1e-8)]
    assert errors[1] < 1e-4 and 50 < errors[0] / errors[1] < 200  # O(λ) convergence
    cos = torch.nn.functional.cosine_similarity(fishback_direction(G, q, damping=1e-10),
                                                fishback_direction(G, q, solve="pinv", rcond=1e-12), dim=0)
    assert float(cos) < 0.9


# ------------------------------------------------------------------ inference_mode

def test_gradient_paths_work_inside_inference_mode(llama):
    _, split, _ = llama
    concept = ConceptScore(TARGET)
    ctx = split.context(PROMPT)
    q_ref, phi_ref = concept_gradient(split, ctx, ctx.h, concept)
    target = phi_ref + 0.3
    ref = steer_to_target(split, ctx, concept, target, max_step_kl=0.05)
    with torch.inference_mode():
        ctx_inf = split.context(PROMPT)
        q, phi = concept_gradient(split, ctx_inf, ctx_inf.h, concept)
        run = steer_to_target(split, ctx_inf, concept, target, max_step_kl=0.05)
        seq_ctx = split.context(PROMPT, continuation=[5, 5])
        q_seq, _ = concept_gradient(split, seq_ctx, seq_ctx.h, SequenceConcept([5, 5]))
    torch.testing.assert_close(q, q_ref, rtol=1e-10, atol=1e-12)
    assert phi == pytest.approx(phi_ref, rel=1e-12)
    assert run.reached and run.steps == ref.steps
    torch.testing.assert_close(run.h, ref.h, rtol=1e-8, atol=1e-10)
    assert q_seq.shape == (D,) and bool(torch.isfinite(q_seq).all())


# ------------------------------------------------------------------ sequence concepts

def _hooked_logits(model, layer, ids, t, delta):
    """Oracle: the model's own logits with δ added to block ``layer``'s input at position t by a plain hook."""
    block = model.model.layers[layer] if hasattr(model, "model") else model.transformer.h[layer]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([x[:, :t], x[:, t:t + 1] + delta, x[:, t + 1:]], dim=1)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()


def _teacher_forced_log_prob(model, layer, tokens, delta):
    """log p(y₁…y_n | PROMPT) = Σ_i log softmax(z_{t+i-1})[y_i] from the hooked full forward."""
    t = len(PROMPT) - 1
    logp = torch.log_softmax(_hooked_logits(model, layer, PROMPT + tokens[:-1], t, delta)[t:], -1)
    return sum(logp[i, y] for i, y in enumerate(tokens))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_sequence_concept_value_and_gradient_match_the_hooked_model(tiny_model, arch):
    """φ = log p(y₁…y_n | prompt) equals the model's own teacher-forced log-probability,
    and q equals jacrev through the full model with the edit applied by a hook
    (repeated tokens in the sequence, as in " Washington D.C.")."""
    model = tiny_model(arch)
    tokens = [5, 9, 5, 9]
    concept = SequenceConcept(tokens)
    split = SplitModel(model, layer=1)
    ctx = split.context(PROMPT, continuation=tokens)
    zero = torch.zeros(D, dtype=torch.float64)
    q, phi = concept_gradient(split, ctx, ctx.h, concept)
    # Error model: the split computes a float64 model in float64, while the hooked oracle is
    # transformers' own forward, whose eager attention (Llama, Gemma; not GPT-2) takes the softmax
    # in float32 and casts back: its attention weights carry float32 rounding (u32 = 6e-8 relative
    # each). Measured: φ off by 4e-9 (llama) / 2e-8 (gemma3) relative, 0 for gpt2; q by ≤ 2e-7
    # relative. (Before the split went float64, both took float32 softmaxes and agreed to 1e-12
    # except when an ε64 difference flipped a float32 rounding: 6.6e-9, a CI flake.)
    # SEQ_RTOL = 1e-6 ≈ 16 u32; a wrong φ (the edit not reaching later positions, an off-by-one
    # teacher-forcing row) is off by ≥ 0.1.
    SEQ_RTOL = 1e-6
    assert phi == pytest.approx(float(_teacher_forced_log_prob(model, 1, tokens, zero)), rel=SEQ_RTOL)
    # the same route twice: equal to float64 round-off
    assert float(concept.probability(split, ctx, ctx.h)) == pytest.approx(math.exp(phi), rel=1e-12)
    want = torch.func.jacrev(lambda delta: _teacher_forced_log_prob(model, 1, tokens, delta))(zero)
    torch.testing.assert_close(q, want, rtol=SEQ_RTOL, atol=1e-8 * float(want.abs().max()))
    delta = 0.3 * q / q.norm()
    assert float(concept.score(split, ctx, ctx.h + delta)) == pytest.approx(
        float(_teacher_forced_log_prob(model, 1, tokens, delta)), rel=SEQ_RTOL)
    # the sequence is not the set of its tokens as alternatives
    assert abs(phi - float(ConceptScore([5, 9])(split.logits(ctx, ctx.h)))) > 1.0


def test_solvers_accept_a_sequence_concept(llama):
    model, split, _ = llama
    tokens = [17, 5]
    concept = SequenceConcept(tokens)
    ctx = split.context(PROMPT, continuation=tokens)
    phi0 = float(concept.score(split, ctx, ctx.h))
    target = phi0 + 1.0
    t = len(PROMPT) - 1
    rows = compare_methods(split, ctx, concept, target, max_step_kl=1.0)
    for r in rows:
        assert r.reached and abs(r.score - target) <= 1e-3
        assert r.target_prob == pytest.approx(math.exp(r.score), rel=1e-12)
        got = float(_teacher_forced_log_prob(model, 1, tokens, r.delta))  # the model's own forward, hooked
        assert abs(got - target) <= 1e-3
        z0, z = split.logits(ctx, ctx.h), _hooked_logits(model, 1, PROMPT, t, r.delta)[t]
        keep = [v for v in range(V) if v != tokens[0]]  # off-target: y₁ removed at position t
        assert r.off_target_kl == pytest.approx(_kl64(z0[keep], z[keep]), rel=1e-6)
    q, _ = concept_gradient(split, ctx, ctx.h, concept)
    G = pullback_fisher(split, ctx, mode="exact", progress=False).dense()
    v = fishback_direction(G, q)
    alpha = scale_to_target(split, ctx, concept, v, target)
    # Brent's root on α to xtol 1e-10: |φ − φ*| ≤ |dφ/dα|·1e-10 plus float64 rounding of φ
    # (|φ| ≈ 9); 1e-6 is far above both (a wrong α misses by ≥ 1e-2)
    assert float(concept.score(split, ctx, ctx.h + alpha * v)) == pytest.approx(target, abs=1e-6)
    assert cost_ratio(G, q, v) == pytest.approx(1.0, abs=1e-9)


def test_check_token_ids():
    torch.testing.assert_close(check_token_ids("ids", [3, 1]), torch.tensor([3, 1]))
    torch.testing.assert_close(check_token_ids("ids", torch.tensor([[2], [2]]), allow_repeats=True),
                               torch.tensor([2, 2]))
    assert check_token_ids("ids", range(4), vocab_size=4).tolist() == [0, 1, 2, 3]
    for bad, match in (([], "non-empty"), ("ab", "non-empty"), (7, "non-empty"), ([1, True], "int token ids"),
                       ([1.0], "int token ids"), (torch.tensor([1.0]), "integer token ids"),
                       ([-1], r"≥ 0"), ([4], r"in \[0, 4\)"), ([1, 1], "repeated")):
        with pytest.raises(ValueError, match=f"ids.*{match}|{match}"):
            check_token_ids("ids", bad, vocab_size=4 if bad == [4] else None)


# ------------------------------------------------------------------ hooks

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_reproduce_the_split_models_upper_map(arch, tiny_model):
    model = tiny_model(arch, seed=2)
    ids = torch.tensor([PROMPT])
    base = model(input_ids=ids).logits[0, -1]
    g = torch.Generator().manual_seed(8)
    for layer in (0, 1, LAYERS):
        split = SplitModel(model, layer=layer)
        ctx = split.context(PROMPT)
        v = torch.randn(D, generator=g, dtype=torch.float64)
        with steering(model, {layer: v}):
            added = model(input_ids=ids).logits[0]
        torch.testing.assert_close(added[-1], split.logits(ctx, ctx.h + v), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(added[:-1], model(input_ids=ids).logits[0, :-1])  # earlier positions untouched
        with steering(model, {layer: v}, mode="replace", positions=[-1]):
            replaced = model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(replaced, split.logits(ctx, v), rtol=1e-6, atol=1e-6)
    assert torch.equal(model(input_ids=ids).logits[0, -1], base)  # every hook removed


def test_hooks_steer_generation_and_are_removed_on_error(llama):
    model, _, _ = llama
    ids = torch.tensor([PROMPT])
    plain = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    push = 50 * model.get_output_embeddings().weight[TARGET[0]] / model.get_output_embeddings().weight[TARGET[0]].norm()
    with steering(model, {LAYERS: push}, positions="all"):
        steered = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert steered[0, len(PROMPT):].tolist() == [TARGET[0]] * 4 and not torch.equal(plain, steered)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, {1: push}):
            raise RuntimeError("boom")
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0), plain)


# ------------------------------------------------------------------ bad input

def test_bad_inputs(llama):
    model, split, ctx = llama
    with pytest.raises(ValueError, match="non-empty"):
        ConceptScore([])
    with pytest.raises(ValueError, match="source: expected token ids disjoint from target"):
        ConceptScore([1, 2], source=[2])
    with pytest.raises(ValueError, match="repeated"):
        ConceptScore([1, 1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ConceptScore([V + 3])(torch.zeros(V))
    G, q = random_metric()
    with pytest.raises(ValueError, match="q: expected a nonzero gradient"):
        fishback_direction(G, torch.zeros_like(q))
    with pytest.raises(ValueError, match=r"q: expected shape \(12,\)"):
        fishback_direction(G, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        fishback_direction(torch.ones(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="damping"):
        fishback_direction(G, q, damping=-1.0)
    with pytest.raises(ValueError, match="orthogonal"):
        cost_ratio(G, q, torch.cat([torch.stack([q[1], -q[0]]), torch.zeros(len(q) - 2, dtype=q.dtype)]))
    with pytest.raises(ValueError, match="paired"):
        caa_direction(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"direction: expected shape \(32,\)"):
        scale_to_target(split, ctx, ConceptScore(TARGET), torch.ones(5, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="method"):
        steer_to_target(split, ctx, ConceptScore(TARGET), 0.0, method="newton")
    with pytest.raises(ValueError, match="solve"):
        steer_to_target(split, ctx, ConceptScore(TARGET), 0.0, solve="lstsq")
    with pytest.raises(ValueError, match="rcond"):
        fishback_direction(G, q, solve="pinv", rcond=0.0)
    with pytest.raises(ValueError, match=r"concept: expected token ids in \[0, 61\) \(the model's vocabulary\)"):
        concept_gradient(split, ctx, ctx.h, ConceptScore([V]))
    with pytest.raises(TypeError, match="ConceptScore or SequenceConcept"):
        concept_gradient(split, ctx, ctx.h, [5])
    with pytest.raises(ValueError, match="continuation"):
        concept_gradient(split, ctx, ctx.h, SequenceConcept([5, 5]))
    with pytest.raises(ValueError, match="continuation"):
        steer_to_target(split, split.context(PROMPT, continuation=[5, 6]), SequenceConcept([5, 5]), 0.0)
    with pytest.raises(ValueError, match="ratio"):
        scale_to_target(split, ctx, ConceptScore(TARGET), ctx.h, 0.0, ratio=2.0)
    with pytest.raises(ValueError, match="methods"):
        compare_methods(split, ctx, ConceptScore(TARGET), 0.0, methods="fishback")
    with pytest.raises(ValueError, match="layer"):
        with steering(model, {LAYERS + 1: torch.zeros(D, dtype=torch.float64)}):
            pass
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        with steering(model, {1: torch.zeros(D + 1, dtype=torch.float64)}):
            pass
    with pytest.raises(ValueError, match="positions"):
        with steering(model, {1: torch.zeros(D, dtype=torch.float64)}, positions="first"):
            pass
    with pytest.raises(ValueError, match="mode"):
        with steering(model, {1: torch.zeros(D, dtype=torch.float64)}, mode="scale"):
            pass
    with pytest.raises(ValueError, match="model: .*expected a Hugging Face transformers model"):
        with steering(torch.nn.Linear(2, 2), {0: torch.zeros(2)}):
            pass


def test_bad_arguments_are_named_before_any_work(llama):
    """Review: these reached scipy (xtol), torch.linalg (a NaN G: an MKL error and an
    internal assert), a size mismatch deep in evaluate_delta, a NaN best score, or
    pullback_fisher after the first gradient (an unknown option); rho = NaN or "1"
    was accepted."""
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    q, phi0 = concept_gradient(split, ctx, ctx.h, concept)
    v = q / q.norm()
    G, q12 = random_metric()
    with pytest.raises(ValueError, match="G: expected finite values"):
        fishback_direction(G * float("nan"), q12)
    for rho in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="rho: expected a finite number"):
            fishback_direction(G, q12, rho)
        with pytest.raises(ValueError, match="rho: expected a finite number"):
            euclidean_direction(q12, rho)
    with pytest.raises(ValueError, match="damping: expected a finite number ≥ 0"):
        fishback_direction(G, q12, damping=float("inf"))
    for xtol in (-1.0, float("nan"), 0):
        with pytest.raises(ValueError, match="xtol: expected a finite number > 0"):
            scale_to_target(split, ctx, concept, v, phi0 + 0.5, xtol=xtol)
    with pytest.raises(ValueError, match="h: expected finite values"):
        scale_to_target(split, ctx, concept, v, phi0 + 0.5, h=ctx.h * float("nan"))
    with pytest.raises(ValueError, match=r"h: expected shape \(32,\)"):
        scale_to_target(split, ctx, concept, v, phi0 + 0.5, h=torch.zeros(7, dtype=ctx.h.dtype))
    with pytest.raises(TypeError, match="ctx: expected a SplitContext"):
        scale_to_target(split, None, concept, v, phi0 + 0.5)
    with pytest.raises(ValueError, match="tol: expected a finite number > 0"):
        steer_to_target(split, ctx, concept, phi0 + 0.5, tol=float("inf"))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['tolerance'\]"):
        compare_methods(split, ctx, concept, phi0 + 0.5, tolerance=1e-4)
    with pytest.raises(ValueError, match=r"k: expected None with metric_mode='exact' \(it is read by metric_mode='low_rank'\)"):
        steer_to_target(split, ctx, concept, phi0 + 0.5, k=8)  # review: failed inside the first step
    with pytest.raises(ValueError, match="metric_mode: expected one of"):
        steer_to_target(split, ctx, concept, phi0 + 0.5, metric_mode="dense")
    with pytest.raises(ValueError, match=r"delta: expected a floating tensor of shape \(32,\)"):
        evaluate_delta(split, ctx, concept, torch.zeros(5, dtype=ctx.h.dtype), method="x")
    with pytest.raises(ValueError, match="delta: expected finite values"):
        evaluate_delta(split, ctx, concept, v * float("nan"), method="x")


def test_an_impossible_or_malformed_target_is_refused_before_any_work(llama):
    """φ* > 0 is p > 1 for a log-probability or sequence concept: refused at once
    (a log-odds concept may take any finite φ*); a 2-D token tensor is not a sequence."""
    from fisherfast.steer import SequenceConcept

    _, split, ctx = llama
    calls = []
    real = split.logits
    split.logits = lambda *a, **k: calls.append(1) or real(*a, **k)
    seq_ctx = split.context(PROMPT, continuation=TARGET)
    try:
        for concept, c in ((ConceptScore(TARGET), ctx), (SequenceConcept(TARGET), seq_ctx)):
            with pytest.raises(ValueError, match="target_score: expected a number ≤ 0"):
                scale_to_target(split, c, concept, torch.ones(D, dtype=torch.float64), 0.5)
            with pytest.raises(ValueError, match="target_score: expected a number ≤ 0"):
                steer_to_target(split, c, concept, 0.1)
        assert calls == []
    finally:
        split.logits = real
    alpha = scale_to_target(split, ctx, ConceptScore(TARGET, source=[1, 2]),
                            concept_gradient(split, ctx, ctx.h, ConceptScore(TARGET, source=[1, 2]))[0],
                            float(ConceptScore(TARGET, source=[1, 2])(split.logits(ctx, ctx.h))) + 0.5)
    assert alpha > 0  # a log-odds target above 0 is fine
    with pytest.raises(ValueError, match="1-D sequence"):
        SequenceConcept(torch.ones(2, 2, dtype=torch.long))
