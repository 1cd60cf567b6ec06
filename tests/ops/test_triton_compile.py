"""Every Triton kernel, as the op layer launches it, compiles to a cubin for
sm_80 and sm_90 and fits the shared memory of an A100 / H100 block.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not
whether the GPU compiler accepts them: tl.dot shapes and dtypes, layouts,
register and shared-memory budgets are only seen by the real pipeline. Here the
public ops run with backend="triton" under the interpreter on shapes that reach
every branch of the wrappers (including the largest tiles: fwht at 2^12, 2^17
and 2^19, fp16/bf16/fp64 inputs, biases, per-token U, the tail-truncated gram) while
each launch's kernel, argument types, constexprs and options are recorded; a
subprocess without the interpreter then compiles every distinct
specialization with Triton's own toolchain (tests/ops/triton_aot.py).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fisherfast.ops import (SRHTPlan, fisher_sketch_update, fwht, lm_logsumexp, softmax_fisher_gram,  # noqa: E402
                            softmax_fisher_gram_topk, softmax_fisher_matmat, softmax_fisher_quad, srht)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through Triton's interpreter (TRITON_INTERPRET=1)")

# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {"80": 163 * 1024, "90": 227 * 1024}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def launch_record(fn, args, kwargs) -> dict:
    """Kernel, runtime argument types, constexpr values and options of one launch."""
    params = inspect.signature(fn).parameters
    names = list(params)
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in params}
    constexprs = {n: values[n] for n in names if "constexpr" in str(params[n].annotation)}
    types = {n: triton_type(values[n]) for n in names if n not in constexprs}
    options = {k: v for k, v in kwargs.items() if k not in params}
    return {"module": fn.__module__, "name": fn.__name__, "types": types, "constexprs": constexprs,
            "options": options}


def exercise_every_wrapper() -> None:
    """One call per branch of the Triton wrappers, on small CPU tensors."""
    g = torch.Generator().manual_seed(0)
    for n, rows in ((8, 3), (2 ** 12, 2), (2 ** 17, 1), (2 ** 19, 1)):  # broadcast path, one pass, two passes
        fwht(torch.randn(rows, n, generator=g), backend="triton")
    fwht(torch.randn(2, 64, generator=g).half(), normalized=True, backend="triton")
    fwht(torch.randn(2, 64, generator=g, dtype=torch.float64), backend="triton")
    srht(torch.randn(3, 20, generator=g), SRHTPlan(20, 48, seed=1), backend="triton")

    V, d, B = 80, 24, 5
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(B, d, generator=g).to(dtype)
        W = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)
        b = torch.randn(V, generator=g).to(dtype)
        for bias in (None, b):
            lm_logsumexp(a, W, bias, backend="triton")
            softmax_fisher_matmat(a, W, torch.randn(d, 3, generator=g).to(dtype), bias, backend="triton")
            for k in (3, 20):  # one column block (quad kernel); more (matmat)
                softmax_fisher_quad(a, W, torch.randn(d, k, generator=g).to(dtype), bias, backend="triton")
        softmax_fisher_matmat(a, W, torch.randn(B, d, 2, generator=g).to(dtype), backend="triton")
        for reduce in ("none", "mean"):
            softmax_fisher_gram(a, W, reduce=reduce, backend="triton")
        softmax_fisher_gram_topk(a, W, tail_tol=1e-2, backend="triton")

    K, m = 300, 64
    plans = (SRHTPlan(d, m, 1), SRHTPlan(d, m, 2), SRHTPlan(K, m, 3), SRHTPlan(K, m, 4))
    sums = torch.zeros(3, m, dtype=torch.float64)
    sumsqs = torch.zeros_like(sums)
    a = torch.randn(B, d, generator=g)
    logits = torch.randn(B, K, generator=g)
    fisher_sketch_update(sums, sumsqs, a, plans, logits=logits, y=torch.randint(0, K, (B,), generator=g),
                         backend="triton")
    fisher_sketch_update(sums, sumsqs, a, plans, logits=logits, u=torch.rand(B, generator=g), backend="triton")


@pytest.fixture(scope="module")
def launches():
    records = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        record = launch_record(self.fn, args, kwargs)
        records[json.dumps(record, sort_keys=True)] = record
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        exercise_every_wrapper()
    finally:
        InterpretedFunction.run = run
    return list(records.values())


def test_every_kernel_is_launched(launches):
    """The exercise reaches every @triton.jit kernel that a wrapper launches."""
    import fisherfast.ops.fisher_sketch_triton as sketch_k
    import fisherfast.ops.fwht_triton as fwht_k
    import fisherfast.ops.softmax_fisher_triton as sf_k

    launched = {(r["module"], r["name"]) for r in launches}
    for module in (fwht_k, sf_k, sketch_k):
        source = inspect.getsource(module)
        kernels = {name for name, obj in vars(module).items()
                   if isinstance(obj, InterpretedFunction) and f"{name}[" in source}
        assert kernels, module.__name__
        assert {(module.__name__, k) for k in kernels} <= launched, sorted(kernels)


def test_kernels_compile_for_sm80_and_sm90(launches, tmp_path):
    launches_path = tmp_path / "launches.json"
    launches_path.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    jobs = {cc: subprocess.Popen([sys.executable, script, str(launches_path), str(tmp_path / f"sm{cc}.json"), cc],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cc in SHARED_LIMIT}  # one process per target: the two cores compile side by side
    failures = []
    for cc, job in jobs.items():
        _, stderr = job.communicate(timeout=1200)
        assert job.returncode == 0, stderr[-4000:]
        for entry in json.loads((tmp_path / f"sm{cc}.json").read_text()):
            launch, outcome = entry["launch"], entry["outcome"]
            label = f"sm_{cc} {launch['name']} {launch['constexprs']} {launch['types']}"
            if "error" in outcome:
                failures.append(f"{label}: {outcome['error']}")
            elif outcome["shared"] > SHARED_LIMIT[cc]:
                failures.append(f"{label}: needs {outcome['shared']} B of shared memory, the limit is "
                                f"{SHARED_LIMIT[cc]}")
            else:
                assert outcome["cubin_bytes"] > 0
    assert not failures, "\n".join(failures)
