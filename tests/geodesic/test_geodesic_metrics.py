"""Tests of fisherfast.geodesic.metrics (and the concept distribution it rests on)
on a tiny random-init float64 Llama.

Oracles: torch.func.jacrev of √(q/2) with q summed explicitly from
softmax(split.logits) (the factor); fisherfast.metric.pullback_fisher(mode=
"concept") (JᵀJ = ½ G_H, the documented constant); the exact squared Hellinger
distance of two concept distributions (second-order agreement of ‖Jδ‖²);
central finite differences of the encoder (its Jacobian factor).
"""
from __future__ import annotations

import math

import pytest
import torch

from fisherfast.concepts import ConceptSchema, concept_distributions
from fisherfast.geodesic import ConceptHellingerMetric, EncoderMetric, FlatMetric
from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from tiny_models import tiny_causal_lm  # noqa: E402  (tests/)

V, D, LAYERS = 61, 32, 3
# The split computes float64 models in float64 throughout: two float64 routes through the
# model agree to float64 round-off (measured < 1e-14 relative); TOL leaves a factor > 100.
TOL = 1e-12
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]]


def tiny_llama(head_scale: float = 25.0, seed: int = 0):
    """A random-init float64 Llama with a peaked p (``tests/tiny_models.py``)."""
    return tiny_causal_lm("llama", vocab=V, d=D, layers=LAYERS, head_scale=head_scale, seed=seed)


@pytest.fixture(scope="module")
def setup():
    split = SplitModel(tiny_llama(), layer=1)
    contexts = split.contexts(PROMPTS)
    p = torch.softmax(split.logits(contexts[0], contexts[0].h), -1)
    top = p.argsort(descending=True).tolist()
    # Concepts on the most probable tokens, so every bin carries mass and moves.
    schema = ConceptSchema({"a": [top[0]], "b": [top[1], top[4]], "c": [top[2]]}, V)
    return split, contexts, schema


def explicit_q(z, schema):
    """q = (Σ_{t∈C_k} p_t)_k ∪ {1 − Σ_k q_k} by plain sums of softmax(z)."""
    p = torch.softmax(z.double(), -1)
    q = [p[..., ids].sum(-1) for ids in schema.token_sets]
    return torch.stack(q + [1 - sum(q)], -1)


def test_concept_distribution_matches_explicit_sums(setup):
    split, contexts, schema = setup
    X = torch.stack([ctx.h for ctx in contexts])
    Q = concept_distributions(split, contexts, schema, X)
    assert Q.shape == (2, 2, 4)
    for c, ctx in enumerate(contexts):
        torch.testing.assert_close(Q[:, c], explicit_q(split.logits(ctx, X), schema), rtol=1e-12, atol=1e-15)


def test_concept_factor_equals_jacrev_of_explicit_sqrt_q(setup):
    split, contexts, schema = setup
    x = contexts[0].h + 0.05 * torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = ConceptHellingerMetric(split, contexts[0], schema).factor(x)
    oracle = torch.func.jacrev(lambda h: (explicit_q(split.logits(contexts[0], h), schema) / 2).sqrt())(x)
    assert J.shape == (4, D)
    torch.testing.assert_close(J, oracle, rtol=TOL, atol=TOL * float(oracle.abs().max()))


def test_concept_metric_is_half_the_pullback_hellinger_metric(setup):
    split, contexts, schema = setup
    metric = ConceptHellingerMetric(split, contexts, schema, eps=0.0)
    x = contexts[1].h
    M = metric.matrix(x)
    # pullback_fisher averages over (context, point) pairs: the same x in both contexts.
    G_H = pullback_fisher(split, contexts, mode="concept", concepts=schema.concepts, h=torch.stack([x, x]),
                          progress=False).dense()
    assert float(torch.linalg.matrix_norm(M - 0.5 * G_H) / torch.linalg.matrix_norm(G_H)) < TOL
    # and two stacked blocks J_c/√C, one per context
    J = metric.factor(x)
    single = ConceptHellingerMetric(split, contexts[1], schema).factor(x)
    torch.testing.assert_close(J[4:] * math.sqrt(2), single, rtol=1e-12, atol=1e-15)


