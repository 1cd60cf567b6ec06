"""softmax-Fisher ops on real-head statistics against float64 formulas (issue 18):
a head whose rows share a strong mean direction and whose logits are peaky
(one row with p ≈ 0.99 and a long flat tail), at V = 262,144, and the
embedded SmolLM2 head with real head inputs (slow).

Why these heads: a float32 running sum that meets the peak early holds ≈ 1,
and every later tail term (e^{z−m} ≈ 4e-8 here, below half an ulp of 1) is
then lost; with thousands of tail terms per lane the old sweeps lost 7e-4 of
the normalizer (random heads with flat logits never show it).

Error model (float32 inputs, ε = 2^-24 ≈ 6e-8): (i) the float32 logit GEMM
rounds each z_v by ≲ ε·√d·‖a‖‖w_v‖ ≈ 1.2e-5·… in the worst case, ≈ ε·‖a‖‖w‖
≈ 2e-6 in practice here, which moves lse and p by as much; (ii) every sum over
V runs in float32 blocks of ≤ 4,096 terms (256 in the C++ sweeps) whose totals
are added in float64 or merged per split, a few ε·log₂(block) ≈ 1e-6; (iii)
the centered projections ŷ = y − ȳ lose ε·‖mean row‖/spread ≈ 10ε relative.
Sum: ≲ 5e-6 on lse (absolute) and on the contractions (relative), whatever
the chunk length and V; the issue's targets, 1e-5, are the tolerances (the
old kernels failed them by 30–70×). (iv) Merging chunk partials into the
running (m, l, μ, ȳ, co-moments) adds one rounding of the running state per
chunk, V/C of them: in float32 that is up to (V/C)·ε — with C = 1 on the
peaky head every tail term (4e-8 < ε/2 of l ≈ 1) is lost outright, and
SmolLM2 lost 1.5e-4 of lse — so the running state is float64 and the merges
add ≲ (V/C)·2^-53 ≈ 1e-11; small chunks get the same tolerances.
gram_topk: its kept set is compared exactly (the data are fixed, no tie lies
within the error above), τ = 1 − Σ_S p moves by ≤ Σ_S p·|δ log p| ≲ 5e-6
(absolute) and G_S by the contraction error (relative).
"""
from __future__ import annotations

import os

import pytest
import torch

from fisherfast.ops import (lm_logsumexp, softmax_fisher_gram, softmax_fisher_gram_topk, softmax_fisher_matmat,
                            softmax_fisher_quad)

LSE_TOL = 1e-5  # absolute
REL_TOL = 1e-5  # relative (Frobenius)
ALL_OPS = ("lse", "gram", "matmat", "quad", "gram_topk")


