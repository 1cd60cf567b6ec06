"""The fused FisherSketch update against its dense definition (explicit ±1
feature matrices, explicit errors e = p − e_y, float64), and every backend
against the reference (docs/design.md §7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from fisherfast.ops import SRHTPlan, fisher_sketch_update


def dense_features(plan: SRHTPlan) -> torch.Tensor:
    """(m, n_in) float64: row j is r_j = D_b H_N e_i restricted to the input, (b, i) = divmod(idx_j, N)."""
    H = torch.from_numpy(scipy.linalg.hadamard(plan.N)).double()
    block, i = plan.idx // plan.N, plan.idx % plan.N
    return (plan.signs.double()[block] * H[i])[:, : plan.n_in]


def make_plans(d, K, m, seed=0):
    return (SRHTPlan(d, m, seed), SRHTPlan(d, m, seed + 1), SRHTPlan(K, m, seed + 2), SRHTPlan(K, m, seed + 3))


def dense_oracle(a, z, y, plans):
    """(Σψ, Σψ²) per kind from the definition, in float64 with scipy's softmax."""
    m = plans[0].m
    Ra, Sa, Re, Se = (dense_features(p).numpy() for p in plans)
    a = a.double().numpy()
    e = scipy.special.softmax(z.double().numpy(), axis=1)
    e[np.arange(len(y)), y.numpy()] -= 1.0
    psi_act = (a @ Ra.T) * (a @ Sa.T) / math.sqrt(m)
    psi_err = (e @ Re.T) * (e @ Se.T) / math.sqrt(m)
    psi = np.stack([psi_act * psi_err * math.sqrt(m), psi_act, psi_err])  # (3, B, m)
    return torch.from_numpy(psi.sum(1)), torch.from_numpy((psi**2).sum(1))


