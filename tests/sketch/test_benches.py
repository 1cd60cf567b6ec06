"""The FisherSketch bench scripts' --quick modes on tiny configs (they write bench/results/*_quick.json)."""
import math
import os
import sys

import pytest

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
