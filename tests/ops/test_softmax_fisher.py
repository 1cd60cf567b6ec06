"""softmax-Fisher contractions vs the dense float64 formula with F = diag p − p pᵀ
materialized (docs/design.md §3), on every backend that can run here (the ``backend``
fixture: reference, cpu, triton — the interpreter without a GPU — and cuda).
A backend that does not implement an op (cuda: quad, gram) skips that op."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fisherfast.ops import (TruncatedGram, lm_logsumexp, softmax_fisher_gram, softmax_fisher_gram_topk,
                            softmax_fisher_matmat, softmax_fisher_quad)
from fisherfast.ops.softmax_fisher import _OPS

# Triton accumulates in float32 whatever the input dtype; the others compute
# float64 inputs in float64.
FP32_TOL = 1e-5


def exact_tol(backend) -> float:
    return FP32_TOL if backend.name == "triton" else 1e-12


def has(backend, *ops) -> bool:
    return all(backend.name in _OPS[op] for op in ops)


def need(backend, *ops) -> None:
    if not has(backend, *ops):
        pytest.skip(f"{backend.name} implements none of {ops}")


def dense_G(a, W, b=None, logits=None):
    """G_i = Wᵀ (diag p_i − p_i p_iᵀ) W in float64, F materialized (on the CPU)."""
    W64 = W.cpu().double()
    z = logits.cpu().double() if logits is not None else a.cpu().double() @ W64.T + (0 if b is None else b.cpu().double())
    p = torch.softmax(z, dim=-1)
    F = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return W64.T @ F @ W64, p


def rel(x, y):
    x, y = x.cpu().double(), y.cpu().double()
    return float((x - y).norm() / y.norm())


def make(B=5, V=300, d=12, k=3, dtype=torch.float32, seed=0, offset=2.0, scale=1.0, bias=True, device="cpu"):
    """Rows with a common component (like a real unembedding: |mean row| > spread)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) + offset * torch.randn(d, generator=g, dtype=torch.float64))
    a = scale * torch.randn(B, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    U = torch.randn(d, k, generator=g, dtype=torch.float64)
    Ub = torch.randn(B, d, k, generator=g, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)  # noqa: E731
    return cast(a), cast(W), cast(b), cast(U), cast(Ub)


@pytest.mark.parametrize("bias", [True, False])
def test_all_ops_match_dense_float64_in_fp32(backend, bias):
    if backend.name == "triton" and backend.device.type == "cpu" and not bias:
        pytest.skip("interpreter time: the bias-free Triton path runs in test_logit_spread_of_2e4_from_the_head_input")
    a, W, b, U, Ub = make(bias=bias, device=backend.device)
    G, p = dense_G(a, W, b)
    kw = dict(chunk=64, backend=backend.name)  # 300 = 4·64 + 44: several chunks and a ragged one
    U64, Ub64 = U.cpu().double(), Ub.cpu().double()
    z64 = a.cpu().double() @ W.cpu().double().T + (0 if b is None else b.cpu().double())
    assert rel(lm_logsumexp(a, W, b, **kw), torch.logsumexp(z64, 1)) <= 1e-6
    assert rel(softmax_fisher_matmat(a, W, U, b, **kw), G @ U64) <= FP32_TOL
    assert rel(softmax_fisher_matmat(a, W, Ub, b, **kw), G @ Ub64) <= FP32_TOL
    if has(backend, "quad", "gram"):
        assert rel(softmax_fisher_quad(a, W, U, b, **kw), U64.T @ G @ U64) <= FP32_TOL
        assert rel(softmax_fisher_quad(a, W, Ub, b, **kw), Ub64.transpose(1, 2) @ G @ Ub64) <= FP32_TOL
        assert rel(softmax_fisher_gram(a, W, b, **kw), G) <= FP32_TOL
        assert rel(softmax_fisher_gram(a, W, b, reduce="mean", **kw), G.mean(0)) <= FP32_TOL


def test_wide_U_in_column_blocks(backend):
    """k = 18 > 16 columns: the kernels run U in column blocks (Triton K_MAX =
    16); quad's off-diagonal blocks come from matmat. d = 20, V = 150: ragged
    d and V tiles."""
    a, W, b, U, _ = make(B=5, V=150, d=20, k=18, seed=11, offset=0.5, device=backend.device)
    G, _ = dense_G(a, W, b)
    U64 = U.cpu().double()
    assert rel(softmax_fisher_matmat(a, W, U, b, backend=backend.name), G @ U64) <= FP32_TOL
    if has(backend, "quad"):
        Q = softmax_fisher_quad(a, W, U, b, backend=backend.name)
        assert rel(Q, U64.T @ G @ U64) <= FP32_TOL and torch.equal(Q, Q.transpose(1, 2))


def test_float64_and_single_token_and_default_chunk(backend):
    a, W, b, U, _ = make(dtype=torch.float64, seed=1, device=backend.device)
    G, _ = dense_G(a, W, b)
    U64, tol, be = U.cpu(), exact_tol(backend), backend.name
    assert rel(softmax_fisher_matmat(a, W, U, b, backend=be), G @ U64) <= tol
    assert rel(softmax_fisher_matmat(a[2], W, U, b, backend=be), G[2] @ U64) <= tol
    assert rel(lm_logsumexp(a[2], W, b, backend=be), torch.logsumexp(a[2].cpu() @ W.cpu().T + b.cpu(), 0)) <= tol
    assert lm_logsumexp(a[2], W, b, backend=be).shape == ()
    if has(backend, "quad", "gram"):
        assert rel(softmax_fisher_quad(a[2], W, U, b, backend=be), U64.T @ G[2] @ U64) <= tol
        assert rel(softmax_fisher_gram(a[2], W, b, backend=be), G[2]) <= tol


def test_logit_given_variants(backend):
    a, W, b, U, Ub = make(seed=2, device=backend.device)
    z = a @ W.T + b
    G, _ = dense_G(None, W, logits=z)
    kw = dict(logits=z, chunk=70, backend=backend.name)
    assert rel(softmax_fisher_matmat(None, W, Ub, **kw), G @ Ub.cpu().double()) <= FP32_TOL
    if has(backend, "quad", "gram"):
        assert rel(softmax_fisher_quad(None, W, U, **kw), U.cpu().double().T @ G @ U.cpu().double()) <= FP32_TOL
        assert rel(softmax_fisher_gram(None, W, **kw), G) <= FP32_TOL
    # -inf logits (masked tokens) carry zero probability.
    z_masked = z.clone()
    z_masked[:, :50] = -float("inf")
    Gm, _ = dense_G(None, W, logits=z_masked)
    out = softmax_fisher_matmat(None, W, U, logits=z_masked, chunk=40, backend=backend.name)
    assert rel(out, Gm @ U.cpu().double()) <= FP32_TOL


def test_half_precision_in_every_op(backend):
    """Every op on fp16 inputs against the float64 formula on the same rounded
    values (reference and triton read the fp16 W as it is; cpu and cuda get a
    float32 copy); tolerance: fp16 output rounding (2^-11)."""
    a, W, b, U, _ = make(dtype=torch.float16, seed=5, offset=0.5, device=backend.device)
    G, p = dense_G(a, W, b)
    kw = dict(chunk=64, backend=backend.name)
    U64 = U.cpu().double()
    lse = lm_logsumexp(a, W, b, **kw)
    assert lse.dtype == torch.float16
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(a.cpu().double() @ W.cpu().double().T
                                                                   + b.cpu().double(), -1), rtol=2e-3, atol=2e-3)
    out = softmax_fisher_matmat(a, W, U, b, **kw)
    assert out.dtype == torch.float16 and rel(out, G @ U64) <= 2e-3
    if has(backend, "quad", "gram", "gram_topk"):
        assert rel(softmax_fisher_quad(a, W, U, b, **kw), U64.T @ G @ U64) <= 2e-3
        assert rel(softmax_fisher_gram(a, W, b, **kw), G) <= 2e-3
        T = softmax_fisher_gram_topk(a, W, b, tail_tol=0.5, **kw)
        G_S, tau, n = truncated_oracle(W, p, 0.5)
        assert T.G.dtype == torch.float16 and torch.equal(T.n_kept.cpu(), n)
        assert rel(T.G, G_S) <= 2e-3 and float((T.tau.cpu() - tau).abs().max()) <= 1e-3


