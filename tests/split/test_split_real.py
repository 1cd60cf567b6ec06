"""SplitModel on the embedded SmolLM2-135M-Instruct (slow: loads the real model).

Oracle for B = ∂a/∂h: the model's own forward (its own attention
implementation, whole prompt) with a plain forward pre-hook that adds x to
block ℓ's input at position t and a forward hook that reads the final norm's
output there, differentiated by torch.autograd — no code of SplitModel on
that path.
"""
import pytest
import torch

pytest.importorskip("transformers")

from fisherfast.split import SplitModel, decoder_blocks  # noqa: E402

pytestmark = pytest.mark.slow
LAYER = 15


@pytest.fixture(scope="module")
def smollm2():
    from fisherfast import models

    try:
        return models.load_default()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))


def hooked_head_input(model, ids, layer, t):
    """x (d,) ↦ a_t: the final-norm output at position t of the model's own forward with x
    added to block ``layer``'s input at position t."""
    block, norm = decoder_blocks(model)[layer], model.model.norm

    def head_input(x):
        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            shift = torch.zeros_like(hidden)
            shift[0, t] = x
            if args:
                return (hidden + shift, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden + shift}

        captured = {}

        def read(module, args, out):
            captured["a"] = out[0, t]

        handles = [block.register_forward_pre_hook(add, with_kwargs=True), norm.register_forward_hook(read)]
        try:
            model(ids[None, : t + 1])
        finally:
            for handle in handles:
                handle.remove()
        return captured["a"]

    return head_input


def test_smollm2_layer15_reproduces_logits(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    ref = model(ids[None]).logits[0]
    sp = SplitModel(model, LAYER)
    assert (sp.model_type, sp.num_layers, sp.d, sp.V) == ("llama", 30, 576, 49152)
    for position in (2, -1):
        ctx = sp.context(ids, position=position)
        z = sp.logits(ctx, ctx.h)
        # float32 through 15 blocks: the one-token path sums in another order
        # than the full forward; 1e-5 relative to the logit scale.
        torch.testing.assert_close(z, ref[ctx.position], rtol=0, atol=1e-5 * ref.abs().max().item())
        assert z.argmax() == ref[ctx.position].argmax()


@pytest.mark.parametrize("position", [2, -1])
def test_smollm2_jvp_vjp_jacobian_and_linearization_match_autograd_of_the_hooked_forward(smollm2, position):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    sp = SplitModel(model, LAYER)
    ctx = sp.context(ids, position=position)
    f = hooked_head_input(model, ids, LAYER, ctx.position)
    x = torch.zeros(sp.d, requires_grad=True)
    with torch.enable_grad():
        a = f(x)
        torch.testing.assert_close(a.detach(), sp.head_input(ctx, ctx.h), rtol=0, atol=1e-4 * a.abs().max().item())
        g = torch.Generator().manual_seed(0)
        U = torch.randn(4, sp.d, generator=g)
        rows = torch.stack([torch.autograd.grad(a, x, u, retain_graph=True)[0] for u in U])   # uᵀB, the oracle
    V_t = torch.randn(4, sp.d, generator=g)
    scale = rows.abs().max().item()
    tol = dict(rtol=0, atol=2e-4 * scale)
    torch.testing.assert_close(sp.vjp(ctx, ctx.h, U), rows, **tol)
    torch.testing.assert_close(U @ sp.jacobian(ctx), rows, **tol)
    lin = sp.linearize(ctx)
    torch.testing.assert_close(lin.vjp(U), rows, **tol)
    # forward products: ⟨u, B v⟩ = ⟨uᵀB, v⟩ with the oracle's uᵀB
    want = rows @ V_t.T                                                        # (4 u, 4 v)
    bound = dict(rtol=0, atol=2e-4 * scale * V_t.norm(dim=1).max().item())
    torch.testing.assert_close(U @ sp.jvp(ctx, ctx.h, V_t)[1].T, want, **bound)
    torch.testing.assert_close(U @ lin.jvp(V_t).T, want, **bound)
