"""The architecture matrix: every decoder-only type of ``tiny_models.MATRIX_TYPES``
(transformers' own configs at tiny sizes, random init, eager attention,
float64), against oracles independent of SplitModel's cached-prefix path:

- logits: the model's own forward;
- B = ∂a/∂h and a concept-style gradient ∇_h log p_y: autograd
  (``torch.autograd.functional.jacobian``, one backward per row) through the
  model's own forward with a plain pre-hook replacing block ℓ's input at t;
- the exact metric: the float64 formula Jᵀ (diag p − p pᵀ) J from that
  autograd Jacobian J = ∂z/∂h of the model's own logits;
- sketch_model: a FisherSketcher fed the model's own logits.

Error model: everything runs in float64 (tests/conftest.py keeps the models'
own code in float64: ``tiny_models.float64_everywhere``), so split and oracle differ
only in the order of floating-point operations: relative error a few hundred
ulps (≈1e-13) for values of order one, amplified at most by the depth (2
blocks) and the conditioning of softmax/norms at random init (≲10²). The
tolerance 1e-10 (relative, and absolute against the largest entry) leaves
two more orders; a split that used float32 anywhere (≈1e-7) fails it.

Types in ``REFUSED_MODEL_TYPES`` are checked to be found (decoder blocks, for
steering) and refused by SplitModel with their type and the reason.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fisherfast.split import REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, SplitModel, architecture, decoder_blocks  # noqa: E402
from tiny_models import MATRIX_TYPES, tiny_causal_lm  # noqa: E402  (tests/)

T, LAYER, RTOL = 6, 1, 1e-10
_MODELS = {}


def model_of(model_type):
    if model_type not in _MODELS:
        _MODELS[model_type] = tiny_causal_lm(model_type, layers=2, d=32, vocab=61, norm_noise=0.2, head_scale=8.0,
                                             sliding_window=3)
    return _MODELS[model_type]


def ids_of(seed=1):
    return torch.randint(3, 61, (T,), generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rtol=RTOL):
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def hooked_logits(model, ids, t, h):
    """Oracle: the model's own logits at t with block ℓ's input at position t replaced by h."""
    block = decoder_blocks(model)[LAYER]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([x[:, :t], h.reshape(1, 1, -1).to(x.dtype), x[:, t + 1:]], dim=1)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model(ids[None, : t + 1], use_cache=False).logits[0, t]
    finally:
        handle.remove()


def test_matrix_covers_every_type():
    assert set(MATRIX_TYPES) == set(SUPPORTED_MODEL_TYPES) | set(REFUSED_MODEL_TYPES)
    assert len(SUPPORTED_MODEL_TYPES) >= 35


@pytest.mark.parametrize("model_type", sorted(REFUSED_MODEL_TYPES))
def test_refused_types_are_found_and_named(model_type):
    model = model_of(model_type)
    arch = architecture(model)
    assert len(arch.blocks) == 2 and arch.split_refusal is not None
    assert repr(model_type) in arch.split_refusal
    assert REFUSED_MODEL_TYPES[model_type].split(" (")[0].split()[0] in arch.split_refusal
    with pytest.raises(ValueError, match=f"model: SplitModel cannot split '{model_type}'"):
        SplitModel(model, LAYER)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_split_matches_autograd_through_the_model(model_type):
    model = model_of(model_type)
    arch = architecture(model)
    assert arch.split_refusal is None and arch.norm is not None and len(arch.blocks) == 2
    ids = ids_of()
    ref = model(ids[None], use_cache=False).logits[0]
    sp = SplitModel(model, LAYER)
    for t in (2, T - 1):
        ctx = sp.context(ids, position=t)
        close(sp.logits(ctx, ctx.h), ref[t])                      # split logits = the model's forward
    t = T - 1
    g = torch.Generator().manual_seed(2)
    h = ctx.h + 0.3 * ctx.h.abs().mean() * torch.randn(sp.d, generator=g, dtype=torch.float64)
    close(sp.logits(ctx, h), hooked_logits(model, ids, t, h))       # off the model's own state
    # J = ∂z/∂h through the model's own forward (autograd, one backward per row)
    J = torch.autograd.functional.jacobian(lambda x: hooked_logits(model, ids, t, x), h)   # (V, d)
    # B = ∂a/∂h from the split against J = ∂z/∂a · B (the head's Jacobian is explicit)
    B = sp.jacobian(ctx, h)
    a = sp.head_input(ctx, h)
    Jz_a = torch.autograd.functional.jacobian(sp.head.logits, a)
    close(Jz_a @ B, J)
    U = torch.randn(3, sp.d, generator=g, dtype=torch.float64)
    a_jvp, BU = sp.jvp(ctx, h, U)
    close(a_jvp, a)
    close(BU, U @ B.T)
    close(sp.vjp(ctx, h, U), U @ B)
    lin = sp.linearize(ctx, h)
    close(lin.jvp(U), U @ B.T)
    close(lin.vjp(U), U @ B)
    # a concept-style gradient: ∇_h log p_y(h)
    y = int(ref[t].argmin())
    grad = torch.func.grad(lambda x: torch.log_softmax(sp.logits(ctx, x), -1)[y])(h)
    h_ref = h.clone().requires_grad_(True)
    torch.log_softmax(hooked_logits(model, ids, t, h_ref), -1)[y].backward()
    close(grad, h_ref.grad)
    # the exact metric Bᵀ G_head B against the float64 formula Jᵀ F J; the head metric is the
    # difference of two sums over V (centered form), conditioned by p's spread: one order more room
    p = torch.softmax(hooked_logits(model, ids, t, h), -1)
    G_ref = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    close(B.T @ sp.head.gram(a) @ B, G_ref, rtol=1e-9)            # scale and soft-cap folded by the head
    if sp.head.softcap is None and sp.head.scale == 1.0:  # pullback_fisher reads W and b itself (metric/**)
        from fisherfast.metric import pullback_fisher
        close(pullback_fisher(sp, ctx, h=h, mode="exact", progress=False).dense(), G_ref, rtol=1e-9)


def own_scale(model):
    """The model's linear logit scale, read from its config the way its forward applies it."""
    c = model.config
    if c.model_type.startswith("cohere"):
        return float(c.logit_scale)
    if c.model_type.startswith("granite"):
        return 1.0 / float(c.logits_scaling)
    return 1.0


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_sketch_model_is_the_sketcher_fed_the_models_own_logits(model_type):
    """sketch_model = FisherSketcher fed the model's own logits (soft-capped and scaled
    ones included) and head inputs a' = s·a (z = W a' + s b). Error model: the sketch
    accumulates in float32 whatever the model's dtype; ≤ 8 rows of V = 61 terms each
    give relative errors ≲ 1e-6 of the largest entry; 1e-5 allowed."""
    from fisherfast.sketch import FisherSketcher, SketchSpec, sketch_model

    model = model_of(model_type)
    texts = [ids_of(3)[:5].tolist(), ids_of(4)[:4].tolist()]
    spec = SketchSpec(d=32, K=61, m=64, seed=3)
    state = sketch_model(model, None, texts, spec=spec, batch_size=2, progress=False, chunk_rows=3)
    sketcher = FisherSketcher(spec, generator_seed=spec.seed)
    norm = architecture(model).norm
    for ids in texts:
        out = {}
        handle = norm.register_forward_hook(lambda mod, args, output: out.__setitem__("a", output))
        try:
            with torch.no_grad():
                logits = model(torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            handle.remove()
        a = out["a"][0] * own_scale(model)
        # the model's own (capped) logits; softcap= makes the error the gradient w.r.t. the linear logits
        sketcher.update(a[:-1], logits=logits[:-1], y=torch.tensor(ids[1:]),
                        softcap=getattr(model.config, "final_logit_softcapping", None))
    expected = sketcher.state
    assert state.count == expected.count == 7
    for kind in ("joint", "activation", "error"):
        for got, want in ((state.sums[kind], expected.sums[kind]), (state.sumsqs[kind], expected.sumsqs[kind])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
