"""pullback_fisher(..., distributed=True) across 2 CPU processes (gloo on loopback)
equals the single-process metric over the same points, in every mode that is
deterministic; the per-point reports come back in point order."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
from _distributed import gloo_group, leave, run_workers

from fisherfast.metric import pullback_fisher
from fisherfast.split import SplitModel

WORLD = 2
TIMEOUT_S = 180
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1, 8], [1, 4, 1, 4, 2], [6, 6, 2, 9]]   # 5: uneven shards
CONCEPTS = [[1, 2], [7]]


def split_and_contexts():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/
    from tiny_models import tiny_causal_lm

    split = SplitModel(tiny_causal_lm("llama", head_scale=10.0), layer=1)
    return split, split.contexts(PROMPTS)


def metrics(split, contexts, rank, **kw):
    """The metrics compared; low_rank's seed differs per rank: its probes must come from rank 0."""
    U = torch.randn(split.d, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    free = pullback_fisher(split, contexts, mode="matrix_free", progress=False, **kw)
    topk = pullback_fisher(split, contexts, mode="topk", tail_tol=1e-2, progress=False, **kw)
    concept = pullback_fisher(split, contexts, mode="concept", concepts=CONCEPTS, progress=False, **kw)
    low = pullback_fisher(split, contexts, mode="low_rank", k=6, seed=rank, progress=False, **kw)
    return {"exact": pullback_fisher(split, contexts, mode="exact", progress=False, **kw).dense(),
            "free_product": free @ U, "free_eig": free.eig(3)[0], "topk": topk.dense(),
            "tau": torch.tensor(topk.report.tau), "n_kept": torch.tensor(topk.report.n_kept),
            "concept": concept.dense(), "q": torch.tensor(concept.report.q), "low_rank": low.dense(),
            "world_size": torch.tensor(concept.report.world_size)}


def _worker(rank: int, port: int, out: str) -> None:
    """Writes this rank's metrics under ``out``."""
    torch.set_num_threads(1)
    with gloo_group(rank, WORLD, port, TIMEOUT_S):
        split, contexts = split_and_contexts()
        torch.save(metrics(split, contexts, rank, distributed=True), os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    leave()


def test_two_processes_equal_one(tmp_path):
    run_workers(_worker, (str(tmp_path),), WORLD, TIMEOUT_S)
    split, contexts = split_and_contexts()
    want = metrics(split, contexts, rank=0)
    assert int(want["world_size"]) == 1
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert int(got["world_size"]) == WORLD
        assert torch.equal(got["n_kept"], want["n_kept"])      # reports in point order
        for name in ("exact", "free_product", "free_eig", "topk", "tau", "concept", "q", "low_rank"):
            # float64 sums in another order: agreement to round-off
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12 * float(want[name].abs().max()),
                                       msg=lambda m, n=name, r=rank: f"{n} on rank {r}: {m}")


def test_distributed_needs_a_process_group():
    split, contexts = split_and_contexts()
    with pytest.raises(RuntimeError, match="init_process_group"):
        pullback_fisher(split, contexts, distributed=True)
