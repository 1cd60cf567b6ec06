"""SRHT against its dense definition, the one-hot closed form, and its
unbiasedness (docs/design.md §7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fisherfast.ops import SRHTPlan, srht, srht_onehot
from fisherfast.ops.srht import parity


def dense_features(plan: SRHTPlan) -> torch.Tensor:
    """(m, n_in) float64 matrix of the feature vectors r_j = D_b H_N e_i,
    i.e. S[j, k] = D_b[k] · H_N[i, k] with b, i = divmod(idx_j, N)."""
    H = torch.from_numpy(scipy.linalg.hadamard(plan.N)).double()
    block, i = plan.idx // plan.N, plan.idx % plan.N
    return (plan.signs.double()[block] * H[i])[:, : plan.n_in]


def test_plan_is_a_pure_function_of_its_arguments():
    a, b, c = SRHTPlan(100, 300, seed=7), SRHTPlan(100, 300, seed=7), SRHTPlan(100, 300, seed=8)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.idx, b.idx) and a == b and hash(a) == hash(b)
    assert not torch.equal(a.signs, c.signs) and a != c
    assert (a.N, a.n_blocks) == (128, 3)
    assert a.signs.shape == (3, 128) and set(a.signs.unique().tolist()) == {-1.0, 1.0}
    assert a.idx.shape == (300,) and a.idx.unique().numel() == 300  # no repeated feature
    assert int(a.idx.min()) >= 0 and int(a.idx.max()) < 3 * 128
    assert SRHTPlan(128256, 4096).N == 131072 and SRHTPlan(1, 1).N == 1


@pytest.mark.parametrize("n_in,m", [(1, 1), (5, 3), (16, 16), (100, 300), (200, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense_definition(backend, n_in, m, dtype):
    plan = SRHTPlan(n_in, m, seed=3)
    x = torch.randn(2, 3, n_in, dtype=dtype, device=backend.device)
    y = srht(x, plan, backend=backend.name)
    assert y.shape == (2, 3, m) and y.dtype == dtype and y.device == x.device
    # The oracle's products in extended precision keep its rounding far below the float64 bound.
    x_ld = x.cpu().double().numpy().astype(np.longdouble)
    expected = torch.from_numpy((x_ld @ dense_features(plan).numpy().astype(np.longdouble).T).astype(np.float64))
    # Each feature is one output of an N-point transform: the fwht bound 2·L·u·‖x‖₂ per row.
    L = max(plan.N.bit_length() - 1, 1)
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    err = (y.cpu().double() - expected).abs().amax(dim=-1)
    assert bool((err <= 2 * L * u * x.cpu().double().norm(dim=-1) + 1e-300).all())


@pytest.mark.parametrize("n_in,m", [(10, 6), (6, 20)])
def test_gradient_matches_finite_differences(backend, n_in, m):
    plan = SRHTPlan(n_in, m, seed=4)
    x = torch.randn(2, n_in, dtype=torch.float64, device=backend.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: srht(t, plan, backend=backend.name), (x,), fast_mode=True)


def test_half_input_and_noncontiguous(backend):
    plan = SRHTPlan(40, 24, seed=1)
    base = torch.randn(40, 6, device=backend.device)
    x = base.t()  # (6, 40), not contiguous
    torch.testing.assert_close(srht(x, plan, backend=backend.name), srht(x.contiguous(), plan, backend="reference"))
    y = srht(x.half(), plan, backend=backend.name)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, srht(x.half().float(), plan, backend="reference").half())


@pytest.mark.parametrize("n_in,m", [(1, 4), (10, 7), (64, 200), (1000, 50)])
def test_onehot_equals_srht_of_onehot(n_in, m):
    plan = SRHTPlan(n_in, m, seed=11)
    y = torch.randint(0, n_in, (3, 5))
    onehot = torch.nn.functional.one_hot(y, n_in).double()
    expected = srht(onehot, plan)
    assert torch.equal(srht_onehot(y, plan, dtype=torch.float64), expected)
    assert torch.equal(srht_onehot(y.int(), plan), expected.float())


def test_parity_is_popcount_mod_two():
    v = torch.randint(0, 2**62, (1000,))
    expected = torch.tensor([bin(int(a)).count("1") % 2 for a in v])
    assert torch.equal(parity(v), expected)


def test_features_are_unbiased():
    """E[(r_j·x)(r_j·y)] = x·y over the plan's random signs.

    For one feature, with Rademacher signs, the cross terms D_k D_l vanish in
    expectation and Var[(r·x)(r·y)] = ‖x‖²‖y‖² + (x·y)² − 2 Σ_k x_k² y_k² (the
    ±1 Hadamard entries square away). Averaging the m features of one plan
    cannot raise the variance, so over S independent seeds the mean has
    standard deviation ≤ √(Var/S); the test allows 5 of them."""
    n_in, m, S = 12, 8, 2000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, n_in, dtype=torch.float64, generator=g)
    xy = torch.stack([x, y])
    Z = torch.empty(S, dtype=torch.float64)
    for s in range(S):
        f = srht(xy, SRHTPlan(n_in, m, seed=s))
        Z[s] = (f[0] * f[1]).mean()
    var = x.dot(x) * y.dot(y) + x.dot(y) ** 2 - 2 * (x**2 * y**2).sum()
    assert abs(float(Z.mean() - x.dot(y))) <= 5 * math.sqrt(float(var) / S)


# -- bad inputs --------------------------------------------------------------------


def test_rejects_bad_plans():
    for kwargs in ({"n_in": 0, "m": 4}, {"n_in": 4, "m": 0}, {"n_in": 4.0, "m": 4}, {"n_in": 4, "m": 4, "seed": -1}):
        with pytest.raises(ValueError):
            SRHTPlan(**kwargs)
    with pytest.raises(TypeError, match="plan: expected an SRHTPlan"):
        srht(torch.randn(4), (4, 4, 0))


def test_rejects_bad_inputs(backend):
    plan = SRHTPlan(10, 4)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal plan.n_in = 10, got 12"):
        srht(torch.randn(3, 12, device=backend.device), plan, backend=backend.name)
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        srht(torch.ones(3, 10, dtype=torch.int64, device=backend.device), plan, backend=backend.name)


def test_rejects_backend_for_wrong_device():
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        srht(torch.randn(2, 10), SRHTPlan(10, 4), backend="cuda")


def test_onehot_rejects_bad_labels():
    plan = SRHTPlan(10, 4)
    with pytest.raises(TypeError, match="y: expected an int32/int64 tensor"):
        srht_onehot(torch.zeros(3), plan)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\), got range \[0, 10\]"):
        srht_onehot(torch.tensor([0, 10]), plan)
    with pytest.raises(ValueError, match="labels in"):
        srht_onehot(torch.tensor([-1]), plan)
    with pytest.raises(TypeError, match="plan: expected an SRHTPlan"):
        srht_onehot(torch.tensor([1]), None)


# ------------------------------------------------------------ edge inputs (issue 9)

def test_empty_batch_gives_empty_result(backend):
    plan = SRHTPlan(40, 24, seed=1)
    y = srht(torch.empty(0, 40, device=backend.device), plan, backend=backend.name)
    assert y.shape == (0, 24) and y.device.type == backend.device.type


def test_half_precision_overflow_raises(backend):
    """Features are ±-sums of 40 entries of 6e4: beyond 65504, so float16 raises."""
    plan = SRHTPlan(40, 24, seed=1)
    x = torch.full((2, 40), 6e4, dtype=torch.float16, device=backend.device)
    assert float(srht(x.float(), plan, backend="reference" if backend.device.type == "cpu" else backend.name)
                 .abs().max()) > 65504
    with pytest.raises(OverflowError, match="srht.*overflows torch.float16"):
        srht(x, plan, backend=backend.name)
