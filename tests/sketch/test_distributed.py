"""all_reduce_state across 2 CPU processes (gloo on loopback) equals the
single-process state over the union of the data, for head and full-network
states; ranks with different specs all refuse."""
import os

import pytest
import torch

from fisherfast.sketch import FisherSketcher, FullNetworkState, SketchSpec, SketchState
from fisherfast.sketch.distributed import all_reduce_state

from _distributed import gloo_group, leave, run_workers  # noqa: E402  (tests/)

SPEC = SketchSpec(d=12, K=40, m=64, seed=5)
WORLD = 2
TIMEOUT_S = 120


def shard(rank: int):
    """Rank ``rank``'s data: a (n, d), logits (n, K), labels (n,); shards differ in size."""
    n = 7 + 4 * rank
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(n, SPEC.d, generator=g), 3 * torch.randn(n, SPEC.K, generator=g),
            torch.randint(0, SPEC.K, (n,), generator=g))


def local_state(rank: int) -> SketchState:
    a, logits, y = shard(rank)
    sketcher = FisherSketcher(SPEC)
    sketcher.update(a, logits=logits, y=y)
    return sketcher.state


def full_network_state(rank: int, seed: int = 0) -> FullNetworkState:
    """Rank ``rank``'s full-network state: random sums under two layers' specs."""
    specs = {"h.0.mlp": SketchSpec(d=9, K=12, m=64, seed=seed), "lm_head": SketchSpec(d=8, K=40, m=64, seed=seed + 1)}
    g = torch.Generator().manual_seed(200 + rank)
    return FullNetworkState(specs, 5 + rank, torch.randn(64, generator=g, dtype=torch.float64),
                            torch.rand(64, generator=g, dtype=torch.float64))


def _worker(rank: int, port: int, out: str) -> None:
    """Writes this rank's states and mismatch error under ``out``, then leaves (``_distributed.leave``)."""
    torch.set_num_threads(1)
    with gloo_group(rank, WORLD, port, TIMEOUT_S):
        local = local_state(rank)
        merged = all_reduce_state(local)
        local.save(os.path.join(out, f"local{rank}.safetensors"))
        merged.save(os.path.join(out, f"merged{rank}.safetensors"))
        all_reduce_state(full_network_state(rank)).save(os.path.join(out, f"full{rank}.safetensors"))
        mismatched = {"head": SketchState(SketchSpec(d=12, K=40, m=64, seed=rank)),  # seed r on rank r
                      "full": full_network_state(rank, seed=rank)}
        for name, state in mismatched.items():  # every rank must refuse
            try:
                all_reduce_state(state)
            except ValueError as err:
                with open(os.path.join(out, f"mismatch_{name}{rank}.txt"), "w") as f:
                    f.write(str(err))
    leave()


def assert_equal_states(got: SketchState, want: SketchState, **tol):
    assert got.spec == want.spec and got.count == want.count
    for kind in ("joint", "activation", "error"):
        torch.testing.assert_close(got.sums[kind], want.sums[kind], **tol)
        torch.testing.assert_close(got.sumsqs[kind], want.sumsqs[kind], **tol)


def test_all_reduce_two_processes_equals_single_process(tmp_path):
    run_workers(_worker, (str(tmp_path),), WORLD, TIMEOUT_S)

    merged = [SketchState.load(tmp_path / f"merged{r}.safetensors") for r in range(WORLD)]
    local = [SketchState.load(tmp_path / f"local{r}.safetensors") for r in range(WORLD)]
    # every rank holds the same state: the exact sum of the shards
    assert_equal_states(merged[1], merged[0], rtol=0, atol=0)
    assert_equal_states(merged[0], local[0].merge(local[1]), rtol=0, atol=0)
    # ... which is the one-pass state over the union (up to float64 summation order)
    data = [shard(r) for r in range(WORLD)]
    union = FisherSketcher(SPEC)
    union.update(torch.cat([d[0] for d in data]), logits=torch.cat([d[1] for d in data]),
                 y=torch.cat([d[2] for d in data]))
    assert_equal_states(merged[0], union.state, rtol=1e-12, atol=1e-12)
    assert merged[0].count == sum(len(d[2]) for d in data)
    # full-network states: the exact sum of the ranks' states
    full = [FullNetworkState.load(tmp_path / f"full{r}.safetensors") for r in range(WORLD)]
    want = full_network_state(0).merge(full_network_state(1))
    for got in full:
        assert got.specs == want.specs and got.count == want.count
        assert torch.equal(got.sum, want.sum) and torch.equal(got.sumsq, want.sumsq)
    for r in range(WORLD):
        for name in ("head", "full"):
            assert "share one spec" in (tmp_path / f"mismatch_{name}{r}.txt").read_text()


def test_bad_inputs_without_process_group():
    with pytest.raises(TypeError, match="SketchState or FullNetworkState"):
        all_reduce_state(torch.zeros(6, 64))
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_state(SketchState(SPEC))
