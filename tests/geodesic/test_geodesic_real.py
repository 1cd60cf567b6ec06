"""Geodesic steering on the embedded SmolLM2-135M, weekdays task, layer 24 (slow: loads the model).

Oracles: the tokenizer's own encoding of " Monday" etc. (the schema);
``pullback_fisher(mode="concept")`` (JᵀJ = ½ G_H in float32, where two routes
through the model agree to ~1e-5 relative, measured 3e-5); the model's own
forward pass with the waypoint written in by ``fisherfast.steer.steering``
(mode "replace" at the last position) for what ``evaluate_path`` injects.
"""
from __future__ import annotations

import pytest
import torch

from fisherfast.geodesic import (WEEKDAYS, ConceptHellingerMetric, bhattacharyya_energy, chord_path, class_centroids,
                                 evaluate_path, lbfgs_path, path_energy, spline_path)
from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from fisherfast.steer import steering

pytestmark = pytest.mark.slow
LAYER = 24


def test_weekdays_paths_metric_and_evaluation_on_smollm2():
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    split = SplitModel(model, LAYER)
    schema = WEEKDAYS.schema(tokenizer, split.V)
    assert schema.concepts == {day: tokenizer.encode(" " + day) for day in WEEKDAYS.classes}

    C = class_centroids(split, WEEKDAYS, tokenizer, WEEKDAYS.examples(steps=(1,)))
    carriers_ids = [WEEKDAYS.prompt_ids(tokenizer, WEEKDAYS.prompt("Friday", 3)),
                    WEEKDAYS.prompt_ids(tokenizer, WEEKDAYS.prompt("Sunday", 1))]
    carriers = split.contexts(carriers_ids)

    metric = ConceptHellingerMetric(split, carriers, schema)
    M = metric.matrix(C[0]) - metric.eps * torch.eye(split.d)
    G_H = pullback_fisher(split, carriers, mode="concept", concepts=schema.concepts,
                          h=torch.stack([C[0], C[0]]), progress=False).dense()
    assert float(torch.linalg.matrix_norm(M - 0.5 * G_H) / torch.linalg.matrix_norm(G_H)) < 1e-3

    T = 6
    chord = chord_path(C[0], C[2], T)
    spline = spline_path(C, 0, 2, T, periodic=True)
    result = lbfgs_path(metric, C[0], C[2], T, outer_steps=2)
    assert torch.equal(result.path[0], C[0]) and torch.equal(result.path[-1], C[2])
    assert result.energy <= path_energy(metric, chord)

    for path in (chord, spline, result.path):
        evaluation = evaluate_path(split, carriers, schema, path, C, "Wednesday")
        # the endpoints are centroids: on the behaviour manifold
        assert float(bhattacharyya_energy(evaluation.q[[0, -1]], evaluation.reference_q).max()) < 1e-6
        assert evaluation.arc_length > 0
        # what evaluate_path injects is what the model computes with the state written in
        for c, ids in enumerate(carriers_ids):
            with steering(model, {LAYER: path[-1]}, mode="replace"):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            p = torch.softmax(logits.double(), -1)
            wednesday = schema.token_sets[2]
            assert float(evaluation.per_context["target_probability"][c]) == pytest.approx(
                float(p[wednesday].sum()), rel=1e-4)
            assert float(evaluation.per_context["target_top1"][c]) == float(int(p.argmax()) in wednesday.tolist())
