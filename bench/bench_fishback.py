"""Bench: the FishBack comparison — verb-morphology concepts × layers × steering
methods at matched concept probability (DESIGN.md §5).

For each concept (``bench/steer_data.py``'s ``MORPHOLOGY_CONCEPTS``: past,
3rd person, progressive), layer and carrier prompt, the target probability
p(T) = Σ_{v∈T} p_v is raised from p₀ to two targets:

- "caa_half": halfway from p₀ to the top of CAA's own ray,
  p* = p₀ + ½(max_{0≤α≤α_max} p(h₀ + α v_CAA) − p₀), a target CAA reaches by
  construction and the other methods can be expected to;
- "p0.5": p* = 0.5 (ambitious).

Methods (all from the public API of ``fisherfast.steer``):
    fishback         iterated FishBack (``steer_to_target``, G and q recomputed per step)
    fishback_frozen  FishBack's direction at h₀ scaled along its ray (``scale_to_target``)
    euclidean        iterated Euclidean gradient ascent (``steer_to_target``)
    caa, actadd, probe  fixed directions from the 12 contrastive pairs, scaled (``scale_to_target``)
    innsteer         INNSteer fitted on the pairs; α found by the bench's own
                     grid scan + Brent search on p(h₀ + δ(h₀, α)) (no library path yet)

A run is "reached" when |log p − log p*| ≤ ``--tol`` (default 0.01, i.e. p within
1% of p*); an exception of the library (e.g. no scale found) or a final p outside
the tolerance (an overshoot or an undershoot) is a failure, recorded with its
reason. Per run: p, total KL(p_base ‖ p_steered) of the full next-token
distributions, the off-target KL in the same direction over the vocabulary
minus T ∪ S (every inflection of the concept's verbs, both renormalized), ‖δ‖
and R = (δᵀG_λδ)(qᵀG_λ⁻¹q)/(qᵀδ)² at h₀ (``cost_ratio``; 1 only for
FishBack's direction at h₀, so exactly 1 for fishback_frozen).

Summary per target × method: success rate; median off-target and total KL over
reached runs; the paired ratio method/FishBack (iterated) of the off-target and
total KL per prompt where both reached — pooled median and the range of
per-(concept, layer) medians — and of the off-target KL against the frozen
FishBack direction (which, unlike today's iterated solver, lands on p*); median R; and per (concept, layer, target) the
Spearman correlation across methods of median R and median off-target KL.

    python bench/bench_fishback.py [--layers 6 12 18 24] [--concepts past ...] [--prompts 12] [--quick]

--quick: a random-init tiny Llama (no tokenizer: token ids), 1 concept, 1 layer,
2 prompts, small token sets — the structure of the full run in seconds.
Results: bench/results/fishback.json (fishback_quick.json with --quick; ``--out`` to change) and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ and the checkout's fisherfast first
from _harness import default_results_path, machine_meta, markdown_table, tiny_llama  # noqa: E402
from steer_data import MORPHOLOGY_CONCEPTS, concept_scores  # noqa: E402

from fisherfast.metric import pullback_fisher  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402
from fisherfast.steer import (INNSteer, ConceptScore, actadd_direction, caa_direction,  # noqa: E402
                              concept_gradient, cost_ratio, fishback_direction, probe_direction, scale_to_target,
                              steer_to_target)

METHODS = ("fishback", "fishback_frozen", "euclidean", "caa", "actadd", "probe", "innsteer")
REFERENCE = "fishback"
KL_DIRECTION = "KL(p_base ‖ p_steered)"
ALPHA_GRID = [0.0] + torch.logspace(-2, math.log10(64.0), 48, dtype=torch.float64).tolist()
CAA_ALPHA_MAX = 16.0


# --------------------------------------------------------------------------------------------- measurements
def kl_base_steered(z0: torch.Tensor, z: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """KL(p_base ‖ p_steered) in float64, over the tokens ``keep`` (renormalized) or all."""
    if keep is not None:
        z0, z = z0[..., keep], z[..., keep]
    lp = torch.log_softmax(z0.to(torch.float64), -1)
    lq = torch.log_softmax(z.to(torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum())


def ray_probabilities(split, ctx, concept: ConceptScore, points: torch.Tensor) -> list[float]:
    """p(T) at each row of ``points`` (n, d), in one batched upper-map pass."""
    with torch.no_grad():
        return concept.target_probability(split.logits(ctx, points)).tolist()


# -------------------------------------------------------------------------------------------------- one cell
def _fit_directions(split, pair_ids, innsteer_options: dict) -> dict:
    h_pos = torch.stack([split.context(p).h for p, _ in pair_ids])
    h_neg = torch.stack([split.context(n).h for _, n in pair_ids])
    inn = INNSteer(d=split.d, dtype=h_pos.dtype, seed=0, n_layers=innsteer_options.get("n_layers", 6),
                   hidden=innsteer_options.get("hidden", 128))
    inn.fit(h_pos, h_neg, steps=innsteer_options.get("steps", 500), progress=False)
    return {"caa": caa_direction(h_pos, h_neg), "actadd": actadd_direction(h_pos[0], h_neg[0]),
            "probe": probe_direction(h_pos, h_neg), "innsteer": inn}


def _run_method(method, split, ctx, concept, target_p, G0, q0, fixed) -> tuple[torch.Tensor, str]:
    """(δ, note) for one method steering p(T) to target_p; raises on a library failure."""
    phi_star = math.log(target_p)
    if method in ("fishback", "euclidean"):
        result = steer_to_target(split, ctx, concept, phi_star, method=method)
        return result.delta, f"{len(result.step_kls)} steps"
    if method == "innsteer":  # its displacement depends on h: the library's search over α of δ(α)
        inn, h0 = fixed["innsteer"], ctx.h
        alpha = scale_to_target(split, ctx, concept, lambda a: inn.delta(h0, a), phi_star)
        return inn.delta(h0, alpha), f"α = {alpha:.4g}"
    v = fishback_direction(G0, q0) if method == "fishback_frozen" else fixed[method]
    alpha = scale_to_target(split, ctx, concept, v, phi_star)
    return alpha * v, f"α = {alpha:.4g}"


def run_cell(split, concept, family, prompt_ids, pair_ids, *, tol: float, innsteer_options: dict,
             labels: dict, log=print) -> list[dict]:
    """Every method × target × prompt of one (concept, layer): a list of run records.
    ``prompt_ids``: (carrier index, ids) pairs."""
    off_target = torch.ones(split.V, dtype=torch.bool)
    off_target[family.target] = False
    off_target[family.source] = False
    fixed = _fit_directions(split, pair_ids, innsteer_options)
    runs = []
    for index, ids in prompt_ids:
        ctx = split.context(ids)
        z0 = split.logits(ctx, ctx.h)
        p0 = float(concept.target_probability(z0))
        q0, _ = concept_gradient(split, ctx, ctx.h, concept)
        G0 = pullback_fisher(split, ctx, mode="exact", progress=False)
        alphas = torch.tensor([a for a in ALPHA_GRID if a <= CAA_ALPHA_MAX], dtype=ctx.h.dtype)
        caa_top = max(ray_probabilities(split, ctx, concept, ctx.h + alphas[:, None] * fixed["caa"]))
        targets = {"caa_half": p0 + 0.5 * (caa_top - p0), "p0.5": 0.5}
        for target, target_p in targets.items():
            base = {**labels, "prompt_index": index, "target": target, "p0": p0, "p_target": target_p,
                    "caa_ray_top": caa_top}
            if target_p <= p0 * math.exp(tol):
                for method in METHODS:
                    runs.append({**base, "method": method, "reached": False,
                                 "reason": "target not above p₀ (nothing to steer)"})
                continue
            for method in METHODS:
                start = time.perf_counter()
                record = {**base, "method": method}
                try:
                    delta, note = _run_method(method, split, ctx, concept, target_p, G0, q0, fixed)
                except (ValueError, RuntimeError) as err:
                    runs.append({**record, "reached": False, "reason": f"{type(err).__name__}: {err}",
                                 "seconds": time.perf_counter() - start})
                    continue
                z = split.logits(ctx, ctx.h + delta)
                p = float(concept.target_probability(z))
                gap = math.log(p) - math.log(target_p)
                reached = abs(gap) <= tol
                reason = "" if reached else (f"{'overshoot' if gap > 0 else 'undershoot'}: p = {p:.4g} for "
                                             f"p* = {target_p:.4g}")
                dq = float(q0.double() @ delta.double())
                R = cost_ratio(G0, q0, delta) if dq > 0 else float("nan")
                runs.append({**record, "reached": reached, "reason": reason, "note": note, "p": p,
                             "kl_total": kl_base_steered(z0, z), "kl_off_target": kl_base_steered(z0, z, off_target),
                             "delta_norm": float(delta.norm()), "R": R, "seconds": time.perf_counter() - start})
        done = [r for r in runs if r["prompt_index"] == index]
        log(f"  {labels} prompt {index}: p0 = {p0:.3g}, CAA top {caa_top:.3g}; reached "
            f"{sum(r['reached'] for r in done)}/{len(done)}")
    return runs


# ------------------------------------------------------------------------------------------------- summary
def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def paired_ratios(runs: list[dict], method: str, target: str, key: str = "kl_off_target",
                  reference: str = REFERENCE) -> dict:
    """Per prompt where both ``method`` and ``reference`` (default iterated FishBack) reached
    ``target``: method/reference of ``key``, keyed by (concept, layer, prompt_index)."""
    def reached(m):
        return {(r["concept"], r["layer"], r["prompt_index"]): r[key] for r in runs
                if r["method"] == m and r["target"] == target and r["reached"]}

    mine, ref = reached(method), reached(reference)
    return {k: mine[k] / ref[k] for k in mine if k in ref and ref[k] > 0}


def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(summary rows per target × method, Spearman rows per target × concept × layer)."""
    from scipy.stats import spearmanr

    rows, spearman = [], []
    targets = list(dict.fromkeys(r["target"] for r in runs))
    cells = list(dict.fromkeys((r["concept"], r["layer"]) for r in runs))
    for target in targets:
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method and r["target"] == target]
            ok = [r for r in mine if r["reached"]]
            row = {"target": target, "method": method, "runs": len(mine), "reached": len(ok),
                   "success": len(ok) / len(mine) if mine else None,
                   "median_kl_off_target": _median([r["kl_off_target"] for r in ok]),
                   "median_kl_total": _median([r["kl_total"] for r in ok]),
                   "median_R": _median([r["R"] for r in ok])}
            for key, short in (("kl_off_target", "off"), ("kl_total", "total")):
                ratios = paired_ratios(runs, method, target, key)
                row[f"ratio_{short}_vs_fishback"] = _median(list(ratios.values()))
                per_cell = [_median([v for k, v in ratios.items() if k[:2] == cell]) for cell in cells]
                per_cell = [v for v in per_cell if v is not None]
                row[f"ratio_{short}_cell_min"] = min(per_cell) if per_cell else None
                row[f"ratio_{short}_cell_max"] = max(per_cell) if per_cell else None
                row[f"pairs_{short}"] = len(ratios)
            frozen = paired_ratios(runs, method, target, reference="fishback_frozen")
            row["ratio_off_vs_fishback_frozen"] = _median(list(frozen.values()))
            rows.append(row)
        for concept, layer in cells:
            points = []
            for method in METHODS:
                ok = [r for r in runs if r["method"] == method and r["target"] == target and r["reached"]
                      and r["concept"] == concept and r["layer"] == layer]
                R, off = _median([r["R"] for r in ok]), _median([r["kl_off_target"] for r in ok])
                if R is not None and off is not None:
                    points.append((method, R, off))
            rho = float(spearmanr([p[1] for p in points], [p[2] for p in points]).statistic) \
                if len(points) >= 3 else None
            spearman.append({"target": target, "concept": concept, "layer": layer, "methods": len(points),
                             "spearman_R_vs_off_target_kl": rho})
    return rows, spearman


