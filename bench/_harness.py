"""Shared helpers for the bench scripts (bench/bench_*.py).

Every bench runs its contenders side by side in one process on the same
inputs, prints a markdown table of medians and ratios, and writes JSON to
bench/results/<name>.json (see ``write_results``). ``bench/run_all.py`` runs
them all and gathers the tables.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NO_CUDA = "no CUDA device"


def has_cuda() -> bool:
    """True when a CUDA device is usable by torch."""
    return torch.cuda.is_available()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs.

    ``warmup`` untimed calls come first (compilation, caches, page faults).
    CUDA work is synchronized before and after each timed call, so GPU kernels
    are timed to completion. With ``min_time`` > 0, each sample loops ``fn``
    until that many seconds pass and reports the time per call (for calls far
    shorter than the timer's resolution)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(repeat, 1)):
        _sync()
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if min_time <= 0 or time.perf_counter() - start >= min_time:
                break
        _sync()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes of tensor memory allocated by ``fn()`` above what was live
    when it started, on ``device``.

    CUDA: torch's caching-allocator statistics (max_memory_allocated after a
    reset). CPU: torch has no CPU allocator statistics, so the call runs under
    ``torch.profiler`` with ``profile_memory=True``; every CPU tensor allocation
    and free is then reported with the allocator's running total, and the peak
    is the largest running total minus the one before the first event. This
    sees every torch allocation (also those made from C++ through torch), but
    not raw ``malloc`` inside an extension (fisherfast's kernels allocate none).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync()
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    baseline = events[0][2] - events[0][1]
    return max(max(total for _, _, total in events) - baseline, 0)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) over ``columns``; missing
    cells are blank, floats get 3 significant digits."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def machine_meta() -> dict:
    """Context stored with every result: versions, threads, CPU, device."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if has_cuda() else NO_CUDA,
    }


def write_results(name: str, rows: Iterable[Mapping[str, object]], meta: Mapping[str, object] | None = None,
                  table: str | None = None) -> str:
    """Write bench/results/<name>.json ({"name", "meta", "rows", "table"});
    returns its path. ``meta`` is merged over ``machine_meta()``."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {"name": name, "meta": {**machine_meta(), **(meta or {})}, "rows": list(rows), "table": table}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


def tiny_llama(head_scale: float = 10.0, seed: int = 0):
    """A random-init float64 Llama (V = 61, d = 32, 3 blocks) with its head scaled so the
    next-token distribution is peaked, as a trained model's is: the --quick benches' model,
    built by the tests' one tiny-model factory (tests/tiny_models.py)."""
    import sys

    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tiny_models import tiny_causal_lm

    return tiny_causal_lm("llama", vocab=61, d=32, layers=3, heads=4, head_scale=head_scale, seed=seed)


def default_results_path(name: str, quick: bool) -> str:
    """bench/results/NAME.json, or NAME_quick.json for a --quick run (so a smoke run
    never overwrites a full run's results)."""
    return os.path.join(RESULTS_DIR, f"{name}_quick.json" if quick else f"{name}.json")
