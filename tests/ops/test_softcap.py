"""Soft-capped softmax-Fisher ops (``softcap=c``: z′ = c·tanh(z/c)) against two
independent float64 oracles: the dense formula J_capᵀ (diag p − p pᵀ) J_cap
with J_cap = diag(1 − tanh²(z/c)) W written out, and the Jacobian of the
capped logits a ↦ c·tanh((W a + b)/c) from torch.func.jacrev.

Error model: float32 inputs, logits of size ≤ ~10, V = 300 in chunks of 64;
every output is a p-weighted covariance summed over ≤ 64 rows per chunk in
float32 and across chunks in float64, so the relative error is a few ε₃₂·√64
≈ 1e-6; FP32_TOL = 1e-5 leaves a margin of ten. float64 inputs: 1e-12
(Triton: float32 arithmetic whatever the input, so FP32_TOL).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from fisherfast.ops import (lm_logsumexp, softmax_fisher_gram, softmax_fisher_gram_topk, softmax_fisher_matmat,
                            softmax_fisher_quad)
from fisherfast.ops import _backends
from fisherfast.ops.softmax_fisher import capabilities

FP32_TOL = 1e-5
CAP = 3.0  # logits of size up to ~10 below: tanh saturates for many rows


def rel(x, y):
    x, y = x.cpu().double(), y.cpu().double()
    return float((x - y).norm() / y.norm())


def make(B=4, V=300, d=12, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) + 1.5 * torch.randn(d, generator=g, dtype=torch.float64)
    a = 2.0 * torch.randn(B, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    U = torch.randn(d, k, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (a, W, b, U)]


def capped_oracle(a, W, b, c=CAP):
    """(lse, G (B,d,d), p) in float64 from the dense formula, G checked against jacrev."""
    a, W, b = a.double(), W.double(), b.double()
    z = a @ W.T + b
    zc = c * torch.tanh(z / c)
    p = torch.softmax(zc, dim=-1)
    s = 1 - torch.tanh(z / c) ** 2
    F = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    J = s[:, :, None] * W  # (B,V,d): J_cap per token
    G = J.transpose(1, 2) @ F @ J
    for i in range(a.shape[0]):  # the formula is the Jacobian of the capped logits
        J_ad = torch.func.jacrev(lambda x: c * torch.tanh((W @ x + b) / c))(a[i])
        assert torch.allclose(J_ad, J[i], rtol=1e-12, atol=1e-14)
    return torch.logsumexp(zc, 1), G, p


def run_quietly(fn):
    """Forced backends without the softcap capability run the reference with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softcap_ops_match_the_capped_jacobian_oracle(backend, dtype):
    a, W, b, U = make(dtype=dtype)
    lse, G, p = capped_oracle(a, W, b)
    # Triton computes in float32 whatever the input dtype (its tl.dot and tiles).
    tol = FP32_TOL if dtype == torch.float32 or backend.name == "triton" else 1e-12
    dev = backend.device
    a, W, b, U = (x.to(dev) for x in (a, W, b, U))
    Ub = torch.randn(a.shape[0], *U.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(dev)
    kw = dict(chunk=64, backend=backend.name, softcap=CAP)
    z = a @ W.T + b
    U64, Ub64 = U.cpu().double(), Ub.cpu().double()

    def check():
        assert float((lm_logsumexp(a, W, b, **kw).cpu().double() - lse).abs().max()) <= 10 * tol
        assert rel(softmax_fisher_matmat(a, W, U, b, **kw), G @ U64) <= tol
        assert rel(softmax_fisher_matmat(None, W, Ub, logits=z, **kw), G @ Ub64) <= tol
        assert rel(softmax_fisher_quad(a, W, U, b, **kw), U64.T @ G @ U64) <= tol
        assert rel(softmax_fisher_quad(None, W, U, logits=z, **kw), U64.T @ G @ U64) <= tol
        assert rel(softmax_fisher_gram(a, W, b, **kw), G) <= tol
        assert rel(softmax_fisher_gram(a, W, b, reduce="mean", **kw), G.mean(0)) <= tol
        assert rel(softmax_fisher_gram(None, W, logits=z, reduce="mean", **kw), G.mean(0)) <= tol
        assert rel(softmax_fisher_gram(a[1], W, b, **kw), G[1]) <= tol
        # tail_tol below the smallest p keeps every row: the truncated metric is G itself.
        T = softmax_fisher_gram_topk(a, W, b, tail_tol=1e-9, **kw)
        assert int(T.n_kept.min()) == W.shape[0] and rel(T.G, G) <= tol

    run_quietly(check)


def test_softcap_truncated_gram_keeps_capped_rows():
    """G_S of the capped metric: the kept rows are s_v w_v, centered at their p-mean."""
    a, W, b, _ = make(B=3, seed=3)
    _, _, p = capped_oracle(a, W, b)
    z = a.double() @ W.double().T + b.double()
    s = 1 - torch.tanh(z / CAP) ** 2
    T = softmax_fisher_gram_topk(a, W, b, tail_tol=0.3, softcap=CAP, backend="reference")
    for i in range(3):
        order = torch.argsort(p[i], descending=True)
        n = int(T.n_kept[i])
        keep = order[:n]
        assert float(p[i, order[:n - 1]].sum()) < 0.7 <= float(p[i, keep].sum()) + 1e-12
        R = s[i, keep, None] * W.double()[keep]
        pk = p[i, keep]
        D = R - (pk @ R) / pk.sum()
        assert rel(T.G[i], (pk[:, None] * D).T @ D) <= FP32_TOL


def test_large_cap_is_the_uncapped_op_and_masks_stay_masked():
    a, W, b, U = make()
    kw = dict(chunk=64, backend="reference")
    # c = 1e6: z′ − z = O(z³/c²) ≈ 1e-9 and s − 1 = O(z²/c²): the plain op to float32 accuracy.
    assert rel(softmax_fisher_gram(a, W, b, softcap=1e6, **kw), softmax_fisher_gram(a, W, b, **kw)) <= FP32_TOL
    # A −inf logit is a mask: probability 0 under the cap too (not c·tanh(−inf) = −c).
    z = (a @ W.T + b).double()
    z[:, :7] = -float("inf")
    lse_cap = lm_logsumexp(a.double(), W.double(), b.double(), softcap=CAP, **kw)
    G = softmax_fisher_gram(None, W.double(), logits=z, softcap=CAP, **kw)
    G_rest = softmax_fisher_gram(None, W.double()[7:], logits=z[:, 7:], softcap=CAP, **kw)
    assert rel(G, G_rest) <= 1e-12
    assert torch.isfinite(lse_cap).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "3"])
