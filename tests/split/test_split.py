"""SplitModel on random-init tiny configs of every supported architecture.

Oracles: the model's own forward (logits), the model's own forward with block
ℓ's input at position t replaced by a candidate h (a pre-hook; independent of
SplitModel's cached-prefix path), and torch.func.jacrev of that full forward.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fisherfast.split import SplitContext, SplitModel  # noqa: E402
from tiny_models import TINY_ARCHS, tiny_causal_lm  # noqa: E402  (tests/)

T = 9  # prompt length; > sliding_window so sliding layers really slide


_CACHE = {}


def make_model(arch, dtype=torch.float32, attn="eager"):
    """The tiny model of ``arch`` (``tests/tiny_models.py``): V = 101, d = 32, 3 blocks,
    perturbed norms (J_N not a plain projection), sliding windows of 4 < T, Gemma3's soft-cap."""
    key = (arch, dtype, attn)
    if key not in _CACHE:
        _CACHE[key] = tiny_causal_lm(arch, vocab=101, d=32, layers=3, norm_noise=0.3, dtype=dtype, attn=attn,
                                     sliding_window=4, logit_softcap=3.0 if arch == "gemma3_text" else None)
    return _CACHE[key]


def prompt(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (T,), generator=g)


def _target(sp):
    return sp._blocks[sp.layer] if sp.layer < sp.num_layers else sp._norm


