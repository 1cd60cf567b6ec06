"""Input validation shared by the ops: every check names the argument and what
was expected, and runs before any work is done."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int | None = None,
                 float_only: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"all inputs must be on one device, got {listing}")
    return first


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    first = next(iter(dtypes.values()))
    if any(d != first for d in dtypes.values()):
        listing = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"all inputs must share one dtype, got {listing}")
    return first


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32/float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast_checked(out: torch.Tensor, dtype: torch.dtype, op: str) -> torch.Tensor:
    """``out`` (computed in float32/float64) cast to the input dtype ``dtype``.

    Rule for half-precision inputs: a value that is finite in the compute dtype
    but overflows float16/bfloat16 (|x| > 65504 for float16) is an error,
    never a silent Inf: OverflowError naming the op and the largest value,
    asking for float32 inputs. Values non-finite already in the compute dtype
    pass through (the ops that forbid them raise before this)."""
    cast = out.to(dtype)
    if dtype in (torch.float16, torch.bfloat16) and cast.numel():
        overflow = torch.isfinite(out) & ~torch.isfinite(cast)
        if bool(overflow.any()):
            largest = float(out[overflow].abs().max())
            raise OverflowError(f"{op}: the result (largest |value| {largest:.4g}) overflows {dtype} "
                                f"(max {torch.finfo(dtype).max:.6g}); pass float32 inputs to get it in float32")
    return cast