def peaky_head(V, d=48, B=3, seed=0):
    """Rows m + 0.1·g/√d (‖m‖ = 1: the shared mean direction dominates each
    row); a = 5m + 4u_i; one hot row per token 17 logits above the flat bulk,
    placed in V's first quarter (so sums that meet it early lose the tail)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, generator=g, dtype=torch.float64)
    m /= m.norm()
    W = m + 0.1 * torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5
    u = torch.randn(B, d, generator=g, dtype=torch.float64)
    u -= (u @ m)[:, None] * m
    u /= u.norm(dim=1, keepdim=True)
    a = 5.0 * m + 4.0 * u
    hot = torch.randint(0, V // 4, (B,), generator=g)
    W[hot] += (17.0 / 4.0) * u
    return W.float(), a.float()


def float64_oracle(a, W):
    """(lse, G (B,d,d)) in float64: G_i = Σ_v p_iv (w_v − μ_i)(w_v − μ_i)ᵀ."""
    a64, W64 = a.double(), W.double()
    z = a64 @ W64.T
    p = torch.softmax(z, dim=1)
    mu = p @ W64
    G = torch.stack([((W64 - mu[i]) * p[i, :, None]).T @ (W64 - mu[i]) for i in range(a.shape[0])])
    return torch.logsumexp(z, dim=1), G


def float64_topk_oracle(a, W, tail_tol):
    """(G_S (B,d,d), τ (B,), |S| (B,)) in float64 by the definition: per token
    the smallest set S of largest-p rows with 1 − Σ_S p ≤ tail_tol, and
    G_S = Σ_S p (w − μ_S)(w − μ_S)ᵀ with μ_S = Σ_S p w / Σ_S p."""
    W64 = W.double()
    p = torch.softmax(a.double() @ W64.T, dim=1)
    out = []
    for pi in p:
        ps, order = torch.sort(pi, descending=True)
        n = int(((torch.cumsum(ps, 0) - ps) < 1.0 - tail_tol).sum())
        R, q = W64[order[:n]], ps[:n]
        D = R - (q @ R) / q.sum()
        out.append(((q[:, None] * D).T @ D, 1.0 - float(q.sum()), n))
    return torch.stack([o[0] for o in out]), torch.tensor([o[1] for o in out]), torch.tensor([o[2] for o in out])


def rel(x, y):
    return float((x.cpu().double() - y).norm() / y.norm())


def check_ops(a, W, lse, G, U, backend, chunk, ops=("lse", "gram", "matmat", "quad"), topk=None):
    """topk: (tail_tol, float64_topk_oracle(a, W, tail_tol)) for "gram_topk"."""
    kw = dict(backend=backend, chunk=chunk)
    U64 = U.double()
    if "lse" in ops:
        err = float((lm_logsumexp(a, W, **kw).cpu().double() - lse).abs().max())
        assert err <= LSE_TOL, f"lse off by {err:.2e} ({backend}, chunk={chunk})"
    if "gram" in ops:
        assert rel(softmax_fisher_gram(a, W, **kw), G) <= REL_TOL
        assert rel(softmax_fisher_gram(a[:1], W, **kw), G[:1]) <= REL_TOL  # B = 1: whole-V chunks by default
    if "matmat" in ops:
        assert rel(softmax_fisher_matmat(a, W, U, **kw), G @ U64) <= REL_TOL
    if "quad" in ops:
        assert rel(softmax_fisher_quad(a, W, U, **kw), U64.T @ G @ U64) <= REL_TOL
    if "gram_topk" in ops:
        tail_tol, (G_S, tau, n_kept) = topk
        got = softmax_fisher_gram_topk(a, W, tail_tol=tail_tol, **kw)
        assert torch.equal(got.n_kept.cpu(), n_kept)
        assert float((got.tau.cpu().double() - tau).abs().max()) <= LSE_TOL
        if int(n_kept.max()) > 1:
            assert rel(got.G, G_S) <= REL_TOL
        else:  # one kept row per token: G_S = 0 up to the rounding of μ_S (compared at G's scale)
            assert float(got.G.cpu().double().norm()) <= REL_TOL * float(G.norm())


PEAKY_TAIL_TOL = 0.5  # keeps the hot row alone (p > 0.98): τ tests the normalizer, G_S = 0


def _peaky_case(V):
    W, a = peaky_head(V)
    lse, G = float64_oracle(a, W)
    U = torch.randn(W.shape[1], 3, generator=torch.Generator().manual_seed(1))
    return W, a, lse, G, U, (PEAKY_TAIL_TOL, float64_topk_oracle(a, W, PEAKY_TAIL_TOL))


@pytest.fixture(scope="module")
def big_peaky_head():
    return _peaky_case(262_144)


@pytest.fixture(scope="module")
def small_peaky_head():
    return _peaky_case(8_192)


def _check_peaky(case, name, chunk):
    W, a, lse, G, U, topk = case
    p = torch.softmax(a.double() @ W.double().T, dim=1)
    assert float(p.max(dim=1).values.min()) > 0.98  # the statistics the test is about
    check_ops(a, W, lse, G, U, name, chunk, ops=ALL_OPS, topk=topk)


@pytest.mark.parametrize("chunk", [None, 262_144, 1024, 64], ids=["default", "whole_vocabulary", "small", "64"])
@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_peaky_shared_mean_head_at_V_262144(big_peaky_head, name, chunk):
    _check_peaky(big_peaky_head, name, chunk)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_peaky_shared_mean_head_with_tiny_chunks(small_peaky_head, name, chunk):
    """Chunks of 1 and 7 logits: V/C merges per token, each rounding the running
    state once (error model (iv)). V = 8,192 because each chunk costs a Python
    step and a GEMM call (V = 262,144 at C = 1 would take minutes); 8,192
    merges still lose the whole tail (1–2% of l) with a float32 running state."""
    _check_peaky(small_peaky_head, name, chunk)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter off (TRITON_INTERPRET=1)")
def test_peaky_shared_mean_head_triton_interpreter():
    """The interpreter needs ~50 s for lse alone at V = 262,144, so V = 8,192
    here (8 splits of ≤ 1,024 rows: the same split-and-merge path)."""
    pytest.importorskip("triton")
    W, a = peaky_head(8_192, B=2)
    lse, G = float64_oracle(a, W)
    U = torch.randn(W.shape[1], 3, generator=torch.Generator().manual_seed(1))
    check_ops(a, W, lse, G, U, "triton", None, ops=("lse", "quad"))


@pytest.fixture(scope="module")
def smollm2_head():
    from fisherfast.models import load_default

    model, tok = load_default()
    ids = tok("The capital of France is Paris, and the capital of Japan is", return_tensors="pt").input_ids
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[0]  # final normed hidden states: the head inputs
    W = model.lm_head.weight.detach()
    a = h[[-1, 3, 7]].contiguous()  # the last token first (the B = 1 case), then two more
    lse, G = float64_oracle(a, W)
    U = torch.randn(W.shape[1], 4, generator=torch.Generator().manual_seed(2))
    tail_tol = 0.1  # a real distribution: keeps several rows per token
    return W, a, lse, G, U, (tail_tol, float64_topk_oracle(a, W, tail_tol))


@pytest.mark.slow
# chunk = 1 is left to the peaky head at V = 8,192 above (its cross-chunk merges are the same
# code; on V = 49,152 one Python step per row takes 1–2.5 minutes per backend).
@pytest.mark.parametrize("chunk", [None, 49_152, 1024, 64, 7],
                         ids=["default", "whole_vocabulary", "small", "64", "7"])
@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_smollm2_head_with_real_head_inputs(smollm2_head, name, chunk):
    W, a, lse, G, U, topk = smollm2_head
    check_ops(a, W, lse, G, U, name, chunk, ops=ALL_OPS, topk=topk)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_peaky_shared_mean_head_on_the_gpu(big_peaky_head, name):
    """The GPU kernels at V = 262,144 (splits of ≤ SPLIT_ROWS rows, float64
    partial sums, IEEE float32 tl.dot); the same error model and tolerances."""
    from fisherfast.ops import available_backends

    if not available_backends()[name].available:
        pytest.skip(available_backends()[name].reason)
    W, a, lse, G, U, _ = big_peaky_head
    ops = ("lse", "matmat") if name == "cuda" else ("lse", "gram", "matmat", "quad")
    check_ops(a.cuda(), W.cuda(), lse, G, U.cuda(), name, None, ops=ops)
