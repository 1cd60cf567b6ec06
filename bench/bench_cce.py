"""Cross-entropy forward at vocabulary scale: fisherfast against Cut Cross-Entropy.

The per-token loss ℓ_i = lse_i − z_{i,y_i} of the linear head z = e cᵀ:

- fisherfast: ``lm_logsumexp(e, c)`` (streamed over V, never a B×V tensor)
  minus the target logit (one gathered dot per token);
- Cut Cross-Entropy's CPU path, ``linear_cross_entropy(e, c, y,
  impl="torch_compile", reduction="none")`` (PyPI ``cut-cross-entropy``: the
  logits GEMM and ``F.cross_entropy`` under ``torch.compile``).

Both run in one process on the same float32 inputs, timed in interleaved
rounds; the error is the max |ℓ − ℓ₆₄| against float64 (``torch.logsumexp``
of float64 logits). Inputs are head-like: rows of c share a mean direction
and e has a component along it.

    python bench/bench_cce.py [--batch 256] [--repeat 3] [--shapes 49152x576 ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import markdown_table, write_results  # noqa: E402

from fisherfast.ops import lm_logsumexp  # noqa: E402

try:
    from cut_cross_entropy import linear_cross_entropy
except ImportError:  # the [bench] extra
    linear_cross_entropy = None

SHAPES = ("49152x576", "128256x2048", "262144x1024")


def head(V: int, d: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g)
    mean /= mean.norm()
    c = 0.5 * mean + torch.randn(V, d, generator=g) / d ** 0.5
    e = 4.0 * mean + 2.0 * torch.randn(B, d, generator=g)
    y = torch.randint(0, V, (B,), generator=g)
    return e, c, y


def fisherfast_ce(e, c, y):
    return lm_logsumexp(e, c) - (e * c[y]).sum(dim=1)


def cce_ce(e, c, y):
    return linear_cross_entropy(e, c, y, impl="torch_compile", reduction="none")


def float64_ce(e, c, y, block: int = 64):
    out = []
    c64 = c.double()
    for s in range(0, e.shape[0], block):
        z = e[s:s + block].double() @ c64.T
        out.append(torch.logsumexp(z, dim=1) - z.gather(1, y[s:s + block, None])[:, 0])
    return torch.cat(out)


def run(shapes, B: int, repeat: int):
    rows = []
    for shape in shapes:
        V, d = map(int, shape.split("x"))
        e, c, y = head(V, d, B)
        exact = float64_ce(e, c, y)
        contenders = {"fisherfast": fisherfast_ce}
        if linear_cross_entropy is not None:
            contenders["cut-cross-entropy"] = cce_ce
        err = {name: float((fn(e, c, y).double() - exact).abs().max()) for name, fn in contenders.items()}  # warm-up
        times = {name: [] for name in contenders}
        for _ in range(repeat):  # interleaved rounds
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn(e, c, y)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in contenders:
            rows.append({"V": V, "d": d, "B": B, "contender": name, "ms": 1e3 * med[name],
                         "vs fisherfast": med[name] / med["fisherfast"], "max |err| vs float64": err[name]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args(argv)
    if linear_cross_entropy is None:
        print("cut-cross-entropy is not installed (pip install 'fisherfast[bench]'): fisherfast rows only")
    rows = run(args.shapes, args.batch, args.repeat)
    table = markdown_table(rows, ["V", "d", "B", "contender", "ms", "vs fisherfast", "max |err| vs float64"])
    print(table)
    print("results:", write_results("cce", rows, {"threads": torch.get_num_threads()}, table))


if __name__ == "__main__":
    main()
