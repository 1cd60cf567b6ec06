"""The model stays the user's (issue 17 item 6): SplitModel leaves shared state
alone while it runs, refuses a model in training mode wherever a context is
used, names inputs longer than the model's positions and non-finite outputs."""
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fisherfast.sketch import sketch_model  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402
from tiny_models import tiny_causal_lm  # noqa: E402  (tests/)


def test_plain_forward_in_another_thread_while_the_split_runs():
    """Another thread's model(ids) (its own sdpa attention) runs unharmed, and gives
    the same logits, while this thread runs the split's upper map over and over; the
    config's attention implementation is never switched."""
    model = tiny_causal_lm("llama", layers=2, dtype=torch.float32, attn="sdpa")
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    sp = SplitModel(model, 1)
    ctx = sp.context(ids[0])
    errors, stop = [], threading.Event()

    def plain():
        try:
            while not stop.is_set():
                torch.testing.assert_close(model(ids).logits, expected)
                assert model.config._attn_implementation == "sdpa"
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    thread = threading.Thread(target=plain)
    thread.start()
    try:
        for _ in range(40):
            sp.jacobian(ctx)
            sp.logits(ctx, ctx.h + 0.1)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]
    assert model.config._attn_implementation == "sdpa"


def test_training_mode_is_refused_wherever_a_context_is_used():
    model = tiny_causal_lm("qwen2", layers=2)
    sp = SplitModel(model, 1)
    ctx = sp.context([1, 2, 3, 4])
    model.train()
    try:
        for call in (lambda: sp.logits(ctx, ctx.h), lambda: sp.jacobian(ctx), lambda: sp.head_input(ctx, ctx.h),
                     lambda: sp.jvp(ctx, ctx.h, torch.eye(sp.d, dtype=ctx.h.dtype)[:2]),
                     lambda: sp.linearize(ctx), lambda: sp.context([1, 2]),
                     lambda: sketch_model(model, None, [[1, 2, 3]], progress=False)):
            with pytest.raises(ValueError, match="model: is in training mode"):
                call()
    finally:
        model.eval()


def test_inputs_longer_than_the_positions_are_named():
    model = tiny_causal_lm("llama", layers=1)  # max_position_embeddings = 64
    sp = SplitModel(model, 1)
    with pytest.raises(ValueError, match="input_ids: 65 tokens exceed the model's 64 positions"):
        sp.context(list(range(3, 60)) + list(range(3, 11)))
    with pytest.raises(ValueError, match=r"input_ids \+ continuation: 65 tokens exceed"):
        sp.context(list(range(3, 60)), continuation=list(range(3, 12)))
    with pytest.raises(ValueError, match="texts_or_prompts: 70 tokens exceed the model's 64 positions"):
        sketch_model(model, None, [[5] * 70], progress=False)
    gpt2 = tiny_causal_lm("gpt2", layers=1)  # learned positions: n_positions = 64
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        SplitModel(gpt2, 0).context([5] * 65)


def test_non_finite_outputs_are_named():
    model = tiny_causal_lm("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    sp = SplitModel(model, 1)
    with pytest.raises(ValueError, match="model: its logits at position 3 are not finite"):
        sp.context([1, 2, 3, 4])
    with pytest.raises(ValueError, match="model: its hidden state at layer 2, position 3 is not finite"):
        SplitModel(model, 2).context([1, 2, 3, 4])


def test_products_fall_back_to_one_vector_at_a_time_where_vmap_cannot_batch():
    """Data-dependent control flow (here .item(); in general a routing vmap cannot batch)
    makes vmap raise; the split then maps one vector at a time, and remembers it."""
    sp = SplitModel(tiny_causal_lm("llama", layers=1), 0)
    X = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sp._map(lambda x: x * x[0].item(), X, None)
    assert sp._loop_tangents
    torch.testing.assert_close(out, X * X[:, :1], rtol=0, atol=0)
