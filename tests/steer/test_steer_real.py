"""Steering on the embedded SmolLM2-135M (slow: loads the model).

After "The capital of France is", raise p(" London") from 0.012 to 0.5 at
layer 24; the steered vector, applied by the hooks in the model's own forward
pass, must give the probability the split model predicts. A multi-token
concept (" Washington D.C.", whose tokens repeat) is scored and steered as a
sequence; the oracle is the model's own teacher-forced forward with the edit
applied by a plain pre-hook.
"""
from __future__ import annotations

import math

import pytest
import torch

from fisherfast.split import SplitModel, decoder_blocks
from fisherfast.steer import ConceptScore, SequenceConcept, compare_methods, steer_to_target, steering

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    from fisherfast.models import load_default

    return load_default()


def test_fishback_reaches_the_target_with_less_distortion_than_euclidean(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    split = SplitModel(model, 24)
    ctx = split.context(ids[0])
    concept = ConceptScore(tokenizer.encode(" London"))
    rows = {row.method: row for row in compare_methods(split, ctx, concept, math.log(0.5))}
    fish, eucl = rows["fishback"], rows["euclidean"]
    for row in (fish, eucl):  # matched probability: within tol of the target from either side
        assert row.reached and abs(row.score - math.log(0.5)) <= 1e-3
    assert fish.kl < eucl.kl and fish.off_target_kl < eucl.off_target_kl / 2
    with steering(model, {24: fish.delta}):
        p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    assert float(p[concept.target].sum()) == pytest.approx(fish.target_prob, abs=1e-3)


def test_a_sequence_concept_with_repeated_tokens(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    tokens = tokenizer.encode(" Washington D.C.")
    assert len(set(tokens)) < len(tokens)  # "." repeats: a set concept would refuse it
    concept = SequenceConcept(tokens)
    split = SplitModel(model, 24)
    ctx = split.context(ids, continuation=tokens)
    t = len(ids) - 1

    def teacher_forced(delta):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = torch.cat([x[:, :t], x[:, t:t + 1] + delta, x[:, t + 1:]], dim=1)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handle = decoder_blocks(model)[24].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                z = model(input_ids=torch.cat([ids, torch.tensor(tokens[:-1])])[None]).logits[0, t:]
        finally:
            handle.remove()
        logp = torch.log_softmax(z.double(), -1)
        return float(sum(logp[i, y] for i, y in enumerate(tokens)))

    phi0 = float(concept.score(split, ctx, ctx.h))
    assert phi0 == pytest.approx(teacher_forced(torch.zeros(split.d)), abs=1e-4)  # float32 model
    target = math.log(0.2)
    assert phi0 < target
    run = steer_to_target(split, ctx, concept, target)
    assert run.reached and abs(run.scores[-1] - target) <= 1e-3
    assert teacher_forced(run.delta) == pytest.approx(target, abs=2e-3)