def test_half_W_is_never_copied_whole_on_the_reference_backend():
    """A float16 W is cast one V-chunk at a time: the peak of torch allocations
    stays far below the float32 copy of W (8 MiB here) that a cast up front makes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from _harness import peak_memory

    g = torch.Generator().manual_seed(0)
    V, d, B = 8192, 256, 4
    W = (torch.randn(V, d, generator=g) / d ** 0.5).half()
    a, U = torch.randn(B, d, generator=g).half(), torch.randn(d, 2, generator=g).half()
    full_copy = V * d * 4
    for run in (lambda: lm_logsumexp(a, W, chunk=256, backend="reference"),
                lambda: softmax_fisher_matmat(a, W, U, chunk=256, backend="reference"),
                lambda: softmax_fisher_gram(a, W, reduce="mean", chunk=256, backend="reference")):
        assert peak_memory(run) < full_copy / 4


def test_logits_of_magnitude_1e4_are_stable(backend):
    # The softmax is shift-invariant: a bias of 1e4 must give the unshifted
    # answer (float64); float32 logits of ±1e4 per token agree with float64 on
    # the same logits.
    a, W, b, U, _ = make(dtype=torch.float64, seed=4, device=backend.device)
    G, _ = dense_G(a, W, b)
    big = b + 1e4
    # float32 (triton) logits z ≈ 1e4 carry absolute error ε·1e4 ≈ 6e-4, so p
    # (and G) carry that relative error; float64 backends stay near exact.
    be, tol, U64 = backend.name, (2e-3 if backend.name == "triton" else 1e-10), U.cpu()
    lse, ref = lm_logsumexp(a, W, big, chunk=64, backend=be).cpu(), torch.logsumexp(a.cpu() @ W.cpu().T + b.cpu(), 1)
    if backend.name == "triton":  # float32 accumulation: relative error of lse ≈ 1e4 itself
        assert rel(lse, ref + 1e4) <= 1e-6
    else:
        assert rel(lse - 1e4, ref) <= 1e-12
    assert rel(softmax_fisher_matmat(a, W, U, big, chunk=64, backend=be), G @ U64) <= tol
    z32 = (a @ W.T + b + 1e4 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64,
                                            device=backend.device)[:, None]).float()
    W32, U32 = W.float(), U.float()
    G32, _ = dense_G(None, W32, logits=z32)
    assert rel(softmax_fisher_matmat(None, W32, U32, logits=z32, chunk=64, backend=be), G32 @ U64) <= FP32_TOL
    if has(backend, "quad", "gram"):
        assert rel(softmax_fisher_gram(a, W, big, reduce="mean", chunk=64, backend=be), G.mean(0)) <= tol
        assert rel(softmax_fisher_quad(None, W32, U32, logits=z32, chunk=64, backend=be), U64.T @ G32 @ U64) <= FP32_TOL
        assert rel(softmax_fisher_gram(None, W32, logits=z32, chunk=64, backend=be), G32) <= FP32_TOL


def test_logit_spread_of_2e4_from_the_head_input(backend):
    """z = W a with a spread of 2e4 (two rows near +1e4, the rest near −1e4):
    p is a two-point distribution, G = p₁p₂ (w₁ − w₂)(w₁ − w₂)ᵀ ≠ 0, and the
    fused kernels must match the float64 formula on the same float32 inputs.
    Tolerance 1e-2: float32 logits of magnitude 1e4 carry absolute error
    ≈ ε·1e4 = 1e-3, which moves p (and G) by that much relative."""
    g = torch.Generator().manual_seed(13)
    V, d, B = 200, 8, 3
    W = torch.randn(V, d, generator=g)
    W[:, 0] = -1.0
    W[[3, 77], 0] = 1.0
    a = 0.5 * torch.randn(B, d, generator=g)
    a[:, 0] = 1e4
    a, W, U = a.to(backend.device), W.to(backend.device), torch.randn(d, 2, generator=g).to(backend.device)
    G, p = dense_G(a, W)
    assert float(p[:, [3, 77]].sum(1).min()) > 0.999 and float(p[:, 3].min()) > 1e-3  # two live rows
    out = softmax_fisher_matmat(a, W, U, chunk=64, backend=backend.name)
    assert rel(out, G @ U.cpu().double()) <= 1e-2
    if has(backend, "gram"):
        assert rel(softmax_fisher_gram(a, W, chunk=64, backend=backend.name), G) <= 1e-2


def test_outputs_symmetric_psd(backend):
    need(backend, "quad", "gram")
    a, W, b, U, Ub = make(seed=5, d=16, k=6, device=backend.device)
    be = backend.name
    for out in (softmax_fisher_gram(a, W, b, chunk=64, backend=be),
                softmax_fisher_gram(a, W, b, reduce="mean", chunk=64, backend=be)[None],
                softmax_fisher_quad(a, W, Ub, b, chunk=64, backend=be)):
        assert torch.equal(out, out.transpose(-1, -2))
        eig = torch.linalg.eigvalsh(out.cpu().double())
        assert float(eig.min()) >= -1e-6 * float(eig.max())
    # vᵀ G v = Var_p(w·v) ≥ 0 (docs/design.md §3), via quad with a single column.
    v = U[:, :1]
    q = softmax_fisher_quad(a, W, v, b, backend=be)[:, 0, 0]
    _, p = dense_G(a, W, b)
    s = W.cpu().double() @ v.cpu().double()[:, 0]
    var = (p * s ** 2).sum(1) - (p @ s) ** 2
    assert rel(q, var) <= FP32_TOL


def test_gram_mean_centered_on_peaked_distinct_tokens(backend):
    need(backend, "gram")
    # Each token peaked on a different row: the within-token metrics are tiny
    # next to the spread of the means (‖G‖ ≈ 1e-3 vs ‖Cov(μ_i)‖ ≈ 1e2).
    _, W, _, _, _ = make(B=6, V=200, d=10, seed=6, offset=3.0, bias=False, device=backend.device)
    # Logits given in fp32, oracle on the same logits: p's own conditioning
    # (relative error ε·|z| from rounding z ≈ 200) is then out of the picture.
    z32 = ((W[[3, 50, 90, 120, 160, 199]].double() * 2.0) @ W.double().T).float()  # z_top − z_rest ≫ 1
    G, p = dense_G(None, W, logits=z32)
    assert float(p.max(1).values.min()) > 0.99
    out = softmax_fisher_gram(None, W, logits=z32, reduce="mean", chunk=64, backend=backend.name)
    assert rel(out, G.mean(0)) <= FP32_TOL
    assert rel(softmax_fisher_gram(None, W, logits=z32, chunk=64, backend=backend.name), G) <= FP32_TOL


def truncated_oracle(W, p, tail_tol):
    """Per token: smallest top-p set S with 1 − Σ_S p ≤ tail_tol, G_S in float64."""
    W64 = W.cpu().double()
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


@pytest.mark.parametrize("tail_tol", [1e-3, 0.2])
def test_gram_tail_truncation(backend, tail_tol):
    need(backend, "gram_topk")
    a, W, b, _, _ = make(B=4, V=400, d=8, seed=7, offset=1.0, scale=25.0, device=backend.device)
    G, p = dense_G(a, W, b)
    G_S, tau, n = truncated_oracle(W, p, tail_tol)
    res = softmax_fisher_gram_topk(a, W, b, tail_tol=tail_tol, chunk=64, backend=backend.name)
    assert isinstance(res, TruncatedGram)
    assert torch.equal(res.n_kept.cpu(), n) and int(n.max()) >= 2
    assert float((res.tau.cpu() - tau).abs().max()) <= 1e-6 and bool((res.tau <= tail_tol + 1e-6).all())
    assert rel(res.G, G_S) <= FP32_TOL
    # 0 ⪯ G_S ⪯ G and ‖G − G_S‖₂ ≤ τ/(1−τ)·max_{v∉S} ‖w_v − μ‖² (docs/design.md §3).
    W64, GS = W.cpu().double(), res.G.cpu().double()
    for i in range(4):
        gap = torch.linalg.eigvalsh(G[i] - GS[i])
        assert float(gap.min()) >= -1e-5 * float(gap.abs().max() + 1e-12)
        mu = p[i] @ W64
        ps, order = torch.sort(p[i], descending=True)
        dropped = order[int(n[i]):]
        radius = float(((W64[dropped] - mu) ** 2).sum(1).max()) if len(dropped) else 0.0
        t = float(tau[i])
        assert float(torch.linalg.matrix_norm(G[i] - GS[i], 2)) <= t / (1 - t) * radius * (1 + 1e-4) + 1e-6
    mean = softmax_fisher_gram_topk(a, W, b, reduce="mean", tail_tol=tail_tol, backend=backend.name)
    assert rel(mean.G, G_S.mean(0)) <= FP32_TOL
    assert mean.tau.shape == () and abs(float(mean.tau) - float(tau.mean())) <= 1e-6
    one = softmax_fisher_gram_topk(a[1], W, b, tail_tol=tail_tol, backend=backend.name)
    assert one.G.shape == (8, 8) and int(one.n_kept) == int(n[1]) and rel(one.G, G_S[1]) <= FP32_TOL


def test_truncation_keeps_few_rows_on_peaked_distribution():
    a, W, b, _, _ = make(B=3, V=2000, d=8, seed=8, offset=1.0, scale=12.0)
    res = softmax_fisher_gram_topk(a, W, b, tail_tol=1e-3, backend="reference")
    assert 2 <= int(res.n_kept.min()) and int(res.n_kept.max()) < 200  # the point of truncating
    _, p = dense_G(a, W, b)
    G_S, _, n = truncated_oracle(W, p, 1e-3)
    assert torch.equal(res.n_kept, n) and rel(res.G, G_S) <= FP32_TOL


def test_nonfinite_inputs_raise_naming_them(backend):
    a, W, b, U, _ = make(seed=9, device=backend.device)
    be = backend.name
    with pytest.raises(ValueError, match="a: expected finite values, got NaN or Inf"):
        softmax_fisher_matmat(a.clone().fill_(float("nan")), W, U, b, backend=be)
    full = has(backend, "quad", "gram", "gram_topk")
    for bad in (float("nan"), float("inf"), -float("inf")):
        W_bad = W.clone()
        W_bad[123, 4] = bad  # NaN, or ±Inf logits (p = 0 for −Inf: then 0·Inf in the Wᵀ sums)
        calls = [lambda: softmax_fisher_matmat(a, W_bad, U, b, chunk=64, backend=be)]
        if full:
            calls += [lambda: softmax_fisher_quad(a, W_bad, U, b, chunk=64, backend=be),
                      lambda: softmax_fisher_gram(a, W_bad, b, chunk=64, backend=be),
                      lambda: softmax_fisher_gram(a, W_bad, b, reduce="mean", chunk=64, backend=be)]
        if bad != bad:  # NaN reaches every token's normalizer
            calls += [lambda: lm_logsumexp(a, W_bad, b, chunk=64, backend=be)]
            if full:
                calls += [lambda: softmax_fisher_gram_topk(a, W_bad, b, tail_tol=0.1, chunk=64, backend=be)]
        for call in calls:
            with pytest.raises(ValueError, match="non-finite (softmax normalizer|result).*W or b"):
                call()
    z = a @ W.T
    z[1, 5] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        softmax_fisher_matmat(None, W, U, logits=z, backend=be)


# ------------------------------------------------------------ edge inputs (issue 9)

def test_empty_batch_gives_empty_results(backend):
    """a of shape (0, d) (or logits (0, V)): right-shaped empty results in the input dtype."""
    _, W, b, U, _ = make(d=12, k=3, device=backend.device)
    a0, z0, be = W.new_empty(0, 12), W.new_empty(0, W.shape[0]), backend.name
    cases = [(lm_logsumexp(a0, W, b, backend=be), (0,)),
             (softmax_fisher_matmat(a0, W, U, b, backend=be), (0, 12, 3)),
             (softmax_fisher_matmat(a0, W, W.new_empty(0, 12, 3), b, backend=be), (0, 12, 3)),
             (softmax_fisher_matmat(None, W, U, logits=z0, backend=be), (0, 12, 3))]
    if has(backend, "quad", "gram", "gram_topk"):
        T = softmax_fisher_gram_topk(a0, W, b, tail_tol=0.1, backend=be)
        cases += [(softmax_fisher_quad(a0, W, U, b, backend=be), (0, 3, 3)),
                  (softmax_fisher_gram(a0, W, b, backend=be), (0, 12, 12)),
                  (softmax_fisher_gram(None, W, logits=z0, backend=be), (0, 12, 12)),
                  (T.G, (0, 12, 12))]
        assert T.tau.shape == (0,) and T.tau.dtype == torch.float64
        assert T.n_kept.shape == (0,) and T.n_kept.dtype == torch.int64
    for out, shape in cases:
        assert out.shape == shape and out.dtype == W.dtype and out.device.type == backend.device.type


def test_mean_over_zero_tokens_names_the_input(backend):
    _, W, b, _, _ = make(d=12, device=backend.device)
    a0, z0, be = W.new_empty(0, 12), W.new_empty(0, W.shape[0]), backend.name
    for call, name in [(lambda: softmax_fisher_gram(a0, W, b, reduce="mean", backend=be), "a"),
                       (lambda: softmax_fisher_gram(None, W, logits=z0, reduce="mean", backend=be), "logits"),
                       (lambda: softmax_fisher_gram_topk(a0, W, tail_tol=0.1, reduce="mean", backend=be), "a")]:
        with pytest.raises(ValueError, match=f"reduce='mean' needs at least one token: {name} has 0 rows"):
            call()


def test_half_precision_overflow_raises(backend):
    """A result finite in float32 but over 65504 is never returned as Inf in float16."""
    g = torch.Generator().manual_seed(14)
    W = (400 * torch.randn(64, 8, generator=g)).half().to(backend.device)
    a = (1e-3 * torch.randn(4, 8, generator=g)).half().to(backend.device)
    U = torch.eye(8, 3).half().to(backend.device)
    G, _ = dense_G(a, W)
    assert float(G.abs().max()) > 65504  # the float64 metric really overflows float16
    be = backend.name
    calls = [lambda: softmax_fisher_matmat(a, W, U, backend=be)]
    if has(backend, "quad", "gram", "gram_topk"):
        calls += [lambda: softmax_fisher_quad(a, W, U, backend=be),
                  lambda: softmax_fisher_gram(a, W, backend=be),
                  lambda: softmax_fisher_gram(a, W, reduce="mean", backend=be),
                  lambda: softmax_fisher_gram_topk(a, W, tail_tol=1e-3, backend=be)]
    for call in calls:
        with pytest.raises(OverflowError, match="overflows torch.float16"):
            call()
    # lse = log Σ e^z with z = 80000 > 65504 (a·w in float32 from fp16 inputs of 100).
    big = torch.full((2, 8), 100.0, dtype=torch.float16, device=backend.device)
    with pytest.raises(OverflowError, match="lm_logsumexp"):
        lm_logsumexp(big, torch.full((5, 8), 100.0, dtype=torch.float16, device=backend.device), backend=be)
    # In range: the same ops return finite fp16 values.
    assert bool(torch.isfinite(softmax_fisher_matmat(a, W / 8, U, backend=be)).all())


def test_bad_input_errors_before_work():
    a, W, b, U, Ub = make()
    cases = [
        (lambda: softmax_fisher_matmat(a[:, :5], W, U), ValueError, "a: expected last dimension d"),
        (lambda: softmax_fisher_matmat(a, W, U[:5]), ValueError, "U: expected shape"),
        (lambda: softmax_fisher_matmat(a, W, Ub[:2]), ValueError, r"U: expected shape \(B,d,k\)"),
        (lambda: softmax_fisher_matmat(a, W, U.double()), TypeError, "one dtype"),
        (lambda: softmax_fisher_matmat(a, W, U, b[:7]), ValueError, "b: expected shape"),
        (lambda: softmax_fisher_quad(a, W, U.to("meta")), ValueError, "one device"),
        (lambda: softmax_fisher_quad(a, W, U.long()), TypeError, "U: expected a floating tensor"),
        (lambda: softmax_fisher_gram_topk(a, W, tail_tol=1.0), ValueError, r"tail_tol: expected a finite number > 0.0 and < 1.0, got 1.0"),
        (lambda: softmax_fisher_gram_topk(a, W, tail_tol=0.0), ValueError, "tail_tol"),
        (lambda: softmax_fisher_gram_topk(a, W, tail_tol=None), ValueError, "tail_tol"),
        (lambda: softmax_fisher_gram(a, W, tail_tol=0.1), TypeError, "tail_tol"),
        (lambda: softmax_fisher_gram(a, W, reduce="sum"), ValueError, "reduce: expected 'none' or 'mean', got 'sum'"),
        (lambda: softmax_fisher_gram(a, W, logits=a @ W.T), ValueError, "either a or logits"),
        (lambda: softmax_fisher_gram(None, W, b, logits=a @ W.T), ValueError, "b: expected None"),
        (lambda: softmax_fisher_gram(None, W, logits=(a @ W.T)[:, :9]), ValueError, "logits: expected last dimension"),
        (lambda: softmax_fisher_gram(None, W), ValueError, "a: expected a tensor"),
        (lambda: softmax_fisher_gram(a, W, chunk=0), ValueError, "chunk: expected an int ≥ 1 or None, got 0"),
        (lambda: lm_logsumexp(a, W.T), ValueError, "a: expected last dimension"),
        (lambda: lm_logsumexp(a, W, backend="nope"), ValueError, "unknown backend"),
        (lambda: softmax_fisher_quad(a, W, U, backend="cuda"), ValueError, "backend 'cuda' cannot run"),
    ]
    for call, err, msg in cases:
        with pytest.raises(err, match=msg):
            call()


# ------------------------------------------------------------ torch.library registration

def _op_cases():
    a, W, b, U, Ub = make()
    z = a @ W.T + b
    ops = torch.ops.fisherfast
    return a, W, b, U, Ub, z, [
        (ops.lm_logsumexp.default, (a, W, b, None, None), [(5,)]),
        (ops.softmax_fisher_matmat.default, (a, W, U, b, None, None, 64), [(5, 12, 3)]),
        (ops.softmax_fisher_matmat.default, (None, W, Ub, None, z, "reference", None), [(5, 12, 3)]),
        (ops.softmax_fisher_quad.default, (a, W, U, b, None, None, None), [(5, 3, 3)]),
        (ops.softmax_fisher_gram.default, (a, W, b, None, "mean", None, None), [(12, 12)]),
        (ops.softmax_fisher_gram.default, (None, W, None, z, "none", None, None), [(5, 12, 12)]),
        (ops.softmax_fisher_gram_topk.default, (a, W, b, None, "none", 0.1, None, None), [(5, 12, 12), (5,), (5,)]),
    ]


def test_custom_ops_pass_opcheck_with_optional_arguments():
    *_, cases = _op_cases()
    for op, args, _ in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    schema = str(torch.ops.fisherfast.softmax_fisher_gram_topk.default._schema)
    assert "Tensor? a" in schema and "str? backend" in schema and "Int? chunk" in schema


def test_fake_implementations_give_shapes_and_check_inputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, W, b, U, Ub, z, cases = _op_cases()
    ops = torch.ops.fisherfast
    with FakeTensorMode() as mode:
        fake = lambda x: None if not isinstance(x, torch.Tensor) else mode.from_tensor(x)  # noqa: E731
        for op, args, shapes in cases:
            out = op(*[fake(x) if isinstance(x, torch.Tensor) else x for x in args])
            outs = out if isinstance(out, tuple) else (out,)
            assert [tuple(o.shape) for o in outs] == shapes
        fa, fW, fb, fU = fake(a), fake(W), fake(b), fake(U)
        assert ops.softmax_fisher_gram_topk.default(fa, fW, fb, None, "none", 0.1, None, None)[1].dtype == torch.float64
        bad = [
            (lambda: ops.softmax_fisher_matmat.default(fa[:, :5], fW, fU, fb, None, None, None), ValueError),
            (lambda: ops.softmax_fisher_matmat.default(fa, fW, fU.double(), fb, None, None, None), TypeError),
            (lambda: ops.softmax_fisher_quad.default(fa, fW, fU[:4], fb, None, None, None), ValueError),
            (lambda: ops.lm_logsumexp.default(fa, fW, fb[:3], None, None), ValueError),
            (lambda: ops.lm_logsumexp.default(fa[0], fW, fb, None, None), ValueError),
            (lambda: ops.softmax_fisher_gram.default(fa, fW, fb, None, "sum", None, None), ValueError),
            (lambda: ops.softmax_fisher_gram.default(fa[:0], fW, fb, None, "mean", None, None), ValueError),
            (lambda: ops.softmax_fisher_gram_topk.default(fa, fW, fb, None, "none", 1.5, None, None), ValueError),
        ]
        for call, err in bad:
            with pytest.raises(err):
                call()


def test_ops_trace_under_torch_compile():
    a, W, b, U, _ = make()

    def f(a, W, b, U):
        return (lm_logsumexp(a, W, b).sum() + softmax_fisher_matmat(a, W, U, b).sum()
                + softmax_fisher_quad(a, W, U, b).sum() + softmax_fisher_gram(a, W, b, reduce="mean").sum()
                + softmax_fisher_gram_topk(a, W, b, tail_tol=0.1).G.sum())

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, W, b, U), f(a, W, b, U), rtol=0, atol=0)


def test_cpu_entry_points_check_their_tensor_views():
    """The C++ entry points take DLPack views and check dtype, rank, shapes and
    layout once per call, naming the argument (ValueError from C++)."""
    _C = pytest.importorskip("fisherfast._C")
    from torch.utils.dlpack import to_dlpack as dl

    B, C = 3, 16
    # The running (m, l) merged across chunks is float64 whatever Z's dtype.
    Z = torch.randn(B, C)
    m, l = torch.full((B,), -float("inf"), dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    _C.softmax_fisher_lse_update(dl(Z), None, dl(m), dl(l), 1)
    assert torch.allclose(m + l.log(), torch.logsumexp(Z, 1).double())
    cases = [
        ((Z.data_ptr(), None, dl(m), dl(l), 1), "Z must be a DLPack capsule"),
        ((dl(Z), None, dl(m.float()), dl(l), 1), "m must be float64, got float32"),
        ((dl(Z), None, dl(m[:2]), dl(l), 1), "m dimension 0 must be 3, got 2"),
        ((dl(Z), dl(torch.zeros(C + 1)), dl(m), dl(l), 1), "bias dimension 0 must be 16"),
        ((dl(Z.long()), None, dl(m), dl(l), 1), "Z must be float32 or float64"),
        ((dl(Z.t()), None, dl(torch.zeros(C, dtype=torch.float64)), dl(torch.zeros(C, dtype=torch.float64)), 1),
         "Z must have unit last stride"),
        ((dl(Z), None, dl(torch.zeros(B, 2, dtype=torch.float64)[:, 0]), dl(l), 1), "m must have unit last stride"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.softmax_fisher_lse_update(*args)
