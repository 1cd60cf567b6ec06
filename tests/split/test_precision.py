"""float64 models in float64 (fisherfast.split.precision): only transformers' own
float32 downcasts of float64 tensors are skipped, nothing else."""
import torch

from fisherfast.split.precision import keep_float64
from tiny_models import tiny_causal_lm


def test_casts_outside_transformers_are_untouched():
    x = torch.randn(3, dtype=torch.float64)
    with keep_float64():
        assert x.to(torch.float32).dtype == torch.float32
        assert x.float().dtype == torch.float32
        assert torch.softmax(x, -1, dtype=torch.float32).dtype == torch.float32
        y = torch.randn(3)
        assert torch.func.jvp(lambda v: v * 1e-6 + 1.0, (y,), (y,))[1].dtype == torch.float32


def test_a_float64_model_computes_in_float64_and_a_float32_model_as_written():
    """Oracle: the same forward under the tests' own float64 patch (tests/conftest.py,
    ``tiny_models.float64_everywhere``, a monkeypatch written independently), which every
    test runs under: both skip the same casts, so they agree to float64 roundoff (the
    unpatched forward is ~1e-8 off); float32 models are bitwise unchanged."""
    ids = torch.tensor([[3, 4, 5, 6]])
    model = tiny_causal_lm("qwen3", layers=2)
    patched = model(ids).logits
    with keep_float64():
        kept = model(ids).logits
    torch.testing.assert_close(kept, patched, rtol=1e-13, atol=1e-13 * float(patched.abs().max()))
    model32 = tiny_causal_lm("qwen3", layers=2, dtype=torch.float32)
    plain32 = model32(ids).logits
    with keep_float64():
        assert torch.equal(model32(ids).logits, plain32)
