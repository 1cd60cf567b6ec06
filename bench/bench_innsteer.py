"""Bench: INNSteer evaluated as its paper evaluates steering — behaviour
success on held-out prompts and the fluency of steered generations — against
CAA, an ITI-style probe and FishBack, on SmolLM2-135M (DESIGN.md §5).

Behaviours (``bench/steer_data.py``'s ``BEHAVIOURS``): sentiment of the next
word (" good"/" great"… against " bad"/" awful"…), a compliance-style answer
choice (" Yes"/" Sure"… against " No"/" Sorry"…) and register (" Dear"/" Sir"…
against " Hey"/" Yo"…). The behaviour probability at a prompt's last position is
b = p(T) / (p(T) + p(S)) = σ(φ), φ the log-odds of T against S.

At one layer (default 12):

1. Fit on the 12 training pairs' last-position activations: CAA (mean h⁺ − h⁻),
   the probe normal (scaled to ‖v_CAA‖), INNSteer (latent v = z̄⁺ − z̄⁻). FishBack
   needs no training data: at each prompt δ = ρ G_λ⁻¹q/(qᵀG_λ⁻¹q) for the log-odds φ.
2. Calibrate each method's one strength knob (α for CAA/probe/INNSteer, ρ for
   FishBack) on the training pairs' negative prompts: the smallest α on a
   geometric grid (0.01–64, interpolated in log α) at which the median b over
   those prompts reaches ``--goal`` (default 0.5). A method that never reaches it
   keeps the grid's best α and is marked "not calibrated".
3. On the held-out prompts (never seen in 1–2): b with the calibrated δ
   (steering success: mean b, fraction with b > 0.5), and fluency: a 20-token
   greedy continuation generated with δ added at the prompt's last position and
   every generated token (``fisherfast.steer.steering``, positions="from_prompt_last"; δ is
   the one computed at the prompt's last activation — INNSteer and FishBack
   would give another δ at each new token), scored by its perplexity under the
   unsteered model, exp(mean NLL of the 20 tokens given the prompt).

    python bench/bench_innsteer.py [--layer 12] [--goal 0.5] [--tokens 20] [--quick]

--quick: a random-init tiny Llama on token ids, 1 behaviour, 4 pairs, 2 held-out
prompts, 5 tokens. Results: bench/results/innsteer.json (innsteer_quick.json with --quick; ``--out``) and a table.
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
from steer_data import BEHAVIOURS, concept_scores  # noqa: E402

from fisherfast.metric import pullback_fisher  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402
from fisherfast.steer import (INNSteer, ConceptScore, caa_direction, concept_gradient,  # noqa: E402
                              fishback_direction, probe_direction, steering)

METHODS = ("none", "caa", "probe", "innsteer", "fishback")
COLUMNS = ["behaviour", "method", "alpha", "calibrated", "train_median_b", "heldout_mean_b", "heldout_success",
           "median_perplexity", "median_delta_norm"]
GRID = torch.logspace(-2, math.log10(64.0), 40, dtype=torch.float64).tolist()


def behaviour_probability(logodds_concept: ConceptScore, logits: torch.Tensor) -> torch.Tensor:
    """b = σ(φ) = p(T)/(p(T)+p(S)) (...)."""
    return torch.sigmoid(logodds_concept(logits.to(torch.float64)))


class Steerer:
    """δ(ctx, α) for one method: fixed vectors, INNSteer's latent translation, or
    FishBack's per-prompt direction (G and q at the prompt, cached)."""

    def __init__(self, method, split, logodds, fitted):
        self.method, self.split, self.logodds, self.fitted = method, split, logodds, fitted
        self._fishback = {}

    def delta(self, ctx, alpha: float) -> torch.Tensor:
        if self.method == "none":
            return torch.zeros_like(ctx.h)
        if self.method in ("caa", "probe"):
            return alpha * self.fitted[self.method]
        if self.method == "innsteer":
            return self.fitted["innsteer"].delta(ctx.h, alpha)
        key = id(ctx)
        if key not in self._fishback:
            q, _ = concept_gradient(self.split, ctx, ctx.h, self.logodds)
            G = pullback_fisher(self.split, ctx, mode="exact", progress=False)
            self._fishback[key] = fishback_direction(G, q, 1.0)
        return alpha * self._fishback[key]

    def probabilities(self, ctx, alphas) -> list[float]:
        """b at ``ctx`` for each α (one batched upper-map pass)."""
        H = torch.stack([ctx.h + self.delta(ctx, a) for a in alphas])
        with torch.no_grad():
            return behaviour_probability(self.logodds, self.split.logits(ctx, H)).tolist()


