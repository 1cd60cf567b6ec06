"""Every Triton and CUDA kernel on a real GPU, at model scale, against
independent oracles (marker ``gpu``; skipped without a CUDA device).

The backend-parametrized tests of tests/ops run the same kernels on small
shapes (on CUDA tensors when a GPU is present); these add the shapes the
kernels are built for — SmolLM2's head (V = 49,152, d = 576) and a Llama-3
sized d = 4096 — where tiling, split counts and float32 accumulation over
long V matter. Oracles: the dense float64 softmax-Fisher formula (centered,
on the GPU), scipy's Hadamard matrix via the Sylvester identity (through the
float64 reference fwht, itself tested against scipy), and the reference
backend for srht and fisher_sketch_update.

Run them all, with the benches' GPU rows, by ``bash bench/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

from fisherfast.ops import (SRHTPlan, available_backends, fisher_sketch_update, fwht, lm_logsumexp,
                            softmax_fisher_gram, softmax_fisher_gram_topk, softmax_fisher_matmat, softmax_fisher_quad,
                            srht)
from fisherfast.ops.softmax_fisher import _OPS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

GPU_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not available_backends()[name].available,
                                                            reason=available_backends()[name].reason), id=name)
                for name in ("triton", "cuda")]
# (V, d, B, k): SmolLM2-135M's head, and a d = 4096 head on a 32k vocabulary.
SHAPES = [(49152, 576, 8, 8), (32000, 4096, 4, 20)]


def rel(x, y) -> float:
    return float((x.double() - y).norm() / y.norm())


def head(V, d, B, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(V, d, generator=g, device="cuda") / d ** 0.5 + 0.05 * torch.randn(d, generator=g, device="cuda")
    a = 3.0 * torch.randn(B, d, generator=g, device="cuda")
    b = torch.randn(V, generator=g, device="cuda")
    U = torch.randn(d, k, generator=g, device="cuda")
    Ub = torch.randn(B, d, k, generator=g, device="cuda")
    return tuple(x.to(dtype) for x in (a, W, b, U, Ub))


def dense_float64(a, W, b):
    """lse, and G_i = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ per token in float64."""
    W64 = W.double()
    z = a.double() @ W64.T + b.double()
    p = torch.softmax(z, dim=-1)
    mu = p @ W64
    G = torch.stack([((W64 - m) * pi[:, None]).T @ (W64 - m) for pi, m in zip(p, mu)])
    return torch.logsumexp(z, -1), G, p


def truncated_float64(W, p, tail_tol):
    """Per token: the smallest top-p set S with 1 − Σ_S p ≤ tail_tol and G_S in float64."""
    W64, out, ns = W.double(), [], []
    for pi in p:
        ps, order = torch.sort(pi, descending=True)
        n = int((torch.cumsum(ps, 0) < 1 - tail_tol).sum()) + 1
        rows, pS = W64[order[:n]], ps[:n]
        D = rows - (pS @ rows) / pS.sum()
        out.append((pS[:, None] * D).T @ D)
        ns.append(n)
    return torch.stack(out), torch.tensor(ns, device=W.device)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[0]}-d{s[1]}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_softmax_fisher_kernels_match_float64(backend, shape, dtype, tol):
    a, W, b, U, Ub = head(*shape, dtype)
    lse, G, p = dense_float64(a, W, b)
    U64, Ub64 = U.double(), Ub.double()
    kw = dict(backend=backend)
    assert rel(lm_logsumexp(a, W, b, **kw), lse) <= (1e-5 if dtype == torch.float32 else tol)
    assert rel(softmax_fisher_matmat(a, W, U, b, **kw), G @ U64) <= tol
    assert rel(softmax_fisher_matmat(a, W, Ub, b, **kw), G @ Ub64) <= tol
    if backend in _OPS["quad"]:
        assert rel(softmax_fisher_quad(a, W, U, b, **kw), U64.T @ G @ U64) <= tol
    if backend in _OPS["gram"] and W.shape[1] <= 1024:  # Triton's exact gram is matmat with U = I_d: d/16 passes
        assert rel(softmax_fisher_gram(a, W, b, **kw), G) <= tol
        assert rel(softmax_fisher_gram(a, W, b, reduce="mean", **kw), G.mean(0)) <= tol
        T = softmax_fisher_gram_topk(a, W, b, tail_tol=1e-2, **kw)
        G_S, n = truncated_float64(W, p, 1e-2)
        assert bool((T.tau <= 1e-2 + 1e-6).all()) and torch.equal(T.n_kept, n) and rel(T.G, G_S) <= tol
        # G_S ⪯ G: the dropped part is PSD (docs/design.md §3).
        gap = torch.linalg.eigvalsh(G - T.G.double())
        assert float(gap.min()) >= -tol * float(torch.linalg.matrix_norm(G, 2).max())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_tensors_dispatch_to_a_gpu_kernel_in_float64(backend):
    """float64 inputs: the cuda kernels compute in float64 (near exact); Triton in float32."""
    a, W, b, U, _ = head(8192, 256, 4, 4, torch.float64, seed=1)
    lse, G, _ = dense_float64(a, W, b)
    tol = 1e-12 if backend == "cuda" else 1e-5
    assert rel(lm_logsumexp(a, W, b, backend=backend), lse) <= tol
    assert rel(softmax_fisher_matmat(a, W, U, b, backend=backend), G @ U) <= tol


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("log2_n", [10, 15, 20])
def test_fwht_kernels_match_float64(backend, log2_n):
    x = torch.randn(16, 1 << log2_n, device="cuda")
    expected = fwht(x.double(), backend="reference")
    assert rel(fwht(x, backend=backend), expected) <= 2 * log2_n * 2.0 ** -24
    y = x.clone()
    fwht(y, inplace=True, normalized=True, backend=backend)
    assert rel(y, expected / 2 ** (log2_n / 2)) <= 2 * log2_n * 2.0 ** -24 + 2.0 ** -24


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_srht_and_fisher_sketch_match_reference(backend):
    d, K, m, B = 576, 49152, 1024, 32
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(B, d, generator=g, device="cuda")
    plan = SRHTPlan(d, m, seed=3)
    assert rel(srht(x, plan, backend=backend), srht(x.double(), plan, backend="reference")) <= 1e-5
    plans = (SRHTPlan(d, m, 1), SRHTPlan(d, m, 2), SRHTPlan(K, m, 3), SRHTPlan(K, m, 4))
    W = torch.randn(K, d, generator=g, device="cuda") / d ** 0.5
    y = torch.randint(0, K, (B,), generator=g, device="cuda")
    out = {}
    for name in (backend, "reference"):
        sums = torch.zeros(3, m, dtype=torch.float64, device="cuda")
        sumsqs = torch.zeros_like(sums)
        fisher_sketch_update(sums, sumsqs, x, plans, W=W, y=y, backend=name)
        out[name] = (sums, sumsqs)
    for got, expected in zip(out[backend], out["reference"]):
        scale = expected.abs().amax(dim=1, keepdim=True)
        assert float(((got - expected).abs() / scale).max()) <= 1e-4