def tables(rows: list[dict], spearman: list[dict]) -> str:
    def fmt_range(row, short):
        lo, hi = row.get(f"ratio_{short}_cell_min"), row.get(f"ratio_{short}_cell_max")
        return "" if lo is None else f"{lo:.2g}–{hi:.2g}"

    shown = []
    for row in rows:
        shown.append({"target": row["target"], "method": row["method"],
                      "success": f"{row['reached']}/{row['runs']}",
                      f"median off-target {KL_DIRECTION}": row["median_kl_off_target"],
                      f"median total {KL_DIRECTION}": row["median_kl_total"],
                      "off-target ratio vs FishBack (pooled median)": row["ratio_off_vs_fishback"],
                      "per-cell median range": fmt_range(row, "off"),
                      "off-target ratio vs frozen FishBack": row["ratio_off_vs_fishback_frozen"],
                      "total ratio vs FishBack": row["ratio_total_vs_fishback"],
                      "median R at h₀": row["median_R"]})
    main = markdown_table(shown, list(shown[0]))
    by_target = {}
    for s in spearman:
        if s["spearman_R_vs_off_target_kl"] is not None:
            by_target.setdefault(s["target"], []).append(s["spearman_R_vs_off_target_kl"])
    sp = [{"target": t, "cells": len(v), "median Spearman(R, off-target KL)": statistics.median(v),
           "min": min(v), "max": max(v)} for t, v in by_target.items()]
    return main + ("\n\n" + markdown_table(sp, list(sp[0])) if sp else "")


