"""fisherfast.steer against independent oracles on tiny random-init models.

Oracles: explicit log-sum-exp formulas in numpy; torch.func.jacrev and
central finite differences of φ(z(h)); the KKT system of the constrained
problem min ½δᵀG_λδ s.t. qᵀδ = ρ solved densely by numpy; Cauchy–Schwarz for
the cost ratio; the exact KL of the full distributions; the split model's own
upper map for the hooks (the model's forward with an edited hidden state must
give what SplitModel predicts).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from fisherfast.steer import (ConceptScore, actadd_direction, caa_direction, concept_gradient, cost_ratio,
                              euclidean_direction, fishback_direction, off_target_kl, probe_direction,
                              scale_to_first_order, scale_to_target, steer_to_target, steering)

V, D, LAYERS = 61, 32, 3
PROMPT = [3, 14, 15, 9, 2, 6]
TARGET = [5, 17]  # two mid-probability tokens at PROMPT's last position


def tiny_model(arch: str, seed: int = 0):
    """Random-init float64 causal LM with a scaled head (a peaked p)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * D,
            num_key_value_heads=2, max_position_embeddings=64))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64))
    model.config._attn_implementation = "eager"
    model = model.double().eval().requires_grad_(False)
    model.get_output_embeddings().weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def llama():
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
        torch.testing.assert_close(q, want, rtol=1e-6, atol=1e-9)
        # transformers runs RMSNorm and the attention softmax in float32 even in a float64
        # model, so φ carries ~1e-7 relative rounding: central differences at ε = 1e-3 have
        # rounding error ~1e-7/ε = 1e-4 and truncation error ~ε² = 1e-6.
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
    # The two routes to G v agree to ~1e-7 (transformers' float32 norm/softmax inside a
    # float64 model); the solve amplifies that by κ(G_λ) ≈ 1e2 at damping 1e-2.
    want = fishback_direction(dense, q, 1.0, damping=1e-2)
    iterations = {"plain": 0, "nystrom": 0}

    def counter(name):
        return lambda x: iterations.__setitem__(name, iterations[name] + 1)

    got = fishback_direction(free, q, 1.0, damping=1e-2, rtol=1e-12, callback=counter("plain"))
    assert float((got - want).norm() / want.norm()) < 1e-5
    # Nyström-preconditioned CG: the same solution in fewer products
    low_rank = pullback_fisher(split, ctx, mode="low_rank", k=16, seed=0, progress=False)
    pcg = fishback_direction(free, q, 1.0, damping=1e-2, rtol=1e-12, preconditioner=low_rank,
                             callback=counter("nystrom"))
    assert float((pcg - want).norm() / want.norm()) < 1e-5
    assert iterations["nystrom"] < 0.7 * iterations["plain"], iterations  # 33 vs 56 (SmolLM2, k=64: 53 vs 228)
    with pytest.raises(TypeError, match="low-rank PullbackMetric"):
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

def test_fishback_reaches_the_target_with_less_kl_than_euclidean(llama):
    _, split, ctx = llama
    concept = ConceptScore(TARGET)
    phi0 = float(concept(split.logits(ctx, ctx.h)))
    target = phi0 + 0.4
    fish = steer_to_target(split, ctx, concept, target, method="fishback", max_step_kl=0.05)
    eucl = steer_to_target(split, ctx, concept, target, method="euclidean")
    assert fish.reached and eucl.reached
    assert target - 1e-3 <= fish.scores[-1] < target + 0.05  # reached, without overshooting far
    assert all(kl <= 0.05 for kl in fish.step_kls)  # the trust region on the actual step KL
    z0 = split.logits(ctx, ctx.h).double()

    def kl_from_start(h):
        lp, lq = torch.log_softmax(z0, -1), torch.log_softmax(split.logits(ctx, h).double(), -1)
        return float((lp.exp() * (lp - lq)).sum())

    # the same concept change at a lower distortion of the full distribution
    assert kl_from_start(fish.h) < kl_from_start(eucl.h)
    torch.testing.assert_close(fish.delta, fish.h - ctx.h)


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
    with pytest.raises(ValueError, match="max_scale"):
        scale_to_target(split, ctx, concept, -v, phi0 + 0.5, max_scale=8.0)


def test_off_target_kl_removes_the_concept_tokens():
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
    p, r = torch.softmax(steered[:, keep], -1), torch.softmax(base[:, keep], -1)
    torch.testing.assert_close(off_target_kl(concept, base, steered), (p * (p / r).log()).sum(-1))


# ------------------------------------------------------------------ hooks

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_reproduce_the_split_models_upper_map(arch):
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
    with pytest.raises(ValueError, match="disjoint"):
        ConceptScore([1, 2], source=[2])
    with pytest.raises(ValueError, match="repeated"):
        ConceptScore([1, 1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ConceptScore([V + 3])(torch.zeros(V))
    G, q = random_metric()
    with pytest.raises(ValueError, match="q is zero"):
        fishback_direction(G, torch.zeros_like(q))
    with pytest.raises(ValueError, match="length 12"):
        fishback_direction(G, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        fishback_direction(torch.ones(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="damping"):
        fishback_direction(G, q, damping=-1.0)
    with pytest.raises(ValueError, match="orthogonal"):
        cost_ratio(G, q, torch.cat([torch.stack([q[1], -q[0]]), torch.zeros(len(q) - 2, dtype=q.dtype)]))
    with pytest.raises(ValueError, match="paired"):
        caa_direction(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="direction must have length 32"):
        scale_to_target(split, ctx, ConceptScore(TARGET), torch.ones(5, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="method"):
        steer_to_target(split, ctx, ConceptScore(TARGET), 0.0, method="newton")
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
    with pytest.raises(ValueError, match="unsupported architecture"):
        with steering(torch.nn.Linear(2, 2), {0: torch.zeros(2)}):
            pass