def run(backend, a, plans, **kw):
    m = plans[0].m
    sums = torch.zeros(3, m, dtype=torch.float64, device=backend.device)
    sumsqs = torch.zeros_like(sums)
    moved = {k: (v.to(backend.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    fisher_sketch_update(sums, sumsqs, a.to(backend.device), plans, backend=backend.name, **moved)
    return sums.cpu(), sumsqs.cpu()


def assert_close_sums(got, expected, rtol=2e-5):
    """Sums of float32 features: relative to the largest |Σψ| of each kind."""
    for g, e in zip(got, expected):
        scale = e.abs().amax(dim=1, keepdim=True) + 1e-300
        assert float(((g - e).abs() / scale).max()) <= rtol


# (d, K, m): one block per side, several blocks (m > N) on either side, padding, K = 2.
SHAPES = [(16, 64, 48), (7, 3, 40), (33, 100, 256), (64, 1000, 96), (5, 2, 8)]


@pytest.mark.parametrize("d,K,m", SHAPES)
def test_matches_dense_definition(backend, d, K, m):
    torch.manual_seed(d + K)
    plans = make_plans(d, K, m)
    a, z, y = torch.randn(9, d), 3 * torch.randn(9, K), torch.randint(0, K, (9,))
    assert_close_sums(run(backend, a, plans, logits=z, y=y), dense_oracle(a, z, y, plans))


def test_head_weights_equal_logits_and_chunking_is_invisible(backend):
    torch.manual_seed(1)
    d, K, m, B = 24, 300, 128, 11
    plans = make_plans(d, K, m, seed=5)
    a, W, b, y = torch.randn(B, d), torch.randn(K, d) / 3, torch.randn(K), torch.randint(0, K, (B,))
    expected = run(backend, a, plans, logits=a @ W.T + b, y=y)
    for chunk_rows in (1, 4, None):
        assert_close_sums(run(backend, a, plans, W=W, b=b, y=y, chunk_rows=chunk_rows), expected)
    assert_close_sums(run(backend, a, plans, W=W, y=y, chunk_rows=3), run(backend, a, plans, logits=a @ W.T, y=y))


def test_sampled_labels_follow_the_inverse_cdf(backend):
    torch.manual_seed(2)
    d, K, m, B = 8, 50, 64, 40
    plans = make_plans(d, K, m, seed=9)
    a, z = torch.randn(B, d), 2 * torch.randn(B, K)
    u = torch.rand(B, dtype=torch.float64)
    cdf = np.cumsum(scipy.special.softmax(z.double().numpy(), axis=1), axis=1)
    y = torch.from_numpy(np.array([np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u.numpy())]))
    assert_close_sums(run(backend, a, plans, logits=z, u=u), dense_oracle(a, z, y, plans))


def test_accumulates_into_existing_sums_and_half_inputs(backend):
    torch.manual_seed(3)
    plans = make_plans(12, 40, 32)
    a, z, y = torch.randn(6, 12), torch.randn(6, 40), torch.randint(0, 40, (6,))
    once = run(backend, a, plans, logits=z, y=y)
    sums = torch.zeros(3, 32, dtype=torch.float64, device=backend.device)
    sumsqs = torch.zeros_like(sums)
    for rows in (slice(0, 2), slice(2, 6)):
        fisher_sketch_update(sums, sumsqs, a[rows].to(backend.device), plans, logits=z[rows].to(backend.device),
                             y=y[rows].to(backend.device), backend=backend.name)
    assert_close_sums((sums.cpu(), sumsqs.cpu()), once, rtol=1e-12)
    half = run(backend, a.half(), plans, logits=z.half(), y=y.int())
    assert_close_sums(half, dense_oracle(a.half().float(), z.half().float(), y, plans))


def test_bad_inputs_raise_before_work():
    plans = make_plans(4, 6, 8)
    a, z, y = torch.randn(3, 4), torch.randn(3, 6), torch.tensor([0, 1, 5])
    sums, sumsqs = torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64)
    cases = [
        (dict(sums=sums.float()), TypeError, "sums"),
        (dict(sumsqs=torch.zeros(3, 9, dtype=torch.float64)), ValueError, "sumsqs"),
        (dict(a=torch.randn(3, 5)), ValueError, "n_in = d"),
        (dict(logits=None), ValueError, "exactly one of logits"),
        (dict(logits=torch.randn(2, 6)), ValueError, "logits"),
        (dict(y=torch.tensor([0, 1, 6])), ValueError, "labels in"),
        (dict(y=torch.tensor([0.0, 1.0, 2.0])), TypeError, "y"),
        (dict(y=None), ValueError, "exactly one of y"),
        (dict(y=None, u=torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)), ValueError, r"\[0, 1\)"),
        (dict(plans=plans[:3]), TypeError, "plans"),
        (dict(plans=(*plans[:3], SRHTPlan(6, 16, 1))), ValueError, "one m"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(backend="nope"), ValueError, "unknown backend"),
    ]
    for change, error, message in cases:
        kw = dict(sums=sums, sumsqs=sumsqs, a=a, plans=plans, logits=z, y=y)
        kw.update(change)
        before = sums.clone()
        with pytest.raises(error, match=message):
            fisher_sketch_update(kw.pop("sums"), kw.pop("sumsqs"), kw.pop("a"), kw.pop("plans"), **kw)
        assert torch.equal(sums, before)
    with pytest.raises(ValueError, match="W must have shape"):
        fisher_sketch_update(sums, sumsqs, a, plans, W=torch.randn(6, 5), y=y)
    with pytest.raises(ValueError, match="b is only used with W"):
        fisher_sketch_update(sums, sumsqs, a, plans, logits=z, b=torch.zeros(6), y=y)


def test_empty_batch_leaves_the_sums_unchanged(backend):
    plans = make_plans(12, 40, 32)
    sums = torch.ones(3, 32, dtype=torch.float64, device=backend.device)
    sumsqs = torch.ones_like(sums)
    a, z = torch.empty(0, 12, device=backend.device), torch.empty(0, 40, device=backend.device)
    fisher_sketch_update(sums, sumsqs, a, plans, logits=z, y=torch.empty(0, dtype=torch.int64, device=backend.device),
                         backend=backend.name)
    fisher_sketch_update(sums, sumsqs, a, plans, W=torch.randn(40, 12, device=backend.device),
                         u=torch.empty(0, device=backend.device), backend=backend.name)
    assert bool((sums == 1).all()) and bool((sumsqs == 1).all())


