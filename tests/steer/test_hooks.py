"""fisherfast.steer.steering in forward passes and generate, on tiny random-init
llama / qwen2 / gpt2 / gpt_neox / gemma3_text models (float64).

Oracle: greedy decoding that recomputes the whole sequence at every step (no
KV cache) and edits the chosen absolute positions through a plain forward
(pre-)hook written here; per-prompt runs for padded batches.
"""
from __future__ import annotations

import pytest
import torch

from tiny_models import TINY_ARCHS  # noqa: E402
from plain_hooks import column_hook  # noqa: E402  (tests/)
from fisherfast.steer import steering

D, LAYERS, NEW = 32, 3, 5
PROMPTS = ([3, 14, 15, 9, 2, 6, 7], [5, 8, 13, 21], [11, 4, 1, 6, 18, 2])
# positions choice → the absolute indices it edits in a sequence of T tokens after an n-token prompt
CHOICES = {
    "prompt_last": lambda n, T: {n - 1},
    "from_prompt_last": lambda n, T: set(range(n - 1, T)),
    "all": lambda n, T: set(range(T)),
    (1, 3): lambda n, T: {1, 3},
    (-2, 8): lambda n, T: {n - 2, 8},  # 8 lies past every prompt: reached while generating
}


@pytest.fixture(scope="module")
def models():
    from tiny_models import tiny_causal_lm

    built = {}
    for arch in TINY_ARCHS:
        # sdpa: transformers 5.23's eager attention takes its softmax in float32, where a float64 model's
        # mask value finfo(float64).min becomes -inf, so fully padded query rows give NaN, and 0·NaN then
        # reaches the real tokens of left-padded rows (with or without steering)
        model = tiny_causal_lm(arch, d=D, layers=LAYERS, head_scale=10.0, norm_noise=0.1, seed=3, attn="sdpa")
        model.generation_config.eos_token_id = None  # gpt2's eos is token 0: never stop early
        built[arch] = model
    return built


