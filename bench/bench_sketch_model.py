"""Streamed sketch_model: peak extra memory and time vs a bare logits GEMM, at vocabulary scale.

Synthetic heads: a random-init one-block Llama (d = 576, tied embeddings) with
V = 49,152 (SmolLM2), 128,256 (Llama-3) and 262,144 (Gemma-3), next-token
labels at every position of B texts of T tokens (B·T rows). Contenders, one
process, same inputs:
  logits GEMM         a Wᵀ for the B·T head inputs: the floor a sketch of the logits needs
  forward, no head    fisherfast.split.final_head_inputs: the model's own forward without its LM head
  materialized        the previous sketch_model: the model's B·T·V logits, the selected rows copied out,
                      then the sketch update from those logits (about 2 × B·T·V float32)
  streamed            sketch_model now: head inputs, then the fused update from W, one chunk of logits
Peak extra memory: torch's CPU tensor allocations during the call above what was live before it
(``_harness.peak_memory``: the profiler's allocator totals), or CUDA's allocator statistics.
"""
from __future__ import annotations

import argparse

import torch

from _harness import markdown_table, peak_memory, timeit, write_results
from fisherfast.sketch import FisherSketcher, SketchSpec
from fisherfast.sketch.model import sketch_model
from fisherfast.split import final_head_inputs

MB = 1 << 20


def synthetic_llama(V: int, d: int, layers: int = 1):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=True)
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config).eval().requires_grad_(False)


def materialized(model, ids, spec):
    """The previous sketch_model's batch: the model's logits, rows copied out, update from logits."""
    sketcher = FisherSketcher(spec)
    captured = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("a", args[0]))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    a, z = captured["a"][:, :-1].reshape(-1, spec.d), logits[:, :-1].reshape(-1, spec.K)
    a_rows, z_rows = a[torch.ones(len(a), dtype=torch.bool)], z[torch.ones(len(z), dtype=torch.bool)]  # copies
    sketcher.update(a_rows, logits=z_rows, y=ids[:, 1:].reshape(-1))
    return sketcher.state


def run(V: int, d: int, B: int, T: int, m: int, repeat: int) -> list[dict]:
    model = synthetic_llama(V, d)
    spec = SketchSpec(d=d, K=V, m=m)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    lists = ids.tolist()
    a = final_head_inputs(model, ids).reshape(-1, d).contiguous()
    W = model.get_output_embeddings().weight
    logits_mb = B * T * V * 4 / MB
    contenders = {
        "logits GEMM": lambda: a @ W.T,
        "forward, no head": lambda: final_head_inputs(model, ids),
        "materialized (previous)": lambda: materialized(model, ids, spec),
        "streamed sketch_model": lambda: sketch_model(model, None, lists, spec=spec, batch_size=B, progress=False),
    }
    rows = []
    for name, fn in contenders.items():
        rows.append({"V": V, "B·T": B * T, "contender": name, "peak_extra_MB": peak_memory(fn) / MB,
                     "time_s": timeit(fn, repeat=repeat, warmup=1)})
    gemm, forward = rows[0]["time_s"], rows[1]["peak_extra_MB"]
    for row in rows:
        row["B·T·V logits MB"] = logits_mb
        row["x GEMM time"] = row["time_s"] / gemm
        row["extra over forward MB"] = row["peak_extra_MB"] - forward
    # the streamed path must equal the materialized one (same rows, same labels)
    got, want = sketch_model(model, None, lists, spec=spec, batch_size=B, progress=False), materialized(model, ids, spec)
    err = max(float(((got.sums[k] - want.sums[k]).abs().max() / want.sums[k].abs().max())) for k in got.sums)
    for row in rows:
        row["rel_diff_vs_materialized"] = err
    del model, W, a
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: V = 4,096, d = 64, B·T = 64")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 128_256, 262_144])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per text (T)")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, d, args.batch, args.tokens, args.m, args.repeat = [4096], 72, 4, 16, 256, 1
    else:
        d = 576
    rows = [row for V in args.vocab for row in run(V, d, args.batch, args.tokens, args.m, args.repeat)]
    columns = ["V", "B·T", "contender", "peak_extra_MB", "extra over forward MB", "B·T·V logits MB", "time_s",
               "x GEMM time", "rel_diff_vs_materialized"]
    table = markdown_table(rows, columns)
    print(table)
    path = write_results("bench_sketch_model" + ("_quick" if args.quick else ""), rows,
                         {"d": d, "m": args.m, "quick": args.quick}, table)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
