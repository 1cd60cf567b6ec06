"""The Hellinger rows of a concept schema and their two consumers, against one float64 formula.

Oracle: s(h) = √q(h) with q summed explicitly from softmax(split.logits(ctx, h))
(plain sums over each concept's tokens, q_other = 1 − Σ q_c), differentiated by
torch.func.jacrev through the whole split model in float64: J_s = ∂s/∂h. From
docs/design.md §4 the concept-mode metric is G_H = J_sᵀ J_s
(= ¼ J_qᵀ diag(1/q) J_q, checked too), and the geodesic concept metric,
whose squared lengths are d_H² = ½ Σ (Δ√q)², has JᵀJ = ½ G_H (§6).

Error model: the split computes float64 models in float64 throughout
(attention and norms included), so the two routes through the model (jacrev
of the whole map vs. a head Jacobian followed by block VJPs) differ only by
float64 round-off accumulated over a few hundred operations: measured
3e-16 – 8e-16 relative; TOL = 1e-12 leaves a factor > 1000. A wrong factor
(½, ¼, √2) is off by ≥ 0.29.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from fisherfast.concepts import ConceptSchema, concept_schema, hellinger_rows
from fisherfast.geodesic import ConceptHellingerMetric
from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from tiny_models import tiny_causal_lm  # noqa: E402  (tests/)

V, D = 61, 32
TOL = 1e-12
PROMPT = [3, 14, 15, 9, 2, 6]


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def setup(arch="llama", softcap=None):
    model = tiny_causal_lm(arch, vocab=V, d=D, layers=3, head_scale=25.0, logit_softcap=softcap)
    split = SplitModel(model, layer=1)
    ctx = split.context(PROMPT)
    p = torch.softmax(split.logits(ctx, ctx.h), -1)
    top = p.argsort(descending=True).tolist()
    # concepts on probable tokens, so every bin carries mass and moves
    schema = ConceptSchema({"a": [top[0]], "b": [top[1], top[4]], "c": [top[2], top[7]]}, V)
    return split, ctx, schema


def explicit_sqrt_q(split, ctx, schema):
    def s(h):
        p = torch.softmax(split.logits(ctx, h).double(), -1)
        q = [p[ids].sum() for ids in schema.token_sets]
        return torch.stack(q + [1 - sum(q)]).sqrt()
    return s


@pytest.mark.parametrize("arch, softcap", [("llama", None), ("gemma3_text", 3.0)], ids=["llama", "gemma3_softcap"])
def test_rows_and_both_metrics_match_one_float64_formula(arch, softcap):
    split, ctx, schema = setup(arch, softcap)
    x = ctx.h + 0.05 * torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = explicit_sqrt_q(split, ctx, schema)
    J_ref = torch.func.jacrev(s)(x)                                          # (n_c + 1, d)
    G_ref = J_ref.T @ J_ref

    J_s, q = hellinger_rows(split, ctx, x, schema)
    assert J_s.shape == (4, D) and q.dtype == torch.float64
    torch.testing.assert_close(q, s(x) ** 2, rtol=TOL, atol=0)
    assert rel(J_s, J_ref) < TOL
    # the design's second form, from the Jacobian of q itself
    J_q = torch.func.jacrev(lambda h: s(h) ** 2)(x)
    assert rel(0.25 * J_q.T @ torch.diag(1 / q) @ J_q, G_ref) < TOL

    G = pullback_fisher(split, ctx, h=x, mode="concept", concepts=schema, progress=False)
    assert rel(G.dense(), G_ref) < TOL                                       # G_H = J_sᵀ J_s
    assert G.info["concepts"] == ["a", "b", "c"]
    M = ConceptHellingerMetric(split, ctx, schema, eps=0.0).matrix(x)
    assert rel(M, 0.5 * G_ref) < TOL                                         # d_H² convention: ½ G_H


def test_a_bin_with_zero_mass_has_a_zero_row():
    """Every token in a concept: q_other ≡ 0 is a constant, its row is 0 (not NaN)."""
    split, ctx, _ = setup()
    schema = ConceptSchema([list(range(0, 30)), list(range(30, V))], V)
    J_s, q = hellinger_rows(split, ctx, ctx.h, schema)
    assert float(q[-1]) == 0.0 and bool((J_s[-1] == 0).all()) and bool(torch.isfinite(J_s).all())


def test_schema_of_and_the_deprecated_tuple_form():
    schema = ConceptSchema({"x": [1, 2], "y": 7}, V)
    assert ConceptSchema.of(schema, V) is schema
    assert ConceptSchema.of([[1, 2], [7]], V).names == ("0", "1")
    with pytest.raises(ValueError, match="concepts: expected a schema over the model's V = 50, got one over V = 61"):
        ConceptSchema.of(schema, 50)
    with pytest.warns(DeprecationWarning, match="ConceptSchema"):
        names, token_sets = concept_schema({"x": [1, 2], "y": 7}, V)
    assert names == ["x", "y"] and [t.tolist() for t in token_sets] == [[1, 2], [7]]


def test_old_names_warn():
    import fisherfast.metric

    with pytest.warns(DeprecationWarning, match="METRIC_MODES"):
        assert fisherfast.metric.MODES == fisherfast.metric.METRIC_MODES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from fisherfast.steer import concept_gradient  # noqa: F401  (the new home re-exported: no warning)
    import importlib
    import sys

    for old, new in (("fisherfast.steer.concept", "concept_gradient"), ("fisherfast.geodesic.concepts", "ConceptSchema")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="fisherfast.concepts"):
            module = importlib.import_module(old)
        assert getattr(module, new) is getattr(importlib.import_module("fisherfast.concepts"), new)


def test_the_moved_concept_modules_are_attributes_of_their_old_packages_with_a_warning():
    """``fisherfast.steer.concept`` / ``fisherfast.geodesic.concepts`` as attributes (the old
    ``__init__`` imported them): the new home, with a DeprecationWarning naming it."""
    import importlib
    import sys

    import fisherfast.concepts as home

    for package, old in (("fisherfast.steer", "concept"), ("fisherfast.geodesic", "concepts")):
        sys.modules.pop(f"{package}.{old}", None)
        module = importlib.import_module(package)
        module.__dict__.pop(old, None)   # as before the submodule was ever imported
        with pytest.warns(DeprecationWarning, match="fisherfast.concepts"):
            assert getattr(module, old) is home
