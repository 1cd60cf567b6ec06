"""SplitModel on the embedded SmolLM2-135M-Instruct (slow: loads the real model)."""
import pytest
import torch

pytest.importorskip("transformers")

from fisherfast.split import SplitModel  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from fisherfast import models

    try:
        return models.load_default()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))


def test_smollm2_layer15_reproduces_logits_and_jacobian(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    ref = model(ids[None]).logits[0]
    sp = SplitModel(model, 15)
    assert (sp.model_type, sp.num_layers, sp.d, sp.V) == ("llama", 30, 576, 49152)
    for position in (2, -1):
        ctx = sp.context(ids, position=position)
        z = sp.logits(ctx, ctx.h)
        # float32 through 15 blocks: the one-token path sums in another order
        # than the full forward; 1e-5 relative to the logit scale.
        torch.testing.assert_close(z, ref[ctx.position], rtol=0, atol=1e-5 * ref.abs().max().item())
        assert z.argmax() == ref[ctx.position].argmax()
    # B from forward mode vs reverse mode on a few directions (⟨u, Bv⟩ = ⟨Bᵀu, v⟩).
    g = torch.Generator().manual_seed(0)
    V_t = torch.randn(4, sp.d, generator=g)
    U = torch.randn(4, sp.d, generator=g)
    B = sp.jacobian(ctx)
    torch.testing.assert_close(sp.jvp(ctx, ctx.h, V_t)[1], V_t @ B.T)
    lhs = (U * (V_t @ B.T)).sum(1)
    rhs = (sp.vjp(ctx, ctx.h, U) * V_t).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4 * lhs.abs().max().item())
