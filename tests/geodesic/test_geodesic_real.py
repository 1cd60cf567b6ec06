"""Geodesic steering on the embedded SmolLM2-135M, weekdays list carriers, layer 24 (slow: loads the model).

Every figure the solver reports is recomputed by an independent route: the
model's own forward pass with the waypoint written in by
``fisherfast.steer.steering`` (mode "replace" at the last position), next-token
probabilities summed over the schema's token ids by hand, and the squared
Hellinger distances, ε and the embedded energy written out from their
definitions. The metric is compared with ``pullback_fisher(mode="concept")``
in float64, where the two routes agree to 1.7e-7 relative (in float32 they
differ by ~5e-4 on these carriers).

What each check catches, verified by breaking the implementation and running
this test (then reverting): features √q instead of √(q/2) → the energy is 2×
the oracle's; the solver skipping its L-BFGS step → the energy is not below
0.9× the chord's; ε at 10% instead of 1% of the chord → the energy is off by
9%; the metric factor scaled by 1/C instead of 1/√C → M − ½G_H is 0.25 of G_H.
The old check "energy ≤ chord energy" passes a solver that never moves (it
holds by construction: the chord is a candidate).
"""
from __future__ import annotations

import pytest
import torch

from fisherfast.geodesic import (ConceptHellingerMetric, chord_path, class_centroids, embedded_energy, evaluate_path,
                                 lbfgs_path)
from fisherfast.geodesic.tasks import WEEKDAYS
from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel
from fisherfast.steer import steering

pytestmark = pytest.mark.slow
LAYER = 24


class HookOracle:
    """Concept distributions and energies from the model's own forward with a replace hook."""

    def __init__(self, model, schema, prompts_ids):
        self.model, self.ids = model, prompts_ids
        self.tokens = [ids.tolist() for ids in schema.token_sets]
        self.other = torch.ones(schema.V, dtype=torch.bool)
        for ids in self.tokens:
            self.other[ids] = False

    def q(self, x, ids):
        with steering(self.model, {LAYER: x}, mode="replace"):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(logits.double(), -1)
        return torch.stack([p[ids_k].sum() for ids_k in self.tokens] + [p[self.other].sum()])

    def hellinger_energy(self, path):
        """(1/C) Σ_c Σ_i ½ Σ_b (√q_{i+1} − √q_i)²."""
        total = 0.0
        for ids in self.ids:
            Q = torch.stack([self.q(x, ids) for x in path])
            total += 0.5 * float(((Q[1:].sqrt() - Q[:-1].sqrt()) ** 2).sum())
        return total / len(self.ids)

    def energy(self, path, eps):
        return self.hellinger_energy(path) + eps * float(((path[1:] - path[:-1]).double() ** 2).sum())


def test_weekdays_embedded_geodesic_and_metric_on_smollm2():
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    split = SplitModel(model, LAYER)
    schema = WEEKDAYS.schema(tokenizer, split.V)
    assert schema.concepts == {day: tokenizer.encode(" " + day) for day in WEEKDAYS.classes}
    C = class_centroids(split, WEEKDAYS, tokenizer, WEEKDAYS.examples(lengths=(3,)))
    carriers_ids = [WEEKDAYS.prompt_ids(tokenizer, WEEKDAYS.list_example(day, n).prompt)
                    for day, n in (("Friday", 3), ("Tuesday", 4))]
    carriers = split.contexts(carriers_ids)
    oracle = HookOracle(model, schema, carriers_ids)

    T = 5
    metric = ConceptHellingerMetric(split, carriers, schema)            # ε relative to the chord (1%)
    result = lbfgs_path(metric, C[0], C[2], T, outer_steps=1, inner_steps=15)
    assert torch.equal(result.path[0], C[0]) and torch.equal(result.path[-1], C[2])

    chord = chord_path(C[0], C[2], T)
    E_H_chord = oracle.hellinger_energy(chord)
    eps = 0.01 * E_H_chord / float(((chord[1:] - chord[:-1]).double() ** 2).sum())
    # ε and the energy the solver reports, from the model's forward (measured agreement ~3e-7)
    assert result.eps == pytest.approx(eps, rel=1e-5)
    E_path = oracle.energy(result.path, eps)
    assert result.energy == pytest.approx(E_path, rel=1e-5)
    assert result.energies[0] == pytest.approx(1.01 * E_H_chord, rel=1e-5)
    # the solver moved the path: measured 0.26 → 0.18 after 100 iterations (30% lower)
    assert E_path < 0.9 * oracle.energy(chord, eps)

    # the gradient the solver follows is the derivative of the oracle's energy: central
    # difference along the unit gradient direction of the interior waypoints
    resolved = metric.with_eps(result.eps)
    interior = result.path[1:-1].clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(embedded_energy(resolved, torch.cat([C[0][None], interior, C[2][None]])),
                                      interior)
    direction, delta = grad / grad.norm(), 1.0
    shifted = [result.path.clone(), result.path.clone()]
    shifted[0][1:-1] += delta * direction
    shifted[1][1:-1] -= delta * direction
    slope = (oracle.energy(shifted[0], eps) - oracle.energy(shifted[1], eps)) / (2 * delta)
    assert slope == pytest.approx(float(grad.norm()), rel=2e-2)

    # evaluate_path's target probability is the oracle's q at the last waypoint
    evaluation = evaluate_path(split, carriers, schema, result.path, C, "Wednesday")
    for c, ids in enumerate(carriers_ids):
        assert float(evaluation.per_context["target_probability"][c]) == pytest.approx(
            float(oracle.q(result.path[-1], ids)[2]), rel=1e-5)

    # the metric factor in float64: JᵀJ = ½ G_H of pullback_fisher(mode="concept")
    model.double()
    split64 = SplitModel(model, LAYER)
    carriers64 = split64.contexts(carriers_ids)
    h = C[0].double()
    M = ConceptHellingerMetric(split64, carriers64, schema, eps=0.0).matrix(h)
    G_H = pullback_fisher(split64, carriers64, mode="concept", concepts=schema.concepts, h=torch.stack([h, h]),
                          progress=False).dense()
    assert float(torch.linalg.matrix_norm(M - 0.5 * G_H) / torch.linalg.matrix_norm(G_H)) < 1e-6


def test_list_carriers_carry_every_task_and_injection_steers_from_layer_24():
    """docs/design.md §6 / issue 13: ≥ 85% accuracy for each default (list) carrier; the arithmetic
    carrier at chance (with a warning); centroid injection controls weekdays at 24, not at 16."""
    from fisherfast.geodesic import check_task, get_task, steerable_layers
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    split = SplitModel(model, LAYER)
    for name in ("weekdays", "months", "letters", "ages"):
        result = check_task(split, get_task(name), tokenizer)
        assert result.accuracy >= 0.85 and result.concept_mass >= 0.9 and not result.near_chance, result
    with pytest.warns(RuntimeWarning, match="near chance"):
        assert check_task(split, get_task("weekdays", "arithmetic"), tokenizer).near_chance
    low, high = steerable_layers(model, WEEKDAYS, tokenizer, [16, 24], WEEKDAYS.examples(lengths=(3,)))
    assert not low.steerable and low.accuracy < 0.3
    assert high.steerable and high.accuracy == 1.0