def test_factor_batches_and_eps(setup):
    split, contexts, schema = setup
    metric = ConceptHellingerMetric(split, contexts, schema, eps=0.25)
    X = torch.stack([contexts[0].h, contexts[1].h])
    J = metric.factor(X)
    assert J.shape == (2, 8, D) and not J.requires_grad
    for i in range(2):
        torch.testing.assert_close(J[i], metric.factor(X[i]), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(metric.matrix(X)[i], J[i].T @ J[i] + 0.25 * torch.eye(D, dtype=torch.float64))


def test_squared_length_matches_squared_hellinger_to_second_order(setup):
    """‖J(x)δ‖² − d_H(q(x), q(x+δ))² = O(‖δ‖³): the relative gap halves with ‖δ‖."""
    split, contexts, schema = setup
    metric = ConceptHellingerMetric(split, contexts, schema)
    x = contexts[0].h
    J = metric.factor(x)
    u = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()

    def relative_gap(step):
        Q = concept_distributions(split, contexts, schema, torch.stack([x, x + step * u]))
        # d_H² = ½ Σ(√q − √q′)², averaged over the contexts (the metric's mean)
        d2 = float((0.5 * ((Q[0].sqrt() - Q[1].sqrt()) ** 2).sum(-1)).mean())
        return abs(float(((J @ (step * u)) ** 2).sum()) - d2) / d2

    gaps = [relative_gap(s) for s in (1e-3, 5e-4, 2.5e-4)]
    assert gaps[0] < 0.1
    for big, small in zip(gaps, gaps[1:]):
        assert 1.7 < big / small < 2.3


def test_concept_features_are_the_map_the_factor_differentiates(setup):
    """jacrev of s = features equals the factor J, and ‖s(x′) − s(x)‖² is exactly the
    context-mean d_H(q(x), q(x′))² for any two points (the embedded energy's identity)."""
    split, contexts, schema = setup
    metric = ConceptHellingerMetric(split, contexts, schema)
    x = contexts[0].h
    J = metric.factor(x)  # two float64 routes through the float64 split: round-off only
    assert float((torch.func.jacrev(metric.features)(x) - J).norm() / J.norm()) < TOL
    x2 = x + 0.3 * torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Q = concept_distributions(split, contexts, schema, torch.stack([x, x2]))
    d2 = float((0.5 * ((Q[0].sqrt() - Q[1].sqrt()) ** 2).sum(-1)).mean())
    assert float(((metric.features(x2) - metric.features(x)) ** 2).sum()) == pytest.approx(d2, rel=1e-10)


def test_flat_metric_is_identity():
    metric = FlatMetric(5)
    X = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(metric.matrix(X), torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    assert metric.eps == 0.0 and metric.factor(X[0]).shape == (5, 5)


def test_encoder_factor_matches_central_differences():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    encoder.requires_grad_(False)
    metric = EncoderMetric(encoder, 6, eps=0.1)
    x = torch.randn(6, dtype=torch.float64)
    # h = 1e-5: truncation O(h²·|E'''|) ~ 1e-10, round-off ~1e-16/h ~ 1e-11.
    h = 1e-5
    eye = torch.eye(6, dtype=torch.float64)
    fd = torch.stack([(encoder(x + h * e) - encoder(x - h * e)) / (2 * h) for e in eye], 1)
    torch.testing.assert_close(metric.factor(x), fd, rtol=0, atol=1e-8)
    torch.testing.assert_close(metric.matrix(x), fd.T @ fd + 0.1 * eye, rtol=0, atol=1e-7)


def test_bad_inputs(setup):
    split, contexts, schema = setup
    with pytest.raises(ValueError, match="eps"):
        ConceptHellingerMetric(split, contexts, schema, eps=-1.0)
    with pytest.raises(ValueError, match="schema: expected a schema over the model's V = 61, got one over V = 50"):
        ConceptHellingerMetric(split, contexts, ConceptSchema([[1], [2]], 50))
    with pytest.raises(TypeError, match="schema"):
        ConceptHellingerMetric(split, contexts, {"a": [1]})
    with pytest.raises(TypeError, match="contexts"):
        ConceptHellingerMetric(split, [], schema)
    other = SplitModel(split.model, layer=2)
    with pytest.raises(ValueError, match="another SplitModel"):
        ConceptHellingerMetric(other, contexts, schema)
    metric = ConceptHellingerMetric(split, contexts, schema)
    with pytest.raises(ValueError, match=r"points: expected shape \(32,\)"):
        metric.factor(torch.zeros(3, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="points: expected the model's dtype"):
        metric.factor(torch.zeros(D, dtype=torch.float32))
    with pytest.raises(TypeError, match="points"):
        metric.factor(torch.zeros(D, dtype=torch.long))
    with pytest.raises(ValueError, match="concepts: expected disjoint concepts"):
        ConceptSchema({"a": [1, 2], "b": [2]}, V)
    with pytest.raises(ValueError, match="vocab_size"):
        ConceptSchema({"a": [1]}, 0)
    with pytest.raises(ValueError, match="d: expected an int ≥ 1"):
        FlatMetric(0)
    with pytest.raises(TypeError, match="encoder"):
        EncoderMetric(lambda x: x, 3)
    with pytest.raises(ValueError, match="logits: expected shape"):
        schema.distribution(torch.zeros(3, V + 1))
