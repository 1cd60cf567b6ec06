"""Argument checks with one message style: the one validation module of the
package (ops, split, sketch, concepts, metric, steer, geodesic, cli).

Every check runs before any work, never modifies its input, and names the
argument in one form:

    "<name>: expected <what>, got <value>"

Scalars of the wrong kind or range raise ValueError (bools are never ints or
numbers here: ``True`` is not a count); tensors of the wrong kind raise
TypeError and of the wrong shape or content ValueError. Each check returns
the value in its canonical type (``int``, ``float``, the tensor itself), so a
caller writes ``k = check_int("k", k, minimum=1)``.

``expected(name, what, got)`` builds the message for checks written in place.

Tensor checks of the ops (``check_tensor``, ``check_same_device``,
``check_same_dtype``) and the half-precision rule live here too:
``compute_dtype`` (float16 / bfloat16 are computed in float32) and
``cast_checked`` (a result cast back to half precision never overflows
silently).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["expected", "check_int", "check_real", "check_choice", "check_finite", "check_vector", "check_points",
           "check_contexts", "check_tensor", "check_same_device", "check_same_dtype", "compute_dtype",
           "cast_checked", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def expected(name: str, what: str, got, *, raw: bool = False) -> str:
    """The message "name: expected what, got got!r" (a type is shown by its name, a
    tensor by its shape and dtype; ``raw=True``: ``got`` is a description, shown as it is)."""
    if raw:
        return f"{name}: expected {what}, got {got}"
    if isinstance(got, type):
        return f"{name}: expected {what}, got {got.__name__}"
    if isinstance(got, torch.Tensor):
        got = f"a tensor of shape {tuple(got.shape)} and dtype {got.dtype}"
        return f"{name}: expected {what}, got {got}"
    return f"{name}: expected {what}, got {got!r}"


def _bounds(minimum, maximum, min_open=False, max_open=False) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '≥'} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '≤'} {maximum}")
    return " and ".join(parts)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an int in [minimum, maximum] (either bound optional).

    Accepts Python and NumPy integers, not bools or floats; ``optional=True``
    lets None through (returned as None). Raises ValueError otherwise.
    """
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        value = int(value)
        ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = _bounds(minimum, maximum)
        what = "an int" + (f" {bounds}" if bounds else "") + (" or None" if optional else "")
        raise ValueError(expected(name, what, value))
    return value


