"""Bench: steering methods on SmolLM2-135M at matched concept probability.

Task: after "The capital of France is", raise p(" London") (0.012) to 0.5 at
layer ℓ. Contenders, side by side on the same context:

- FishBack, iterated (``steer_to_target``: G and q recomputed every step, exact
  metric by default, trust region on the actual step KL, a final line search
  so every run ends within tol = 1e-3 of log 0.5);
- Euclidean gradient ascent, iterated the same way;
- fixed directions scaled to the same probability (``scale_to_target``: a
  ratio-1.2 geometric scan, refinement of the scan's maxima, Brent):
  CAA (mean of h⁺ − h⁻ over 6 contrastive pairs "capital of <UK place>" vs
  "capital of <other country>"), ActAdd (the first pair alone), an ITI-style
  logistic-probe normal, and FishBack's first direction frozen at h₀; a ray
  that never reaches 0.5 reports its best probability and α.

Reported per method, one KL convention: KL(p₀ ‖ p) of the full next-token
distributions, the off-target KL (concept token removed, rest renormalized,
same direction), the cost ratio R(δ) = (δᵀG_λδ)(qᵀG_λ⁻¹q)/(qᵀδ)² of the total
displacement at h₀ (1 for the first FishBack step), ‖δ‖ and wall time; plus
the time of one FishBack direction from the exact metric vs from the
matrix-free metric by conjugate gradients, plain and Nyström-preconditioned
(rank 64); plus FishBack's two solves (``--solves``): damped G_λ⁻¹q vs the
pseudo-inverse G⁺q with rank cutoffs rcond — their cosine, the best
probability along each frozen ray, KL at matched probability, and the
iterated run with each.

    python bench/bench_steer.py [--layer 15 24] [--quick] [--solves] [--no-timing]
"""
from __future__ import annotations

import argparse
import dataclasses
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
from fisherfast.steer import (ConceptScore, TargetNotReached, actadd_direction, caa_direction,  # noqa: E402
                              compare_methods, concept_gradient, cost_ratio, evaluate_delta, fishback_direction,
                              probe_direction, scale_to_target, steer_to_target)

PROMPT, WORD, GOAL = "The capital of France is", " London", 0.5
POSITIVE = ["The capital of England is", "The capital of the United Kingdom is", "The capital of Britain is",
            "The capital of Great Britain is", "The largest city in England is", "Big Ben stands in the city of"]
NEGATIVE = ["The capital of France is", "The capital of Germany is", "The capital of Italy is",
            "The capital of Spain is", "The largest city in France is", "The Eiffel Tower stands in the city of"]


def bench_layer(model, tokenizer, layer: int) -> list[dict]:
    split = SplitModel(model, layer)
    ctx = split.context(tokenizer(PROMPT, return_tensors="pt").input_ids[0])
    concept = ConceptScore(tokenizer.encode(WORD))
    target = math.log(GOAL)
    q, _ = concept_gradient(split, ctx, ctx.h, concept)
    G = pullback_fisher(split, ctx, mode="exact", progress=False)
    rows = []

    def row(result, seconds, note=""):
        rows.append({"layer": layer, "method": result.method, "reached": result.reached, "steps": result.steps,
                     "p": result.target_prob, "kl": result.kl, "off_target_kl": result.off_target_kl,
                     "cost_ratio_at_h0": cost_ratio(G, q, result.delta), "delta_norm": result.delta_norm,
                     "seconds": seconds, "note": note})

    for method in ("fishback", "euclidean"):
        start = time.perf_counter()
        (result,) = compare_methods(split, ctx, concept, target, methods=(method,))
        row(dataclasses.replace(result, method=f"{method} (iterated)"), time.perf_counter() - start)

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
            alpha, reached, note = scale_to_target(split, ctx, concept, v, target), True, ""
        except TargetNotReached as err:  # the ray never reaches the target: report where it peaks
            alpha, reached = err.best_alpha, False
            note = f"the ray peaks at p = {math.exp(err.best_score):.3f} (α = {err.best_alpha:.3g})"
        seconds = time.perf_counter() - start + (activations_s if method in ("CAA", "probe (ITI-style)") else 0.0)
        row(evaluate_delta(split, ctx, concept, alpha * v, method=f"{method} (scaled)", reached=reached), seconds,
            note)
    return rows


