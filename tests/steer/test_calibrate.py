"""fisherfast.steer.calibrate / sweep_layers on tiny random-init models (float64).

Oracle: the calibrated vector α*·v applied by a plain forward pre-hook written
here at each prompt's last token, each prompt alone; p from a float64 softmax,
KL(p_base ‖ p_steered) summed directly. Tolerances: the aggregate is within
``tol`` of the target by the bisection's stopping rule (evaluated by the same
model in another batch shape: float64 rounding, 1e-12, on top); the budget's
k-section keeps its lower end, so KL ≤ budget exactly (up to 1e-12 for the
batch-shape rounding) and, with its bracket of relative width 1e-6 on a KL
smooth in α (∝ α² near 0), within a relative 1e-4 of the budget.
"""
from __future__ import annotations

import math

import pytest
import torch

from fisherfast.split import architecture
from fisherfast.steer import ConceptScore, SteeringVectors
from fisherfast.steer.calibration import calibrate, sweep_layers

PROMPTS = [[3, 14, 15, 9, 2], [5, 8, 13, 21], [11, 4, 1, 6, 18, 2], [7, 7, 30, 2], [9, 26, 5]]
TARGET_TOKEN, SOURCE_TOKEN = 17, 23


@pytest.fixture(scope="module")
def model():
    from tiny_models import tiny_causal_lm

    return tiny_causal_lm("llama", d=32, layers=3, head_scale=10.0, norm_noise=0.1, seed=3)


def direction(model, token=TARGET_TOKEN):
    w = model.get_output_embeddings().weight
    return (w[token] - w.mean(0)).clone()


