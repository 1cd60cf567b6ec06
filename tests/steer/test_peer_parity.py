"""Parities with the other steering libraries, where they install next to this
venv (optional: neither is in fisherfast's extras — repeng 0.4 pins numpy < 2
and fails to import under numpy 2; steering-vectors 0.12 declares
transformers < 5 but runs on 5.x with ``pip install --no-deps``).

- repeng reads fisherfast's GGUF control vector (``export_gguf``) and its
  ControlModel, adding ``direction.N`` to block N's output, gives logits
  bitwise equal to ``steering(positions="all")`` at layer ℓ = N + 1.
- steering-vectors' CAA at ``decoder_block`` ℓ − 1 equals ``caa_direction`` of
  the layer-ℓ states (cosine 1 to float32 rounding of two mean computations,
  ~1e-7) and applies bitwise equal.
"""
from __future__ import annotations

import pytest
import torch

from fisherfast.steer import SteeringVectors, caa_direction, steering

def peer(name):
    """The peer package, or a skip naming why it cannot be imported here."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{name} is not installed ({err})")
    except AttributeError as err:  # repeng 0.4 under numpy 2: np.float_ at import
        pytest.skip(f"{name} does not import with this numpy/transformers ({err})")


PAIRS = [("I love this film, it is", "I hate this film, it is"),
         ("What a wonderful day, I feel", "What a terrible day, I feel"),
         ("The food was delicious and the service", "The food was disgusting and the service")]


def test_repeng_reads_the_gguf_and_steers_bitwise_alike(tiny_lm, tmp_path):
    pytest.importorskip("gguf")
    repeng = peer("repeng")
    model = tiny_lm("llama", d=32, layers=3, head_scale=10.0, seed=1, dtype=torch.float32)
    layer = 2
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    SteeringVectors.for_model(model, {layer: v}).export_gguf(tmp_path / "v.gguf")
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with steering(model, {layer: v}, positions="all"):
        ours = model(input_ids=ids).logits
    control = repeng.ControlVector.import_gguf(str(tmp_path / "v.gguf"))
    wrapped = repeng.ControlModel(model, [layer - 1])  # mutates the model until unwrap()
    try:
        wrapped.set_control(control, 1.0)
        theirs = wrapped(input_ids=ids).logits
    finally:
        wrapped.unwrap()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, model(input_ids=ids).logits)


@pytest.mark.slow
def test_steering_vectors_caa_equals_caa_direction_and_applies_alike():
    sv_lib = peer("steering_vectors")
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    layer = 12
    theirs = sv_lib.train_steering_vector(model, tokenizer, PAIRS, layers=[layer - 1], layer_type="decoder_block",
                                          read_token_index=-1, show_progress=False)
    states = {}
    for side in (0, 1):
        rows = []
        for pair in PAIRS:
            ids = tokenizer(pair[side], return_tensors="pt").input_ids
            rows.append(model(ids, output_hidden_states=True).hidden_states[layer][0, -1])
        states[side] = torch.stack(rows)
    ours = caa_direction(states[0], states[1])
    their_v = theirs.layer_activations[layer - 1]
    cos = float(torch.nn.functional.cosine_similarity(ours.double(), their_v.double(), dim=0))
    assert cos > 1 - 1e-6
    ids = tokenizer("The weather today is", return_tensors="pt").input_ids
    with theirs.apply(model, min_token_index=0):
        applied = model(ids).logits
    with steering(model, {layer: their_v}, positions="all"):
        assert torch.equal(model(ids).logits, applied)
