"""fisherfast.steer.steering in every decoding mode of generate, on tiny random-init
models (float64): greedy, sampling, beam search with num_return_sequences,
static and sliding-window caches, assisted and prompt-lookup decoding,
inputs_embeds; per-row vectors and scales.

Oracle: a plain forward (pre-)hook written here that edits fixed absolute
columns of every row, in the same generate call with use_cache=False — each
step recomputes the whole sequence, so with an unpadded prompt of known
length n a column is a position and the hook needs no tracking at all (tied
to a hand-written recompute loop in the first test). Padded and per-row
batches: each row run alone. Tokens must be identical; logits (greedy,
sampling) equal to float64 rounding: the cached and recomputed forwards sum
attention in different orders, error ~ L·d·eps64·|h| ≈ 1e-13, so 1e-9.
"""
from __future__ import annotations

import pytest
import torch

from fisherfast.steer import steering
from plain_hooks import column_hook  # tests/

D, LAYERS, NEW = 32, 3, 6
PROMPT = [3, 14, 15, 9, 2, 6, 7]
ARCHS = ("llama", "gpt2", "gemma3_text")
CHOICES = {  # positions → columns edited in a sequence of T tokens after an n-token prompt
    "prompt_last": lambda n, T: {n - 1},
    "from_prompt_last": lambda n, T: set(range(n - 1, T)),
    "all": lambda n, T: set(range(T)),
    (-2, 9): lambda n, T: {n - 2, 9},
}


@pytest.fixture(scope="module")
def models():
    from tiny_models import tiny_causal_lm

    built = {}
    for arch in ARCHS:
        model = tiny_causal_lm(arch, d=D, layers=LAYERS, head_scale=10.0, norm_noise=0.1, seed=3, attn="sdpa",
                               sliding_window=3)  # gemma3: sliding layers really slide on these prompts
        model.generation_config.eos_token_id = None  # never stop early
        built[arch] = model
    draft = tiny_causal_lm("llama", d=16, layers=1, heads=2, head_scale=10.0, seed=5, attn="sdpa")
    draft.generation_config.eos_token_id = None
    built["draft"] = draft
    return built


def vector(scale=1.0, seed=1, shape=(D,)):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(model, ids=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("min_new_tokens", NEW)
    out = model.generate(input_ids=ids, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)
    new = out.sequences if ids is None else out.sequences[:, ids.shape[1]:]
    return new.tolist(), torch.stack(out.logits, 1)


def reference(model, layer, v, choice, n, **kw):
    """The same generate call without cache, with the plain column hook."""
    handle = column_hook(model, layer, v, lambda T: CHOICES[choice](n, T))
    try:
        return run(model, use_cache=False, **kw)
    finally:
        handle.remove()


def steered(model, layer, v, choice, **kw):
    positions = list(choice) if isinstance(choice, tuple) else choice
    with steering(model, {layer: v}, positions=positions):
        return run(model, **kw)


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.5),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sampling": dict(do_sample=True, num_beams=2, num_return_sequences=2),
}


def test_reference_is_the_recompute_loop(models):
    """The generate(use_cache=False) + column-hook oracle = a hand-written greedy loop."""
    model, v = models["llama"], vector()
    seq = list(PROMPT)
    for _ in range(NEW):
        handle = column_hook(model, 1, v, lambda T: CHOICES["from_prompt_last"](len(PROMPT), T))
        try:
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        finally:
            handle.remove()
    tokens, _ = reference(model, 1, v, "from_prompt_last", len(PROMPT), ids=torch.tensor([PROMPT]),
                          do_sample=False)
    assert tokens[0] == seq[len(PROMPT):]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_modes_match_the_recompute_reference(models, arch, mode):
    model, v, ids = models[arch], vector(2.0), torch.tensor([PROMPT])
    plain, _ = run(model, ids, **MODES[mode])
    differs = False
    for layer in (1, LAYERS):
        for choice in CHOICES:
            want, want_logits = reference(model, layer, v, choice, len(PROMPT), ids=ids, **MODES[mode])
            for use_cache in (True, False):
                got, logits = steered(model, layer, v, choice, ids=ids, use_cache=use_cache, **MODES[mode])
                assert got == want, (layer, choice, use_cache)
                if "beam" not in mode:  # beam search reports its processed beam scores, not per-row logits
                    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
            differs |= want != plain
    assert differs  # the vector does change the generation


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("choice", ["prompt_last", "from_prompt_last", (-2, 9)])
def test_static_and_sliding_window_caches(models, arch, choice):
    """cache_implementation="static" hands the blocks 4-D masks (a dict of them on
    Gemma3, whose sliding layers keep 3 tokens); dynamic sliding caches too."""
    model, v, ids = models[arch], vector(2.0), torch.tensor([PROMPT])
    want, want_logits = reference(model, 2, v, choice, len(PROMPT), ids=ids, do_sample=False)
    for cache in ("static", "dynamic"):
        got, logits = steered(model, 2, v, choice, ids=ids, do_sample=False, cache_implementation=cache)
        assert got == want, cache
        torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("choice", list(CHOICES))
def test_assisted_and_prompt_lookup_decoding(models, choice):
    """Calls of several candidate tokens continue the sequence (and the cache is
    cropped after a rejection): greedy assisted decoding gives greedy's tokens."""
    model, v = models["llama"], vector(2.0)
    prompt = [3, 14, 15, 9, 3, 14, 15, 9, 3, 14]  # repeats: prompt lookup finds candidates
    ids = torch.tensor([prompt])
    want, _ = reference(model, 1, v, choice, len(prompt), ids=ids, do_sample=False, max_new_tokens=8,
                        min_new_tokens=8)
    for extra in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=models["draft"])):
        got, _ = steered(model, 1, v, choice, ids=ids, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                         **extra)
        assert got == want, extra


