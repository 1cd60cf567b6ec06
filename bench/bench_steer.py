"""Bench: steering methods on SmolLM2-135M at matched concept probability.

Task: after "The capital of France is", raise p(" London") (0.012) to 0.5 at
layer ℓ. Contenders, side by side on the same context:

- FishBack, iterated (``steer_to_target``: G and q recomputed every step, exact
  metric by default, trust region on the actual step KL);
- Euclidean gradient ascent, iterated the same way;
- fixed directions scaled to the same probability (``scale_to_target``):
  CAA (mean of h⁺ − h⁻ over 6 contrastive pairs "capital of <UK place>" vs
  "capital of <other country>"), ActAdd (the first pair alone), an ITI-style
  logistic-probe normal, and FishBack's first direction frozen at h₀.

Reported per method: KL(p₀ ‖ p) of the full next-token distributions, the
off-target KL (concept token removed, rest renormalized), the cost ratio
R(δ) = (δᵀG_λδ)(qᵀG_λ⁻¹q)/(qᵀδ)² of the total displacement at h₀ (1 for the
first FishBack step), ‖δ‖ and wall time; plus the time of one FishBack
direction from the exact metric vs from the matrix-free metric by conjugate
gradients, plain and Nyström-preconditioned (rank 64).

    python bench/bench_steer.py [--layer 15 24] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import markdown_table, write_results  # noqa: E402

from fisherfast.metric import pullback_fisher  # noqa: E402
from fisherfast.models import load_default  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402
from fisherfast.steer import (ConceptScore, actadd_direction, caa_direction, compare_methods,  # noqa: E402
                              concept_gradient, cost_ratio, fishback_direction, off_target_kl, probe_direction,
                              scale_to_target)

PROMPT, WORD, GOAL = "The capital of France is", " London", 0.5
POSITIVE = ["The capital of England is", "The capital of the United Kingdom is", "The capital of Britain is",
            "The capital of Great Britain is", "The largest city in England is", "Big Ben stands in the city of"]
NEGATIVE = ["The capital of France is", "The capital of Germany is", "The capital of Italy is",
            "The capital of Spain is", "The largest city in France is", "The Eiffel Tower stands in the city of"]


def _kl(z0, z) -> float:
    lp, lq = torch.log_softmax(z0.double(), -1), torch.log_softmax(z.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def bench_layer(model, tokenizer, layer: int) -> list[dict]:
    split = SplitModel(model, layer)
    ctx = split.context(tokenizer(PROMPT, return_tensors="pt").input_ids[0])
    concept = ConceptScore(tokenizer.encode(WORD))
    target = math.log(GOAL)
    z0 = split.logits(ctx, ctx.h)
    q, _ = concept_gradient(split, ctx, ctx.h, concept)
    G = pullback_fisher(split, ctx, mode="exact", progress=False)
    rows = []

    def row(method, delta, seconds, steps="", reached=True):
        z = split.logits(ctx, ctx.h + delta)
        rows.append({"layer": layer, "method": method, "reached": reached, "steps": steps,
                     "p": float(concept.target_probability(z)), "kl": _kl(z0, z),
                     "off_target_kl": float(off_target_kl(concept, z0, z)),
                     "cost_ratio_at_h0": cost_ratio(G, q, delta), "delta_norm": float(delta.norm()),
                     "seconds": seconds})

    for method in ("fishback", "euclidean"):
        start = time.perf_counter()
        (result,) = compare_methods(split, ctx, concept, target, methods=(method,))
        row(f"{method} (iterated)", result["delta"], time.perf_counter() - start, result["steps"], result["reached"])

    def last(prompts):
        return torch.stack([split.context(tokenizer(p, return_tensors="pt").input_ids[0]).h for p in prompts])

    start = time.perf_counter()
    h_pos, h_neg = last(POSITIVE), last(NEGATIVE)
    activations_s = time.perf_counter() - start
    fixed = {"CAA": lambda: caa_direction(h_pos, h_neg), "ActAdd": lambda: actadd_direction(h_pos[0], h_neg[0]),
             "probe (ITI-style)": lambda: probe_direction(h_pos, h_neg),
             "FishBack first direction": lambda: fishback_direction(G, q)}
    for method, make in fixed.items():
        start = time.perf_counter()
        v = make()
        try:
            alpha = scale_to_target(split, ctx, concept, v, target)
        except ValueError:  # the ray never reaches the target: report where it peaks
            scales = torch.logspace(-2, 3, 200).tolist()
            probs = [float(concept.target_probability(split.logits(ctx, ctx.h + a * v))) for a in scales]
            best = max(range(len(scales)), key=probs.__getitem__)
            rows.append({"layer": layer, "method": f"{method} (scaled)", "reached": False, "steps": "",
                         "p": probs[best], "note": f"the ray peaks at p = {probs[best]:.3f} (α = {scales[best]:.3g})"})
            continue
        seconds = time.perf_counter() - start + (activations_s if method in ("CAA", "probe (ITI-style)") else 0.0)
        row(f"{method} (scaled)", alpha * v, seconds)
    return rows


def direction_timing(model, tokenizer, layer: int, repeat: int) -> dict:
    """One FishBack direction: exact metric + Cholesky vs matrix-free metric + CG,
    plain and preconditioned by a rank-64 Nyström approximation."""
    split = SplitModel(model, layer)
    ctx = split.context(tokenizer(PROMPT, return_tensors="pt").input_ids[0])
    q, _ = concept_gradient(split, ctx, ctx.h, ConceptScore(tokenizer.encode(WORD)))
    def exact():
        return fishback_direction(pullback_fisher(split, ctx, mode="exact", progress=False), q)

    def cg(k=None):
        free = pullback_fisher(split, ctx, mode="matrix_free", progress=False)
        pre = None if k is None else pullback_fisher(split, ctx, mode="low_rank", k=k, seed=0, progress=False)
        return fishback_direction(free, q, preconditioner=pre)

    contenders = {"exact_s": exact, "matrix_free_cg_s": cg, "matrix_free_nystrom64_pcg_s": lambda: cg(64)}
    times = {}
    for name, run in contenders.items():
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        times[name] = sorted(samples)[len(samples) // 2]
    return {"layer": layer, **times, "cg_vs_exact": times["matrix_free_cg_s"] / times["exact_s"],
            "pcg_vs_exact": times["matrix_free_nystrom64_pcg_s"] / times["exact_s"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, nargs="+", default=[15, 24])
    parser.add_argument("--quick", action="store_true", help="layer 24 only, one repeat")
    args = parser.parse_args(argv)
    layers = [24] if args.quick else args.layer
    model, tokenizer = load_default()
    rows = [r for layer in layers for r in bench_layer(model, tokenizer, layer)]
    columns = ["layer", "method", "reached", "steps", "p", "kl", "off_target_kl", "cost_ratio_at_h0", "delta_norm",
               "seconds", "note"]
    table = markdown_table(rows, columns)
    timing = [direction_timing(model, tokenizer, layer, 1 if args.quick else 3) for layer in layers]
    timing_table = markdown_table(timing, list(timing[0]))
    print(f"SmolLM2-135M, {PROMPT!r}: p({WORD!r}) → {GOAL}, torch threads {torch.get_num_threads()}\n")
    print(table)
    print("\none FishBack direction (metric + solve):\n")
    print(timing_table)
    path = write_results("steer", rows + timing, meta={"prompt": PROMPT, "word": WORD, "goal": GOAL},
                         table=table + "\n\n" + timing_table)
    print(f"\nwrote {path}")
    return {"rows": rows, "table": table + "\n\n" + timing_table}


if __name__ == "__main__":
    main()
