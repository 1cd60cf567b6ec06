"""softmax-Fisher contractions vs the dense float64 formula with F = diag p − p pᵀ
materialized (docs/design.md §3), on every backend that can run here."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fisherfast.ops import (TruncatedGram, available_backends, lm_logsumexp, softmax_fisher_gram,
                            softmax_fisher_matmat, softmax_fisher_quad)

BACKENDS = [name for name in ("reference", "cpu") if available_backends()[name].available]
_TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter (conftest)


def dense_G(h, W, b=None, logits=None):
    """G_i = Wᵀ (diag p_i − p_i p_iᵀ) W in float64, F materialized."""
    W64 = W.double()
    z = logits.double() if logits is not None else h.double() @ W64.T + (0 if b is None else b.double())
    p = torch.softmax(z, dim=-1)
    F = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return W64.T @ F @ W64, p


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(B=5, V=300, d=12, k=3, dtype=torch.float32, seed=0, offset=2.0, scale=1.0, bias=True):
    """Rows with a common component (like a real unembedding: |mean row| > spread)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) + offset * torch.randn(d, generator=g, dtype=torch.float64))
    h = scale * torch.randn(B, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    U = torch.randn(d, k, generator=g, dtype=torch.float64)
    Ub = torch.randn(B, d, k, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(W), cast(b), cast(U), cast(Ub)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_all_ops_match_dense_float64_in_fp32(backend, bias):
    h, W, b, U, Ub = make(bias=bias)
    G, p = dense_G(h, W, b)
    kw = dict(chunk=64, backend=backend)  # 300 = 4·64 + 44: several chunks and a ragged one
    z64 = h.double() @ W.double().T + (0 if b is None else b.double())
    assert rel(lm_logsumexp(h, W, b, **kw), torch.logsumexp(z64, 1)) <= 1e-6
    assert rel(softmax_fisher_matmat(h, W, U, b, **kw), G @ U.double()) <= 1e-5
    assert rel(softmax_fisher_matmat(h, W, Ub, b, **kw), G @ Ub.double()) <= 1e-5
    assert rel(softmax_fisher_quad(h, W, U, b, **kw), U.double().T @ G @ U.double()) <= 1e-5
    assert rel(softmax_fisher_quad(h, W, Ub, b, **kw), Ub.double().transpose(1, 2) @ G @ Ub.double()) <= 1e-5
    assert rel(softmax_fisher_gram(h, W, b, **kw), G) <= 1e-5
    assert rel(softmax_fisher_gram(h, W, b, reduce="mean", **kw), G.mean(0)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_exact_and_single_token_and_default_chunk(backend):
    h, W, b, U, _ = make(dtype=torch.float64, seed=1)
    G, _ = dense_G(h, W, b)
    assert rel(softmax_fisher_matmat(h, W, U, b, backend=backend), G @ U) <= 1e-12
    assert rel(softmax_fisher_matmat(h[2], W, U, b, backend=backend), G[2] @ U) <= 1e-12
    assert softmax_fisher_quad(h[2], W, U, b, backend=backend).shape == (3, 3)
    assert rel(softmax_fisher_gram(h[2], W, b, backend=backend), G[2]) <= 1e-12
    assert lm_logsumexp(h[2], W, b, backend=backend).shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_given_variants(backend):
    h, W, b, U, Ub = make(seed=2)
    z = h @ W.T + b
    G, _ = dense_G(None, W, logits=z)
    kw = dict(logits=z, chunk=70, backend=backend)
    assert rel(softmax_fisher_matmat(None, W, Ub, **kw), G @ Ub.double()) <= 1e-5
    assert rel(softmax_fisher_quad(None, W, U, **kw), U.double().T @ G @ U.double()) <= 1e-5
    assert rel(softmax_fisher_gram(None, W, **kw), G) <= 1e-5
    # -inf logits (masked tokens) carry zero probability.
    z_masked = z.clone()
    z_masked[:, :50] = -float("inf")
    Gm, _ = dense_G(None, W, logits=z_masked)
    assert rel(softmax_fisher_matmat(None, W, U, logits=z_masked, chunk=40, backend=backend), Gm @ U.double()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs_computed_in_fp32(backend):
    h, W, b, U, _ = make(dtype=torch.float16, seed=3, offset=0.5)
    G, _ = dense_G(h, W, b)  # the oracle sees the same (rounded) fp16 inputs
    out = softmax_fisher_matmat(h, W, U, b, chunk=64, backend=backend)
    assert out.dtype == torch.float16
    assert rel(out, G @ U.double()) <= 2e-3  # fp16 output rounding (2^-11)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"] * available_backends()["triton"].available)
def test_half_precision_W_in_every_op(backend):
    """quad, gram (exact and truncated) and lse on fp16 inputs against the
    float64 formula on the same rounded values (reference and triton read the
    fp16 W as it is; cpu gets a float32 copy)."""
    h, W, b, U, _ = make(dtype=torch.float16, seed=5, offset=0.5)
    G, _ = dense_G(h, W, b)
    device = _TRITON_DEVICE if backend == "triton" else "cpu"
    h, W, b, U = (x.to(device) for x in (h, W, b, U))
    torch.testing.assert_close(lm_logsumexp(h, W, b, backend=backend).cpu().double(),
                               torch.logsumexp(h.double() @ W.double().T + b.double(), -1).cpu(), rtol=2e-3, atol=2e-3)
    U64 = U.cpu().double()
    assert rel(softmax_fisher_quad(h, W, U, b, chunk=64, backend=backend).cpu(), U64.T @ G @ U64) <= 2e-3
    assert rel(softmax_fisher_gram(h, W, b, chunk=64, backend=backend).cpu(), G) <= 2e-3
    T = softmax_fisher_gram(h, W, b, tail_tol=0.5, chunk=64, backend=backend)
    assert T.G.dtype == torch.float16 and bool((T.tau <= 0.5).all()) and bool((T.n_kept < W.shape[0]).all())


def test_half_W_is_never_copied_whole_on_the_reference_backend():
    """A float16 W is cast one V-chunk at a time: the peak of torch allocations
    stays far below the float32 copy of W (8 MiB here) that a cast up front makes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from _harness import peak_memory

    g = torch.Generator().manual_seed(0)
    V, d, B = 8192, 256, 4
    W = (torch.randn(V, d, generator=g) / d ** 0.5).half()
    h, U = torch.randn(B, d, generator=g).half(), torch.randn(d, 2, generator=g).half()
    full_copy = V * d * 4
    for run in (lambda: lm_logsumexp(h, W, chunk=256, backend="reference"),
                lambda: softmax_fisher_matmat(h, W, U, chunk=256, backend="reference"),
                lambda: softmax_fisher_gram(h, W, reduce="mean", chunk=256, backend="reference")):
        assert peak_memory(run) < full_copy / 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e4_are_stable(backend):
    # The softmax is shift-invariant: a bias of 1e4 (float64) must give the
    # unshifted answer; float32 logits of ±1e4 per token agree with float64 on
    # the same logits; a 1e4 spread (one-hot p) stays finite.
    h, W, b, U, _ = make(dtype=torch.float64, seed=4)
    G, _ = dense_G(h, W, b)
    big = b + 1e4
    assert rel(lm_logsumexp(h, W, big, chunk=64, backend=backend) - 1e4,
               torch.logsumexp(h @ W.T + b, 1)) <= 1e-12
    assert rel(softmax_fisher_matmat(h, W, U, big, chunk=64, backend=backend), G @ U) <= 1e-10
    assert rel(softmax_fisher_gram(h, W, big, reduce="mean", chunk=64, backend=backend), G.mean(0)) <= 1e-10
    z32 = (h @ W.T + b + 1e4 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)[:, None]).float()
    W32, U32 = W.float(), U.float()
    G32, _ = dense_G(None, W32, logits=z32)
    assert rel(softmax_fisher_quad(None, W32, U32, logits=z32, chunk=64, backend=backend),
               U32.double().T @ G32 @ U32.double()) <= 1e-5
    assert rel(softmax_fisher_gram(None, W32, logits=z32, chunk=64, backend=backend), G32) <= 1e-5
    spread = softmax_fisher_matmat(h.float() * 1e4, W32, U32, chunk=64, backend=backend)
    assert bool(torch.isfinite(spread).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_symmetric_psd(backend):
    h, W, b, U, Ub = make(seed=5, d=16, k=6)
    for out in (softmax_fisher_gram(h, W, b, chunk=64, backend=backend),
                softmax_fisher_gram(h, W, b, reduce="mean", chunk=64, backend=backend)[None],
                softmax_fisher_quad(h, W, Ub, b, chunk=64, backend=backend)):
        assert torch.equal(out, out.transpose(-1, -2))
        eig = torch.linalg.eigvalsh(out.double())
        assert float(eig.min()) >= -1e-6 * float(eig.max())
    # vᵀ G v = Var_p(w·v) ≥ 0 (docs/design.md §3), via quad with a single column.
    v = U[:, :1]
    q = softmax_fisher_quad(h, W, v, b, backend=backend)[:, 0, 0]
    _, p = dense_G(h, W, b)
    s = W.double() @ v.double()[:, 0]
    var = (p * s ** 2).sum(1) - (p @ s) ** 2
    assert rel(q, var) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_mean_centered_on_peaked_distinct_tokens(backend):
    # Each token peaked on a different row: the within-token metrics are tiny
    # next to the spread of the means (‖G‖ ≈ 1e-3 vs ‖Cov(μ_i)‖ ≈ 1e2).
    _, W, _, _, _ = make(B=6, V=200, d=10, seed=6, offset=3.0, bias=False)
    # Logits given in fp32, oracle on the same logits: p's own conditioning
    # (relative error ε·|z| from rounding z ≈ 200) is then out of the picture.
    z32 = ((W[[3, 50, 90, 120, 160, 199]].double() * 2.0) @ W.double().T).float()  # z_top − z_rest ≫ 1
    G, p = dense_G(None, W, logits=z32)
    assert float(p.max(1).values.min()) > 0.99
    out = softmax_fisher_gram(None, W, logits=z32, reduce="mean", chunk=64, backend=backend)
    assert rel(out, G.mean(0)) <= 1e-5
    assert rel(softmax_fisher_gram(None, W, logits=z32, chunk=64, backend=backend), G) <= 1e-5


def truncated_oracle(W, p, tail_tol):
    """Per token: smallest top-p set S with 1 − Σ_S p ≤ tail_tol, G_S in float64."""
    W64 = W.double()
    out, taus, ns = [], [], []
    for pi in p:
        ps, order = torch.sort(pi, descending=True)
        n = int((torch.cumsum(ps, 0) < 1 - tail_tol).sum()) + 1
        pS, rows = ps[:n], W64[order[:n]]
        D = rows - (pS @ rows) / pS.sum()
        out.append((pS[:, None] * D).T @ D)
        taus.append(1 - float(pS.sum()))
        ns.append(n)
    return torch.stack(out), torch.tensor(taus, dtype=torch.float64), torch.tensor(ns)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail_tol", [1e-3, 0.2])
def test_gram_tail_truncation(backend, tail_tol):
    h, W, b, _, _ = make(B=4, V=400, d=8, seed=7, offset=1.0, scale=25.0)
    G, p = dense_G(h, W, b)
    G_S, tau, n = truncated_oracle(W, p, tail_tol)
    res = softmax_fisher_gram(h, W, b, tail_tol=tail_tol, chunk=64, backend=backend)
    assert isinstance(res, TruncatedGram)
    assert torch.equal(res.n_kept, n)
    assert float((res.tau - tau).abs().max()) <= 1e-6 and bool((res.tau <= tail_tol + 1e-6).all())
    assert rel(res.G, G_S) <= 1e-5
    # 0 ⪯ G_S ⪯ G and ‖G − G_S‖₂ ≤ τ/(1−τ)·max_{v∉S} ‖w_v − μ‖² (docs/design.md §3).
    W64 = W.double()
    for i in range(4):
        gap = torch.linalg.eigvalsh(G[i] - res.G[i].double())
        assert float(gap.min()) >= -1e-5 * float(gap.abs().max() + 1e-12)
        mu = p[i] @ W64
        ps, order = torch.sort(p[i], descending=True)
        dropped = order[int(n[i]):]
        radius = float(((W64[dropped] - mu) ** 2).sum(1).max()) if len(dropped) else 0.0
        t = float(tau[i])
        assert float(torch.linalg.matrix_norm(G[i] - res.G[i].double(), 2)) <= t / (1 - t) * radius * (1 + 1e-4) + 1e-6
    mean = softmax_fisher_gram(h, W, b, reduce="mean", tail_tol=tail_tol, backend=backend)
    assert rel(mean.G, G_S.mean(0)) <= 1e-5
    assert mean.tau.shape == () and abs(float(mean.tau) - float(tau.mean())) <= 1e-6


def test_truncation_keeps_few_rows_on_peaked_distribution():
    h, W, b, _, _ = make(B=3, V=2000, d=8, seed=8, offset=1.0, scale=12.0)
    res = softmax_fisher_gram(h, W, b, tail_tol=1e-3, backend="reference")
    assert 2 <= int(res.n_kept.min()) and int(res.n_kept.max()) < 200  # the point of truncating
    _, p = dense_G(h, W, b)
    G_S, _, n = truncated_oracle(W, p, 1e-3)
    assert torch.equal(res.n_kept, n) and rel(res.G, G_S) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_raise_naming_them(backend):
    h, W, b, U, _ = make(seed=9)
    with pytest.raises(ValueError, match="h contains NaN"):
        softmax_fisher_matmat(h.clone().fill_(float("nan")), W, U, b, backend=backend)
    for bad in (float("nan"), float("inf"), -float("inf")):
        W_bad = W.clone()
        W_bad[123, 4] = bad  # NaN, or ±Inf logits (p = 0 for −Inf: then 0·Inf in the Wᵀ sums)
        calls = [lambda: softmax_fisher_matmat(h, W_bad, U, b, chunk=64, backend=backend),
                 lambda: softmax_fisher_quad(h, W_bad, U, b, chunk=64, backend=backend),
                 lambda: softmax_fisher_gram(h, W_bad, b, chunk=64, backend=backend),
                 lambda: softmax_fisher_gram(h, W_bad, b, reduce="mean", chunk=64, backend=backend)]
        if bad != bad:  # NaN reaches every token's normalizer
            calls += [lambda: softmax_fisher_gram(h, W_bad, b, tail_tol=0.1, chunk=64, backend=backend),
                      lambda: lm_logsumexp(h, W_bad, b, chunk=64, backend=backend)]
        for call in calls:
            with pytest.raises(ValueError, match="non-finite (softmax normalizer|result).*W or b"):
                call()
    z = h @ W.T
    z[1, 5] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        softmax_fisher_matmat(None, W, U, logits=z, backend=backend)


def test_bad_input_errors_before_work():
    h, W, b, U, Ub = make()
    cases = [
        (lambda: softmax_fisher_matmat(h[:, :5], W, U), ValueError, "h must have last dimension d"),
        (lambda: softmax_fisher_matmat(h, W, U[:5]), ValueError, "U must have shape"),
        (lambda: softmax_fisher_matmat(h, W, Ub[:2]), ValueError, r"U must have shape \(B,d,k\)"),
        (lambda: softmax_fisher_matmat(h, W, U.double()), TypeError, "one dtype"),
        (lambda: softmax_fisher_matmat(h, W, U, b[:7]), ValueError, "b must have shape"),
        (lambda: softmax_fisher_quad(h, W, U.to("meta")), ValueError, "one device"),
        (lambda: softmax_fisher_quad(h, W, U.long()), TypeError, "U must be a floating tensor"),
        (lambda: softmax_fisher_gram(h, W, tail_tol=1.0), ValueError, r"tail_tol must be None or a float in \(0, 1\)"),
        (lambda: softmax_fisher_gram(h, W, tail_tol=0.0), ValueError, "tail_tol"),
        (lambda: softmax_fisher_gram(h, W, reduce="sum"), ValueError, "reduce must be"),
        (lambda: softmax_fisher_gram(h, W, logits=h @ W.T), ValueError, "either h or logits"),
        (lambda: softmax_fisher_gram(None, W, b, logits=h @ W.T), ValueError, "b must be None"),
        (lambda: softmax_fisher_gram(None, W, logits=(h @ W.T)[:, :9]), ValueError, "logits must have last dimension"),
        (lambda: softmax_fisher_gram(None, W), ValueError, "h must be a tensor"),
        (lambda: softmax_fisher_gram(h, W, chunk=0), ValueError, "chunk must be"),
        (lambda: lm_logsumexp(h, W.T), ValueError, "h must have last dimension"),
        (lambda: lm_logsumexp(h, W, backend="nope"), ValueError, "unknown backend"),
    ]
    for call, err, msg in cases:
        with pytest.raises(err, match=msg):
            call()


def test_custom_ops_have_consistent_fakes():
    h, W, b, U, _ = make()
    for op, args in [
        (torch.ops.fisherfast.lm_logsumexp.default, (h, W, b, "", 0)),
        (torch.ops.fisherfast.softmax_fisher_matmat.default, (h, W, U, b, None, "", 0)),
        (torch.ops.fisherfast.softmax_fisher_quad.default, (h, W, U, b, None, "", 0)),
        (torch.ops.fisherfast.softmax_fisher_gram.default, (h, W, b, None, "mean", -1.0, "", 0)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


_TRITON_SCRIPT = r"""
import torch
from fisherfast.ops import lm_logsumexp
g = torch.Generator().manual_seed(0)
for dt, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
    W = torch.randn(300, 40, generator=g).to(dt)  # 300 rows: 5 tiles of 64, the last ragged
    h = torch.randn(5, 40, generator=g).to(dt)  # 5 tokens in a block of 16
    b = (torch.randn(300, generator=g) + 1e4).to(dt) if dt == torch.float32 else None
    z = h.double() @ W.double().T + (0 if b is None else b.double())
    out = lm_logsumexp(h, W, b, backend="triton")
    ref = torch.logsumexp(z, 1)
    err = float(((out.double() - ref) / ref.abs()).abs().max())
    assert out.dtype == dt and err <= tol, (dt, err)
W[7, 3] = float("nan")
try:
    lm_logsumexp(h, W, backend="triton")
except ValueError as e:
    assert "non-finite softmax normalizer" in str(e)
else:
    raise AssertionError("NaN in W not reported")
print("ok")
"""


@pytest.mark.skipif(not available_backends()["triton"].available and not __import__("importlib").util.find_spec("triton"),
                    reason="triton not installed")
def test_triton_lm_logsumexp_in_interpreter():
    # TRITON_INTERPRET must be set before the kernel is defined: run in a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.skipif(not available_backends()["triton"].available, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_fused_kernels_match_dense_float64(dtype, tol):
    # V = 150: four 32-row tiles and a ragged one; d = 20 < BLOCK_D (masked);
    # B = 5 < BLOCK_B; k = 3 padded to 16 (fp16: output rounding 2^-11).
    h, W, b, U, Ub = make(B=5, V=150, d=20, k=3, dtype=dtype, seed=11, offset=0.5)
    h, W, b, U, Ub = (x.to(_TRITON_DEVICE) for x in (h, W, b, U, Ub))
    G, _ = dense_G(h.cpu(), W.cpu(), b.cpu())
    kw = dict(backend="triton")
    out = softmax_fisher_matmat(h, W, U, b, **kw)
    assert out.dtype == dtype and rel(out.cpu(), G @ U.cpu().double()) <= tol
    assert rel(softmax_fisher_matmat(h[:2], W, Ub[:2], None, **kw).cpu(), dense_G(h[:2].cpu(), W.cpu())[0]
               @ Ub[:2].cpu().double()) <= tol
    Q = softmax_fisher_quad(h, W, U, b, **kw).cpu()
    assert rel(Q, U.cpu().double().T @ G @ U.cpu().double()) <= tol and torch.equal(Q, Q.transpose(1, 2))
    assert rel(softmax_fisher_gram(h, W, b, **kw).cpu(), G) <= tol
    if dtype == torch.float32:
        assert rel(softmax_fisher_gram(h, W, b, reduce="mean", **kw).cpu(), G.mean(0)) <= tol
        wide = torch.randn(20, 18, generator=torch.Generator().manual_seed(1)).to(_TRITON_DEVICE)  # 2 column blocks
        Qw = softmax_fisher_quad(h, W, wide, b, **kw).cpu().double()
        assert rel(Qw, wide.cpu().double().T @ G @ wide.cpu().double()) <= tol


@pytest.mark.skipif(not available_backends()["triton"].available, reason="triton backend unavailable")
def test_triton_truncation_and_nonfinite():
    h, W, b, _, _ = make(B=3, V=96, d=16, seed=12, offset=1.0, scale=6.0)
    _, p = dense_G(h, W, b)
    G_S, tau, n = truncated_oracle(W, p, 0.05)
    dev = _TRITON_DEVICE
    res = softmax_fisher_gram(h.to(dev), W.to(dev), b.to(dev), tail_tol=0.05, backend="triton")
    assert int(n.min()) >= 2 and torch.equal(res.n_kept.cpu(), n) and rel(res.G.cpu(), G_S) <= 1e-5
    assert float((res.tau.cpu() - tau).abs().max()) <= 1e-6
    W_bad = W.clone()
    W_bad[40, 2] = float("nan")
    U = torch.randn(16, 2)
    for call in (lambda: softmax_fisher_matmat(h.to(dev), W_bad.to(dev), U.to(dev), backend="triton"),
                 lambda: softmax_fisher_quad(h.to(dev), W_bad.to(dev), U.to(dev), backend="triton")):
        with pytest.raises(ValueError, match="non-finite softmax normalizer.*W or b"):
            call()
