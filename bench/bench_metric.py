"""Bench: the pullback Fisher metric G = Jᵀ F J at one position of SmolLM2-135M.

Contenders, side by side on the same context (layer 15 by default, the last
token of one prompt), all producing the d×d metric:

- (a) jacrev: torch.func.jacrev of the full logits h ↦ z (V×d), then
  Jᵀ diag(p) J − (Jᵀp)(Jᵀp)ᵀ;
- (b) Fisher-Stein: d reverse passes to the final hidden state (B row by row),
  J = W B (einsum, V×d), then the same dense Fisher contraction over V;
- fisherfast modes exact, topk (τ ≤ 1e-3), low_rank (k = 64), monte_carlo.

Error: relative Frobenius distance to a float64 computation of G (float64
copy of the model, B from its Jacobian, G_head in centered form). Memory:
peak tensor memory of one call (bench/_harness.peak_memory). GPU rows say
"no CUDA device" when none is present.

    python bench/bench_metric.py [--layer 15] [--repeat 3] [--skip-jacrev]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import NO_CUDA, has_cuda, markdown_table, peak_memory, timeit, write_results  # noqa: E402

from fisherfast.metric import pullback_fisher  # noqa: E402
from fisherfast.models import load_default  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402

PROMPT = "The capital of France is"


def dense_fisher(J: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Jᵀ (diag p − p pᵀ) J as the baselines compute it (dense over V)."""
    Jp = J.T @ p
    return (J * p[:, None]).T @ J - torch.outer(Jp, Jp)


def jacrev_baseline(split, ctx, chunk_size: int):
    """(a) jacrev of the full logits (V reverse products, vmapped), then JᵀFJ."""
    J = torch.func.jacrev(lambda x: split.logits(ctx, x), chunk_size=chunk_size)(ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h), -1)
    return dense_fisher(J, p)


def fisher_stein_baseline(split, ctx):
    """(b) d reverse passes to the final hidden state a, J = W B, JᵀFJ over V."""
    h = ctx.h.clone().requires_grad_(True)
    with torch.enable_grad():
        a = split.head_input(ctx, h)
        B = torch.stack([torch.autograd.grad(a[i], h, retain_graph=True)[0] for i in range(split.d)])
    J = torch.einsum("vd,de->ve", split.W, B)
    z = split.W @ a.detach() + (0 if split.b is None else split.b)
    return dense_fisher(J, torch.softmax(z, -1))


def float64_metric(model, layer, ids):
    """G in float64: a float64 copy of the model, B from d JVPs, centered G_head."""
    split = SplitModel(copy.deepcopy(model).double(), layer)
    ctx = split.context(ids)
    B = split.jacobian(ctx, ctx.h)
    p = torch.softmax(split.logits(ctx, ctx.h), -1)
    Wc = split.W - p @ split.W
    return B.T @ ((Wc * p[:, None]).T @ Wc) @ B


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-jacrev", action="store_true", help="leave out (a) (minutes on a small CPU)")
    parser.add_argument("--jacrev-chunk", type=int, default=2048, help="vmapped reverse products per jacrev batch")
    parser.add_argument("--quick", action="store_true", help="smoke run: no (a), one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.skip_jacrev, args.repeat = True, 1

    model, tokenizer = load_default()
    split = SplitModel(model, args.layer)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids[0]
    ctx = split.context(ids)
    G64 = float64_metric(model, args.layer, ids)

    def rel_err(G):
        return float(torch.linalg.matrix_norm(G.double() - G64) / torch.linalg.matrix_norm(G64))

    contenders = [
        ("(b) Fisher-Stein: d reverse passes + V×d J", lambda: fisher_stein_baseline(split, ctx),
         {"repeat": 1, "memory": True}),
        ("exact", lambda: pullback_fisher(split, ctx, mode="exact"), {}),
        ("topk τ≤1e-3", lambda: pullback_fisher(split, ctx, mode="topk", tail_tol=1e-3), {}),
        ("low_rank k=64", lambda: pullback_fisher(split, ctx, mode="low_rank", k=64, seed=0), {}),
        ("monte_carlo S=1024", lambda: pullback_fisher(split, ctx, mode="monte_carlo", n_samples=1024, seed=0,
                                                       chunk=256), {}),
    ]
    if not args.skip_jacrev:
        contenders.insert(0, ("(a) jacrev of full logits + JᵀFJ",
                              lambda: jacrev_baseline(split, ctx, args.jacrev_chunk), {"repeat": 1}))
    rows = []
    for name, fn, timing in contenders:
        start = time.perf_counter()
        result = fn()
        first = time.perf_counter() - start
        G = result.dense() if hasattr(result, "dense") else result
        if timing.get("repeat") == 1:              # the slow baselines: the first run is the time
            seconds = first
            memory = peak_memory(fn) if timing.get("memory") else None
        else:
            seconds = timeit(fn, repeat=args.repeat, warmup=0)
            memory = peak_memory(fn)
        row = {"contender": name, "device": "cpu", "median_s": seconds, "rel_fro_err_vs_fp64": rel_err(G),
               "peak_MB": None if memory is None else memory / 2**20}
        info = getattr(result, "info", {})
        if "tau" in info:
            row["note"] = f"τ={info['tau'][0]:.1e}, kept {info['n_kept'][0]} tokens"
        elif "trace_fraction" in info:
            row["note"] = f"claims {info['trace_fraction']:.3f} of the trace"
        rows.append(row)
        print(f"{name}: {seconds:.2f} s", flush=True)
    ref = next(r for r in rows if r["contender"].startswith("(b)"))
    for row in rows:
        row["speedup_vs_b"] = ref["median_s"] / row["median_s"]
        if row["peak_MB"] is not None and ref["peak_MB"]:
            row["mem_vs_b"] = row["peak_MB"] / ref["peak_MB"]
    jac = next((r for r in rows if r["contender"].startswith("(a)")), None)
    if jac is not None:
        for row in rows:
            row["speedup_vs_a"] = jac["median_s"] / row["median_s"]
    rows.append({"contender": "any (GPU)", "device": "cuda" if has_cuda() else NO_CUDA})
    columns = ["contender", "device", "median_s", "speedup_vs_a", "speedup_vs_b", "peak_MB", "mem_vs_b",
               "rel_fro_err_vs_fp64", "note"]
    table = markdown_table(rows, columns)
    print(f"\nSmolLM2-135M, layer {args.layer}, d={split.d}, V={split.V}, one position "
          f"(last token of {args.prompt!r}), torch threads {torch.get_num_threads()}\n")
    print(table)
    meta = {"layer": args.layer, "prompt": args.prompt, "d": split.d, "V": split.V}
    print(f"\nwrote {write_results('metric', rows, meta=meta, table=table)}")
    return {"rows": rows, "table": table, "meta": meta}


if __name__ == "__main__":
    main()
