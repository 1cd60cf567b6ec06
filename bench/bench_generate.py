"""Steering overhead in generate: tokens/s steered vs unsteered, and per-row steering vs separate runs.

One process, the same prompts and the same number of new tokens for every
contender (min_new_tokens = max_new_tokens, greedy), so only the ratios mean
anything (on a shared machine, the absolute tokens/s move with the load):

- B = 1 and B = B (left-padded prompts of different lengths): generate with
  and without ``steering(model, {ℓ: v})`` (positions "from_prompt_last": the
  prompt's last token and every generated one edited);
- per-row steering: one batched generate with a different vector per row
  ((B, d) at layer ℓ) against B separate steered runs of one row each — the
  tokens must be the same (checked here; recorded per row).

The default model is the embedded SmolLM2-135M (CUDA when present); --quick
runs a random-init tiny Llama in float64 on the CPU.

    python bench/bench_generate.py [--quick] [--new-tokens 32] [--batch 8] [--repeat 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import default_results_path, machine_meta, markdown_table, timeit, tiny_llama  # noqa: E402

from fisherfast.steer import steering  # noqa: E402

PROMPTS = ("The capital of France is", "My favourite city to visit is", "I live in",
           "The weather today is sunny and", "Once upon a time, in a small village,", "The best way to learn is",
           "Yesterday I went to the", "In the morning she drinks")


def _setup(quick: bool, batch: int):
    """(model, prompt rows as lists of ids, layer, device)."""
    if quick:
        model = tiny_llama()
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(1, 61, (3 + i % 4,), generator=g).tolist() for i in range(batch)]
        return model, rows, 2, torch.device("cpu")
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    rows = [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(batch)]
    return model, rows, model.config.num_hidden_layers // 2, device


def _pad_left(rows, device):
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random-init Llama, 8 tokens, one repeat")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 32; 8 quick)")
    parser.add_argument("--batch", type=int, default=8, help="B, the batched runs' rows")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats per contender (default 3; 1 quick)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/generate[_quick].json)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be ≥ 1")
    new = args.new_tokens or (8 if args.quick else 32)
    repeat = args.repeat or (1 if args.quick else 3)
    model, rows, layer, device = _setup(args.quick, args.batch)
    model.generation_config.eos_token_id = None  # every row generates exactly `new` tokens
    d = model.get_output_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm = model(torch.tensor([rows[0]], device=device), output_hidden_states=True) \
            .hidden_states[layer][0, -1].norm()
    per_row = torch.randn(args.batch, d, generator=g, dtype=torch.float64)
    per_row = (per_row / per_row.norm(dim=1, keepdim=True) * float(norm)).to(device, model.dtype)  # ‖v‖ = ‖h_ℓ‖
    v = per_row[0]

    def generate(ids, mask):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)[:, ids.shape[1]:]

    def steered(ids, mask, vectors):
        with steering(model, vectors):
            return generate(ids, mask)

    one = _pad_left(rows[:1], device)
    full = _pad_left(rows, device)
    out = []
    for label, (ids, mask) in (("B=1", one), (f"B={args.batch}", full)):
        B = ids.shape[0]
        plain = timeit(lambda: generate(ids, mask), repeat=repeat)
        steer = timeit(lambda: steered(ids, mask, {layer: v}), repeat=repeat)
        out.append({"case": label, "new tokens per row": new, "unsteered tok/s": B * new / plain,
                    "steered tok/s": B * new / steer, "steered / unsteered tok/s": plain / steer})
    batch_tokens = steered(*full, {layer: per_row}).tolist()
    alone_tokens = [steered(*_pad_left([r], device), {layer: per_row[i]})[0].tolist() for i, r in enumerate(rows)]
    t_batch = timeit(lambda: steered(*full, {layer: per_row}), repeat=repeat)
    singles = [_pad_left([r], device) for r in rows]
    t_alone = timeit(lambda: [steered(*singles[i], {layer: per_row[i]}) for i in range(len(rows))], repeat=repeat)
    out.append({"case": f"per-row vectors, B={args.batch}", "new tokens per row": new,
                "steered tok/s": args.batch * new / t_batch,
                "separate runs tok/s": args.batch * new / t_alone, "batched / separate tok/s": t_alone / t_batch,
                "tokens equal": batch_tokens == alone_tokens})
    columns = ["case", "new tokens per row", "unsteered tok/s", "steered tok/s", "steered / unsteered tok/s",
               "separate runs tok/s", "batched / separate tok/s", "tokens equal"]
    table = markdown_table(out, columns)
    print(table)
    meta = {**machine_meta(), "model": "tiny llama (float64)" if args.quick else "SmolLM2-135M-Instruct",
            "device": str(device), "layer": layer, "repeat": repeat, "batch": args.batch}
    result = {"name": "generate", "meta": meta, "rows": out, "table": table,
              "records": {"prompts": rows, "layer": layer, "vectors": per_row.double().cpu().tolist(),
                          "batch_tokens": batch_tokens, "alone_tokens": alone_tokens}}
    path = args.out or default_results_path("generate", args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
