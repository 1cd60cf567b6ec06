"""Bench of the softmax-Fisher contractions (issue 3, docs/design.md §3).

Side by side on the same inputs, per op:
  naive      PyTorch formula that materializes the logits (B×V) and W·U
             (B×V×k weighted copy), G U = Wᵀ(p ⊙ WU) − μ (pᵀWU);
  reference  chunked two-pass PyTorch backend;
  cpu        one-pass backend (MKL GEMMs + fused C++ moments);
  floor      one plain GEMM Wᵀ X of the op's FLOP count (2·V·d·n with n the
             number of right-hand columns the op needs: B logits, k
             projections, B(k+1) accumulated columns for matmat).
Shapes: (V, d, B, k) = (49152, 576, 64, 8) and (128256, 4096, 16, 4); peak
extra torch memory at the second; gram exact vs tail_tol=1e-3 on peaked
distributions at (49152, 576) with B=8 (the exact per-token gram costs
2·V·d² per token: 33 GFLOP at d=576 and 4.3 TFLOP at d=4096, so the big shape
is left out to keep the bench within minutes on 2 cores).

GPU rows (CUDA tensors, same shapes): naive on the GPU, triton and cuda (the
ops each implements), each checked against the float64 formula before it is
timed; they say "no CUDA device" when none is present. ``--gpu-only`` runs
only them (bench/gpu_check.sh).

Run: python bench/bench_softmax_fisher.py [--quick] [--gpu-only]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import NO_CUDA, has_cuda, markdown_table, peak_memory, timeit, write_results  # noqa: E402

from fisherfast.ops import (available_backends, lm_logsumexp, softmax_fisher_gram,  # noqa: E402
                            softmax_fisher_gram_topk, softmax_fisher_matmat, softmax_fisher_quad)


def naive_lse(a, W):
    return torch.logsumexp(a @ W.T, dim=1)


def naive_matmat(a, W, U):
    p = torch.softmax(a @ W.T, dim=1)
    X = p[:, :, None] * (W @ U)[None]  # (B,V,k)
    return torch.einsum("bvk,vd->bdk", X, W) - (p @ W)[:, :, None] * X.sum(1)[:, None, :]


def naive_quad(a, W, U):
    p = torch.softmax(a @ W.T, dim=1)
    Y = W @ U
    s = p @ Y
    return torch.einsum("bv,vi,vj->bij", p, Y, Y) - s[:, :, None] * s[:, None, :]


def naive_gram(a, W):
    p = torch.softmax(a @ W.T, dim=1)
    mu = p @ W
    return torch.stack([(W * p_i[:, None]).T @ W for p_i in p]) - mu[:, :, None] * mu[:, None, :]


def make_inputs(V, d, B, k, seed=0, peaked=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g) / d ** 0.5
    a = torch.randn(B, d, generator=g) * (12.0 if peaked else 2.0)
    U = torch.randn(d, k, generator=g)
    return a, W, U


GPU_OPS = {  # op -> (naive, fisherfast call, backends that implement it)
    "lm_logsumexp": (lambda a, W, U: naive_lse(a, W), lambda a, W, U, be: lm_logsumexp(a, W, backend=be),
                     ("triton", "cuda")),
    "matmat": (naive_matmat, lambda a, W, U, be: softmax_fisher_matmat(a, W, U, backend=be), ("triton", "cuda")),
    "quad": (naive_quad, lambda a, W, U, be: softmax_fisher_quad(a, W, U, backend=be), ("triton",)),
}


def gpu_rows(shapes) -> list[dict]:
    """Per shape and op: naive on the GPU and each GPU backend, checked against
    the float64 naive formula (relative error ≤ 1e-4) before timing."""
    if not has_cuda():
        rows = [{"op": op, "gpu": NO_CUDA} for op in GPU_OPS]
        print(markdown_table(rows, ["op", "gpu"]), flush=True)
        return rows
    status = available_backends()
    rows = []
    for V, d, B, k in shapes:
        a, W, U = (x.cuda() for x in make_inputs(V, d, B, k))
        for op, (naive, ours, names) in GPU_OPS.items():
            expected = naive(a.double(), W.double(), U.double())
            row = {"op": op, "V": V, "d": d, "B": B, "k": k, "gpu_naive_s": timeit(lambda: naive(a, W, U), repeat=5)}
            for be in names:
                if not status[be].available:
                    row[f"{be}_s"] = status[be].reason
                    continue
                err = float((ours(a, W, U, be).double() - expected).norm() / expected.norm())
                assert err <= 1e-4, f"{op} on {be}: relative error {err:.2e} vs the float64 formula"
                row[f"{be}_s"] = timeit(lambda: ours(a, W, U, be), repeat=5)
                row[f"{be}_vs_naive"] = row["gpu_naive_s"] / row[f"{be}_s"]
                row[f"{be}_rel_err"] = err
            rows.append(row)
            print(markdown_table([row], list(row)), flush=True)
        del a, W, U
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows")
    args = parser.parse_args(argv)
    shapes = [(49152, 576, 64, 8), (128256, 4096, 16, 4)]
    if args.quick:
        shapes = [(8192, 256, 16, 4), (16384, 512, 8, 4)]
    if args.gpu_only:
        rows = gpu_rows(shapes)
        write_results("softmax_fisher_gpu", rows, meta={"quick": args.quick})
        return {"rows": rows}
    backends = [name for name in ("reference", "cpu") if available_backends()[name].available]
    rows = []
    for V, d, B, k in shapes:
        a, W, U = make_inputs(V, d, B, k)
        repeat = 3 if V * d < 5e7 else 2
        ops = {
            "lm_logsumexp": (B, lambda: naive_lse(a, W), lambda be: lm_logsumexp(a, W, backend=be)),
            "matmat": (B * (k + 2) + k, lambda: naive_matmat(a, W, U),
                       lambda be: softmax_fisher_matmat(a, W, U, backend=be)),
            "quad": (B + k, lambda: naive_quad(a, W, U), lambda be: softmax_fisher_quad(a, W, U, backend=be)),
        }
        for op, (n, naive, ours) in ops.items():
            X = torch.randn(V, n)
            t_floor = timeit(lambda: W.T @ X, repeat=repeat)
            del X
            t_naive = timeit(naive, repeat=repeat)
            row = {"op": op, "V": V, "d": d, "B": B, "k": k, "floor_s": t_floor, "naive_s": t_naive}
            for be in backends:
                t = timeit(lambda: ours(be), repeat=repeat)
                row[f"{be}_s"] = t
                row[f"{be}_vs_naive"] = t_naive / t  # speed-up (goal ≥ 1)
                row[f"{be}_vs_floor"] = t / t_floor  # goal ≤ 1.3
            rows.append(row)
            print(markdown_table([row], list(row)), flush=True)
        if (V, d) == shapes[-1][:2]:
            mem = {"op": "matmat peak extra memory (MiB)", "V": V, "d": d, "B": B, "k": k}
            mem["naive_MiB"] = peak_memory(lambda: naive_matmat(a, W, U)) / 2 ** 20
            for be in backends:
                mem[f"{be}_MiB"] = peak_memory(lambda: softmax_fisher_matmat(a, W, U, backend=be)) / 2 ** 20
                mem[f"{be}_vs_naive"] = mem[f"{be}_MiB"] / mem["naive_MiB"]  # goal ≤ 0.1
            rows.append(mem)
            print(markdown_table([mem], list(mem)), flush=True)
        del a, W, U

    # gram: exact vs tail_tol=1e-3 on peaked distributions.
    V, d, B = (8192, 256, 4) if args.quick else (49152, 576, 8)
    a, W, _ = make_inputs(V, d, B, 1, peaked=True)
    t_naive = timeit(lambda: naive_gram(a, W), repeat=2)
    t_exact = timeit(lambda: softmax_fisher_gram(a, W, backend=backends[-1]), repeat=2)
    t_mean = timeit(lambda: softmax_fisher_gram(a, W, reduce="mean", backend=backends[-1]), repeat=2)
    trunc = softmax_fisher_gram_topk(a, W, tail_tol=1e-3, backend=backends[-1])
    t_tail = timeit(lambda: softmax_fisher_gram_topk(a, W, tail_tol=1e-3, backend=backends[-1]), repeat=3)
    G = softmax_fisher_gram(a, W, backend=backends[-1])
    err = float(torch.linalg.matrix_norm(G - trunc.G, 2).max() / torch.linalg.matrix_norm(G, 2).max())
    grow = {"op": "gram (peaked)", "V": V, "d": d, "B": B, "naive_s": t_naive, "exact_s": t_exact,
            "mean_s": t_mean, "tail1e-3_s": t_tail, "tail_speedup": t_exact / t_tail,
            "mean_n_kept": float(trunc.n_kept.double().mean()), "max_tau": float(trunc.tau.max()),
            "rel_err_2norm": err, "backend": backends[-1]}
    rows.append(grow)
    print(markdown_table([grow], list(grow)), flush=True)
    rows += gpu_rows(shapes)
    write_results("softmax_fisher", rows, meta={"quick": args.quick})
    return {"rows": rows}


if __name__ == "__main__":
    main()
