"""Shared fixtures.

Without a CUDA device, the Triton kernels run in Triton's interpreter on CPU
tensors: TRITON_INTERPRET=1 must be set before any kernel is defined, so it is
set here, at collection, before the tests import anything. It changes nothing
else: automatic dispatch of CPU tensors still picks cpu, then reference; only
a test that asks for the triton backend runs the interpreter.

``backend`` is parametrized over every backend: each test that takes it runs
once per backend that can run here (on CUDA tensors for cuda/triton when a GPU
is present, else on CPU tensors) and is skipped, with the dispatcher's reasons,
for the others.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fisherfast.ops import _backends  # noqa: E402  (after TRITON_INTERPRET)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    def __str__(self) -> str:
        return self.name


def backend_device(name: str) -> torch.device:
    """The device a backend's tests use: CUDA for cuda/triton when present."""
    gpu = name in ("cuda", "triton") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def _backend_params():
    params = []
    for name in _backends.BACKENDS:
        device = backend_device(name)
        reasons = _backends.not_supported_reasons("any op", name, {name: None}, device)
        marks = [pytest.mark.skip(reason=f"{name}: " + "; ".join(reasons))] if reasons else []
        params.append(pytest.param(Backend(name, device), id=name, marks=marks))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> Backend:
    """A backend that can run here, with the device its tensors live on."""
    return request.param


# ---------------------------------------------------------------- tiny causal LMs

from tiny_models import TINY_ARCHS, float64_everywhere, tiny_causal_lm  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="module")
def _float64_models_in_float64(request):
    """Every test that runs models (all but tests/ops, whose kernels never meet
    transformers and whose torch.compile tests must trace plain torch): a
    float64 model's own code computes in float64 (transformers' float32
    downcasts skipped, ``tiny_models.float64_everywhere``), so float64 forwards
    are float64 oracles for SplitModel, which computes float64 models in
    float64 (issue 18 item 4)."""
    if request.path.parent.name == "ops":  # module scope: set up before the module's other fixtures
        yield
        return
    with float64_everywhere():
        yield


@pytest.fixture(scope="session")
def tiny_lm():
    """The factory ``tiny_causal_lm(arch, **options)``: one place that builds
    the random-init test models (new tests use it instead of their own)."""
    return tiny_causal_lm