def test_op_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    plans = make_plans(12, 40, 32)
    tensors = [t for plan in plans for t in plan.tensors(torch.device("cpu"))]
    args = [torch.zeros(3, 32, dtype=torch.float64), torch.zeros(3, 32, dtype=torch.float64), torch.randn(4, 12),
            torch.randn(4, 40), torch.randint(0, 40, (4,)), None, *tensors, None]
    torch.library.opcheck(torch.ops.fisherfast.fisher_sketch_update_.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with_mean_and_cap = [torch.zeros(4, 32, dtype=torch.float64), torch.zeros(4, 32, dtype=torch.float64),
                         *args[2:3], 2.0 * torch.tanh(args[3]), *args[4:], 2.0]  # first-moment row, softcap c = 2
    torch.library.opcheck(torch.ops.fisherfast.fisher_sketch_update_.default, with_mean_and_cap,
                          test_utils=("test_schema", "test_faketensor"))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args]
        torch.ops.fisherfast.fisher_sketch_update_.default(*fake)
        bad = list(fake)
        bad[3] = mode.from_tensor(torch.randn(5, 40))  # logits rows ≠ a rows
        with pytest.raises(ValueError, match="logits must have R = 4 rows"):
            torch.ops.fisherfast.fisher_sketch_update_.default(*bad)
        bad = list(fake)
        bad[0] = mode.from_tensor(torch.zeros(3, 31, dtype=torch.float64))
        with pytest.raises(TypeError, match="sums must be float64 of shape"):
            torch.ops.fisherfast.fisher_sketch_update_.default(*bad)


def test_cpu_entry_point_checks_its_tensor_views():
    """The C++ update takes DLPack views and checks them once, naming the argument."""
    _C = pytest.importorskip("fisherfast._C")
    from torch.utils.dlpack import to_dlpack as dl

    plans = make_plans(4, 6, 8)
    tensors = [dl(t) for plan in plans for t in plan.tensors(torch.device("cpu"))]
    sums = torch.zeros(3, 8, dtype=torch.float64)
    a, z, y = dl(torch.randn(2, 4)), dl(torch.randn(2, 6)), dl(torch.tensor([0, 5]))
    scratch, acc = dl(torch.empty(1, sum(p.n_blocks * p.N for p in plans))), dl(torch.empty(1, 6, 8).double())
    cases = [
        ((dl(sums), dl(sums), a, z, None, None), "give exactly one of y or u"),
        ((dl(sums), dl(sums.float()), a, z, y, None), "sumsqs must be float64, got float32"),
        ((dl(sums), dl(sums), a, dl(torch.randn(3, 6)), y, None), "logits dimension 0 must be 2"),
        ((dl(sums[:, :7].contiguous()), dl(sums), a, z, y, None), "sumsqs dimension 1 must be 7"),
        ((dl(sums[:, :7]), dl(sums), a, z, y, None), "sums must be contiguous"),
    ]
    for head, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.fisher_sketch_update(*head, *tensors, scratch, acc, 1)
    _C.fisher_sketch_update(dl(sums), dl(sums.clone()), a, z, y, None, *tensors, scratch, acc, 1)
    assert bool(sums.abs().sum() > 0)


