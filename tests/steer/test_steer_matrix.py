"""steering() on every decoder-only model type of the architecture matrix
(tests/tiny_models.MATRIX_TYPES: attention, mixture-of-experts, hybrid and
state-space models), tiny random-init configs in float64.

Oracles: a plain forward pre-hook written here that adds the vector at fixed
columns of the layer-ℓ block input — in one forward (positions "all"), and in
greedy generate without cache (each step recomputes the sequence, so columns
are positions). The steered generate, with and without its cache (a KV
cache, or the recurrent state of Mamba / LFM2 / Jamba / Falcon-H1), must give
the same tokens and logits to float64 rounding (summation order differs
between cached and recomputed forwards: ~L·d·eps64·|h| ≈ 1e-13; 1e-8 leaves
room for the recurrent scans' longer sums).
"""
from __future__ import annotations

import pytest
import torch

from tiny_models import MATRIX_TYPES
from plain_hooks import column_hook  # noqa: E402  (tests/)
from fisherfast.split import architecture
from fisherfast.steer import SteeringVectors, steering

PROMPT = [3, 14, 15, 9, 5, 6, 7]
NEW = 3


def build(model_type):
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm(model_type, layers=2, head_scale=10.0, seed=3)
    model.generation_config.eos_token_id = None
    return model


def greedy(model, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences[:, len(PROMPT):].tolist(), torch.stack(out.logits, 1)


@pytest.mark.parametrize("model_type", MATRIX_TYPES)
def test_steering_equals_a_plain_hook_in_forward_and_generate(model_type):
    model = build(model_type)
    d = architecture(model).head.weight.shape[1]
    v = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = torch.tensor([PROMPT])
    plain = model(input_ids=ids).logits
    handle = column_hook(model, 1, v, lambda T: range(T))
    try:
        want = model(input_ids=ids).logits
    finally:
        handle.remove()
    vectors = SteeringVectors.for_model(model, {1: v})  # the model's identity is found for every type
    assert vectors.identity["model_type"] == model_type and vectors.identity["layers"] == 2
    with steering(model, vectors, positions="all"):
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-8, atol=1e-8)
    assert float((want - plain).abs().max()) > 1e-3  # the vector does change the logits
    n = len(PROMPT)
    for positions, columns in (("prompt_last", lambda T: [n - 1]), ("from_prompt_last", lambda T: range(n - 1, T))):
        handle = column_hook(model, 1, v, columns)
        try:
            want_tokens, want_logits = greedy(model, use_cache=False)
        finally:
            handle.remove()
        for use_cache in (True, False):
            with steering(model, {1: v}, positions=positions):
                tokens, logits = greedy(model, use_cache=use_cache)
            assert tokens == want_tokens, (positions, use_cache)
            torch.testing.assert_close(logits, want_logits, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("model_type", ["mamba", "lfm2", "jamba", "falcon_h1"])
def test_hybrid_and_state_space_models_in_sampling_and_beam_search(model_type):
    """The recurrent state is reordered with the beams; positions still count right."""
    model = build(model_type)
    d = architecture(model).head.weight.shape[1]
    v = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = len(PROMPT)
    for kw in (dict(do_sample=True, top_k=0, temperature=2.0), dict(num_beams=3, num_return_sequences=2)):
        handle = column_hook(model, 1, v, lambda T: range(n - 1, T))
        try:
            torch.manual_seed(0)
            want = greedy(model, use_cache=False, **kw)[0]
        finally:
            handle.remove()
        with steering(model, {1: v}):
            torch.manual_seed(0)
            assert greedy(model, **kw)[0] == want, kw
