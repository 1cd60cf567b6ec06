"""Bench: geodesic steering solvers on SmolLM2-135M, list carriers, steerable layers.

For each task (weekdays, months, letters, ages; list carriers, docs/design.md §6)
and layer (default 24 and 27, where injecting class centroids controls the
answer), the activation cloud is the last-position states of the task's list
prompts (lengths 1–6), the class centroids their per-class means, and the
carriers two list prompts. For each pair of classes (a, b) (b = a + ⌈K/4⌉
places on, forward), every solver builds a T-waypoint path from centroid a to
centroid b:

- chord: the straight line;
- spline: the cubic spline through the class centroids (periodic for cyclic tasks);
- frozen L-BFGS: the frozen-factor iteration on the concept Hellinger metric;
- embedded L-BFGS: the exact-gradient minimizer of Σ d_H² (+ ε at 1% of the chord's);
- density: the geodesic of the conformal density metric of the centroid spline;
- GAGA-Out / GAGA-PHATE: latent-chord waypoints of the autoencoder trained on the
  cloud (Hellinger targets / PHATE potentials), pulled to the cloud by the kNN
  density penalty and decoded.

Each path is injected into the carriers (``evaluate_path``) and scored by its
Bhattacharyya energy to the behaviour manifold (the centroids' concept
distributions) E_BC, its Hellinger arc length and energy Σ d_H², legibility,
and the target probability / top-1 at the end; GAGA rows add the top-1 of the
decoded endpoint D(E(h₁)) ("dec_top1"). A figure of the first pair's paths
over the cloud's top two principal components goes to
bench/results/geodesic_paths.png.

    python bench/bench_geodesic.py [--quick] [--tasks weekdays months] [--layers 24 27] [--pairs 2] [--T 9]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import RESULTS_DIR, markdown_table, write_results  # noqa: E402

from fisherfast.concepts import concept_distributions  # noqa: E402
from fisherfast.geodesic import (ConceptHellingerMetric, DensityMetric, chord_path,  # noqa: E402
                                 evaluate_path, gaga_out, gaga_phate, get_task, lbfgs_path, latent_path, spline_path)
from fisherfast.models import load_default  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402

SOLVERS = ("chord", "spline", "frozen", "embedded", "density", "gaga_out", "gaga_phate")
MEASURES = ("E_BC", "arc", "E_H", "legibility", "end_p", "end_top1")


def pairs_for(K: int, cyclic: bool, n: int) -> list[tuple[int, int]]:
    gap = max(2, math.ceil(K / 4))
    starts = K if cyclic else K - gap
    return [((p * starts) // n, ((p * starts) // n + gap) % K) for p in range(n)]


def hellinger_energy(q: torch.Tensor) -> float:
    """Σ_t d_H(q_t, q_{t+1})² averaged over contexts, q (T, C, B)."""
    return float((0.5 * ((q[1:].sqrt() - q[:-1].sqrt()) ** 2).sum(-1)).sum(0).mean())


def run_setting(model, tokenizer, task, layer, args, log):
    split = SplitModel(model, layer)
    schema = task.schema(tokenizer, split.V)
    examples = task.examples(lengths=tuple(range(1, 7)))
    H = torch.stack([split.context(task.prompt_ids(tokenizer, e.prompt)).h for e in examples])
    labels = torch.tensor([e.answer_index for e in examples])
    C = torch.stack([H[labels == k].mean(0) for k in range(task.n_classes)])          # as class_centroids
    carrier_examples = [task.list_example(task.classes[0], 3), task.list_example(task.classes[task.n_classes // 2], 4)]
    carriers = split.contexts([task.prompt_ids(tokenizer, e.prompt) for e in carrier_examples])
    metric = ConceptHellingerMetric(split, carriers, schema)
    density = DensityMetric.from_centroids(C.double(), periodic=task.cyclic,          # float64: its log-density
                                           strength=args.density_strength)
    fits = {}
    if "gaga_out" in args.solvers:
        t0 = time.perf_counter()
        q_cloud = concept_distributions(split, carriers, schema, H)
        fits["gaga_out"] = (gaga_out(H, q_cloud, steps=args.gaga_steps, seed=0), time.perf_counter() - t0)
    if "gaga_phate" in args.solvers:
        t0 = time.perf_counter()
        try:
            fits["gaga_phate"] = (gaga_phate(H, knn=min(5, len(H) - 1), steps=args.gaga_steps, seed=0),
                                  time.perf_counter() - t0)
        except ImportError as error:
            log(f"  gaga_phate skipped: {error}")
    rows, figure_paths = [], {}
    for pair_index, (a, b) in enumerate(pairs_for(task.n_classes, task.cyclic, args.pairs)):
        h0, h1 = C[a], C[b]
        for solver in args.solvers:
            t0 = time.perf_counter()
            extra = {}
            if solver == "chord":
                path = chord_path(h0, h1, args.T)
            elif solver == "spline":
                path = spline_path(C, a, b, args.T, periodic=task.cyclic)
            elif solver in ("frozen", "embedded"):
                result = lbfgs_path(metric, h0, h1, args.T, energy=solver, outer_steps=args.outer,
                                    inner_steps=args.inner)
                path = result.path
                extra = {"converged": result.converged, "iters": result.inner_iterations}
            elif solver == "density":
                result = lbfgs_path(density, h0.double(), h1.double(), args.T, outer_steps=args.outer,
                                    inner_steps=args.inner)
                path = result.path.to(C.dtype)
                extra = {"converged": result.converged, "iters": result.inner_iterations}
            elif solver in fits:
                fit, _ = fits[solver]
                path = latent_path(fit.autoencoder, h0, h1, args.T, cloud=H, density_weight=1.0).path
                with torch.no_grad():
                    decoded = fit.autoencoder.decode(fit.autoencoder.encode(h1[None]))[0]
                extra = {"dec_top1": evaluate_path(split, carriers, schema, decoded[None], C, b).target_top1}
            else:
                continue
            seconds = time.perf_counter() - t0
            ev = evaluate_path(split, carriers, schema, path, C, b)
            row = {"task": task.name, "layer": layer, "pair": f"{task.classes[a]}→{task.classes[b]}",
                   "solver": solver, "E_BC": ev.bhattacharyya_energy, "arc": ev.arc_length,
                   "E_H": hellinger_energy(ev.q), "legibility": ev.legibility, "end_p": ev.target_probability,
                   "end_top1": ev.target_top1, "seconds": seconds, **extra}
            rows.append(row)
            log(f"  {row['pair']:>22} {solver:>10}  E_BC {row['E_BC']:.3f}  arc {row['arc']:.3f}  "
                f"E_H {row['E_H']:.4f}  leg {row['legibility']:.2f}  {seconds:.1f}s {extra}")
            if pair_index == 0:
                figure_paths[solver] = path
    return rows, (H, labels, C, figure_paths)


def summary(rows) -> list[dict]:
    """Per solver: mean of each measure, and in how many settings it has the lowest E_BC / arc."""
    settings = {}
    for row in rows:
        settings.setdefault((row["task"], row["layer"], row["pair"]), []).append(row)
    wins = {"E_BC": {}, "arc": {}}
    for group in settings.values():
        for measure in wins:
            best = min(group, key=lambda r: r[measure])["solver"]
            wins[measure][best] = wins[measure].get(best, 0) + 1
    out = []
    for solver in SOLVERS:
        mine = [r for r in rows if r["solver"] == solver]
        if not mine:
            continue
        entry = {"solver": solver, "n": len(mine)}
        for measure in MEASURES:
            entry[measure] = sum(r[measure] for r in mine) / len(mine)
        entry["lowest E_BC"] = f"{wins['E_BC'].get(solver, 0)}/{len(settings)}"
        entry["shortest arc"] = f"{wins['arc'].get(solver, 0)}/{len(settings)}"
        entry["seconds"] = sum(r["seconds"] for r in mine) / len(mine)
        if "converged" in mine[0]:
            entry["converged"] = f"{sum(bool(r['converged']) for r in mine)}/{len(mine)}"
        if "dec_top1" in mine[0]:
            entry["dec_top1"] = sum(r["dec_top1"] for r in mine) / len(mine)
        out.append(entry)
    return out


def plot(figures, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(figures)
    tasks = sorted({k[0] for k in keys}, key=[k[0] for k in keys].index)
    layers = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(tasks), len(layers), figsize=(5 * len(layers), 4.2 * len(tasks)), squeeze=False)
    colours = dict(zip(SOLVERS, ("k", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:blue", "tab:cyan")))
    for (task, layer), (H, labels, C, paths) in figures.items():
        ax = axes[tasks.index(task)][layers.index(layer)]
        mean = H.mean(0)
        basis = torch.linalg.svd((H - mean).double(), full_matrices=False).Vh[:2].T

        def project(X):
            return ((X.double() - mean.double()) @ basis).numpy()

        cloud = project(H)
        ax.scatter(cloud[:, 0], cloud[:, 1], c=labels.numpy(), cmap="hsv", s=10, alpha=0.35)
        centroids = project(C)
        ax.scatter(centroids[:, 0], centroids[:, 1], c="k", marker="x", s=25)
        for solver, P in paths.items():
            xy = project(P)
            ax.plot(xy[:, 0], xy[:, 1], "-o", ms=2.5, lw=1.2, color=colours[solver], label=solver)
        ax.set_title(f"{task}, layer {layer}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="weekdays, layer 24, one pair, T = 4, few iterations")
    parser.add_argument("--tasks", nargs="+", default=["weekdays", "months", "ages", "letters"])
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 27])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--T", type=int, default=9)
    parser.add_argument("--outer", type=int, default=2, help="L-BFGS outer steps")
    parser.add_argument("--inner", type=int, default=40, help="L-BFGS iterations per outer step")
    parser.add_argument("--gaga-steps", type=int, default=800)
    parser.add_argument("--density-strength", type=float, default=10.0, help="λ of the density metric")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--name", default=None, help="results file name (default geodesic / geodesic_quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.layers, args.pairs, args.T = ["weekdays"], [24], 1, 4
        args.outer, args.inner, args.gaga_steps = 1, 3, 20
    name = args.name or ("geodesic_quick" if args.quick else "geodesic")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    model, tokenizer = load_default()
    rows, figures = [], {}
    for task_name in args.tasks:
        task = get_task(task_name)
        for layer in args.layers:
            log(f"{task_name}, layer {layer}")
            setting_rows, figures[(task_name, layer)] = run_setting(model, tokenizer, task, layer, args, log)
            rows += setting_rows
            out = report(rows, figures, args, name)      # after every setting: a stopped run keeps what it did
    print(out.pop("text"))
    return out


def report(rows, figures, args, name) -> dict:
    table = markdown_table(summary(rows), ["solver", "n", *MEASURES, "lowest E_BC", "shortest arc", "converged",
                                           "dec_top1", "seconds"])
    detail = markdown_table(rows, ["task", "layer", "pair", "solver", *MEASURES, "converged", "seconds"])
    os.makedirs(RESULTS_DIR, exist_ok=True)
    figure = os.path.join(RESULTS_DIR, f"{name}_paths.png")
    plot(figures, figure)
    path = write_results(name, rows, meta={"args": vars(args), "figure": figure}, table=table)
    text = (f"SmolLM2-135M, list carriers, T = {args.T}, tasks {args.tasks}, layers {args.layers}, "
            f"{args.pairs} pair(s) each; torch threads {torch.get_num_threads()}\n\n{table}\n\n{detail}\n\n"
            f"wrote {path} and {figure}")
    return {"rows": rows, "summary": summary(rows), "json": path, "figure": figure, "text": text}


if __name__ == "__main__":
    main()
