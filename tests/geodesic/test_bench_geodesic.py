"""bench/bench_geodesic.py --quick on the embedded model (slow: loads SmolLM2).

Checks the bench's own bookkeeping against independent recomputation: every
solver row is present, the chord row's figures are ``evaluate_path`` of the
straight line recomputed here, E_H is the sum of squared Hellinger distances
of the row's distributions, the summary counts each setting's lowest E_BC
once, and the JSON and the figure are written.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from bench_scripts import load_bench  # tests/

pytestmark = pytest.mark.slow


def test_quick_bench_runs_and_its_rows_are_recomputable(tmp_path, monkeypatch):
    bench = load_bench("bench_geodesic.py")
    import sys

    for module in (bench, sys.modules["_harness"]):  # write into tmp_path, not the checkout's bench/results
        monkeypatch.setattr(module, "RESULTS_DIR", str(tmp_path))
    out = bench.main(["--quick", "--name", "geodesic_test"])
    assert os.path.dirname(out["json"]) == str(tmp_path)
    rows = out["rows"]
    expected = [s for s in bench.SOLVERS if s != "gaga_phate" or importlib.util.find_spec("phate")]
    assert [r["solver"] for r in rows] == expected
    assert all(r["task"] == "weekdays" and r["layer"] == 24 and r["pair"] == "Monday→Wednesday" for r in rows)
    for r in rows:
        assert 0 <= r["legibility"] <= 1 and r["E_BC"] >= 0 and r["arc"] > 0
        assert r["E_H"] <= r["arc"] ** 2 + 1e-12          # Σ d² ≤ (Σ d)²
    # the chord row, recomputed independently of the bench
    from fisherfast.geodesic import chord_path, evaluate_path, get_task
    from fisherfast.models import load_default
    from fisherfast.split import SplitModel

    model, tokenizer = load_default()
    task, split = get_task("weekdays"), SplitModel(model, 24)
    schema = task.schema(tokenizer, split.V)
    examples = task.examples(lengths=(1, 2, 3, 4, 5, 6))
    H = torch.stack([split.context(task.prompt_ids(tokenizer, e.prompt)).h for e in examples])
    labels = torch.tensor([e.answer_index for e in examples])
    C = torch.stack([H[labels == k].mean(0) for k in range(7)])
    carriers = split.contexts([task.prompt_ids(tokenizer, task.list_example("Monday", 3).prompt),
                               task.prompt_ids(tokenizer, task.list_example("Thursday", 4).prompt)])
    ev = evaluate_path(split, carriers, schema, chord_path(C[0], C[2], 4), C, 2)
    chord = rows[0]
    assert chord["E_BC"] == pytest.approx(ev.bhattacharyya_energy, rel=1e-9)
    assert chord["arc"] == pytest.approx(ev.arc_length, rel=1e-9)
    d2 = 0.5 * ((ev.q[1:].sqrt() - ev.q[:-1].sqrt()) ** 2).sum(-1)
    assert chord["E_H"] == pytest.approx(float(d2.sum(0).mean()), rel=1e-9)
    assert chord["end_top1"] == ev.target_top1
    # summary: one winner per setting
    summary = out["summary"]
    assert sum(int(s["lowest E_BC"].split("/")[0]) for s in summary) == 1
    with open(out["json"]) as f:
        assert len(json.load(f)["rows"]) == len(rows)
    assert os.path.getsize(out["figure"]) > 10_000