def autograd_oracle(a, W, b, y, softcap, plans):
    """(Σ, Σ²) per kind (joint, activation, error, first moment) from the float64 per-sample gradients
    g = ∂CE(c·tanh((W a + b)/c), y)/∂W (K, d) and e = ∂CE/∂z (K,) by torch.func.jacrev of the capped
    cross-entropy — the chain rule through the cap done by autograd, not by the formula under test."""
    m = plans[0].m
    Ra, Sa, Re, Se = (dense_features(p) for p in plans)
    a, W, b = a.double(), W.double(), b.double()

    def loss_z(z, y_i):  # cross-entropy of the capped logits, as a function of the linear logits z
        return torch.nn.functional.cross_entropy((softcap * torch.tanh(z / softcap))[None], y_i[None])

    def loss_W(W_, a_i, y_i):
        return loss_z(W_ @ a_i + b, y_i)

    g = torch.stack([torch.func.jacrev(loss_W)(W, a_i, y_i) for a_i, y_i in zip(a, y)])  # (B, K, d)
    e = torch.stack([torch.func.jacrev(loss_z)(W @ a_i + b, y_i) for a_i, y_i in zip(a, y)])  # (B, K)
    r_g = torch.einsum("jk,bkd,jd->bj", Re, g, Ra)  # r_j·g with r_j = rᵉ_j ⊗ rᵃ_j
    s_g = torch.einsum("jk,bkd,jd->bj", Se, g, Sa)
    psi = torch.stack([r_g * s_g / math.sqrt(m), (a @ Ra.T) * (a @ Sa.T) / math.sqrt(m),
                       (e @ Re.T) * (e @ Se.T) / math.sqrt(m), r_g / math.sqrt(m)])  # (4, B, m)
    return psi.sum(1), psi.square().sum(1)


@pytest.mark.parametrize("d,K,m", [(16, 64, 48), (7, 3, 40), (33, 100, 256)])
def test_softcap_and_first_moment_match_autograd(backend, d, K, m):
    # Logits of scale 6 against the cap c = 4 keep tanh well inside its curved part (s from 0.01 to 1).
    # Error model: the op's features are float32 (the capped logits rounded once, s = 1 − (z′/c)² to
    # ~1e-7 absolute, the FWHT sums of ≤ 256 terms) against float64 autograd; the W path adds the
    # float32 GEMM (d ≤ 33 terms): ~1e-6 relative per feature, within the 2e-5 of assert_close_sums.
    torch.manual_seed(d * K)
    c, B = 4.0, 9
    plans = make_plans(d, K, m, seed=3)
    a, W, b = torch.randn(B, d), 6 * torch.randn(K, d) / math.sqrt(d), torch.randn(K)
    y = torch.randint(0, K, (B,))
    expected = autograd_oracle(a, W, b, y, c, plans)
    for kw in (dict(W=W, b=b), dict(logits=c * torch.tanh((a.double() @ W.double().T + b.double()) / c))):
        sums = torch.zeros(4, m, dtype=torch.float64, device=backend.device)
        sumsqs = torch.zeros_like(sums)
        moved = {k: v.float().to(backend.device) for k, v in kw.items()}
        fisher_sketch_update(sums, sumsqs, a.to(backend.device), plans, y=y.to(backend.device), softcap=c,
                             backend=backend.name, **moved)
        assert_close_sums((sums.cpu(), sumsqs.cpu()), expected)
    # Without the cap's slope the error would be p − e_y: far from the oracle, so the test can fail.
    sums = torch.zeros(4, m, dtype=torch.float64)
    fisher_sketch_update(sums, torch.zeros_like(sums), a, plans, logits=c * torch.tanh((a @ W.T + b) / c), y=y)
    assert float((sums[2] - expected[0][2]).abs().max()) > 0.1 * float(expected[0][2].abs().max())


def test_softcap_bad_inputs_raise_before_work():
    d, K, m = 4, 8, 16
    plans = make_plans(d, K, m)
    sums, sumsqs = torch.zeros(4, m, dtype=torch.float64), torch.zeros(4, m, dtype=torch.float64)
    a, y = torch.randn(2, d), torch.tensor([0, 1])
    for bad in (0.0, -1.0, float("inf"), True, "4"):
        with pytest.raises(ValueError, match="softcap"):
            fisher_sketch_update(sums, sumsqs, a, plans, logits=torch.zeros(2, K), y=y, softcap=bad)
    with pytest.raises(ValueError, match="capped logits"):
        fisher_sketch_update(sums, sumsqs, a, plans, logits=torch.full((2, K), 5.0), y=y, softcap=4.0)
    with pytest.raises(ValueError, match="sumsqs"):
        fisher_sketch_update(sums, sumsqs[:3], a, plans, logits=torch.zeros(2, K), y=y)
    assert not sums.any() and not sumsqs.any()