def oracle(model, layer, vec, prompt, concept):
    """(value, KL) with vec added at the prompt's last token by a plain hook."""
    blocks = architecture(model).blocks
    ids = torch.tensor([prompt])
    base = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)

    def add(h):
        h = h.clone()
        h[0, -1] += vec
        return h

    if layer < len(blocks):
        handle = blocks[layer].register_forward_pre_hook(
            lambda m, a, kw: ((add(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": add(kw["hidden_states"])}),
            with_kwargs=True)
    else:
        handle = blocks[-1].register_forward_hook(lambda m, a, out: (add(out[0]), *out[1:])
                                                  if isinstance(out, tuple) else add(out))
    try:
        steered = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    finally:
        handle.remove()
    p = steered.exp()
    pt = float(p[concept.target].sum())
    value = pt if concept.source is None else pt / (pt + float(p[concept.source].sum()))
    return value, float((base.exp() * (base - steered)).sum())


@pytest.mark.parametrize("layer", [1, 3])
@pytest.mark.parametrize("source", [None, [SOURCE_TOKEN]])
def test_median_reaches_the_target_within_tol(model, layer, source):
    concept = ConceptScore([TARGET_TOKEN], source)
    v = direction(model)
    cal = calibrate(model, v, layer, PROMPTS, concept, 0.6)
    assert cal.bound == "target" and cal.scale > 0
    values, kls = zip(*(oracle(model, layer, cal.vector, p, concept) for p in PROMPTS))
    assert abs(sorted(values)[(len(values) - 1) // 2] - 0.6) <= 1e-3 + 1e-12
    assert abs(cal.value - 0.6) <= 1e-3
    for got, value, kl in zip(cal.prompts, values, kls):
        assert math.isclose(got.value, value, abs_tol=1e-12) and math.isclose(got.kl, kl, abs_tol=1e-12)
        assert got.reached == (value >= 0.6 - 1e-3)
    torch.testing.assert_close(cal.vector, cal.scale * v)


def test_every_prompt_mode(model):
    concept = ConceptScore([TARGET_TOKEN])
    cal = calibrate(model, direction(model), 3, PROMPTS, concept, 0.6, mode="every")
    values = [oracle(model, 3, cal.vector, p, concept)[0] for p in PROMPTS]
    assert cal.bound == "target" and min(values) >= 0.6 - 1e-3 - 1e-12 and abs(min(values) - 0.6) <= 1e-3 + 1e-12
    median = calibrate(model, direction(model), 3, PROMPTS, concept, 0.6)
    assert cal.scale > median.scale  # every prompt needs more than the median one


def test_the_kl_budget_binds_and_is_never_exceeded(model):
    concept = ConceptScore([TARGET_TOKEN])
    v = direction(model)
    free = calibrate(model, v, 3, PROMPTS, concept, 0.8)
    assert free.bound == "target"
    budget = 0.5 * free.max_kl
    cal = calibrate(model, v, 3, PROMPTS, concept, 0.8, kl_budget=budget)
    assert cal.bound == "budget" and cal.scale < free.scale
    kls = [oracle(model, 3, cal.vector, p, concept)[1] for p in PROMPTS]
    assert max(kls) <= budget + 1e-12 and max(kls) >= budget * (1 - 1e-4)
    assert cal.value < 0.8 - 1e-3 and not all(p.reached for p in cal.prompts)
    loose = calibrate(model, v, 3, PROMPTS, concept, 0.8, kl_budget=2 * free.max_kl)
    assert loose.bound == "target" and math.isclose(loose.scale, free.scale, rel_tol=1e-9)


def test_each_prompts_limit_is_what_it_alone_would_hit(model):
    concept = ConceptScore([TARGET_TOKEN])
    v = direction(model)
    free = calibrate(model, v, 3, PROMPTS, concept, 0.8)
    budget = sorted(p.kl for p in free.prompts)[2]  # between the prompts' own costs
    cal = calibrate(model, v, 3, PROMPTS, concept, 0.8, kl_budget=budget)
    limits = [p.limit for p in cal.prompts]
    assert {"target", "budget"} <= set(limits)
    for prompt, limit in zip(PROMPTS, limits):
        assert calibrate(model, v, 3, [prompt], concept, 0.8, kl_budget=budget).bound == limit
    high = calibrate(model, v, 3, PROMPTS, concept, 0.899999, max_scale=1.0)  # out of reach
    assert high.bound == "max_scale" and all(p.limit == "max_scale" for p in high.prompts)


def test_record_travels_in_the_vector_file(model, tmp_path):
    concept = ConceptScore([TARGET_TOKEN])
    cal = calibrate(model, direction(model), 2, PROMPTS, concept, 0.6, kl_budget=5.0)
    sv = cal.steering_vectors(model, method="unembedding")
    sv.save(tmp_path / "v.safetensors")
    back = SteeringVectors.load(tmp_path / "v.safetensors", model=model)
    record = back.settings["calibration"]
    assert record["target"] == 0.6 and record["budget"] == 5.0 and record["layer"] == 2
    assert record["prompts"]["count"] == len(PROMPTS) and len(record["per_prompt"]) == len(PROMPTS)
    assert record["bound"] == cal.bound and record["value"] == cal.value
    assert torch.equal(back.vectors[2], cal.vector)


def test_layer_sweep_is_calibrate_per_layer(model):
    concept = ConceptScore([TARGET_TOKEN], [SOURCE_TOKEN])
    g = torch.Generator().manual_seed(5)
    dirs = {layer: torch.randn(32, generator=g, dtype=torch.float64) + direction(model) for layer in (1, 2, 3)}
    swept = sweep_layers(model, dirs, [1, 2, 3], PROMPTS, concept, 0.7, kl_budget=3.0)
    assert [c.layer for c in swept] == [1, 2, 3]
    for c in swept:
        alone = calibrate(model, dirs[c.layer], c.layer, PROMPTS, concept, 0.7, kl_budget=3.0)
        assert (c.scale, c.bound, c.max_kl) == (alone.scale, alone.bound, alone.max_kl)
    assert len({round(c.max_kl, 6) for c in swept}) == 3  # the layers cost differently
    assert sweep_layers(model, dirs.__getitem__, [2], PROMPTS, concept, 0.7)[0].layer == 2


def test_bad_inputs(model):
    concept, v = ConceptScore([TARGET_TOKEN]), direction(model)
    cases = [(dict(layer=4), "layer"), (dict(vector=torch.zeros(32)), "vector"), (dict(vector=v[:5]), "vector"),
             (dict(prompts=[]), "prompts"), (dict(prompts=[[1, 99]]), "prompts\\[0\\]"),
             (dict(prompts=[[]]), "prompts\\[0\\]"), (dict(target=1.0), "target"), (dict(target=0), "target"),
             (dict(kl_budget=0.0), "kl_budget"), (dict(kl_budget=math.inf), "kl_budget"), (dict(mode="mean"), "mode"),
             (dict(concept=ConceptScore([99])), "concept"), (dict(tol=0), "tol"), (dict(max_scale=-1), "max_scale")]
    for change, message in cases:
        args = dict(model=model, vector=v, layer=2, prompts=PROMPTS, concept=concept, target=0.6) | change
        with pytest.raises(ValueError, match=message):
            calibrate(**args)
    with pytest.raises(ValueError, match="no vector for layers \\[3\\]"):
        sweep_layers(model, {2: v}, [2, 3], PROMPTS, concept, 0.6)
    with pytest.raises(ValueError, match="layers"):
        sweep_layers(model, {2: v}, [], PROMPTS, concept, 0.6)


def test_fishback_per_prompt_directions(model):
    """One FishBack direction per prompt (steer_to_target at each prompt's last
    token, normalized), one shared strength: each prompt steered by its own
    direction reaches the median target."""
    from fisherfast.split import SplitModel
    from fisherfast.steer import steer_to_target

    concept = ConceptScore([TARGET_TOKEN], [SOURCE_TOKEN])
    split = SplitModel(model, 2)
    rows = []
    for p in PROMPTS:
        delta = steer_to_target(split, split.context(torch.tensor(p)), concept, math.log(0.7 / 0.3)).delta
        rows.append(delta / delta.norm())
    dirs = torch.stack(rows)
    cal = calibrate(model, dirs, 2, PROMPTS, concept, 0.6)
    assert cal.bound == "target" and cal.vector.shape == dirs.shape
    values = [oracle(model, 2, cal.vector[i], p, concept)[0] for i, p in enumerate(PROMPTS)]
    assert abs(sorted(values)[(len(values) - 1) // 2] - 0.6) <= 1e-3 + 1e-12
    with pytest.raises(ValueError, match="per-prompt directions"):
        cal.steering_vectors(model)
    with pytest.raises(ValueError, match=r"\(5, 32\)"):
        calibrate(model, dirs[:3], 2, PROMPTS, concept, 0.6)
