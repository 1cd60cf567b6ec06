"""calibrate on the embedded SmolLM2 (slow): the sentiment behaviour of
bench/steer_data.py (b = p(T)/(p(T)+p(S)), T negative words, S positive
ones), a CAA vector at layer 12 from its 12 training pairs, calibrated on 5 of
its held-out prompts and checked on the other 5.

Oracle: each prompt alone through the model's own forward with the vector
added at its last token by a plain hook. Tolerances: the calibration prompts'
median b is within tol = 1e-3 of the target (the search's stopping rule; the
oracle's float32 forward without cache adds ~1e-6); the KL budget holds to
float32 rounding of the KL (1e-5). Held out: prompts of the same kind have
b values spread like the calibration prompts', so their median at the same
strength must lie within the range of the calibration prompts' values (a
distribution-free statement about two samples of 5 from one population) —
and above the unsteered held-out median (steering moved them).
"""
from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = pytest.mark.slow


def behaviour_b(model, concept, ids, layer=None, vec=None):
    from fisherfast.split import architecture

    handle = None
    if vec is not None:
        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, -1] += vec
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        handle = architecture(model).blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return float(torch.sigmoid(concept(z))), torch.log_softmax(z, -1)


def test_calibrated_strength_reaches_the_target_on_held_out_prompts_within_the_budget():
    from fisherfast.models import load_default
    from fisherfast.steer import caa_direction, calibrate
    from bench_scripts import load_bench

    data = load_bench("steer_data.py")   # the benchmark data (bench/, not the library)
    BEHAVIOURS, concept_scores = data.BEHAVIOURS, data.concept_scores

    model, tokenizer = load_default()
    behaviour = BEHAVIOURS["sentiment"]
    _, concept, _ = concept_scores(tokenizer, behaviour)
    layer = 12

    def state(text):
        ids = tokenizer(text, return_tensors="pt").input_ids
        return model(ids, output_hidden_states=True).hidden_states[layer][0, -1]

    with torch.no_grad():
        v = caa_direction(torch.stack([state(a) for a, _ in behaviour.pairs]),
                          torch.stack([state(b) for _, b in behaviour.pairs]))
    prompts = [tokenizer(p).input_ids for p in behaviour.held_out]
    train, held = prompts[:5], prompts[5:]
    for budget, bound in ((4.0, "target"), (0.05, "budget")):
        cal = calibrate(model, v, layer, train, concept, 0.5, kl_budget=budget)
        assert cal.bound == bound
        values, kls = [], []
        for ids in train:
            b, steered = behaviour_b(model, concept, ids, layer, cal.vector)
            _, base = behaviour_b(model, concept, ids)
            values.append(b)
            kls.append(float((base.exp() * (base - steered)).sum()))
        assert max(kls) <= budget + 1e-5
        if bound == "budget":
            assert statistics.median(values) < 0.5 and max(kls) >= budget * (1 - 1e-3)
            continue
        assert abs(statistics.median(values) - 0.5) <= 1e-3 + 1e-5
        held_b = [behaviour_b(model, concept, ids, layer, cal.vector)[0] for ids in held]
        plain_b = [behaviour_b(model, concept, ids)[0] for ids in held]
        assert min(values) <= statistics.median(held_b) <= max(values)
        assert statistics.median(held_b) > statistics.median(plain_b) + 0.1
