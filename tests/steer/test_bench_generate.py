"""bench/bench_generate.py --quick on a random-init tiny Llama: the JSON's
structure and ratios, and the per-row batch's tokens regenerated row by row
with a plain hook that recomputes the whole sequence at each step (no cache,
no ``steering``): the oracle the bench's own "tokens equal" check relies on."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench_scripts import load_bench  # tests/


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = load_bench("bench_generate.py")
    out = tmp_path_factory.mktemp("generate") / "generate.json"
    result = bench.main(["--quick", "--batch", "3", "--out", str(out)])
    with open(out) as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
    return bench, result


def test_structure_and_ratios(quick):
    _, data = quick
    cases = [r["case"] for r in data["rows"]]
    assert cases == ["B=1", "B=3", "per-row vectors, B=3"]
    for row in data["rows"][:2]:
        assert row["unsteered tok/s"] > 0 and row["steered tok/s"] > 0
        assert math.isclose(row["steered / unsteered tok/s"], row["steered tok/s"] / row["unsteered tok/s"],
                            rel_tol=1e-9)
    last = data["rows"][2]
    assert math.isclose(last["batched / separate tok/s"], last["steered tok/s"] / last["separate runs tok/s"],
                        rel_tol=1e-9)
    assert last["tokens equal"] is True and "table" in data and "| case |" in data["table"]


def test_per_row_tokens_match_a_plain_hook_recomputation(quick):
    bench, data = quick
    model = bench.tiny_llama()
    rec = data["records"]
    layer, new = rec["layer"], data["rows"][0]["new tokens per row"]
    block = model.model.layers[layer]
    for prompt, v, tokens in zip(rec["prompts"], rec["vectors"], rec["batch_tokens"]):
        v = torch.tensor(v, dtype=torch.float64)
        seq = list(prompt)
        n = len(prompt)

        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[0, n - 1:] += v  # from the prompt's last token on
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            for _ in range(new):
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        finally:
            handle.remove()
        assert seq[n:] == tokens
    assert len({tuple(t) for t in rec["batch_tokens"]}) > 1
