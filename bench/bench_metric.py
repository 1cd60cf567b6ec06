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

Two more tables on the same context (``metric_products.json``):
- one matrix-free product G v against one forward of the upper blocks: the
  earlier route (``split.jvp`` + fused head product + ``split.vjp``, each
  re-running the forward) and the current one (one recorded forward per
  point, ``split.linearize``; B v and Bᵀu by reverse passes; head product on
  cached logits), with their parts;
- B = ∂a/∂h by d forward-mode JVPs vs d reverse products (``split.jacobian``).

``--auto`` (``metric_auto.json``): random-init Llama blocks at d = 576, 2,048,
4,096 (SmolLM2-, TinyLlama- and Llama-2-7B-shaped; 2 upper blocks, V = 8,192,
a 32-token prompt): the exact build against one matrix-free product, with the
head's share of each, i.e. how many products the exact build is worth; this
sets ``fisherfast.metric.pullback.AUTO_EXACT_MAX_D``.

    python bench/bench_metric.py [--layer 15] [--repeat 3] [--skip-jacrev] [--auto [--auto-dims 576 2048 4096]]
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

from fisherfast.metric import auto_mode, pullback_fisher  # noqa: E402
from fisherfast.models import load_default  # noqa: E402
from fisherfast.ops.softmax_fisher import softmax_fisher_gram, softmax_fisher_matmat  # noqa: E402
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


def product_rows(split, ctx, repeat: int) -> list[dict]:
    """One matrix-free product G v (and its parts) against one forward of the upper blocks."""
    h, W, b = ctx.h, split.W, split.b
    g = torch.Generator().manual_seed(0)
    v = torch.randn(split.d, 1, generator=g)
    V8 = torch.randn(split.d, 8, generator=g)
    a = split.head_input(ctx, h)
    z = split.logits_from_head_input(a)

    def earlier(U):     # the route before split.linearize: every product re-runs the forward twice
        _, BU = split.jvp(ctx, h, U.T.contiguous())
        HBU = softmax_fisher_matmat(a[None], W, BU.T.contiguous(), b)[0]
        return split.vjp(ctx, h, HBU.T.contiguous()).T

    G = pullback_fisher(split, ctx, mode="matrix_free", progress=False)
    lin = split.linearize(ctx)
    lin.jvp(v.T)                                   # builds the pushforward graph once
    start = time.perf_counter()
    G @ v                                          # records the forward at the first product
    first = time.perf_counter() - start
    err = float((G @ V8 - earlier(V8)).norm() / earlier(V8).norm())
    with torch.no_grad():
        forward = timeit(lambda: split.head_input(ctx, h), repeat=repeat)
    cases = [
        ("one forward of the upper blocks (split.head_input)", forward, 1),
        ("G v, earlier route: split.jvp + head op + split.vjp", timeit(lambda: earlier(v), repeat=repeat), 1),
        ("  split.jvp (re-runs the forward)", timeit(lambda: split.jvp(ctx, h, v.T), repeat=repeat), 1),
        ("  split.vjp (re-runs the forward)", timeit(lambda: split.vjp(ctx, h, v.T), repeat=repeat), 1),
        ("  head op from h", timeit(lambda: softmax_fisher_matmat(a[None], W, v, b), repeat=repeat), 1),
        ("G v, current route (matrix_free mode)", timeit(lambda: G @ v, repeat=repeat), 1),
        ("  B v: Linearization.jvp", timeit(lambda: lin.jvp(v.T), repeat=repeat), 1),
        ("  Bᵀu: Linearization.vjp", timeit(lambda: lin.vjp(v.T), repeat=repeat), 1),
        ("  head op on cached logits", timeit(lambda: softmax_fisher_matmat(None, W, v, logits=z[None]),
                                              repeat=repeat), 1),
        ("G V, current route, k = 8 probes (per probe)", timeit(lambda: G @ V8, repeat=repeat) / 8, 8),
    ]
    rows = [{"step": name, "ms": 1e3 * t, "x_forward": t / forward} for name, t, _ in cases]
    rows.append({"step": "first product (records the forward)", "ms": 1e3 * first, "x_forward": first / forward})
    rows.append({"step": f"current vs earlier route, rel. error on 8 probes: {err:.1e}"})
    return rows


def jacobian_rows(split, ctx) -> list[dict]:
    """B = ∂a/∂h by d forward-mode JVPs vs d reverse products (the one choice: reverse)."""
    eye = torch.eye(split.d)
    rows = []
    for chunk in (None, 64):
        fwd = timeit(lambda: split.jvp(ctx, ctx.h, eye, chunk=chunk), repeat=1, warmup=0)
        rev = timeit(lambda: split.jacobian(ctx, chunk=chunk), repeat=1, warmup=0)
        rows.append({"chunk": "all" if chunk is None else chunk, "forward_JVPs_s": fwd, "reverse_VJPs_s": rev,
                     "forward_over_reverse": fwd / rev})
    return rows


