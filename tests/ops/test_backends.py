"""The dispatcher: what can run and why not, forcing, errors, torch.compile."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch.library import opcheck

from fisherfast.ops import BACKENDS, SRHTPlan, _backends, available_backends, fwht, srht

fwht_module = importlib.import_module("fisherfast.ops.fwht")


def _cpu_extension_importable() -> bool:
    try:
        importlib.import_module("fisherfast._C")
    except ImportError:
        return False
    return True


def test_available_backends_lists_every_backend_with_reasons():
    status = available_backends()
    assert tuple(status) == BACKENDS
    assert status["reference"].available
    assert status["cpu"].available == _cpu_extension_importable()
    for s in status.values():
        assert s.available == (s.reason == ""), s  # off ⇔ a reason is given
        assert s.name in str(s)
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        assert "fisherfast._C_cuda" in status["cuda"].reason


def test_triton_off_without_gpu_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes triton available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = available_backends()["triton"]
    assert not status.available
    assert "no CUDA device" in status.reason or "triton is not installed" in status.reason


def _recording(monkeypatch, module):
    """Replace every impl of ``module`` by a recorder that still computes."""
    calls = []
    for name, impl in list(module._IMPLS.items()):
        def record(*args, _name=name, _impl=impl):
            calls.append(_name)
            return _impl(*args)
        monkeypatch.setitem(module._IMPLS, name, record)
    return calls


def test_automatic_choice_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FISHERFAST_BACKEND", raising=False)
    calls = _recording(monkeypatch, fwht_module)
    fwht(torch.randn(2, 8))
    assert calls == ["cpu" if available_backends()["cpu"].available else "reference"]


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_environment_variable_forces_a_backend(monkeypatch, name):
    if not available_backends()[name].available:
        pytest.skip(available_backends()[name].reason)
    monkeypatch.setenv("FISHERFAST_BACKEND", name)
    calls = _recording(monkeypatch, fwht_module)
    x = torch.randn(3, 16)
    y = fwht(x)
    assert calls == [name]
    monkeypatch.delenv("FISHERFAST_BACKEND")
    torch.testing.assert_close(y, fwht(x, backend="reference"))


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("FISHERFAST_BACKEND", "cuda")
    calls = _recording(monkeypatch, fwht_module)
    fwht(torch.randn(2, 4), backend="reference")
    assert calls == ["reference"]


def test_forced_unusable_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv("FISHERFAST_BACKEND", "cuda")
    calls = _recording(monkeypatch, fwht_module)
    x = torch.randn(2, 8)
    before = x.clone()
    with pytest.raises(ValueError) as info:
        fwht(x, inplace=True)
    reasons = _backends.not_supported_reasons("fwht", "cuda", fwht_module._IMPLS, x.device)
    assert len(reasons) >= 1
    for reason in reasons:
        assert reason in str(info.value)
    assert "needs CUDA tensors, got cpu" in str(info.value)
    assert calls == [] and torch.equal(x, before)


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("FISHERFAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fwht(torch.randn(4))
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        srht(torch.randn(4), SRHTPlan(4, 2))


def test_custom_ops_pass_opcheck():
    # Schema, fake (meta) implementation and dispatch registration, as torch checks them.
    x = torch.randn(3, 32)
    opcheck(torch.ops.fisherfast.fwht.default, (x, True, None))
    opcheck(torch.ops.fisherfast.fwht.default, (x.half(), False, "reference"))
    opcheck(torch.ops.fisherfast.fwht_.default, (x.clone(), False, None))
    signs, idx = SRHTPlan(32, 20, seed=2).tensors(x.device)
    opcheck(torch.ops.fisherfast.srht.default, (x, signs, idx, None))


def test_torch_compile_traces_the_ops():
    plan = SRHTPlan(64, 16, seed=5)

    def f(x):
        y = fwht(x, normalized=True) * 2 + 1
        return y, srht(y, plan).sum(-1)

    def g(x):
        return fwht(x, inplace=True)

    x = torch.randn(4, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(x), f(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    y = x.clone()
    torch.compile(g, backend="aot_eager", fullgraph=True)(y)
    torch.testing.assert_close(y, fwht(x), rtol=0, atol=0)


def test_fakes_check_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    signs, idx = SRHTPlan(32, 20, seed=2).tensors(torch.device("cpu"))
    idx32 = idx.int()
    with FakeTensorMode() as mode:
        x, s, i = (mode.from_tensor(t) for t in (torch.randn(3, 32), signs, idx))
        assert torch.ops.fisherfast.fwht.default(x, False, None).shape == (3, 32)
        assert torch.ops.fisherfast.srht.default(x, s, i, None).shape == (3, 20)
        with pytest.raises(ValueError, match="power of two"):
            torch.ops.fisherfast.fwht.default(x[:, :30], False, None)
        with pytest.raises(TypeError, match="floating"):
            torch.ops.fisherfast.fwht.default(mode.from_tensor(torch.ones(3, 32, dtype=torch.int64)), False, None)
        with pytest.raises(ValueError, match="N ≥ n_in"):
            torch.ops.fisherfast.srht.default(mode.from_tensor(torch.randn(3, 64)), s, i, None)
        with pytest.raises(TypeError, match="idx: expected int64"):
            torch.ops.fisherfast.srht.default(x, s, mode.from_tensor(idx32), None)
