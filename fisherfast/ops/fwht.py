"""Fast Walsh–Hadamard transform over the last dimension (docs/design.md §7).

y = H_N x with H_N the unnormalized Sylvester Hadamard matrix (entries ±1,
natural order, equal to scipy.linalg.hadamard(N)); ``normalized=True`` scales
by 1/√N so the transform is orthonormal. N must be a power of two. Any leading
batch shape; float32/float64 computed as they are, float16/bfloat16 computed in
float32 and returned in the input dtype. Cost: N log₂N adds per row, no extra
memory beyond the output. A half-precision result that overflows its dtype
raises OverflowError (never a silent Inf); an empty batch gives an empty result.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends
from fisherfast.checks import cast_checked, check_tensor, compute_dtype


def _check_fwht_input(x: torch.Tensor) -> None:
    check_tensor("x", x, min_ndim=1)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x.shape[-1]: expected a power of two, got {n} (pad to {1 << max(n - 1, 0).bit_length()})")


def fwht_reference(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """Radix-2 butterflies in pure PyTorch: pairs (i, i + h) within blocks of
    2h, h = 1, 2, …, N/2 (Sylvester order). src, dst: contiguous, same shape
    and float32/float64 dtype; dst may be src (in place)."""
    if dst.data_ptr() != src.data_ptr():
        dst.copy_(src)
    n = dst.shape[-1]
    rows = dst.view(-1, n)
    h = 1
    while h < n:
        blocks = rows.view(-1, n // (2 * h), 2, h)
        a, b = blocks[:, :, 0], blocks[:, :, 1]
        blocks.copy_(torch.stack((a + b, a - b), dim=2))
        h *= 2
    if scale != 1.0:
        rows.mul_(scale)


def fwht_cpu(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """The C++ kernel (csrc/cpu/fwht.cpp): cache-blocked, OpenMP over rows
    with torch's thread count, GIL released."""
    n = src.shape[-1]
    _backends.cpu_extension().fwht(to_dlpack(src.view(-1, n)), to_dlpack(dst.view(-1, n)), scale,
                                   torch.get_num_threads())


def fwht_triton(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """The Triton kernel (fisherfast/ops/fwht_triton.py), imported on first use
    so that TRITON_INTERPRET is read when the kernels are defined."""
    from fisherfast.ops.fwht_triton import fwht_triton as launch

    launch(src, dst, scale)


def fwht_cuda(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """The CUDA kernel (csrc/cuda/fwht.cu) on the tensors' current stream."""
    n = src.shape[-1]
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream(src.device).cuda_stream
        _backends.cuda_extension().fwht(to_dlpack(src.view(-1, n)), to_dlpack(dst.view(-1, n)), scale, stream)


# Every impl: (src, dst, scale) on contiguous float32/float64 tensors of one
# shape, dst may be src; writes scale · H_N src into dst.
_IMPLS = {"reference": fwht_reference, "cpu": fwht_cpu, "triton": fwht_triton, "cuda": fwht_cuda}


def _scale(n: int, normalized: bool) -> float:
    return 1.0 / math.sqrt(n) if normalized else 1.0


@torch.library.custom_op("fisherfast::fwht", mutates_args=())
def _fwht_op(x: torch.Tensor, normalized: bool, backend: Optional[str]) -> torch.Tensor:
    _check_fwht_input(x)
    impl = _backends.select("fwht", _IMPLS, x.device, backend or None)
    src = x.to(compute_dtype(x.dtype)).contiguous()
    # A converted copy is ours to overwrite; otherwise write a fresh output, so
    # the transform reads x once and writes once.
    dst = src if src.data_ptr() != x.data_ptr() else torch.empty_like(src)
    if x.numel():
        impl(src, dst, _scale(x.shape[-1], normalized))
    return cast_checked(dst, x.dtype, "fwht")


@_fwht_op.register_fake
def _(x, normalized, backend):
    _check_fwht_input(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fwht_setup_context(ctx, inputs, output):
    _, ctx.normalized, ctx.backend = inputs


def _fwht_backward(ctx, grad):
    # H_N is symmetric, so the vector-Jacobian product is the same transform.
    return torch.ops.fisherfast.fwht(grad, ctx.normalized, ctx.backend), None, None


_fwht_op.register_autograd(_fwht_backward, setup_context=_fwht_setup_context)


@torch.library.custom_op("fisherfast::fwht_", mutates_args=("x",))
def _fwht_inplace_op(x: torch.Tensor, normalized: bool, backend: Optional[str]) -> None:
    _check_fwht_input(x)
    impl = _backends.select("fwht", _IMPLS, x.device, backend or None)
    if not x.numel():
        return
    scale = _scale(x.shape[-1], normalized)
    if x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        impl(x, x, scale)
        return
    y = x.to(compute_dtype(x.dtype), memory_format=torch.contiguous_format).contiguous()
    impl(y, y, scale)
    x.copy_(cast_checked(y, x.dtype, "fwht"))


@_fwht_inplace_op.register_fake
def _(x, normalized, backend):
    _check_fwht_input(x)
    return None


def fwht(x: torch.Tensor, *, normalized: bool = False, inplace: bool = False, backend: str | None = None) -> torch.Tensor:
    """Walsh–Hadamard transform of ``x`` over its last dimension.

    Args:
        x: (..., N) floating tensor, N a power of two; any strides.
        normalized: scale by 1/√N (orthonormal transform, self-inverse).
        inplace: overwrite ``x`` and return it (not differentiable; the
            out-of-place op is, its backward being the same transform).
        backend: force "reference", "cpu", "triton" or "cuda" (default: the
            fastest available; FISHERFAST_BACKEND overrides too).

    Returns:
        H_N x (times 1/√N if normalized), same shape and dtype as ``x``.

    Raises:
        TypeError/ValueError for a non-floating x or N not a power of two;
        OverflowError when a float16/bfloat16 result overflows its dtype
        (``inplace=True`` then leaves x unchanged).
    """
    _check_fwht_input(x)
    # The op bodies pick the backend (first thing, before any work), so that
    # torch.compile sees one opaque op whatever the backend.
    if inplace:
        torch.ops.fisherfast.fwht_(x, normalized, backend)
        return x
    return torch.ops.fisherfast.fwht(x, normalized, backend)