def full_head_input(sp, ids, t, h, attention_mask=None):
    """Oracle: the model's own forward with block ℓ's input at position t set to h → a_t (after the norm)."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([x[:, :t], h.reshape(1, 1, -1), x[:, t + 1:]], dim=1)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    handle = _target(sp).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = sp._base(input_ids=ids[None], attention_mask=None if attention_mask is None else attention_mask[None])
    finally:
        handle.remove()
    return out.last_hidden_state[0, t]


ARCHS = list(TINY_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_reproduce_model(arch, dtype):
    model = make_model(arch, dtype)
    ids = prompt()
    ref = model(ids[None]).logits[0]
    L = model.config.num_hidden_layers
    for layer in (0, 1, L - 1, L):
        sp = SplitModel(model, layer)
        for position in (0, 5, -1):
            ctx = sp.context(ids, position=position)
            assert ctx.h.shape == (sp.d,)
            torch.testing.assert_close(sp.logits(ctx, ctx.h), ref[ctx.position])


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding(arch):
    # float32 only: in float64 eager attention the fp32 softmax turns a fully
    # masked (padding) row into NaN inside transformers itself.
    model = make_model(arch)
    ids, mask = prompt(), torch.ones(T, dtype=torch.long)
    mask[:3] = 0
    ref = model(ids[None], attention_mask=mask[None]).logits[0]
    sp = SplitModel(model, 1)
    for position in (3, 6, -1):
        ctx = sp.context(ids, attention_mask=mask, position=position)
        torch.testing.assert_close(sp.logits(ctx, ctx.h), ref[ctx.position])


@pytest.mark.parametrize("arch", ARCHS)
def test_context_held_fixed_at_other_h(arch):
    """f(h') equals the full forward with position t's state replaced by h' (batched candidates)."""
    model = make_model(arch, torch.float64)
    ids = prompt()
    sp = SplitModel(model, 1)
    ctx = sp.context(ids, position=6)
    kv_before = {i: (k.clone(), v.clone()) for i, (k, v) in ctx.kv.items()}
    g = torch.Generator().manual_seed(2)
    H = ctx.h + torch.randn(2, 3, sp.d, generator=g, dtype=torch.float64)
    a = sp.head_input(ctx, H)
    assert a.shape == (2, 3, sp.d)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(a[i, j], full_head_input(sp, ids, 6, H[i, j]))
    z = sp.logits(ctx, H[1, 2])
    torch.testing.assert_close(z, sp.logits_from_head_input(a[1, 2]))
    for i, (k, v) in ctx.kv.items():  # the cached context is not touched by the upper map
        assert torch.equal(k, kv_before[i][0]) and torch.equal(v, kv_before[i][1])


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobian_jvp_vjp_vs_jacrev_of_full_forward(arch):
    model = make_model(arch, torch.float64)
    ids = prompt()
    L = model.config.num_hidden_layers
    # transformers' norms and attention softmax compute in float32 even for a
    # float64 model, so forward and reverse mode agree to float32 accuracy.
    tol = dict(rtol=1e-5, atol=1e-5)
    for layer in (0, L - 1):
        sp = SplitModel(model, layer)
        ctx = sp.context(ids, position=-1)
        h = ctx.h + 0.1 * torch.randn(sp.d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        B_ref = torch.func.jacrev(lambda x: full_head_input(sp, ids, T - 1, x))(h)
        B = sp.jacobian(ctx, h, chunk=7)  # chunk not dividing d
        torch.testing.assert_close(B, B_ref, **tol)
        g = torch.Generator().manual_seed(4)
        V_t = torch.randn(5, sp.d, dtype=torch.float64, generator=g)
        U = torch.randn(5, sp.d, dtype=torch.float64, generator=g)
        a, Bt = sp.jvp(ctx, h, V_t)
        torch.testing.assert_close(a, sp.head_input(ctx, h))
        torch.testing.assert_close(Bt, V_t @ B_ref.T, **tol)
        BtU = sp.vjp(ctx, h, U)
        torch.testing.assert_close(BtU, U @ B_ref, **tol)
        # adjoint identity ⟨u, B v⟩ = ⟨Bᵀu, v⟩
        torch.testing.assert_close((U * Bt).sum(1), (BtU * V_t).sum(1), **tol)


def _edited_full_logits(sp, ids, t, delta):
    """Oracle: the model's own logits (all positions) with δ added to block ℓ's input at position t (a pre-hook)."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = torch.cat([x[:, :t], x[:, t:t + 1] + delta, x[:, t + 1:]], dim=1)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    handle = _target(sp).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return sp.model(input_ids=ids[None]).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_logits_match_the_edited_full_forward(arch):
    """Logits at t..t+n-1 with h edited at t equal the model's own forward on
    prompt + continuation with the edit applied by a hook, for batched candidates
    (a repeated token in the continuation included)."""
    model = make_model(arch, torch.float64)
    ids = prompt()
    t, y = 5, torch.tensor([7, 7, 30, 2])
    fed = torch.cat([ids[:t + 1], y[:-1]])
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(5)
    for layer in (0, 1, L):
        sp = SplitModel(model, layer)
        ctx = sp.context(ids, position=t, continuation=y)
        assert ctx.continuation.ids.tolist() == y.tolist() and ctx.continuation.x.shape == (3, sp.d)
        torch.testing.assert_close(sp.logits(ctx, ctx.h), model(ids[None]).logits[0, t])  # position t unchanged
        deltas = torch.randn(2, sp.d, generator=g, dtype=torch.float64)
        z = sp.sequence_logits(ctx, ctx.h + deltas)
        assert z.shape == (2, 4, sp.V)
        for delta, got in zip(deltas, z):
            torch.testing.assert_close(got, _edited_full_logits(sp, fed, t, delta)[t:])
        one = SplitModel(model, layer).context(ids, position=t, continuation=y[:1])
        torch.testing.assert_close(SplitModel.sequence_logits(sp, ctx, ctx.h)[0], sp.logits(ctx, ctx.h))
        assert one.continuation.x.shape == (0, sp.d)


def test_sequence_logits_with_left_padding():
    model = make_model("llama")
    ids, mask = prompt(), torch.ones(T, dtype=torch.long)
    mask[:3] = 0
    y = torch.tensor([4, 9])
    ref = model(torch.cat([ids, y[:1]])[None], attention_mask=torch.cat([mask, mask[:1] * 0 + 1])[None]).logits[0]
    sp = SplitModel(model, 1)
    ctx = sp.context(ids, attention_mask=mask, continuation=y)
    torch.testing.assert_close(sp.sequence_logits(ctx, ctx.h), ref[T - 1:])
    with pytest.raises(ValueError, match="no continuation"):
        sp.sequence_logits(sp.context(ids), ctx.h)


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_jacobian_factorizes_B(arch):
    """B = J_N(r_L) A with A = ∂r_L/∂h (docs/design.md §2)."""
    model = make_model(arch, torch.float64)
    sp = SplitModel(model, 1)
    ctx = sp.context(prompt(), position=-1)
    r = sp.residual(ctx, ctx.h)
    J_N = sp.norm_jacobian(ctx, r)
    J_ref = torch.func.jacrev(lambda x: sp._norm(x))(r)
    torch.testing.assert_close(J_N, J_ref, rtol=1e-5, atol=1e-5)
    A = torch.func.jacrev(lambda x: sp.residual(ctx, x))(ctx.h)
    torch.testing.assert_close(sp.jacobian(ctx, ctx.h), J_N @ A, rtol=1e-5, atol=1e-5)


def test_last_layer_is_the_norm_alone():
    model = make_model("llama", torch.float64)
    sp = SplitModel(model, model.config.num_hidden_layers)
    ctx = sp.context(prompt())
    torch.testing.assert_close(sp.residual(ctx, ctx.h), ctx.h)
    torch.testing.assert_close(sp.jacobian(ctx, ctx.h), sp.norm_jacobian(ctx, ctx.h), rtol=1e-6, atol=1e-6)


def test_attributes_and_unembedding():
    for arch in ARCHS:
        model = make_model(arch)
        sp = SplitModel(model, 2)
        head = model.get_output_embeddings()
        assert (sp.model_type, sp.num_layers, sp.d, sp.V) == (arch, 3, 32, 101)
        assert torch.equal(sp.W, head.weight) and sp.W.shape == (sp.V, sp.d)
        assert sp.b is None  # none of the supported heads has a bias
        assert not sp.W.requires_grad


def test_sdpa_model_config_is_never_switched():
    model = make_model("llama", torch.float32, attn="sdpa")
    ids = prompt()
    ref = model(ids[None]).logits[0, -1]
    sp = SplitModel(model, 1)
    ctx = sp.context(ids)
    torch.testing.assert_close(sp.logits(ctx, ctx.h), ref)
    sp.jacobian(ctx, ctx.h)  # forward mode works
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[1].self_attn.config._attn_implementation == "sdpa"


def test_contexts_many_prompts():
    model = make_model("llama", torch.float64)
    sp = SplitModel(model, 1)
    prompts = [prompt(1), prompt(2)[:5].tolist()]
    ctxs = sp.contexts(prompts)
    assert [c.position for c in ctxs] == [T - 1, 4]
    for c, p in zip(ctxs, prompts):
        ref = model(torch.as_tensor(p)[None]).logits[0, -1]
        torch.testing.assert_close(sp.logits(c, c.h), ref)


def test_model_not_mutated():
    model = make_model("gpt2")
    model.requires_grad_(True)
    try:
        sp = SplitModel(model, 1)
        ctx = sp.context(prompt())
        B = sp.jacobian(ctx, ctx.h)
        assert not B.requires_grad
        assert all(p.requires_grad for p in model.parameters()) and not model.training
    finally:
        model.requires_grad_(False)


def test_bad_input():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 3\]"):
        SplitModel(model, 4)
    with pytest.raises(ValueError, match="layer"):
        SplitModel(model, -1)
    with pytest.raises(TypeError, match="layer"):
        SplitModel(model, 1.0)
    sp = SplitModel(model, 1)
    ids = prompt()
    with pytest.raises(ValueError, match="position"):
        sp.context(ids, position=T)
    with pytest.raises(TypeError, match="input_ids"):
        sp.context(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        sp.context(ids.reshape(3, 3))
    for bad in (101, -1):  # outside [0, V): a ValueError before the embedding's IndexError
        wrong = ids.clone()
        wrong[2] = bad
        with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 101\)"):
            sp.context(wrong)
        with pytest.raises(ValueError, match=r"continuation: token ids must be in \[0, 101\)"):
            sp.context(ids, continuation=[3, bad])
    with pytest.raises(ValueError, match="continuation"):
        sp.context(ids, continuation=[])
    with pytest.raises(ValueError, match="attention_mask"):
        sp.context(ids, attention_mask=torch.ones(T - 1, dtype=torch.long))
    mask = torch.ones(T, dtype=torch.long)
    mask[-1] = 0
    with pytest.raises(ValueError, match="attention_mask: position 8 is padding"):
        sp.context(ids, attention_mask=mask)
    ctx = sp.context(ids)
    with pytest.raises(ValueError, match=r"h: expected shape \(\.\.\., 32\)"):
        sp.head_input(ctx, torch.zeros(31))
    with pytest.raises(TypeError, match="h: expected dtype torch.float32"):
        sp.logits(ctx, ctx.h.double())
    with pytest.raises(ValueError, match=r"h: expected shape \(32,\)"):
        sp.jacobian(ctx, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="tangents"):
        sp.jvp(ctx, ctx.h, torch.zeros(32))
    with pytest.raises(ValueError, match="cotangents"):
        sp.vjp(ctx, ctx.h, torch.zeros(3, 31))
    with pytest.raises(ValueError, match="chunk"):
        sp.jacobian(ctx, ctx.h, chunk=0)
    with pytest.raises(ValueError, match="ctx: was made by another SplitModel"):
        SplitModel(model, 2).head_input(ctx, ctx.h)
    with pytest.raises(TypeError, match="ctx"):
        sp.head_input(None, ctx.h)
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            sp.context(ids)
    finally:
        model.eval()
    assert isinstance(ctx, SplitContext)


def test_refused_model_says_why():
    """A state-space model is refused with its type and what is missing; a non-model is named."""
    model = tiny_causal_lm("mamba", layers=1)
    with pytest.raises(ValueError, match="'mamba'.*recurrent state.*MambaMixer"):
        SplitModel(model, 0)
    with pytest.raises(ValueError, match="model: unsupported architecture: expected a Hugging Face transformers model"):
        SplitModel(torch.nn.Linear(2, 2), 0)