def test_bad_softcap_is_named(bad):
    a, W, b, U = make()
    for call in (lambda: lm_logsumexp(a, W, b, softcap=bad),
                 lambda: softmax_fisher_matmat(a, W, U, b, softcap=bad),
                 lambda: softmax_fisher_quad(a, W, U, b, softcap=bad),
                 lambda: softmax_fisher_gram(a, W, b, softcap=bad),
                 lambda: softmax_fisher_gram_topk(a, W, b, tail_tol=0.1, softcap=bad)):
        with pytest.raises(ValueError, match="softcap"):
            call()


def test_dispatcher_falls_back_for_a_missing_capability():
    """A backend that lacks what a call needs is skipped by the automatic choice
    and, when forced, replaced by the reference with a warning naming the gap."""
    impls = {"reference": lambda: "reference", "cpu": lambda: "cpu"}
    lacks = {"reference": [], "cpu": ["softcap"]}.get
    cpu = torch.device("cpu")
    assert _backends.select("op", impls, cpu, None, lacks=lacks)() == "reference"
    with pytest.warns(RuntimeWarning, match="'cpu' does not implement softcap; running the reference"):
        assert _backends.select("op", impls, cpu, "cpu", lacks=lacks)() == "reference"
    assert _backends.select("op", impls, cpu, "cpu", lacks=lambda name: [])() == "cpu"
    # The table says what each backend of each op implements; the reference has everything.
    for op in ("lm_logsumexp", "matmat", "quad", "gram", "gram_topk"):
        assert capabilities(op)["reference"] == {"logits", "per_token_U", "softcap"}