def calibrate(steerer, contexts, goal: float) -> tuple[float, bool, float]:
    """(α, reached, median b at α): the smallest α with median b over ``contexts`` ≥ goal."""
    curves = [steerer.probabilities(ctx, GRID) for ctx in contexts]
    medians = [statistics.median(col) for col in zip(*curves)]
    for i, m in enumerate(medians):
        if m >= goal:
            if i == 0:
                return GRID[0], True, m
            lo, hi = math.log(GRID[i - 1]), math.log(GRID[i])
            t = (goal - medians[i - 1]) / (m - medians[i - 1])
            alpha = math.exp(lo + t * (hi - lo))
            return alpha, True, statistics.median(steerer.probabilities(c, [alpha])[0] for c in contexts)
    best = max(range(len(GRID)), key=medians.__getitem__)
    return GRID[best], False, medians[best]


def continuation(model, ids: torch.Tensor, layer: int, delta: torch.Tensor, tokens: int) -> list[int]:
    """Greedy continuation of ``tokens`` new ids with δ added at layer ``layer``."""
    mask = torch.ones_like(ids[None])
    with torch.no_grad(), steering(model, {layer: delta}):
        out = model.generate(ids[None], attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[0]:].tolist()


def perplexity(model, prompt_ids: torch.Tensor, new_ids: list[int]) -> float:
    """exp(mean NLL of ``new_ids`` given the prompt) under the unsteered model."""
    full = torch.cat([prompt_ids, torch.tensor(new_ids, dtype=prompt_ids.dtype)])
    with torch.no_grad():
        logits = model(full[None]).logits[0, prompt_ids.shape[0] - 1: -1].to(torch.float64)
    nll = torch.nn.functional.cross_entropy(logits, full[prompt_ids.shape[0]:])
    return float(torch.exp(nll))


def run_behaviour(model, split, name, logodds, pairs, held_out, *, goal, tokens, innsteer_options, log=print):
    """Rows (per method) and per-prompt records for one behaviour."""
    h_pos = torch.stack([split.context(p).h for p, _ in pairs])
    h_neg = torch.stack([split.context(n).h for _, n in pairs])
    caa = caa_direction(h_pos, h_neg)
    inn = INNSteer(d=split.d, dtype=h_pos.dtype, seed=0, n_layers=innsteer_options.get("n_layers", 6),
                   hidden=innsteer_options.get("hidden", 128))
    inn.fit(h_pos, h_neg, steps=innsteer_options.get("steps", 500), progress=False)
    fitted = {"caa": caa, "probe": probe_direction(h_pos, h_neg) * caa.norm(), "innsteer": inn}
    train = [split.context(n) for _, n in pairs]
    test = [(ids, split.context(ids)) for ids in held_out]
    rows, records = [], []
    for method in METHODS:
        start = time.perf_counter()
        steerer = Steerer(method, split, logodds, fitted)
        alpha, calibrated, train_b = (0.0, True, statistics.median(
            steerer.probabilities(c, [0.0])[0] for c in train)) if method == "none" else \
            calibrate(steerer, train, goal)
        bs, ppls, norms = [], [], []
        for index, (ids, ctx) in enumerate(test):
            delta = steerer.delta(ctx, alpha)
            b = steerer.probabilities(ctx, [alpha])[0]
            new = continuation(model, ids, split.layer, delta, tokens)
            ppl = perplexity(model, ids, new)
            bs.append(b), ppls.append(ppl), norms.append(float(delta.norm()))
            records.append({"behaviour": name, "method": method, "prompt_index": index, "b": b, "perplexity": ppl,
                            "delta_norm": norms[-1], "continuation_ids": new})
        rows.append({"behaviour": name, "method": method, "alpha": alpha, "calibrated": calibrated,
                     "train_median_b": train_b, "heldout_mean_b": statistics.mean(bs),
                     "heldout_success": sum(b > 0.5 for b in bs) / len(bs),
                     "median_perplexity": statistics.median(ppls), "median_delta_norm": statistics.median(norms),
                     "seconds": time.perf_counter() - start})
        log(f"  {name} {method}: α = {alpha:.3g} ({'calibrated' if calibrated else 'NOT calibrated'}), held-out "
            f"mean b = {rows[-1]['heldout_mean_b']:.3f}, median ppl = {rows[-1]['median_perplexity']:.3g}")
    return rows, records


