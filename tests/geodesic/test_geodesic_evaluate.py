"""Tests of fisherfast.geodesic.evaluate.

Oracles: explicit formulas on hand-made distributions written out with
numpy loops (d_H² = ½Σ(√q − √r)², D_B = −log Σ√(q r) via the Bhattacharyya
coefficient, the arc length and energy as plain sums, legibility counted by
hand); for ``evaluate_path`` on a tiny float64 Llama, the same formulas on
softmax(model logits) summed per concept, and the argmax of the logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherfast.concepts import ConceptSchema
from fisherfast.geodesic import (bhattacharyya_distance, bhattacharyya_energy, chord_path, evaluate_path,
                                 hellinger_arc_length, hellinger_distance, legibility)
from fisherfast.split import SplitModel
from tiny_models import tiny_causal_lm  # noqa: E402  (tests/)

V, D = 61, 32


def tiny_llama(head_scale: float = 25.0, seed: int = 0):
    """A random-init float64 Llama with a peaked p (``tests/tiny_models.py``)."""
    return tiny_causal_lm("llama", vocab=V, d=D, layers=3, head_scale=head_scale, seed=seed)


Q = np.array([0.5, 0.3, 0.15, 0.05])
R = np.array([0.1, 0.2, 0.3, 0.4])


def np_hellinger(q, r):
    return np.sqrt(0.5 * sum((np.sqrt(a) - np.sqrt(b)) ** 2 for a, b in zip(q, r)))


def np_bhattacharyya(q, r):
    return -np.log(sum(np.sqrt(a * b) for a, b in zip(q, r)))


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def test_hellinger_and_bhattacharyya_on_hand_made_distributions():
    assert float(hellinger_distance(t(Q), t(R))) == pytest.approx(np_hellinger(Q, R), rel=1e-14)
    assert float(bhattacharyya_distance(t(Q), t(R))) == pytest.approx(np_bhattacharyya(Q, R), rel=1e-12)
    assert float(hellinger_distance(t(Q), t(Q))) == 0.0
    assert float(hellinger_distance(t([1.0, 0.0]), t([0.0, 1.0]))) == 1.0
    assert float(bhattacharyya_distance(t([1.0, 0.0]), t([0.0, 1.0]))) == float("inf")
    # broadcasting over leading axes
    out = hellinger_distance(t([Q, R])[:, None], t([Q, R])[None])
    assert out.shape == (2, 2) and float(out[0, 1]) == pytest.approx(np_hellinger(Q, R), rel=1e-14)


def test_arc_length_energy_and_legibility_on_a_hand_made_path():
    path = np.array([[0.6, 0.3, 0.05, 0.05],    # legible: 0.6 > ½·0.95
                     [0.3, 0.2, 0.1, 0.4],      # not: 0.3 = ½·0.6 (strict majority needed)
                     [0.0, 0.0, 0.0, 1.0],      # not: no concept mass
                     [0.1, 0.1, 0.7, 0.1]])     # legible
    manifold = np.array([[0.8, 0.1, 0.05, 0.05], [0.05, 0.05, 0.8, 0.1]])
    arc = sum(np_hellinger(path[i], path[i + 1]) for i in range(3))
    energy = sum(min(np_bhattacharyya(q, r) for r in manifold) for q in path)
    assert float(hellinger_arc_length(t(path))) == pytest.approx(arc, rel=1e-13)
    assert float(bhattacharyya_energy(t(path), t(manifold))) == pytest.approx(energy, rel=1e-12)
    assert float(legibility(t(path))) == 0.5
    # a context axis: (T, C, B) gives one value per context
    two = t(np.stack([path, path[::-1]], 1))
    np.testing.assert_allclose(hellinger_arc_length(two).numpy(), [arc, arc], rtol=1e-13)
    np.testing.assert_allclose(legibility(two).numpy(), [0.5, 0.5])


@pytest.fixture(scope="module")
def setup():
    split = SplitModel(tiny_llama(), layer=2)
    contexts = split.contexts([[3, 14, 15, 9, 2, 6], [2, 7, 1, 8]])
    p = torch.softmax(split.logits(contexts[0], contexts[0].h), -1)
    top = p.argsort(descending=True).tolist()
    schema = ConceptSchema({"x": [top[0], top[3]], "y": [top[1]], "z": [top[2]]}, V)
    return split, contexts, schema


@pytest.mark.parametrize("forward, target", [(True, "y"), (False, "x")])
def test_evaluate_path_matches_explicit_formulas(setup, forward, target):
    split, contexts, schema = setup
    g = torch.Generator().manual_seed(2)
    h0, h1 = contexts[0].h, contexts[1].h + 0.5 * torch.randn(D, dtype=torch.float64, generator=g)
    path = chord_path(h0, h1, 6) if forward else chord_path(h1, h0, 6)
    reference = torch.stack([h0, h1, contexts[1].h])
    result = evaluate_path(split, contexts, schema, path, reference, target)
    k = schema.names.index(target)

    def q_of(ctx, x):
        p = torch.softmax(split.logits(ctx, x), -1).numpy()
        q = [p[ids.numpy()].sum() for ids in schema.token_sets]
        return np.array(q + [1 - sum(q)])

    per = {"bhattacharyya_energy": [], "arc_length": [], "legibility": [], "target_probability": [],
           "target_top1": []}
    for ctx in contexts:
        qs = [q_of(ctx, x) for x in path]
        rs = [q_of(ctx, r) for r in reference]
        per["bhattacharyya_energy"].append(sum(min(np_bhattacharyya(q, r) for r in rs) for q in qs))
        per["arc_length"].append(sum(np_hellinger(a, b) for a, b in zip(qs, qs[1:])))
        per["legibility"].append(np.mean([q[:-1].max() > 0.5 * q[:-1].sum() for q in qs]))
        per["target_probability"].append(qs[-1][k])
        per["target_top1"].append(float(int(split.logits(ctx, path[-1]).argmax()) in schema.token_sets[k].tolist()))
    for name, values in per.items():
        assert getattr(result, name) == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12), name
        np.testing.assert_allclose(result.per_context[name].numpy(), values, rtol=1e-9, atol=1e-12)
    # the backward path ends at context 0's own state, whose top token (in both contexts) is in "x"
    assert per["target_top1"] == ([0.0, 0.0] if forward else [1.0, 1.0])
    assert 0 < result.legibility < 1
    assert result.q.shape == (6, 2, 4) and result.reference_q.shape == (3, 2, 4)
    # the endpoints are reference points: their energy terms are 0 (up to round-off)
    assert float(bhattacharyya_energy(result.q[[0]], result.reference_q)[0]) < 1e-12
    assert set(result.as_dict()) == set(per)


def test_bad_inputs(setup):
    split, contexts, schema = setup
    with pytest.raises(ValueError, match=r"q: expected distributions \(last axis\) summing to 1"):
        hellinger_distance(t([0.5, 0.6]), t([0.5, 0.5]))
    with pytest.raises(ValueError, match="q: expected finite entries ≥ 0"):
        hellinger_distance(t([-0.5, 1.5]), t([0.5, 0.5]))
    with pytest.raises(ValueError, match="same number of bins"):
        hellinger_distance(t(Q), t([0.5, 0.5]))
    with pytest.raises(TypeError, match="q: expected a floating tensor"):
        hellinger_distance(Q, t(R))
    with pytest.raises(ValueError, match="Q: expected at least 2 axes"):
        hellinger_arc_length(t(Q))
    with pytest.raises(ValueError, match="Q, R: expected matching shapes"):
        bhattacharyya_energy(t([Q, R]), t([[Q, R]]))
    path = torch.stack([contexts[0].h, contexts[1].h])
    with pytest.raises(ValueError, match="target: expected one of"):  # review: named "concept"
        evaluate_path(split, contexts, schema, path, path, "w")
    with pytest.raises(ValueError, match=r"target: expected one of .* or an int in \[0, "):
        evaluate_path(split, contexts, schema, path, path, -1)
    bad = path.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="path: expected finite values"):  # review: was "Q: entries must be finite"
        evaluate_path(split, contexts, schema, bad, path, 0)
    with pytest.raises(ValueError, match="reference: expected finite values"):
        evaluate_path(split, contexts, schema, path, bad, 0)
    with pytest.raises(ValueError, match="path: expected shape"):
        evaluate_path(split, contexts, schema, path[:, :5], path, 0)
    with pytest.raises(TypeError, match="reference: expected the model's dtype"):
        evaluate_path(split, contexts, schema, path, path.float(), 0)
    with pytest.raises(TypeError, match="contexts"):
        evaluate_path(split, "prompt", schema, path, path, 0)
