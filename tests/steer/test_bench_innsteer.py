"""bench/bench_innsteer.py --quick on a random-init tiny Llama: the JSON's
structure, the perplexities recomputed from the stored continuations by a
plain forward and a hand-written log-softmax, the unsteered behaviour
probabilities from the model's own forward, and the steered continuations
regenerated token by token with a plain hook (no ``generate``)."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from bench_scripts import load_bench  # tests/


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = load_bench("bench_innsteer.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("innsteer") / "innsteer.json"
        bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        return bench, json.load(f)


def test_structure(quick):
    bench, data = quick
    assert set(data) >= {"name", "meta", "rows", "records", "table"}
    assert [r["method"] for r in data["rows"]] == list(bench.METHODS)
    assert len(data["records"]) == len(bench.METHODS) * 2
    for row in data["rows"]:
        mine = [r for r in data["records"] if r["method"] == row["method"]]
        assert row["heldout_mean_b"] == pytest.approx(statistics.mean(r["b"] for r in mine), rel=1e-12)
        assert row["median_perplexity"] == pytest.approx(statistics.median(r["perplexity"] for r in mine), rel=1e-12)
        assert all(len(r["continuation_ids"]) == data["meta"]["tokens"] for r in mine)
        if row["method"] != "none" and row["calibrated"]:
            assert row["train_median_b"] == pytest.approx(data["meta"]["goal"], abs=0.02)
    none = next(r for r in data["rows"] if r["method"] == "none")
    assert none["alpha"] == 0 and none["median_delta_norm"] == 0


def _hooked_logits(model, layer, ids, delta, positions=(-1,)):
    """Last-position logits of the model's own forward with δ added to the input of
    block ``layer`` at ``positions`` (a plain pre-hook, no library code)."""
    def hook(module, args, kwargs):
        hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        hidden[:, list(positions)] += delta
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0, -1]
    finally:
        handle.remove()


def test_perplexity_and_unsteered_b_independently(quick):
    bench, data = quick
    model, behaviour = bench.tiny_setup()
    target, source = behaviour["target"], behaviour["source"]
    for record in data["records"]:
        prompt = behaviour["held_out"][record["prompt_index"]]
        full = torch.cat([prompt, torch.tensor(record["continuation_ids"])])
        with torch.no_grad():
            logits = model(full[None]).logits[0].to(torch.float64)
        nll = []
        for t in range(len(prompt), len(full)):
            row = logits[t - 1]
            nll.append(float(torch.logsumexp(row, 0) - row[full[t]]))
        assert record["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)
        if record["method"] == "none":
            p = torch.softmax(logits[len(prompt) - 1], 0)
            assert record["b"] == pytest.approx(float(p[target].sum() / (p[target].sum() + p[source].sum())),
                                                rel=1e-6)


def test_steered_continuation_regenerated_with_a_plain_hook(quick):
    """CAA's continuation: δ = α v_CAA rebuilt from the JSON's α and the pairs, then
    greedy decoding without a KV cache, the hook adding δ at every step's last
    position (which is what positions="last" does under a cache)."""
    bench, data = quick
    model, behaviour = bench.tiny_setup()
    layer = data["meta"]["layer"]
    from fisherfast.split import SplitModel
    from fisherfast.steer import caa_direction

    split = SplitModel(model, layer)
    h_pos = torch.stack([split.context(p).h for p, _ in behaviour["pairs"]])
    h_neg = torch.stack([split.context(n).h for _, n in behaviour["pairs"]])
    row = next(r for r in data["rows"] if r["method"] == "caa")
    delta = row["alpha"] * caa_direction(h_pos, h_neg)
    record = next(r for r in data["records"] if r["method"] == "caa" and r["prompt_index"] == 0)
    ids = behaviour["held_out"][0].clone()
    for _ in range(data["meta"]["tokens"]):
        # without a cache every step recomputes the whole sequence, so δ must be added at each
        # generated position seen so far: re-add it at every position from the prompt's last on
        n_prompt = len(behaviour["held_out"][0])
        positions = list(range(n_prompt - 1, len(ids)))
        next_id = int(_hooked_logits(model, layer, ids, delta, positions).argmax())
        ids = torch.cat([ids, torch.tensor([next_id])])
    assert ids[len(behaviour["held_out"][0]):].tolist() == record["continuation_ids"]
    b = torch.softmax(_hooked_logits(model, layer, behaviour["held_out"][0], delta).double(), 0)
    t, s = behaviour["target"], behaviour["source"]
    assert record["b"] == pytest.approx(float(b[t].sum() / (b[t].sum() + b[s].sum())), rel=1e-6)