def test_several_candidates_per_call_really_happen(models):
    """Guards the test above: prompt lookup does send calls of several tokens."""
    model = models["llama"]
    widths = []
    handle = model.base_model.register_forward_pre_hook(
        lambda m, a, kw: widths.append((kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]),
        with_kwargs=True)
    try:
        with steering(model, {1: vector()}):
            run(model, torch.tensor([[3, 14, 15, 9, 3, 14, 15, 9, 3, 14]]), do_sample=False,
                prompt_lookup_num_tokens=3, max_new_tokens=8, min_new_tokens=8)
    finally:
        handle.remove()
    assert widths[0] > 10 or any(w > 1 for w in widths[1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_embeds(models, arch):
    model, v, ids = models[arch], vector(2.0), torch.tensor([PROMPT])
    embeds = model.get_input_embeddings()(ids)
    for choice in ("prompt_last", "from_prompt_last"):
        want, _ = reference(model, 1, v, choice, len(PROMPT), ids=ids, do_sample=False)
        for use_cache in (True, False):
            got, _ = steered(model, 1, v, choice, inputs_embeds=embeds, do_sample=False, use_cache=use_cache)
            assert got == want, (choice, use_cache)


def pad_left(prompts):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return ids, mask


PROMPTS = (PROMPT, [5, 8, 13, 21], [11, 4, 1, 6, 18, 2])


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_beam_search_equals_each_prompt_alone(models, arch):
    model, v = models[arch], vector(2.0)
    ids, mask = pad_left(PROMPTS)
    beam = dict(do_sample=False, num_beams=3, num_return_sequences=2)
    for choice in ("prompt_last", "from_prompt_last", (-2, 9)):
        for use_cache in (True, False):
            batch, _ = steered(model, 2, v, choice, ids=ids, attention_mask=mask, use_cache=use_cache, **beam)
            alone = sum((steered(model, 2, v, choice, ids=torch.tensor([p]), use_cache=use_cache, **beam)[0]
                         for p in PROMPTS), [])
            assert batch == alone, (choice, use_cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_vectors_and_scales_equal_each_row_alone(models, arch):
    """One batched generate with a different vector / strength per row (padded,
    with beam search too) = each row steered alone with its own vector."""
    model = models[arch]
    ids, mask = pad_left(PROMPTS)
    V = vector(2.0, shape=(3, D))
    s = [1.0, -0.5, 2.0]
    base_v = vector(1.5, seed=7)
    cases = [({1: V}, 1.0, [{1: V[i]} for i in range(3)]),
             ({2: base_v}, s, [{2: s[i] * base_v} for i in range(3)]),
             ({1: V, LAYERS: base_v}, {LAYERS: s}, [{1: V[i], LAYERS: s[i] * base_v} for i in range(3)])]
    for vectors, scale, each in cases:
        for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2, num_return_sequences=2)):
            with steering(model, vectors, scale=scale):
                batch, logits = run(model, ids, attention_mask=mask, **kw)
            alone, alone_logits = [], []
            for p, vec in zip(PROMPTS, each):
                with steering(model, vec):
                    t, lg = run(model, torch.tensor([p]), **kw)
                alone += t
                alone_logits.append(lg)
            assert batch == alone, (scale, kw)
            if "num_beams" not in kw:
                torch.testing.assert_close(logits, torch.cat(alone_logits), rtol=1e-9, atol=1e-9)
    # the rows really are steered differently: row 0 with row 1's vector gives other tokens
    with steering(model, {1: V[1]}):
        other, _ = run(model, torch.tensor([PROMPTS[0]]), do_sample=False)
    with steering(model, {1: V[0]}):
        own, _ = run(model, torch.tensor([PROMPTS[0]]), do_sample=False)
    assert other != own


def test_per_row_bad_inputs(models):
    model = models["llama"]
    ids, mask = pad_left(PROMPTS)
    with pytest.raises(ValueError, match="same number of rows"):
        with steering(model, {1: vector(shape=(3, D)), 2: vector(shape=(2, D))}):
            pass
    with pytest.raises(ValueError, match="scale for layer 1 has 2 rows; the vectors have 3"):
        with steering(model, {1: vector(shape=(3, D))}, scale=[1.0, 2.0]):
            pass
    with pytest.raises(ValueError, match="layers \\[2\\] have no vector"):
        with steering(model, {1: vector()}, scale={2: 1.0}):
            pass
    with pytest.raises(ValueError, match="scale"):
        with steering(model, {1: vector()}, scale=[[1.0]]):
            pass
    calls = []
    handle = model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="per-row steering of 2 rows cannot apply to generate's batch of 3"):
            with steering(model, {1: vector(shape=(2, D))}):
                run(model, ids, attention_mask=mask, do_sample=False)
    finally:
        handle.remove()
    assert calls == []  # refused before generation started


def test_refused_modes_are_named_before_generation(models):
    model, ids = models["llama"], torch.tensor([PROMPT])
    calls = []
    handle = model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for kw, name in ((dict(negative_prompt_ids=torch.tensor([[1, 2]]), guidance_scale=2.0),
                          "classifier-free guidance"),
                         (dict(penalty_alpha=0.6, top_k=4), "contrastive search")):
            with pytest.raises(ValueError, match=name), steering(model, {1: vector()}):
                run(model, ids, **kw)
    finally:
        handle.remove()
    assert calls == []
    assert "generate" not in vars(model)  # the wrapper is gone with the block
