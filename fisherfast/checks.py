"""Argument checks with one message style, shared by the method modules
(concepts, metric, steer, geodesic).

Every check runs before any work, never modifies its input, and names the
argument in one form:

    "<name>: expected <what>, got <value>"

Scalars of the wrong kind or range raise ValueError (bools are never ints or
numbers here: ``True`` is not a count); tensors of the wrong kind raise
TypeError and of the wrong shape or content ValueError. Each check returns
the value in its canonical type (``int``, ``float``, the tensor itself), so a
caller writes ``k = check_int("k", k, minimum=1)``.

``expected(name, what, got)`` builds the message for checks written in place.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["expected", "check_int", "check_real", "check_choice", "check_vector", "check_finite"]


def expected(name: str, what: str, got) -> str:
    """The message "name: expected what, got got!r" (a tensor is shown by its shape and dtype)."""
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


def check_vector(name: str, v, d: int | None = None) -> torch.Tensor:
    """``v`` if it is a finite floating (d,) tensor (any d when ``d`` is None).

    Raises:
        TypeError: not a floating tensor.
        ValueError: not 1-D, the wrong length, or NaN / Inf entries.
    """
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise TypeError(expected(name, "a floating tensor of shape (d,)", v if isinstance(v, torch.Tensor)
                                 else type(v).__name__))
    if v.dim() != 1 or (d is not None and v.shape[0] != d):
        raise ValueError(expected(name, f"shape ({'d' if d is None else d},)", v))
    return check_finite(name, v)