def check_real(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
               min_open: bool = False, max_open: bool = False, finite: bool = True,
               optional: bool = False) -> float | None:
    """``value`` as a float within the bounds (``min_open`` / ``max_open``: strict).

    Accepts Python and NumPy reals, not bools or strings; ``finite=False``
    lets ±inf through (never NaN); ``optional=True`` lets None through.
    Raises ValueError otherwise.
    """
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = not math.isnan(value) and (math.isfinite(value) or not finite)
        ok = ok and (minimum is None or (value > minimum if min_open else value >= minimum))
        ok = ok and (maximum is None or (value < maximum if max_open else value <= maximum))
    if not ok:
        bounds = _bounds(minimum, maximum, min_open, max_open)
        what = ("a finite number" if finite else "a number") + (f" {bounds}" if bounds else "") + \
            (" or None" if optional else "")
        raise ValueError(expected(name, what, value))
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; ValueError listing them otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(expected(name, "one of " + ", ".join(repr(c) for c in choices), value))
    return value


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` if every entry is finite; ValueError otherwise."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return x


def check_tensor(name: str, x, *, ndim: int | tuple[int, ...] | None = None, min_ndim: int | None = None,
                 float_only: bool = True) -> torch.Tensor:
    """``x`` if it is a tensor (of a ``FLOAT_DTYPES`` dtype unless ``float_only=False``)
    with ``ndim`` dimensions (an int or a tuple of allowed counts) and at least ``min_ndim``.

    Raises:
        TypeError: not a tensor, or not floating when ``float_only``.
        ValueError: another number of dimensions.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(expected(name, "a torch.Tensor", type(x)))
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(expected(name, "a floating tensor (float16/bfloat16/float32/float64)", x.dtype))
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed:
            raise ValueError(expected(name, f"{' or '.join(map(str, allowed))} dimensions", f"shape {tuple(x.shape)}",
                                      raw=True))
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(expected(name, f"at least {min_ndim} dimension(s)", f"shape {tuple(x.shape)}", raw=True))
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of the given tensors (None entries skipped); ValueError listing them otherwise."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(device != first for device in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(expected(", ".join(devices), "one device", listing, raw=True))
    return first


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """The one dtype of the given tensors (None entries skipped); TypeError listing them otherwise."""
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    first = next(iter(dtypes.values()))
    if any(d != first for d in dtypes.values()):
        listing = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(expected(", ".join(dtypes), "one dtype", listing, raw=True))
    return first


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a computation on ``dtype`` inputs runs in: float32 for half
    precision (float16, bfloat16), the dtype itself otherwise (float32, float64)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def cast_checked(out: torch.Tensor, dtype: torch.dtype, op: str) -> torch.Tensor:
    """``out`` (computed in ``compute_dtype(dtype)``) cast to the input dtype ``dtype``.

    Rule for half-precision inputs: a value that is finite in the compute dtype
    but overflows float16/bfloat16 (|x| > 65504 for float16) is an error,
    never a silent Inf: OverflowError naming the op and the largest value,
    asking for float32 inputs. Values non-finite already in the compute dtype
    pass through (the ops that forbid them raise before this)."""
    cast = out.to(dtype)
    if dtype in HALF_DTYPES and cast.numel():
        overflow = torch.isfinite(out) & ~torch.isfinite(cast)
        if bool(overflow.any()):
            largest = float(out[overflow].abs().max())
            raise OverflowError(f"{op}: the result (largest |value| {largest:.4g}) overflows {dtype} "
                                f"(max {torch.finfo(dtype).max:.6g}); pass float32 inputs to get it in float32")
    return cast


def check_vector(name: str, v, d: int | None = None) -> torch.Tensor:
    """``v`` if it is a finite floating (d,) tensor (any d when ``d`` is None).

    Raises:
        TypeError: not a floating tensor.
        ValueError: not 1-D, the wrong length, or NaN / Inf entries.
    """
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(expected(name, "a floating tensor of shape (d,)", v if isinstance(v, torch.Tensor)
                                 else type(v)))
    if v.dim() != 1 or (d is not None and v.shape[0] != d):
        raise ValueError(expected(name, f"shape ({'d' if d is None else d},)", v))
    return check_finite(name, v)


def check_points(name: str, points, d: int | None = None, *, dtype: torch.dtype | None = None,
                 min_n: int = 1, finite: bool = False) -> torch.Tensor:
    """Points as an (n, d) floating tensor with n ≥ ``min_n``; a (d,) tensor becomes (1, d).

    ``dtype``: the dtype the points must have (e.g. the model's); ``finite``:
    also refuse NaN / Inf.

    Raises:
        TypeError: not a floating tensor, or not of ``dtype``.
        ValueError: another shape, too few points, or NaN / Inf when ``finite``.
    """
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError(expected(name, "a floating tensor", points if isinstance(points, torch.Tensor)
                                 else type(points)))
    if dtype is not None and points.dtype != dtype:
        raise TypeError(expected(name, f"the model's dtype {dtype}", points.dtype))
    X = points[None] if points.ndim == 1 else points
    D = "d" if d is None else d
    if X.ndim != 2 or (d is not None and X.shape[1] != d) or X.shape[0] < min_n:
        shape = f"({D},) or (n, {D})" if min_n <= 1 else f"(n, {D}) with n ≥ {min_n}"
        raise ValueError(expected(name, f"shape {shape}", points))
    return check_finite(name, X) if finite else X


def check_contexts(split, contexts) -> list:
    """A non-empty list of ``SplitContext``s made by ``split`` (one context is wrapped).

    Raises:
        TypeError: not a SplitContext or a non-empty list of them.
        ValueError: a context made by another SplitModel (model or layer).
    """
    from fisherfast.split import SplitContext

    ctx_list = [contexts] if isinstance(contexts, SplitContext) else contexts
    if not isinstance(ctx_list, (list, tuple)) or not ctx_list:
        raise TypeError(expected("contexts", "a SplitContext or a non-empty list of them (from split.context / "
                                 "split.contexts)", type(contexts)))
    for i, ctx in enumerate(ctx_list):
        if not isinstance(ctx, SplitContext):
            raise TypeError(expected(f"contexts[{i}]", "a SplitContext", type(ctx)))
        if ctx.owner_id != id(split):
            raise ValueError(f"contexts[{i}]: expected a context of this SplitModel, got one made by another "
                             "SplitModel (a different model or layer)")
    return list(ctx_list)