LLAMA_SHAPES = {   # d: (heads, kv heads, d_ff) — SmolLM2-135M, TinyLlama-1.1B, Llama-2-7B
    576: (9, 3, 1536), 2048: (32, 4, 5632), 4096: (32, 32, 11008), 64: (4, 2, 128)}


def auto_rows(dims, repeat: int, vocab: int = 8192, blocks: int = 2, prompt_len: int = 32) -> list[dict]:
    """Exact build vs one matrix-free product on random-init Llama blocks, per d."""
    import transformers

    rows = []
    for d in dims:
        heads, kv, ff = LLAMA_SHAPES[d]
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff,
                                          num_hidden_layers=blocks, num_attention_heads=heads,
                                          num_key_value_heads=kv, max_position_embeddings=4 * prompt_len)
        model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
        split = SplitModel(model, 0)
        ctx = split.context(torch.randint(0, vocab, (prompt_len,)))
        a = split.head_input(ctx, ctx.h)
        v = torch.randn(d, 1)
        with torch.no_grad():
            forward = timeit(lambda: split.head_input(ctx, ctx.h), repeat=repeat)
        exact = timeit(lambda: pullback_fisher(split, ctx, mode="exact", progress=False), repeat=1, warmup=0)
        exact_head = timeit(lambda: softmax_fisher_gram(a[None], split.W, split.b), repeat=1, warmup=0)
        G = pullback_fisher(split, ctx, mode="matrix_free", progress=False)
        G @ v
        product = timeit(lambda: G @ v, repeat=repeat)
        z = split.logits_from_head_input(a)
        product_head = timeit(lambda: softmax_fisher_matmat(None, split.W, v, logits=z[None]), repeat=repeat)
        rows.append({"d": d, "d_ff": ff, "blocks": blocks, "V": vocab, "forward_ms": 1e3 * forward,
                     "exact_build_s": exact, "exact_head_s": exact_head, "product_ms": 1e3 * product,
                     "product_head_ms": 1e3 * product_head, "product_x_forward": product / forward,
                     "exact_in_products": exact / product, "auto_mode": auto_mode(d)})
        print(f"d={d}: exact {exact:.2f} s, product {1e3 * product:.1f} ms", flush=True)
        del model, split, ctx, G
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-jacrev", action="store_true", help="leave out (a) (minutes on a small CPU)")
    parser.add_argument("--jacrev-chunk", type=int, default=2048, help="vmapped reverse products per jacrev batch")
    parser.add_argument("--quick", action="store_true", help="smoke run: no (a), one repeat")
    parser.add_argument("--auto", action="store_true", help="only the exact-vs-matrix-free crossover on random "
                        "Llama blocks (minutes at d = 4,096)")
    parser.add_argument("--auto-dims", type=int, nargs="+", default=[576, 2048, 4096], choices=sorted(LLAMA_SHAPES))
    args = parser.parse_args(argv)
    if args.quick:
        args.skip_jacrev, args.repeat = True, 1
    if args.auto:
        rows = auto_rows(args.auto_dims, args.repeat)
        columns = ["d", "d_ff", "blocks", "V", "forward_ms", "exact_build_s", "exact_head_s", "product_ms",
                   "product_head_ms", "product_x_forward", "exact_in_products", "auto_mode"]
        table = markdown_table(rows, columns)
        print(f"\nrandom-init Llama blocks, torch threads {torch.get_num_threads()}\n\n{table}")
        print(f"\nwrote {write_results('metric_auto', rows, table=table)}")
        return {"rows": rows, "table": table}

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

    products = product_rows(split, ctx, args.repeat)
    product_table = markdown_table(products, ["step", "ms", "x_forward"])
    print(f"\none matrix-free product vs one forward of the upper blocks (layer {args.layer}):\n\n{product_table}")
    jac_table = None
    if not args.quick:
        jac = jacobian_rows(split, ctx)
        jac_table = markdown_table(jac, ["chunk", "forward_JVPs_s", "reverse_VJPs_s", "forward_over_reverse"])
        print(f"\nB = ∂a/∂h, d = {split.d}: forward vs reverse mode\n\n{jac_table}")
        products = products + [{"jacobian": row} for row in jac]
    print(f"\nwrote {write_results('metric_products', products, meta=meta, table=product_table)}")
    return {"rows": rows, "table": table, "meta": meta, "products": product_table, "jacobian": jac_table}


if __name__ == "__main__":
    main()
