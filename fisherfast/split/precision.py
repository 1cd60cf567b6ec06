"""float64 models computed in float64 throughout the split (issue 18 item 4).

transformers' modeling code casts to float32 in places written for half
precision — the attention softmax (``softmax(..., dtype=torch.float32)``),
the variance of RMS norms (``hidden_states.to(torch.float32)``), MoE router
logits (``.type(torch.float32)``). For a float64 model each of these is a
*downcast* that leaves float32 rounding (~1e-7 relative) in the model's
output and noise of that size in every derivative. Within
``keep_float64()``, in the calling thread only (a TorchFunctionMode), such
a downcast of a float64 tensor, when written in transformers' code, is
skipped: the tensor stays float64. Nothing else changes: float32 and
half-precision models, and every cast outside transformers' modules, run as
written.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["keep_float64"]

_TO, _FLOAT, _TYPE = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


def _in_transformers() -> bool:
    """Whether the nearest caller outside torch (and this module) is transformers' modeling code
    (``transformers.models.*``, ``transformers.integrations.*``; not e.g. ``PreTrainedModel.float()``)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torch") or name == __name__):
            return name.startswith(("transformers.models.", "transformers.integrations."))
        frame = frame.f_back
    return False


class keep_float64(TorchFunctionMode):
    """Skip float64 → float32 downcasts made by transformers' modeling code (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("input")
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
            if func is _FLOAT and _in_transformers():
                return tensor
            if func is _TYPE and (args[1:2] == (torch.float32,) or kwargs.get("dtype") is torch.float32) \
                    and _in_transformers():
                return tensor
            if func is _TO and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32) \
                    and _in_transformers():
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
                if kwargs.get("dtype") is torch.float32:
                    kwargs = {**kwargs, "dtype": torch.float64}
            elif func in _SOFTMAX and kwargs.get("dtype") is torch.float32 and _in_transformers():
                kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)
