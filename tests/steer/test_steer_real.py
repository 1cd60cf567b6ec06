"""FishBack against Euclidean steering on the embedded SmolLM2-135M (slow: loads the model).

After "The capital of France is", raise p(" London") from 0.012 to 0.5 at
layer 24; the steered vector, applied by the hooks in the model's own forward
pass, must give the probability the split model predicts.
"""
from __future__ import annotations

import math

import pytest
import torch

from fisherfast.split import SplitModel
from fisherfast.steer import ConceptScore, compare_methods, steering

pytestmark = pytest.mark.slow


def test_fishback_reaches_the_target_with_less_distortion_than_euclidean():
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    split = SplitModel(model, 24)
    ctx = split.context(ids[0])
    concept = ConceptScore(tokenizer.encode(" London"))
    rows = {row["method"]: row for row in compare_methods(split, ctx, concept, math.log(0.5))}
    fish, eucl = rows["fishback"], rows["euclidean"]
    assert fish["reached"] and eucl["reached"]
    assert fish["kl"] < eucl["kl"] and fish["off_target_kl"] < eucl["off_target_kl"] / 2
    with steering(model, {24: fish["delta"]}):
        p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    assert float(p[concept.target].sum()) == pytest.approx(fish["target_prob"], abs=1e-3)