def solve_comparison(model, tokenizer, layer: int, rconds=(1e-9, 1e-6, 1e-4, 1e-2)) -> list[dict]:
    """FishBack's damped solve G_λ⁻¹q (λ = 1e-3·qᵀGq/qᵀq) against the pseudo-inverse
    G⁺q with rank cutoff rcond·λ_max, at h₀ of the bench prompt: cosine with the
    damped direction, the kept rank, the best p along the frozen ray (scan over
    α), KL at matched p, and the iterated run to p = 0.5 with each solve.
    Matched p is the smaller of 0.5 and 90% of the best p on the pinv ray and
    on the damped ray; the damped direction's KLs at that p are reported
    beside (``*_damped``)."""
    split = SplitModel(model, layer)
    ctx = split.context(tokenizer(PROMPT, return_tensors="pt").input_ids[0])
    concept = ConceptScore(tokenizer.encode(WORD))
    q, phi0 = concept_gradient(split, ctx, ctx.h, concept)
    G = pullback_fisher(split, ctx, mode="exact", progress=False).dense()
    eigenvalues = torch.linalg.eigvalsh(G.double())
    solves = [("damped", {"solve": "damped"})] + [(f"pinv rcond={r:g}", {"solve": "pinv", "rcond": r})
                                                   for r in rconds]
    directions = {name: fishback_direction(G, q, **kw) for name, kw in solves}
    best = {}
    for name, v in directions.items():
        try:
            scale_to_target(split, ctx, concept, v, math.log(0.999))
            best[name] = 0.999
        except TargetNotReached as err:
            best[name] = math.exp(err.best_score)
    rows = []
    for name, kw in solves:
        v = directions[name]
        p_match = min(GOAL, 0.9 * min(best[name], best["damped"]))  # reachable on both rays
        record = {"layer": layer, "solve": name, "p0": math.exp(phi0),
                  "kept_rank": int((eigenvalues > kw.get("rcond", 0) * eigenvalues[-1]).sum()) if "rcond" in kw
                  else split.d,
                  "cos_with_damped": float(torch.nn.functional.cosine_similarity(
                      v.double(), directions["damped"].double(), dim=0)),
                  "ray_best_p": best[name], "p_matched": p_match}
        if best[name] > math.exp(phi0):
            for suffix, vector in (("", v), ("_damped", directions["damped"])):
                alpha = scale_to_target(split, ctx, concept, vector, math.log(p_match))
                frozen = evaluate_delta(split, ctx, concept, alpha * vector, method=name)
                record.update({f"kl_matched{suffix}": frozen.kl, f"off_target_kl_matched{suffix}": frozen.off_target_kl})
        start = time.perf_counter()
        run = steer_to_target(split, ctx, concept, math.log(GOAL), **kw)
        iterated = evaluate_delta(split, ctx, concept, run.delta, method=name, reached=run.reached, steps=run.steps)
        record.update(iterated_reached=run.reached, iterated_steps=run.steps, iterated_p=iterated.target_prob,
                      iterated_kl=iterated.kl, iterated_off_target_kl=iterated.off_target_kl,
                      iterated_s=time.perf_counter() - start)
        rows.append(record)
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
    parser.add_argument("--solves", action="store_true", help="only FishBack's damped vs pseudo-inverse solves")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the exact vs matrix-free direction timing (minutes per layer on a loaded CPU)")
    args = parser.parse_args(argv)
    layers = [24] if args.quick else args.layer
    model, tokenizer = load_default()
    if args.solves:
        rows = [r for layer in layers for r in solve_comparison(model, tokenizer, layer)]
        table = markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
        print(f"SmolLM2-135M, {PROMPT!r}: p({WORD!r}), FishBack's solve\n\n{table}")
        path = write_results("steer_solves", rows, meta={"prompt": PROMPT, "word": WORD, "goal": GOAL}, table=table)
        print(f"\nwrote {path}")
        return {"rows": rows, "table": table}
    rows = [r for layer in layers for r in bench_layer(model, tokenizer, layer)]
    columns = ["layer", "method", "reached", "steps", "p", "kl", "off_target_kl", "cost_ratio_at_h0", "delta_norm",
               "seconds", "note"]
    table = markdown_table(rows, columns)
    print(f"SmolLM2-135M, {PROMPT!r}: p({WORD!r}) → {GOAL}, torch threads {torch.get_num_threads()}\n")
    print(table, flush=True)
    timing = [] if args.no_timing else [direction_timing(model, tokenizer, layer, 1 if args.quick else 3)
                                        for layer in layers]
    timing_table = markdown_table(timing, list(timing[0])) if timing else "(timing skipped: --no-timing)"
    print("\none FishBack direction (metric + solve):\n")
    print(timing_table)
    path = write_results("steer", rows + timing, meta={"prompt": PROMPT, "word": WORD, "goal": GOAL},
                         table=table + "\n\n" + timing_table)
    print(f"\nwrote {path}")
    return {"rows": rows, "table": table + "\n\n" + timing_table}


if __name__ == "__main__":
    main()
