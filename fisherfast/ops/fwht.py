"""Fast Walsh–Hadamard transform over the last dimension (DESIGN.md §7).

y = H_N x with H_N the unnormalized Sylvester Hadamard matrix (entries ±1,
natural order, equal to scipy.linalg.hadamard(N)); ``normalized=True`` scales
by 1/√N so the transform is orthonormal. N must be a power of two. Any leading
batch shape; float32/float64 computed as they are, float16/bfloat16 computed in
float32 and returned in the input dtype. Cost: N log₂N adds per row, no extra
memory beyond the output.
"""
from __future__ import annotations

import math

import torch

from fisherfast.ops import _backends
from fisherfast.ops._checks import check_tensor, compute_dtype


def _check_fwht_input(x: torch.Tensor) -> None:
    check_tensor("x", x, min_ndim=1)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x.shape[-1] must be a power of two, got {n} (pad to {1 << max(n - 1, 0).bit_length()})")


def fwht_reference_(y: torch.Tensor, scale: float) -> None:
    """In-place radix-2 butterflies on a contiguous float32/float64 tensor: pairs
    (i, i + h) within blocks of 2h, h = 1, 2, …, N/2 (gives Sylvester order)."""
    n = y.shape[-1]
    rows = y.view(-1, n)
    h = 1
    while h < n:
        blocks = rows.view(-1, n // (2 * h), 2, h)
        a, b = blocks[:, :, 0], blocks[:, :, 1]
        blocks.copy_(torch.stack((a + b, a - b), dim=2))
        h *= 2
    if scale != 1.0:
        rows.mul_(scale)


_IMPLS = {"reference": fwht_reference_}


def _run(y: torch.Tensor, scale: float, backend: str) -> None:
    impl = _backends.select("fwht", _IMPLS, y.device, backend or None)
    impl(y, scale)


@torch.library.custom_op("fisherfast::fwht", mutates_args=())
def _fwht_op(x: torch.Tensor, normalized: bool, backend: str) -> torch.Tensor:
    y = x.to(compute_dtype(x.dtype), copy=True, memory_format=torch.contiguous_format).contiguous()
    _run(y, 1.0 / math.sqrt(x.shape[-1]) if normalized else 1.0, backend)
    return y.to(x.dtype)


@_fwht_op.register_fake
def _(x, normalized, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fisherfast::fwht_", mutates_args=("x",))
def _fwht_inplace_op(x: torch.Tensor, normalized: bool, backend: str) -> None:
    scale = 1.0 / math.sqrt(x.shape[-1]) if normalized else 1.0
    if x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        _run(x, scale, backend)
        return
    y = x.to(compute_dtype(x.dtype), memory_format=torch.contiguous_format).contiguous()
    _run(y, scale, backend)
    x.copy_(y)


@_fwht_inplace_op.register_fake
def _(x, normalized, backend):
    return None


def fwht(x: torch.Tensor, *, normalized: bool = False, inplace: bool = False, backend: str | None = None) -> torch.Tensor:
    """Walsh–Hadamard transform of ``x`` over its last dimension.

    Args:
        x: (..., N) floating tensor, N a power of two; any strides.
        normalized: scale by 1/√N (orthonormal transform, self-inverse).
        inplace: overwrite ``x`` and return it.
        backend: force "reference", "cpu", "triton" or "cuda" (default: the
            fastest available; FISHERFAST_BACKEND overrides too).

    Returns:
        H_N x (times 1/√N if normalized), same shape and dtype as ``x``.
    """
    _check_fwht_input(x)
    if inplace:
        torch.ops.fisherfast.fwht_(x, normalized, backend or "")
        return x
    return torch.ops.fisherfast.fwht(x, normalized, backend or "")
