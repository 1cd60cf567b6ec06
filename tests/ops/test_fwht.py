"""fwht on every backend against scipy.linalg.hadamard (dense, float64) and its
Kronecker factorization for the large sizes.

The oracle runs in extended precision. Tolerances: a radix-2 Walsh–Hadamard transform in precision u commits, in
stage s, a rounding error of at most u·‖z_s‖₂ (z_s the stage output), which
the remaining stages scale exactly like the signal, so to first order
‖ŷ − y‖₂ ≤ L·u·‖y‖₂ for N = 2^L. The Triton backend forms the same sums as
short ±1 dot products (a different summation order, the same kind of bound);
the tests allow 2·L·u·‖y‖₂ (+u for the 1/√N scaling) for every backend.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisherfast.ops import available_backends, fwht
from fisherfast.ops.fwht import fwht_reference

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def hadamard_oracle(x: torch.Tensor) -> torch.Tensor:
    """H_N x over the last dim, in extended precision (numpy longdouble, so
    that its own rounding stays far below the float64 bounds), returned as
    float64: the dense scipy matrix for N ≤ 1024, else the Sylvester identity
    H_N = H_{f1} ⊗ H_{f2} ⊗ … (factors ≤ 64, scipy matrices too) applied along
    the axes of the row reshaped to (f1, f2, …)."""
    x_ld = x.detach().cpu().double().numpy().astype(np.longdouble)
    n = x_ld.shape[-1]
    if n <= 1024:
        y = x_ld @ scipy.linalg.hadamard(n).astype(np.longdouble).T
    else:
        L = n.bit_length() - 1
        dims = [64] * (L // 6) + ([1 << (L % 6)] if L % 6 else [])
        y = x_ld.reshape(-1, *dims)
        for axis, f in enumerate(dims, start=1):
            H = scipy.linalg.hadamard(f).astype(np.longdouble)
            y = np.moveaxis(np.moveaxis(y, axis, -1) @ H.T, -1, axis)
        y = y.reshape(x_ld.shape)
    return torch.from_numpy(y.astype(np.float64))


def assert_transform_close(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, normalized: bool = False):
    """Row-wise ‖y − expected‖₂ ≤ rtol·‖expected‖₂ with rtol = 2·L·u in the
    compute precision (+u for the scaling, + one rounding to a half dtype)."""
    n = expected.shape[-1]
    L = max(n.bit_length() - 1, 1)
    u = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    rtol = 2 * L * u + (u if normalized else 0.0)
    if dtype in (torch.float16, torch.bfloat16):
        rtol += UNIT_ROUNDOFF[dtype]
    err = (y.detach().cpu().double() - expected).reshape(-1, n).norm(dim=1)
    ref = expected.reshape(-1, n).norm(dim=1)
    bad = err > rtol * ref + 1e-300
    assert not bool(bad.any()), f"max relative error {float((err / ref.clamp_min(1e-300)).max()):.3e} > {rtol:.3e}"


@pytest.mark.parametrize("log2_n", range(0, 11))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_scipy_hadamard(backend, log2_n, dtype):
    n = 1 << log2_n
    x = torch.randn(3, n, dtype=dtype, device=backend.device)
    y = fwht(x, backend=backend.name)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_transform_close(y, hadamard_oracle(x), dtype)


@pytest.mark.parametrize("log2_n", range(11, 18))
def test_large_sizes_match_kronecker_oracle(backend, log2_n):
    n = 1 << log2_n
    rows = 1 if log2_n >= 16 else 2  # one row exercises the split-a-row path of the cpu kernel
    x = torch.randn(rows, n, device=backend.device)
    assert_transform_close(fwht(x, backend=backend.name), hadamard_oracle(x), torch.float32)


@pytest.mark.parametrize("log2_n", [12, 17])
def test_float64_large_sizes(backend, log2_n):
    x = torch.randn(2, 1 << log2_n, dtype=torch.float64, device=backend.device)
    assert_transform_close(fwht(x, backend=backend.name), hadamard_oracle(x), torch.float64)


def test_many_rows_large_size(backend):
    # More rows than threads with rows of many cache blocks: the row-parallel path.
    if backend.name == "triton" and backend.device.type == "cpu":
        pytest.skip("interpreter: kept to small shapes")
    x = torch.randn(5, 1 << 15, device=backend.device)
    assert_transform_close(fwht(x, backend=backend.name), hadamard_oracle(x), torch.float32)


@pytest.mark.parametrize("log2_n", [1, 5, 10])
def test_transform_twice_is_n_times_identity(backend, log2_n):
    # H·H = N·I; small integers keep every sum exact in float32 (|values| ≤ 3·N² < 2^24).
    n = 1 << log2_n
    x = torch.randint(-3, 4, (4, n), device=backend.device).float()
    assert torch.equal(fwht(fwht(x, backend=backend.name), backend=backend.name), n * x)
    # Normalized: self-inverse, within two transforms' error bounds (see the module docstring).
    z = fwht(fwht(x, normalized=True, backend=backend.name), normalized=True, backend=backend.name)
    rtol = 2 * (2 * log2_n + 1) * UNIT_ROUNDOFF[torch.float32]
    assert bool(((z - x).norm(dim=1) <= rtol * x.norm(dim=1)).all())


@pytest.mark.parametrize("shape", [(8,), (2, 3, 16), (1, 1, 1, 32), (0, 64), (5, 0, 4)])
def test_batch_shapes(backend, shape):
    x = torch.randn(shape, device=backend.device)
    y = fwht(x, backend=backend.name)
    assert y.shape == x.shape
    if x.numel():
        assert_transform_close(y, hadamard_oracle(x), torch.float32)


def test_normalized_flag(backend):
    x = torch.randn(3, 256, dtype=torch.float64, device=backend.device)
    y = fwht(x, normalized=True, backend=backend.name)
    assert_transform_close(y, hadamard_oracle(x) / 16.0, torch.float64, normalized=True)


@pytest.mark.parametrize("view", ["transposed", "sliced_rows", "last_dim_step2"])
@pytest.mark.parametrize("inplace", [False, True])
def test_non_contiguous_inputs(backend, view, inplace):
    base = torch.randn(64, 64, device=backend.device)
    x = {
        "transposed": lambda b: b.t(),
        "sliced_rows": lambda b: b[::2],
        "last_dim_step2": lambda b: b.repeat_interleave(2, dim=1)[:, ::2],
    }[view](base)
    assert not x.is_contiguous()
    expected = hadamard_oracle(x)
    before = x.clone()
    y = fwht(x, inplace=inplace, backend=backend.name)
    assert_transform_close(y, expected, torch.float32)
    if inplace:
        assert y is x
        assert_transform_close(x, expected, torch.float32)
    else:
        assert torch.equal(x, before), "out-of-place fwht modified its input"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_inplace_equals_out_of_place(backend, dtype):
    x = torch.randn(3, 4, 128, device=backend.device).to(dtype)
    y = fwht(x, backend=backend.name)
    address = x.data_ptr()
    out = fwht(x, inplace=True, backend=backend.name)
    assert out is x and x.data_ptr() == address
    assert torch.equal(x, y)


def test_out_of_place_leaves_input_alone(backend):
    for x in (torch.randn(4, 1024, device=backend.device), torch.randn(2, 64, device=backend.device).half()):
        before = x.clone()
        y = fwht(x, backend=backend.name)
        assert torch.equal(x, before)
        assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(backend, dtype):
    # Computed in float32 from the exact half values, rounded once to the half dtype.
    x = torch.randn(4, 512, device=backend.device).to(dtype)
    y = fwht(x, normalized=True, backend=backend.name)
    assert y.dtype == dtype
    expected = hadamard_oracle(x) / math.sqrt(512)
    assert_transform_close(y, expected, dtype, normalized=True)
    # float32 accumulation: a half-precision accumulation would miss by far more.
    assert torch.equal(y, fwht(x.float(), normalized=True, backend=backend.name).to(dtype))


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def _cases(draw):
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    log2_n = draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(_DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "step", "offset"]))
    return batch, 1 << log2_n, dtype, layout, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31))


def _make(batch, n, dtype, layout, seed, device):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and batch:
        x = torch.randn(*batch[:-1], n, batch[-1], generator=g).transpose(-1, -2)
    elif layout == "step":
        x = torch.randn(*batch, 2 * n, generator=g)[..., ::2]
    elif layout == "offset":
        x = torch.randn(*batch, n + 1, generator=g)[..., 1:]
    else:
        x = torch.randn(*batch, n, generator=g)
    return x.to(dtype=dtype, device=device)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_property_sweep(backend, case):
    batch, n, dtype, layout, inplace, normalized, seed = case
    x = _make(batch, n, dtype, layout, seed, backend.device)
    expected = hadamard_oracle(x) / (math.sqrt(n) if normalized else 1.0)
    before = x.clone()
    y = fwht(x, normalized=normalized, inplace=inplace, backend=backend.name)
    assert y.shape == x.shape and y.dtype == dtype
    assert_transform_close(y, expected, dtype, normalized=normalized)
    if inplace:
        assert y is x
    else:
        assert torch.equal(x, before)


@pytest.mark.parametrize("normalized", [False, True])
def test_gradient_matches_finite_differences(backend, normalized):
    x = torch.randn(2, 8, dtype=torch.float64, device=backend.device, requires_grad=True)
    f = lambda t: fwht(t, normalized=normalized, backend=backend.name)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("log2_n", [3, 8, 13])
def test_triton_kernel_converts_on_load(log2_n, dtype):
    # The kernel itself reads half (or float32) inputs and computes in its output's float32.
    status = available_backends()["triton"]
    if not status.available:
        pytest.skip(status.reason)
    from fisherfast.ops.fwht_triton import fwht_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = torch.randn(3, 1 << log2_n, device=device).to(dtype)
    dst = torch.empty(src.shape, device=device)
    fwht_triton(src, dst, 0.5)
    assert_transform_close(dst, hadamard_oracle(src) * 0.5, torch.float32, normalized=True)


def test_reference_impl_writes_dst_only():
    src = torch.randn(2, 16, dtype=torch.float64)
    before = src.clone()
    dst = torch.empty_like(src)
    fwht_reference(src, dst, 0.25)
    assert torch.equal(src, before)
    torch.testing.assert_close(dst, hadamard_oracle(src) * 0.25, rtol=1e-14, atol=1e-14)


# -- bad inputs: clear errors before any work --------------------------------------


@pytest.mark.parametrize("n", [3, 6, 100, 1000])
def test_rejects_non_power_of_two(backend, n):
    x = torch.randn(2, n, device=backend.device)
    before = x.clone()
    with pytest.raises(ValueError, match="power of two"):
        fwht(x, inplace=True, backend=backend.name)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_rejects_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match="x: expected a floating tensor"):
        fwht(torch.zeros(2, 8, dtype=dtype))


def test_rejects_non_tensors_and_scalars():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fwht(np.zeros(8))
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        fwht(torch.tensor(1.0))


def test_rejects_backend_for_wrong_device():
    x = torch.randn(2, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        fwht(x, inplace=True, backend="cuda")
    assert torch.equal(x, before)


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fwht(torch.randn(8), backend="fast")


# ------------------------------------------------------------ edge inputs (issue 9)

def test_empty_batch_gives_empty_result(backend):
    x = torch.empty(0, 16, device=backend.device)
    assert fwht(x, backend=backend.name).shape == (0, 16)
    assert fwht(x, inplace=True, backend=backend.name) is x


@pytest.mark.parametrize("inplace", [False, True])
def test_half_precision_overflow_raises(backend, inplace):
    """Sixteen entries of 6e4 sum to 9.6e5 > 65504: an OverflowError, never a
    silent Inf; in place, x is left as it was."""
    x = torch.full((2, 16), 6e4, dtype=torch.float16, device=backend.device)
    before = x.clone()
    with pytest.raises(OverflowError, match="fwht.*overflows torch.float16"):
        fwht(x, inplace=inplace, backend=backend.name)
    assert torch.equal(x, before)
    # In range: sixteen entries of 1e3 give 1.6e4, returned exactly.
    y = fwht(torch.full((2, 16), 1e3, dtype=torch.float16, device=backend.device), backend=backend.name)
    assert float(y[0, 0]) == 16e3 and bool(torch.isfinite(y).all())


def test_cpu_entry_points_take_checked_dlpack_views():
    """fwht/srht cross into C++ as DLPack views (like the other ops): the
    extension checks each view and names it, before any work."""
    from torch.utils.dlpack import to_dlpack as dl

    from fisherfast.ops import _backends

    if not _backends.available_backends()["cpu"].available:
        pytest.skip("the C++ extension is not built")
    ext = _backends.cpu_extension()
    x = torch.randn(3, 8)
    y = torch.empty(3, 8)
    ext.fwht(dl(x), dl(y), 1.0, 1)
    assert torch.allclose(y, fwht(x, backend="reference"))
    for args, message in (((x.data_ptr(), dl(y), 1.0, 1), "src must be a DLPack capsule"),
                          ((dl(x.int()), dl(y), 1.0, 1), "src must be float32 or float64"),
                          ((dl(x), dl(torch.empty(3, 4)), 1.0, 1), "dst dimension 1 must be 8"),
                          ((dl(x), dl(y.double()), 1.0, 1), "dst must be float32"),
                          ((dl(x[:, :6].contiguous()), dl(y[:, :6].contiguous()), 1.0, 1), "power of two")):
        with pytest.raises(ValueError, match=message):
            ext.fwht(*args)
    signs, idx = torch.ones(1, 8), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="idx must be int64"):
        ext.srht(dl(x), dl(signs), dl(idx.int()), dl(torch.empty(3, 2)), 1)
    with pytest.raises(ValueError, match="out dimension 1 must be 2"):
        ext.srht(dl(x), dl(signs), dl(idx), dl(torch.empty(3, 3)), 1)
