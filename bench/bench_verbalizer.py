"""Verbalizer shift on the embedded SmolLM2-135M-Instruct (issue 5, item 4).

The same review prompts under different answer tokens (yes_no, no_yes,
good_bad, a_b; fisherfast.sketch.tasks) share every head input a, so every
activation-only similarity is 1: the activation-sketch marginal S_a and the
linear CKA of the head inputs. The head-Fisher alignment A (FisherSketch,
m = 4096, one pass per task) sees the labels through e = p − e_y and separates
the tasks. A control task, yes_no on a disjoint set of reviews, shows the same
task on other prompts aligning highly. The exact alignment of the empirical
head Fishers (kernel identity, docs/design.md §7: ⟨F̂_i, F̂_j⟩ = mean over pairs of
(a·a′)²(e·e′)², computed here from the materialized a and e over the full
vocabulary) is printed beside the sketch estimate.

    python bench/bench_verbalizer.py [--n 24] [--m 4096]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import markdown_table, write_results  # noqa: E402

from fisherfast.sketch import SketchSpec, alignment  # noqa: E402
from fisherfast.sketch.model import sketch_tasks  # noqa: E402
from fisherfast.sketch.tasks import verbalizer_tasks  # noqa: E402


def head_data(model, tokenizer, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (n, d), P (n, V)) float64 at each prompt's last token, one prompt at a
    time (no padding): a = hidden_states[-1] (the final normed state in HF
    Llama), p = softmax(z) over the full vocabulary."""
    A, P = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
            A.append(out.hidden_states[-1][0, -1].double())
            P.append(out.logits[0, -1].double().softmax(-1))
    return torch.stack(A), torch.stack(P)


def task_data(model, tokenizer, tasks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, E) per task with E = P − onehot(y); one forward pass per distinct prompt set."""
    cache, data = {}, []
    for task in tasks:
        if task.prompts not in cache:
            cache[task.prompts] = head_data(model, tokenizer, task.prompts)
        A, P = cache[task.prompts]
        y = torch.tensor(task.label_ids(tokenizer))
        data.append((A, P - torch.nn.functional.one_hot(y, P.shape[1])))
    return data


def exact_alignment(data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A(i, j) from ⟨F̂_i, F̂_j⟩ = mean_{x∼i, x′∼j} (a·a′)²(e·e′)² (docs/design.md §7)."""
    n = len(data)
    G = torch.zeros(n, n, dtype=torch.float64)
    for i, (Ai, Ei) in enumerate(data):
        for j, (Aj, Ej) in enumerate(data):
            G[i, j] = ((Ai @ Aj.T).square() * (Ei @ Ej.T).square()).mean()
    d = G.diagonal().sqrt()
    return G / (d[:, None] * d[None, :])


def exact_activation_alignment(data) -> torch.Tensor:
    """S_a(i, j): cosine of the second moments M = E[a aᵀ], ⟨M_i, M_j⟩ = mean (a·a′)²."""
    G = torch.tensor([[float((Ai @ Aj.T).square().mean()) for Aj, _ in data] for Ai, _ in data], dtype=torch.float64)
    d = G.diagonal().sqrt()
    return G / (d[:, None] * d[None, :])


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of paired rows: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) after centering."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return float((Y.T @ X).square().sum() / ((X.T @ X).norm() * (Y.T @ Y).norm()))


def matrix_rows(names, M, fmt=lambda v: f"{v:.3f}"):
    return [{"task": name, **{other: fmt(M[i][j]) for j, other in enumerate(names)}} for i, name in enumerate(names)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="prompts per task (the control uses the next n)")
    parser.add_argument("--m", type=int, default=4096, help="sketch size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 prompts per task")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 8
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    tasks = verbalizer_tasks(n=args.n) + verbalizer_tasks(["yes_no"], n=args.n, offset=args.n, suffix="′")
    names = [t.name for t in tasks]
    spec = SketchSpec(d=model.config.hidden_size, K=model.get_output_embeddings().out_features, m=args.m)

    start = time.perf_counter()
    states = sketch_tasks(model, tokenizer, tasks, spec=spec, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start
    sketch = alignment(states)
    S_a = alignment(states, kind="activation").A
    data = task_data(model, tokenizer, tasks)
    exact = exact_alignment(data)
    exact_S_a = exact_activation_alignment(data)
    same_prompts = [i for i, t in enumerate(tasks) if t.prompts == tasks[0].prompts]
    cka = [[linear_cka(data[i][0], data[j][0]) if i in same_prompts and j in same_prompts else float("nan")
            for j in range(len(tasks))] for i in range(len(tasks))]

    pm = [[f"{sketch.A[i, j]:.3f} ± {sketch.stderr[i, j]:.3f}" for j in range(len(names))] for i in range(len(names))]
    off = ~torch.eye(len(names), dtype=torch.bool)
    err = (sketch.A - exact).abs()[off]
    tables = {
        "FisherSketch alignment A (± stderr)": matrix_rows(names, pm, fmt=str),
        "exact head-Fisher alignment (kernel identity)": matrix_rows(names, exact.tolist()),
        "activation marginal S_a (sketch)": matrix_rows(names, S_a.tolist()),
        "activation marginal S_a (exact)": matrix_rows(names, exact_S_a.tolist()),
        "linear CKA of head inputs (paired prompts only)": matrix_rows(
            names, cka, fmt=lambda v: "n/a" if v != v else f"{v:.3f}"),
    }
    print(f"SmolLM2-135M-Instruct, d={spec.d}, K={spec.K}, m={spec.m}, n={args.n} prompts per task; "
          f"control {names[-1]} = yes_no on the next {args.n} reviews")
    for title, rows in tables.items():
        print(f"\n{title}\n\n{markdown_table(rows, ['task', *names])}")
    print(f"\nsketch vs exact, off-diagonal: mean |error| {float(err.mean()):.4f}, max {float(err.max()):.4f}")
    print(f"\nall {len(names)} sketches: {seconds:.1f} s (one forward pass per prompt set; "
          f"{sum(s.count for s in states.values())} rows)")
    result = {"names": names, "A": sketch.A.tolist(), "stderr": sketch.stderr.tolist(), "exact": exact.tolist(),
              "S_a": S_a.tolist(), "S_a_exact": exact_S_a.tolist(), "cka": cka, "seconds": seconds,
              "mean_abs_error": float(err.mean()), "max_abs_error": float(err.max())}
    rows = [{"table": title, **row} for title, table in tables.items() for row in table]
    write_results("verbalizer", rows, meta={"n": args.n, "m": args.m, "spec": spec.to_json()},
                  table="\n\n".join(f"{t}\n\n{markdown_table(r, ['task', *names])}" for t, r in tables.items()))
    return result


if __name__ == "__main__":
    main()
