"""Backends of the op layer: which can run here, why the others cannot, and
which one an op call uses.

Four backends, one dispatch rule:

- ``reference``: pure PyTorch, always present; the oracle for the others.
- ``cpu``: the C++ extension ``fisherfast._C`` (CPU tensors).
- ``triton``: Triton kernels on CUDA tensors, or on CPU tensors when
  ``TRITON_INTERPRET=1`` (the interpreter; how the GPU path is tested here).
- ``cuda``: the CUDA extension ``fisherfast._C_cuda`` (CUDA tensors).

Automatic choice: CUDA tensors try cuda, then triton, then reference; CPU
tensors try cpu, then reference. ``FISHERFAST_BACKEND`` (or an op's
``backend=`` argument) forces one; a forced backend that cannot run raises an
error that lists every reason.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Callable, Mapping

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is off; empty when available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'off (' + self.reason + ')'}"


@functools.cache
def _import_extension(name: str):
    """(module, "") or (None, reason)."""
    try:
        return importlib.import_module(f"fisherfast.{name}"), ""
    except ImportError as err:
        return None, f"fisherfast.{name} is not importable ({err}); reinstall with `pip install .` to build it"


def lazy_impl(family: str, backend: str, fn: str) -> Callable:
    """The function ``fn`` of the backend module ``fisherfast.ops.<family>_<backend>``,
    imported on first call (TRITON_INTERPRET must be read when the Triton
    kernels are defined; the extensions load only when used). Keyword
    arguments that are None are not passed on (a backend without a
    capability has no parameter for it). ``.backend`` names the backend."""
    def call(*args, **kwargs):
        module = importlib.import_module(f"fisherfast.ops.{family}_{backend}")
        return getattr(module, fn)(*args, **{k: v for k, v in kwargs.items() if v is not None})

    call.backend = backend
    return call


def cpu_extension():
    """The loaded ``fisherfast._C`` module; raises with the reason if absent."""
    module, reason = _import_extension("_C")
    if module is None:
        raise RuntimeError(reason)
    return module


@functools.cache
def _cuda_extension_status():
    module, reason = _import_extension("_C_cuda")
    if module is None:
        return None, reason
    # The module imports without a driver; every runtime call would then fail
    # (cudaErrorInsufficientDriver), so probe once and keep the reason.
    problem = module.probe()
    if problem:
        return None, f"fisherfast._C_cuda is built but CUDA is unusable: {problem}"
    return module, ""


def cuda_extension():
    """The loaded, usable ``fisherfast._C_cuda`` module; raises with the reason if not."""
    module, reason = _cuda_extension_status()
    if module is None:
        raise RuntimeError(reason)
    return module


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_problem() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install 'fisherfast[triton]'"
    return ""


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "")
    if name == "cpu":
        module, reason = _import_extension("_C")
        return BackendStatus(name, module is not None, reason)
    if name == "cuda":
        module, reason = _cuda_extension_status()
        return BackendStatus(name, module is not None, reason)
    if name == "triton":
        problem = _triton_import_problem()
        if not problem and not (torch.cuda.is_available() or triton_interpreted()):
            problem = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors in the interpreter)"
        return BackendStatus(name, not problem, problem)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why."""
    return {name: _status(name) for name in BACKENDS}


def _device_problem(name: str, device: torch.device) -> str:
    if name == "cpu" and device.type != "cpu":
        return f"needs CPU tensors, got {device.type}"
    if name == "cuda" and device.type != "cuda":
        return f"needs CUDA tensors, got {device.type}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    return ""


def not_supported_reasons(op: str, name: str, impls: Mapping[str, Callable], device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on ``device`` (empty list: it can)."""
    if name not in BACKENDS:
        return [f"unknown backend {name!r}; expected one of {BACKENDS}"]
    reasons = []
    if name not in impls:
        reasons.append(f"{op} has no {name} implementation (it has: {', '.join(impls)})")
    status = _status(name)
    if not status.available:
        reasons.append(status.reason)
    device_problem = _device_problem(name, device)
    if device_problem:
        reasons.append(device_problem)
    return reasons


def select(op: str, impls: Mapping[str, Callable], device: torch.device, backend: str | None = None,
           lacks: Callable[[str], list[str]] | None = None) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device``.

    ``backend`` (or the FISHERFAST_BACKEND environment variable) forces one;
    otherwise the fastest backend that can run is taken. A forced backend that
    cannot run is a bad argument: ValueError listing every reason.
    ``lacks(name)``: the capabilities this call needs that backend ``name``
    does not declare; the automatic choice skips such a backend, a forced one
    runs the reference instead, with a warning naming what it lacks."""
    forced = backend or os.environ.get("FISHERFAST_BACKEND") or None
    missing = lacks or (lambda name: [])
    if forced:
        reasons = not_supported_reasons(op, forced, impls, device)
        if reasons:
            raise ValueError(f"fisherfast.ops.{op}: backend {forced!r} cannot run: " + "; ".join(reasons))
        gaps = missing(forced)
        if gaps:
            warnings.warn(f"fisherfast.ops.{op}: backend {forced!r} does not implement {', '.join(gaps)}; "
                          f"running the reference backend", RuntimeWarning, stacklevel=3)
            return impls["reference"]
        return impls[forced]
    preference = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in preference:
        if name in impls and not not_supported_reasons(op, name, impls, device) and not missing(name):
            return impls[name]
    raise RuntimeError(f"fisherfast.ops.{op}: no backend can run on {device}")