def vector(scale=1.0, seed=1):
    return scale * torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_generate(model, prompt, layer, v, chosen, new=NEW):
    """Greedy tokens, recomputing the full sequence each step with a plain hook."""
    seq = list(prompt)
    for _ in range(new):
        handle = column_hook(model, layer, v, lambda T: chosen(len(prompt), len(seq)))
        try:
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        finally:
            handle.remove()
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def generate(model, ids, mask=None, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                         max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


def pad(prompts, side):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    return ids, mask


# ------------------------------------------------------------------ generation: cache-independent positions

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_positions_choice_matches_full_recomputation_with_and_without_cache(models, arch):
    model, v, prompt = models[arch], vector(), PROMPTS[0]
    ids = torch.tensor([prompt])
    plain = generate(model, ids)[0]
    seen = {tuple(plain)}
    for layer in (1, LAYERS):
        for choice, chosen in CHOICES.items():
            expected = reference_generate(model, prompt, layer, v, chosen)
            positions = list(choice) if isinstance(choice, tuple) else choice
            for use_cache in (True, False):
                with steering(model, {layer: v}, positions=positions):
                    got = generate(model, ids, use_cache=use_cache)[0]
                assert got == expected, (layer, choice, use_cache)
            seen.add(tuple(expected))
    assert len(seen) >= 3  # the choices steer differently and change the plain generation


def test_last_is_a_deprecated_spelling_of_from_prompt_last(models):
    model, v, ids = models["llama"], vector(), torch.tensor([PROMPTS[0]])
    with steering(model, {1: v}, positions="from_prompt_last"):
        expected = generate(model, ids)[0]
    with pytest.warns(DeprecationWarning, match="'last' is deprecated.*'from_prompt_last'"):
        with steering(model, {1: v}, positions="last"):
            got = generate(model, ids)[0]
    assert got == expected and expected != generate(model, ids)[0]


def test_prompt_length_override_and_inference_modes(models):
    model, v, prompt = models["llama"], vector(), PROMPTS[0]
    ids = torch.tensor([prompt])
    expected = reference_generate(model, prompt, 1, v, lambda n, T: {3})  # the prompt taken as 4 tokens
    for ctx in (torch.no_grad, torch.inference_mode):
        for use_cache in (True, False):
            with ctx(), steering(model, {1: v}, positions="prompt_last", prompt_length=4):
                assert generate(model, ids, use_cache=use_cache)[0] == expected
    assert expected != reference_generate(model, prompt, 1, v, CHOICES["prompt_last"])


def test_independent_forward_calls_in_one_block_are_separate_prompts(models):
    model, v = models["qwen2"], vector()
    with steering(model, {2: v}, positions="prompt_last"):
        got = [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
    for p, logits in zip(PROMPTS, got):
        handle = column_hook(model, 2, v, lambda T: {len(p) - 1})
        try:
            expected = model(input_ids=torch.tensor([p])).logits[0]
        finally:
            handle.remove()
        torch.testing.assert_close(logits, expected)


def test_split_models_own_block_calls_are_not_edited(models):
    from fisherfast.split import SplitModel

    model, v, ids = models["gpt_neox"], vector(), PROMPTS[0]
    split = SplitModel(model, 1)
    ctx = split.context(ids)
    plain = split.logits(ctx, ctx.h)
    with steering(model, {2: v}, positions="all"):
        torch.testing.assert_close(split.logits(ctx, ctx.h), plain, rtol=0, atol=0)
        steered = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert float((steered - plain).abs().max()) > 1e-2


# ------------------------------------------------------------------ padded batches

@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_forward_equals_per_prompt_forward(models, arch, side):
    model, v = models[arch], vector()
    ids, mask = pad(PROMPTS, side)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's own positions (as generate passes them)
    unsteered = [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
    for choice in ("prompt_last", "from_prompt_last", "all", [0, -3]):
        with steering(model, {1: v, LAYERS: -v}, positions=choice):
            batch = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            alone = [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(batch[i][mask[i].bool()], alone[i])
        assert max(float((a - u).abs().max()) for a, u in zip(alone, unsteered)) > 1e-2  # it does steer


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_generation_equals_per_prompt_generation(models, arch):
    model, v = models[arch], vector()
    ids, mask = pad(PROMPTS, "left")
    for choice in ("prompt_last", "from_prompt_last", [1, -2, 7]):
        for use_cache in (True, False):
            with steering(model, {2: v}, positions=choice):
                batch = generate(model, ids, mask, use_cache=use_cache)
                alone = [generate(model, torch.tensor([p]), use_cache=use_cache)[0] for p in PROMPTS]
            assert batch == alone, (choice, use_cache)


# ------------------------------------------------------------------ bad input

def test_bad_inputs(models):
    model, v = models["llama"], vector()
    for positions in ("first", [], [1.5], [True], 3):
        with pytest.raises(ValueError, match="positions"):
            with steering(model, {1: v}, positions=positions):
                pass
    for n in (0, [2, 0], 2.5, "4"):
        with pytest.raises(ValueError, match="prompt_length"):
            with steering(model, {1: v}, prompt_length=n):
                pass
    with pytest.raises(ValueError, match="reaches before the start"):
        with steering(model, {1: v}, positions=[-9]):
            model(input_ids=torch.tensor([PROMPTS[0]]))
    with pytest.raises(ValueError, match="prompt_length has 1 entries for a batch of 3"):
        with steering(model, {1: v}, prompt_length=[4]):
            model(input_ids=pad(PROMPTS, "left")[0])
    with pytest.raises(ValueError, match="attention_mask"):
        with steering(model, {1: v}):
            model(input_ids=torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


# ------------------------------------------------------------------ the embedded SmolLM2 (slow)

@pytest.mark.slow
def test_smollm2_padded_batch_and_cache_give_the_reference_tokens():
    from fisherfast.models import load_default

    model, tokenizer = load_default()
    model.generation_config.eos_token_id = None  # compare whole continuations, never stop early
    london = model.get_output_embeddings().weight[tokenizer.encode(" London")[0]]
    v = 40 * london / london.norm()
    prompts = ["The capital of France is", "My favourite city to visit is", "I live in"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert batch.attention_mask.sum(-1).tolist() != [batch.input_ids.shape[1]] * 3  # really padded
    with steering(model, {24: v}):  # from_prompt_last
        steered = generate(model, batch.input_ids, batch.attention_mask)
        no_cache = generate(model, batch.input_ids, batch.attention_mask, use_cache=False)
        alone = [generate(model, tokenizer(p, return_tensors="pt").input_ids)[0] for p in prompts]
    assert steered == no_cache == alone
    first = tokenizer(prompts[0]).input_ids
    assert alone[0] == reference_generate(model, first, 24, v, CHOICES["from_prompt_last"])
    assert steered != generate(model, batch.input_ids, batch.attention_mask)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["prompt_last", "from_prompt_last", (-2, 8)])
def test_each_generate_in_one_block_steers_its_own_prompt(models, positions, use_cache):
    """Several generate() calls in one steering block — a second prompt that
    extends the first's output (a chat turn) and one that extends the first
    prompt — each steer as if generated alone: the
    reference recomputes each call's sequence with its own prompt length."""
    model = models["llama"]
    v, chosen = vector(3.0), CHOICES[positions]
    first = PROMPTS[0]
    wanted = list(positions) if isinstance(positions, tuple) else positions
    with torch.no_grad(), steering(model, {1: v}, positions=wanted):
        out1 = model.generate(torch.tensor([first]), max_new_tokens=NEW, do_sample=False, use_cache=use_cache)[0]
        turn = out1.tolist() + [4, 12]
        out2 = model.generate(torch.tensor([turn]), max_new_tokens=NEW, do_sample=False, use_cache=use_cache)[0]
        longer = first + [10, 16]
        out3 = model.generate(torch.tensor([longer]), max_new_tokens=NEW, do_sample=False, use_cache=use_cache)[0]
    with torch.no_grad():
        assert out1[len(first):].tolist() == reference_generate(model, first, 1, v, chosen)
        assert out2[len(turn):].tolist() == reference_generate(model, turn, 1, v, chosen)
        assert out3[len(longer):].tolist() == reference_generate(model, longer, 1, v, chosen)