# ---------------------------------------------------------------------------------------------------- setup
def tiny_setup():
    """A random-init tiny Llama and a synthetic concept on token ids (--quick)."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    pool = torch.randint(10, 61, (40, 5), generator=generator)
    target, source = [3, 4, 5], [6, 7, 8]
    with torch.no_grad():  # contrastive pairs: the pool's prompts most and least inclined to T
        order = torch.softmax(model(pool).logits[:, -1], -1)[:, target].sum(-1).argsort(descending=True).tolist()
    pairs = [(pool[order[i]].tolist(), pool[order[-1 - i]].tolist()) for i in range(4)]
    carriers = [pool[order[len(order) // 2 + i]].tolist() for i in range(2)]
    concept = {"name": "synthetic", "target": target, "source": source, "carriers": carriers, "pairs": pairs}
    return model, concept


def _merge(paths, out) -> dict:
    runs, metas = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs += data["runs"]
        metas.append(data["meta"])
    keys = [(r["concept"], r["layer"], r["prompt_index"], r["target"], r["method"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("the result files overlap (a concept, layer, prompt, target and method twice)")
    rows, spearman = summarize(runs)
    meta = {**metas[0], "merged_from": [os.path.basename(p) for p in paths],
            "concepts": {k: v for m in metas for k, v in m.get("concepts", {}).items()}}
    result = {"name": "fishback", "meta": meta, "rows": rows, "spearman": spearman, "runs": runs,
              "table": tables(rows, spearman)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(result["table"])
    print(f"\nwrote {out}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--concepts", nargs="+", default=list(MORPHOLOGY_CONCEPTS), choices=list(MORPHOLOGY_CONCEPTS))
    parser.add_argument("--prompts", type=int, default=12, help="carrier prompts per concept (≤ 12)")
    parser.add_argument("--first", type=int, default=0, help="index of the first carrier prompt used")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="summarize the runs of earlier result files (e.g. one per concept) instead of running")
    parser.add_argument("--tol", type=float, default=0.01, help="|log p − log p*| that counts as reached")
    parser.add_argument("--quick", action="store_true", help="tiny random-init model, 1 concept, 1 layer, 2 prompts")
    parser.add_argument("--out", default=None,
                        help="results file (default bench/results/fishback.json; fishback_quick.json with --quick, "
                             "so a smoke run does not overwrite a full run's results)")
    args = parser.parse_args(argv)
    args.out = args.out or default_results_path("fishback", args.quick)
    meta = {**machine_meta(), "kl_direction": KL_DIRECTION, "tol": args.tol, "methods": list(METHODS),
            "reference": REFERENCE, "caa_alpha_max": CAA_ALPHA_MAX, "quick": args.quick}
    jobs = []  # (labels, split, concept, family, prompt_ids, pair_ids)
    if args.from_json:
        return _merge(args.from_json, args.out)
    if args.quick:
        model, c = tiny_setup()
        concept, family = ConceptScore(c["target"]), ConceptScore(c["target"], c["source"])
        jobs.append(({"concept": c["name"], "layer": 2}, SplitModel(model, 2), concept, family,
                     list(enumerate(c["carriers"])), c["pairs"]))
        meta.update(model="random-init tiny Llama (d=32, V=61, 3 layers)", concepts={c["name"]: c})
        innsteer_options = {"n_layers": 2, "hidden": 16, "steps": 100}
    else:
        from fisherfast.models import load_default

        model, tokenizer = load_default()

        def encode(text):
            return tokenizer(text, return_tensors="pt").input_ids[0]

        meta.update(model="SmolLM2-135M-Instruct", prompts_per_concept=args.prompts, concepts={})
        innsteer_options = {}
        for name in args.concepts:
            definition = MORPHOLOGY_CONCEPTS[name]
            concept, family, survivors = concept_scores(tokenizer, definition)
            meta["concepts"][name] = {"target_words": survivors["target"], "source_words": survivors["source"],
                                      "target_listed": len(definition.words), "target_single_token":
                                      len(survivors["target"]), "carriers": list(definition.carriers)}
            chosen = list(range(args.first, min(args.first + args.prompts, len(definition.carriers))))
            meta["concepts"][name]["carrier_indices"] = chosen
            prompts = [(i, encode(definition.carriers[i])) for i in chosen]
            pairs = [(encode(p), encode(n)) for p, n in definition.pairs]
            for layer in args.layers:
                jobs.append(({"concept": name, "layer": layer}, None, concept, family, prompts, pairs))
    runs, result = [], {}
    for labels, split, concept, family, prompts, pairs in jobs:
        start = time.perf_counter()
        split = split or SplitModel(model, labels["layer"])
        runs += run_cell(split, concept, family, prompts, pairs, tol=args.tol, innsteer_options=innsteer_options,
                         labels=labels)
        print(f"{labels}: {time.perf_counter() - start:.0f} s", flush=True)
        rows, spearman = summarize(runs)
        result = {"name": "fishback", "meta": meta, "rows": rows, "spearman": spearman, "runs": runs,
                  "table": tables(rows, spearman)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after every cell, so a long run leaves its partial results
            json.dump(result, f, indent=1, default=str)
    print(f"\n{meta['model']}: steering to matched p(T); off-target = vocabulary minus every inflection "
          f"(T ∪ S); KL direction {KL_DIRECTION}\n")
    print(result["table"])
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
