"""The FisherSketch bench scripts' --quick modes on tiny configs (they write bench/results/*_quick.json)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))


@pytest.mark.slow  # ~20 s: the profiler-based memory peaks
def test_bench_sketch_model_quick():
    import bench_sketch_model

    rows = {row["contender"]: row for row in bench_sketch_model.main(["--quick"])}
    assert rows["streamed sketch_model"]["rel_diff_vs_materialized"] == 0  # same state, exactly
    assert rows["streamed sketch_model"]["peak_extra_MB"] < rows["materialized (previous)"]["peak_extra_MB"]


def test_bench_source_selection_quick():
    pytest.importorskip("scipy")
    import bench_source_selection

    rows, summary = bench_source_selection.main(["--quick"])
    assert len(rows) == 10 and len({r["source"] for r in rows}) == 10
    for row in rows:  # the sketch against the kernel identity and the dense mean gradients, within its error bars
        assert abs(row["A"] - row["A exact"]) <= 4 * row["A stderr"] + 0.02, row
        assert abs(row["G"] - row["grad cos"]) <= 4 * row["G stderr"] + 0.02, row
    spearman = [v for per_step in summary["spearman"].values() for v in per_step.values()]
    assert len(spearman) == 7 * len(summary["step_sizes"]) and all(math.isfinite(v) and -1 <= v <= 1
                                                                   for v in spearman)


def test_bench_domains_quick():
    """bench_domains --quick: standard-library domains on the tiny model (no Debian package needed);
    every accuracy a fraction, top-5 ≥ top-1, chance = 1/D, and the index latency rows present."""
    import bench_domains

    result = bench_domains.main(["--quick"])
    D = len(result["domains"])
    assert D == 6
    rows = {r["similarity"]: r for r in result["retrieval"]}
    assert rows["chance"]["top1"] == pytest.approx(1 / D)
    for name, row in rows.items():
        assert 0 <= row["top1"] <= row["top5"] <= 1, (name, row)
        assert name == "chance" or row["n"] == 4 * D
    assert [r["domains"] for r in result["latency"]] == [D, 200] and all(r["query_ms"] > 0 for r in result["latency"])
    assert result["cost"][1]["vs_forward"] > 0
    D1 = D - 1
    steps = {r["step"] for r in result["selection"]}
    assert steps == {0.01, 0.03}
    for row in result["selection"]:
        if row["similarity"] == "chance":
            assert row["top1"] == pytest.approx(1 / D1)
            continue
        assert -1 <= row["spearman"] <= 1 and 0 <= row["top1"] <= 1, row
        assert row["regret"] >= 0, row


# head_transfer: the source-selection benches' ground truth. Oracles: torch's own cross_entropy and autograd,
# in float64; the streamed sums differ from them only in summation order (~1e-16 relative per term), so 1e-12.
def _head_problem(bias: bool, N=37, V=53, d=11):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    W += 2.0 * torch.randn(d, generator=g, dtype=torch.float64)  # a shared mean direction, as real heads have
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = 3.0 * torch.randn(N, d, generator=g, dtype=torch.float64)  # peaky logits
    return W, b, a, torch.randint(V, (N,), generator=g)


@pytest.mark.parametrize("bias", [False, True])
def test_head_transfer_loss_and_gradient_match_autograd(bias):
    import head_transfer

    W, b, a, y = _head_problem(bias)
    Wg = W.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(a @ Wg.T + (0 if b is None else b), y)
    (grad,) = torch.autograd.grad(loss, Wg)
    for chunk in (5, 256):  # rows streamed in several chunks, and in one
        assert head_transfer.mean_cross_entropy(W, b, a, y, chunk) == pytest.approx(float(loss.detach()), rel=1e-12)
        torch.testing.assert_close(head_transfer.mean_head_gradient(W, b, a, y, chunk), grad, rtol=1e-12, atol=1e-14)


def test_finetune_head_takes_normalized_steps_and_leaves_w0():
    import head_transfer

    W0, b, a, y = _head_problem(True)
    before = W0.clone()
    W1 = head_transfer.finetune_head(W0, b, a, y, steps=1, step=0.05)
    g = head_transfer.mean_head_gradient(W0, b, a, y)
    torch.testing.assert_close(W1, W0 - 0.05 * g / g.norm(), rtol=1e-12, atol=1e-14)
    W3 = head_transfer.finetune_head(W0, b, a, y, steps=3, step=0.05)
    assert torch.equal(W0, before)
    assert float((W3 - W0).norm()) <= 0.15 + 1e-12  # three steps of Frobenius length 0.05
    assert head_transfer.mean_cross_entropy(W3, b, a, y) < head_transfer.mean_cross_entropy(W0, b, a, y)


def test_selection_summary_on_known_rankings():
    """A score equal to the transfer ranks every target's sources exactly (Spearman 1, top-1 1, regret 0);
    its negation ranks them backwards (Spearman −1, the worst source picked)."""
    import bench_domains

    T = torch.tensor([[9.0, 1.0, 2.0, 4.0], [3.0, 9.0, 5.0, 1.0], [2.0, 4.0, 9.0, 3.0], [1.0, 2.0, 3.0, 9.0]])
    out = bench_domains.selection_summary(T, {"same": T.clone(), "negated": -T})
    assert out["same"]["spearman"] == pytest.approx(1) and out["same"]["top1"] == 1
    assert out["same"]["regret"] == 0
    assert out["negated"]["spearman"] == pytest.approx(-1) and out["negated"]["top1"] == 0
    # target 0's sources 1, 2, 3 transfer 3, 2, 1: the negated score picks source 3 (regret 3 − 1 = 2)
    best_minus_worst = [max(T[s, t] for s in range(4) if s != t) - min(T[s, t] for s in range(4) if s != t)
                        for t in range(4)]
    assert out["negated"]["regret"] == pytest.approx(float(sum(best_minus_worst)) / 4)


def test_bench_domains_gemma3_shape_quick():
    """--gemma3-shape: the cost rows on a random-init Gemma-3 (tiny with --quick), both paths timed."""
    import bench_domains

    result = bench_domains.main(["--quick", "--gemma3-shape"])
    assert result["shape"]["vocab_size"] == 512
    forward, signature = result["cost"]
    assert forward["tokens"] == signature["tokens"] > 0 and signature["vs_forward"] > 0


def test_gemma3_270m_shape_has_its_parameter_count():
    """The full run's shape is Gemma-3-270M's: 268M parameters (170M of them the 262,144 × 640 embedding),
    counted on the meta device (nothing allocated)."""
    transformers = pytest.importorskip("transformers")
    import bench_domains

    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**bench_domains.GEMMA3_270M))
    n = sum(p.numel() for p in model.parameters())  # tied head: counted once
    assert model.get_output_embeddings().weight.shape == (262_144, 640)
    assert n == pytest.approx(268e6, rel=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--max-domains", "2"], "--max-domains: expected an int ≥ 3, got 2"),
    (["--targets", "5"], "--targets: expected at most --queries (4) held-out prompts, got 5"),
    (["--step", "0.01", "-1"], "--step: expected finite lengths > 0"),
    (["--sketch", "0"], "--sketch: expected an int ≥ 1, got 0"),
    (["--bergson-python", "/nonexistent/python"], "--bergson-python: expected a Python that imports bergson"),
])
def test_bench_domains_names_a_bad_argument_before_any_work(argv, message, capsys):
    import bench_domains

    with pytest.raises(SystemExit) as exit_info:
        bench_domains.main(["--quick", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--index-domains", "-5"], "--index-domains: expected an int ≥ 1, got -5"),
    (["--bergson-projection", "0"], "--bergson-projection: expected an int ≥ 1, got 0"),
    (["--step", "0.01", "0.01"], "--step: expected distinct lengths"),
    (["--sketch", "100000"], "only 0 domains have ≥ 100004 items; need 3"),
    (["--sketch", "100000", "--gemma3-shape"], "only 0 domains have ≥ 100004 items; need 1"),
])
def test_bench_domains_names_too_few_domains_and_other_late_failures(argv, message, capsys):
    import bench_domains

    with pytest.raises(SystemExit) as exit_info:
        bench_domains.main(["--quick", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_selection_summary_skips_undefined_spearman():
    """A score constant over a target's sources has no Spearman (NaN): that target is left out of the mean and
    counted in spearman_targets; top-1 and regret still count it."""
    import bench_domains

    T = torch.tensor([[9.0, 1.0, 2.0, 4.0], [3.0, 9.0, 5.0, 1.0], [2.0, 4.0, 9.0, 3.0], [1.0, 2.0, 3.0, 9.0]])
    S = T.clone()
    S[:, 0] = 7.0  # target 0: every source scores the same
    out = bench_domains.selection_summary(T, {"partly constant": S})["partly constant"]
    assert out["spearman_targets"] == 3 and out["spearman"] == pytest.approx(1)
    assert 0 <= out["top1"] <= 1 and out["regret"] >= 0