def tiny_setup():
    """A random-init tiny Llama and one synthetic behaviour on token ids (--quick)."""
    model = tiny_llama()
    generator = torch.Generator().manual_seed(2)
    pool = torch.randint(10, 61, (40, 5), generator=generator)
    target, source = [3, 4, 5], [6, 7, 8]
    logodds = ConceptScore(target, source)
    with torch.no_grad():  # pairs: the pool's prompts most and least inclined to T over S
        order = logodds(model(pool).logits[:, -1]).argsort(descending=True).tolist()
    pairs = [(pool[order[i]], pool[order[-1 - i]]) for i in range(4)]
    held_out = [pool[order[len(order) // 2 + i]] for i in range(2)]
    return model, {"name": "synthetic", "target": target, "source": source, "pairs": pairs, "held_out": held_out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--behaviours", nargs="+", default=list(BEHAVIOURS), choices=list(BEHAVIOURS))
    parser.add_argument("--goal", type=float, default=0.5, help="median b on the training negatives to calibrate to")
    parser.add_argument("--tokens", type=int, default=20, help="greedy tokens generated per held-out prompt")
    parser.add_argument("--held-out", type=int, default=10, help="held-out prompts per behaviour (the first N)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="gather the rows of earlier result files (e.g. one per behaviour) instead of running")
    parser.add_argument("--quick", action="store_true", help="tiny random-init model, 1 behaviour, 2 held-out prompts")
    parser.add_argument("--out", default=None,
                        help="results file (default bench/results/innsteer.json; innsteer_quick.json with --quick, "
                             "so a smoke run does not overwrite a full run's results)")
    args = parser.parse_args(argv)
    args.out = args.out or default_results_path("innsteer", args.quick)
    if args.from_json:
        return _merge(args.from_json, args.out)
    meta = {**machine_meta(), "goal": args.goal, "quick": args.quick, "grid": [GRID[0], GRID[-1], len(GRID)]}
    jobs = []
    if args.quick:
        model, b = tiny_setup()
        layer, tokens = 2, 5
        jobs.append((b["name"], ConceptScore(b["target"], b["source"]), b["pairs"], b["held_out"]))
        innsteer_options = {"n_layers": 2, "hidden": 16, "steps": 100}
        meta.update(model="random-init tiny Llama (d=32, V=61, 3 layers)",
                    behaviours={b["name"]: {"target": b["target"], "source": b["source"],
                                            "held_out": [h.tolist() for h in b["held_out"]]}})
    else:
        from fisherfast.models import load_default

        model, tokenizer = load_default()
        layer, tokens, innsteer_options = args.layer, args.tokens, {}
        meta.update(model="SmolLM2-135M-Instruct", behaviours={})

        def encode(text):
            return tokenizer(text, return_tensors="pt").input_ids[0]

        for name in args.behaviours:
            definition = BEHAVIOURS[name]
            _, logodds, survivors = concept_scores(tokenizer, definition)
            held_out = list(definition.held_out[:args.held_out])
            meta["behaviours"][name] = {**survivors, "held_out": held_out}
            jobs.append((name, logodds, [(encode(p), encode(n)) for p, n in definition.pairs],
                         [encode(p) for p in held_out]))
    meta.update(layer=layer, tokens=tokens)
    split = SplitModel(model, layer)
    rows, records = [], []
    for name, logodds, pairs, held_out in jobs:
        r, rec = run_behaviour(model, split, name, logodds, pairs, held_out, goal=args.goal, tokens=tokens,
                               innsteer_options=innsteer_options)
        rows += r
        records += rec
    table = markdown_table(rows, COLUMNS)
    result = {"name": "innsteer", "meta": meta, "rows": rows, "records": records, "table": table}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\n{meta['model']}, layer {layer}: calibrated to median b = {args.goal} on the training negatives; "
          f"b and perplexity ({tokens} greedy tokens, unsteered model) on held-out prompts\n")
    print(table)
    print(f"\nwrote {args.out}")
    return result


def _merge(paths, out) -> dict:
    rows, records, metas = [], [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        records += data["records"]
        metas.append(data["meta"])
    meta = {**metas[0], "merged_from": [os.path.basename(p) for p in paths],
            "behaviours": {k: v for m in metas for k, v in m["behaviours"].items()}}
    result = {"name": "innsteer", "meta": meta, "rows": rows, "records": records,
              "table": markdown_table(rows, COLUMNS)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(result["table"])
    return result



if __name__ == "__main__":
    main()
