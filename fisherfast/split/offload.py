"""Modules dispatched by accelerate (``from_pretrained(..., device_map=...)``):
their parameters, where they run, and calling them with explicit parameters.

accelerate wraps the ``forward`` of every dispatched module in a hook
(``_hf_hook``, the original kept as ``_old_forward``). A module offloaded to
CPU or disk holds "meta" placeholders; its hook copies the real weights from
``hook.weights_map`` to ``hook.execution_device`` before each forward and
drops them after. The functional passes of ``fisherfast.split`` call blocks
with ``torch.func.functional_call`` and their own parameter dicts, which that
hook cannot handle (it tries to load into the swapped-in tensors), so for
those calls the hooks are bypassed and the parameters materialized here, one
module at a time: memory for offloaded weights is bounded by the blocks a pass
keeps alive, never the whole model.

Models without accelerate hooks go through the same functions unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

__all__ = ["materialized_parameters", "execution_device", "bypass_dispatch_hooks", "is_offloaded"]


def _hooks(module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several


def is_offloaded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a meta placeholder (offloaded by accelerate)."""
    return any(p.device.type == "meta" for p in module.parameters())


def materialized_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: detached tensor} of every parameter of ``module`` (recursively),
    with offloaded (meta) ones loaded from their accelerate weights map onto
    the hook's execution device.

    Raises:
        RuntimeError: a parameter is on "meta" and no accelerate hook of its
            module can load it.
    """
    params = {}
    for prefix, sub in module.named_modules():
        direct = list(sub.named_parameters(recurse=False))
        if not direct:
            continue
        loaders = [h for h in _hooks(sub) if getattr(h, "weights_map", None) is not None]
        for name, p in direct:
            full = f"{prefix}.{name}" if prefix else name
            if p.device.type != "meta":
                params[full] = p.detach()
                continue
            for hook in loaders:
                if name in hook.weights_map:
                    value = hook.weights_map[name]
                    device = hook.execution_device if hook.execution_device is not None else "cpu"
                    params[full] = value.to(device=device, dtype=p.dtype).detach()
                    break
            else:
                raise RuntimeError(f"parameter {full!r} of {type(module).__name__} is on the meta device and no "
                                   "accelerate offload hook holds its weights; load the model with a device_map "
                                   "and offload_folder, or move it to a real device")
    return params


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The device ``module`` computes on: its accelerate execution device, else
    the device of its first non-meta parameter (None when it has none)."""
    for sub in module.modules():
        for hook in _hooks(sub):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


@contextlib.contextmanager
def bypass_dispatch_hooks(modules: Iterable[torch.nn.Module]):
    """Within the block, the accelerate-wrapped ``forward`` of every submodule of
    ``modules`` is the module's original forward (no loading, no offloading, no
    device moves); restored on exit, also on error. Not thread-safe for a model
    shared across threads."""
    saved = []
    try:
        for module in modules:
            for sub in module.modules():
                if hasattr(sub, "_old_forward") and "forward" in sub.__dict__:
                    saved.append((sub, sub.__dict__["forward"]))
                    sub.forward = sub._old_forward
        yield
    finally:
        for sub, wrapped in saved:
            sub.forward = wrapped
