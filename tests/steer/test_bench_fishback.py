"""bench/bench_fishback.py --quick on a random-init tiny Llama: the JSON's
structure, R = 1 for FishBack's own direction (Cauchy–Schwarz equality, which
holds for no other direction), the ratios and success rates recomputed from
the per-prompt runs, the KL recomputed through the model's own forward with a
plain hook, and the benchmark data's token filtering."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from bench_scripts import load_bench  # noqa: E402  (tests/)
from fisherfast.split import SplitModel
from fisherfast.steer import steering


_data = load_bench("steer_data.py")   # the benchmark data (bench/, not the library)
BEHAVIOURS, MORPHOLOGY_CONCEPTS = _data.BEHAVIOURS, _data.MORPHOLOGY_CONCEPTS
concept_scores, single_token_ids = _data.concept_scores, _data.single_token_ids


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = load_bench("bench_fishback.py")
        out = tmp_path_factory.mktemp("fishback") / "fishback.json"
        returned = bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        return bench, returned, json.load(f)


def test_structure(quick):
    bench, returned, data = quick
    assert set(data) >= {"name", "meta", "rows", "spearman", "runs", "table"}
    assert data["meta"]["kl_direction"] == "KL(p_base ‖ p_steered)" and "KL(p_base ‖ p_steered)" in data["table"]
    methods = list(bench.METHODS)
    targets = ["caa_half", "p0.5"]
    assert [(r["target"], r["method"]) for r in data["rows"]] == [(t, m) for t in targets for m in methods]
    # 1 concept × 1 layer × 2 prompts × 2 targets × 7 methods, every one recorded (failures with a reason)
    assert len(data["runs"]) == 2 * 2 * len(methods)
    for run in data["runs"]:
        if run["reached"]:
            assert abs(math.log(run["p"]) - math.log(run["p_target"])) <= data["meta"]["tol"]
            assert run["kl_total"] >= 0 and run["kl_off_target"] >= 0 and run["delta_norm"] > 0
        else:
            assert run["reason"]
    assert returned["rows"] == data["rows"]


def test_cost_ratio_is_one_only_for_fishback(quick):
    _, _, data = quick
    frozen = [r for r in data["runs"] if r["method"] == "fishback_frozen" and r["reached"]]
    assert frozen, "the frozen FishBack direction reached no target on the tiny model"
    for r in frozen:
        assert r["R"] == pytest.approx(1.0, abs=1e-6)
    others = [r for r in data["runs"] if r["method"] in ("euclidean", "caa", "actadd", "probe", "innsteer")
              and r["reached"]]
    assert others and all(r["R"] > 1 + 1e-3 for r in others)
    row = next(r for r in data["rows"] if r["method"] == "fishback_frozen" and r["reached"])
    assert row["median_R"] == pytest.approx(1.0, abs=1e-6)


def test_ratios_and_success_recomputed_from_runs(quick):
    _, _, data = quick
    checked = 0
    for row in data["rows"]:
        runs = [r for r in data["runs"] if r["target"] == row["target"] and r["method"] == row["method"]]
        assert row["runs"] == len(runs) and row["reached"] == sum(r["reached"] for r in runs)
        ref = {r["prompt_index"]: r for r in data["runs"]
               if r["target"] == row["target"] and r["method"] == "fishback" and r["reached"]}
        ratios = [r["kl_off_target"] / ref[r["prompt_index"]]["kl_off_target"] for r in runs
                  if r["reached"] and r["prompt_index"] in ref]
        if ratios:
            assert row["ratio_off_vs_fishback"] == pytest.approx(statistics.median(ratios), rel=1e-12)
            checked += 1
        else:
            assert row["ratio_off_vs_fishback"] is None
    assert checked >= 4


def test_kl_matches_a_hooked_forward(quick):
    """The bench's KL(p_base ‖ p_steered) of a δ against the model's own forward
    with δ added by a forward hook at the last position."""
    bench, _, data = quick
    model, concept = bench.tiny_setup()
    split = SplitModel(model, 2)
    ids = torch.tensor(concept["carriers"][0])
    ctx = split.context(ids)
    delta = torch.randn(split.d, generator=torch.Generator().manual_seed(0), dtype=ctx.h.dtype)
    z0 = model(ids[None]).logits[0, -1]
    with steering(model, {2: delta}):
        z = model(ids[None]).logits[0, -1]
    p0, p = torch.softmax(z0.double(), -1), torch.softmax(z.double(), -1)
    expected = float((p0 * (p0.log() - p.log())).sum())
    assert bench.kl_base_steered(split.logits(ctx, ctx.h), split.logits(ctx, ctx.h + delta)) == \
        pytest.approx(expected, rel=1e-6)  # the model's rotary tables are float32: logits agree to ~1e-7


class _CharTokenizer:
    """Encodes a word as one token if it is in ``vocab``, else one token per character."""

    def __init__(self, vocab):
        self.vocab = {w: i + 1000 for i, w in enumerate(vocab)}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[text]] if text in self.vocab else [ord(c) for c in text]


def test_single_token_filter_and_concepts():
    tok = _CharTokenizer([" walked", " ran", " walks", " walking", " runs"])
    ids, kept = single_token_ids(tok, [" walked", " strolled", " ran", " walked"])
    assert kept == [" walked", " ran"] and ids == [tok.vocab[" walked"], tok.vocab[" ran"]]
    concept, family, survivors = concept_scores(tok, MORPHOLOGY_CONCEPTS["past"])
    assert survivors == {"target": [" walked", " ran"], "source": [" walks", " walking", " runs"]}
    assert concept.source is None and family.source.tolist() == [tok.vocab[w] for w in survivors["source"]]
    with pytest.raises(ValueError, match="no single-token"):
        concept_scores(_CharTokenizer([" walked"]), MORPHOLOGY_CONCEPTS["past"])
    for c in MORPHOLOGY_CONCEPTS.values():
        assert len(c.carriers) == 12 and len(c.pairs) == 12 and len(c.words) >= 30
        assert not set(c.words) & set(c.source_words)
    for b in BEHAVIOURS.values():
        assert len(b.pairs) == 12 and len(b.held_out) >= 8 and not set(b.words) & set(b.source_words)


@pytest.mark.parametrize("name", ["fishback", "innsteer"])
def test_quick_run_does_not_overwrite_the_full_results(name, tmp_path, monkeypatch):
    """Review: --quick wrote bench/results/{name}.json, the full run's file."""
    import sys

    bench = load_bench(f"bench_{name}.py")
    monkeypatch.setattr(sys.modules["_harness"], "RESULTS_DIR", str(tmp_path))  # where default_results_path writes
    full = tmp_path / f"{name}.json"
    full.write_text('{"full": true}')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    assert full.read_text() == '{"full": true}'
    assert json.loads((tmp_path / f"{name}_quick.json").read_text())["meta"]["quick"] is True
