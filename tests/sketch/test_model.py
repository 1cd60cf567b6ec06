"""sketch_model on tiny random-init causal LMs (the conftest ``tiny_lm`` factory; nothing fetched).

Oracle: each text run alone (unpadded) through the model's own forward; the
head input a is captured by a plain forward hook on the final norm, the logits
are the model's own ``.logits`` (with Gemma3's soft-capping where set), and the
labels are picked by hand; these rows go through FisherSketcher directly."""
import pytest
import scipy.linalg
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from fisherfast.sketch import FisherSketcher, SketchSpec, SketchState, alignment
from fisherfast.sketch.model import sketch_model, sketch_task, sketch_tasks
from fisherfast.sketch.tasks import PromptTask, verbalizer_tasks

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "Yes", "No",
         "Good", "Bad", "is", "it", "good", "?", "Answer", ":", "very", "big", "small", "red", "blue", "sun"]
V = len(WORDS)
TEXTS = ["the cat sat on the mat", "a dog ran", "the red sun is very big and the blue sun is small",
         "cat dog", "is it good ? Answer :", "the small dog sat on a mat far away"]
NORMS = {"llama": "model.norm", "qwen2": "model.norm", "gpt2": "transformer.ln_f",
         "gpt_neox": "gpt_neox.final_layer_norm", "gemma3_text": "model.norm"}
_MODELS = {}


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def tiny_model(tiny_lm):
    """arch → a tiny model (d = 16, V = 28; "gemma3_softcap": Gemma3 with final_logit_softcapping 2)."""
    def make(arch: str):
        if arch not in _MODELS:
            base = "gemma3_text" if arch == "gemma3_softcap" else arch
            model = tiny_lm(base, vocab=V, d=16, layers=2, heads=2, head_scale=8.0, dtype=torch.float32)
            if arch == "gemma3_softcap":
                model.config.final_logit_softcapping = 2.0
            _MODELS[arch] = model
        return _MODELS[arch]
    return make


def own_forward(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (T, d), logits (T, V)) of one unpadded text: the final norm's output and the model's own logits."""
    norm = model.get_submodule(NORMS[model.config.model_type])
    out = {}
    handle = norm.register_forward_hook(lambda mod, args, output: out.__setitem__("a", output))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()
    return out["a"][0], logits


def manual_state(model, rows_per_batch, spec, sample=False):
    """rows_per_batch: list (one per update) of lists of (token ids, position, label)."""
    sketcher = FisherSketcher(spec, generator_seed=spec.seed)
    softcap = getattr(model.config, "final_logit_softcapping", None)  # the logits below are the capped ones
    for rows in rows_per_batch:
        forwards = [own_forward(model, ids) for ids, _, _ in rows]
        a = torch.stack([f[0][t] for f, (_, t, _) in zip(forwards, rows)])
        logits = torch.stack([f[1][t] for f, (_, t, _) in zip(forwards, rows)])
        if sample:
            sketcher.update(a, logits=logits, sample=True, softcap=softcap)
        else:
            sketcher.update(a, logits=logits, y=torch.tensor([y for _, _, y in rows]), softcap=softcap)
    return sketcher.state


def assert_states_close(state, expected):
    assert state.spec == expected.spec and state.count == expected.count
    for kind in ("joint", "activation", "error"):
        for got, want in ((state.sums[kind], expected.sums[kind]), (state.sumsqs[kind], expected.sumsqs[kind])):
            scale = float(want.abs().max())
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3_softcap"])
def test_next_token_state_equals_manual_features(arch, tokenizer, tiny_model):
    model = tiny_model(arch)
    spec = SketchSpec(d=16, K=V, m=64, seed=3)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:  # chunk_rows=5: the op forms (and caps) logits 5 rows at a time
        state = sketch_model(model, tokenizer, TEXTS, spec=spec, batch_size=4, progress=False, chunk_rows=5)
    finally:
        handle.remove()
    assert not calls  # the model's LM head never runs: no B·T·V logits
    ids = tokenizer(TEXTS)["input_ids"]
    batches = [[(x, t, x[t + 1]) for x in ids[s:s + 4] for t in range(len(x) - 1)] for s in (0, 4)]
    assert_states_close(state, manual_state(model, batches, spec))
    assert state.count == sum(len(x) - 1 for x in ids)


def test_padding_is_ignored(tokenizer, tiny_model):
    model = tiny_model("llama")
    spec = SketchSpec(d=16, K=V, m=64)
    one_by_one = sketch_model(model, tokenizer, TEXTS, spec=spec, batch_size=1, progress=False)
    padded = sketch_model(model, tokenizer, TEXTS, spec=spec, batch_size=len(TEXTS), progress=False)
    assert_states_close(padded, one_by_one)


def test_verbalizer_labels_at_last_position(tokenizer, tiny_model):
    model = tiny_model("llama")
    spec = SketchSpec(d=16, K=V, m=64, seed=1)
    labels = [WORDS.index(w) for w in ("Yes", "No", "Yes", "Good", "Bad", "No")]
    state = sketch_model(model, tokenizer, TEXTS, spec=spec, labels=labels, batch_size=4, progress=False)
    ids = tokenizer(TEXTS)["input_ids"]
    batches = [[(x, len(x) - 1, y) for x, y in zip(ids[s:s + 4], labels[s:s + 4])] for s in (0, 4)]
    assert_states_close(state, manual_state(model, batches, spec))
    assert state.count == len(TEXTS)


def test_sample_draws_seeded_labels(tokenizer, tiny_model):
    model = tiny_model("llama")
    spec = SketchSpec(d=16, K=V, m=64, seed=2)
    state = sketch_model(model, tokenizer, TEXTS, spec=spec, sample=True, batch_size=3, progress=False)
    ids = tokenizer(TEXTS)["input_ids"]
    batches = [[(x, t, None) for x in ids[s:s + 3] for t in range(len(x) - 1)] for s in (0, 3)]
    assert_states_close(state, manual_state(model, batches, spec, sample=True))
    last = sketch_model(model, tokenizer, TEXTS, spec=spec, sample=True, labels=None, progress=False)
    assert last.count == len(TEXTS)  # labels=None: the last position of each text


def test_token_id_inputs_and_default_spec(tokenizer, tiny_model):
    model = tiny_model("gpt2")
    ids = tokenizer(TEXTS)["input_ids"]
    from_ids = sketch_model(model, None, ids, batch_size=2, progress=False)
    from_text = sketch_model(model, tokenizer, TEXTS, batch_size=2, progress=False)
    assert from_ids.spec == SketchSpec(d=16, K=V)
    assert_states_close(from_ids, from_text)


def test_prompt_task_labels(tokenizer, tiny_model):
    model = tiny_model("llama")
    task = PromptTask("t", ("is it good ?", "the cat"), ("Yes", "No"))
    assert task.label_ids(tokenizer) == [WORDS.index("Yes"), WORDS.index("No")]
    spec = SketchSpec(d=16, K=V, m=32)
    via_task = sketch_task(model, tokenizer, task, spec=spec, progress=False)
    direct = sketch_model(model, tokenizer, list(task.prompts), labels=task.label_ids(tokenizer), spec=spec,
                          progress=False)
    assert_states_close(via_task, direct)
    with pytest.raises(ValueError, match="exactly one"):
        PromptTask("t", ("a",), ("very big",)).label_ids(tokenizer)


def test_builtin_tasks_share_prompts_and_balance():
    tasks = verbalizer_tasks(n=8)
    assert [t.name for t in tasks] == ["yes_no", "no_yes", "good_bad", "a_b"]
    assert len({t.prompts for t in tasks}) == 1
    yes_no, no_yes = tasks[0], tasks[1]
    assert yes_no.answers.count(" Yes") == 4 and all(a != b for a, b in zip(yes_no.answers, no_yes.answers))
    assert set(verbalizer_tasks(n=8, offset=8)[0].prompts).isdisjoint(yes_no.prompts)
    with pytest.raises(ValueError, match="names"):
        verbalizer_tasks(["maybe"])
    with pytest.raises(ValueError, match=r"n: expected an int in \[1, 48\] for offset 0, got 1000"):
        verbalizer_tasks(n=1000)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(labels="tokens"), ValueError, "labels must be"),
    (dict(labels=[1, 2]), ValueError, "one token id per prompt"),
    (dict(labels=[1.0] * 6), TypeError, "int token ids"),
    (dict(labels=[1] * 5 + [V]), ValueError, r"token ids in \[0"),
    (dict(labels=[1] * 6, positions="all"), ValueError, "positions must be 'last'"),
    (dict(labels=[1] * 6, sample=True), ValueError, "do not also give"),
    (dict(labels=None), ValueError, "sample=True"),
    (dict(positions="last"), ValueError, "no label after the last token"),
    (dict(positions="every"), ValueError, "positions must be one of"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(spec=SketchSpec(d=8, K=V)), ValueError, "d = 16"),
    (dict(spec=(16, V)), TypeError, "SketchSpec"),
])
def test_bad_arguments(kwargs, error, match, tokenizer, tiny_model):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        sketch_model(model, tokenizer, TEXTS, progress=False, **kwargs)


def test_bad_data(tokenizer, tiny_model):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="non-empty list"):
        sketch_model(model, tokenizer, "the cat", progress=False)
    with pytest.raises(TypeError, match="non-empty list"):
        sketch_model(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="all strings or all lists"):
        sketch_model(model, tokenizer, ["the cat", [2, 3]], progress=False)
    with pytest.raises(ValueError, match="tokenizer is required"):
        sketch_model(model, None, ["the cat"], progress=False)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        sketch_model(model, tokenizer, ["the cat", "dog"], progress=False)
    with pytest.raises(TypeError, match="supported architecture"):
        sketch_model(torch.nn.Linear(2, 2), tokenizer, ["the cat"], progress=False)


def test_sketch_tasks_shares_forward_passes(tokenizer, tiny_model):
    model = tiny_model("llama")
    spec = SketchSpec(d=16, K=V, m=32)
    prompts, other = ("is it good ?", "the cat sat", "a dog"), ("the sun is red", "it is blue")
    tasks = [PromptTask("yes_no", prompts, ("Yes", "No", "Yes")),
             PromptTask("good_bad", prompts, ("Good", "Bad", "Good")), PromptTask("other", other, ("No", "Yes"))]
    together = sketch_tasks(model, tokenizer, tasks, spec=spec, batch_size=2, progress=False)
    assert list(together) == ["yes_no", "good_bad", "other"]
    for task in tasks:
        assert_states_close(together[task.name], sketch_task(model, tokenizer, task, spec=spec, progress=False))
    with pytest.raises(ValueError, match="unique"):
        sketch_tasks(model, tokenizer, [tasks[0], tasks[0]], spec=spec, progress=False)
    with pytest.raises(ValueError, match=r"labels\['x'\] must hold one token id per prompt"):
        sketch_model(model, tokenizer, list(prompts), labels={"x": [2]}, spec=spec, progress=False)


def test_cli_sketch_and_align(tokenizer, tmp_path, capsys, tiny_model):
    from fisherfast import cli

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "a.txt").write_text("\n".join(TEXTS[:3]) + "\n\n")
    (tmp_path / "b.txt").write_text("\n".join(TEXTS[3:]))
    for name in ("a", "b"):
        assert cli.main(["sketch", "--model", str(tmp_path / "model"), "--texts", str(tmp_path / f"{name}.txt"),
                         "--out", str(tmp_path / f"{name}.safetensors"), "--m", "32", "--no-progress"]) == 0
    spec = SketchSpec(d=16, K=V, m=32)
    a = SketchState.load(tmp_path / "a.safetensors", spec=spec)
    assert_states_close(a, sketch_model(model, tokenizer, TEXTS[:3], spec=spec, progress=False))
    capsys.readouterr()
    png = tmp_path / "heat.png"
    assert cli.main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                     "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    b = SketchState.load(tmp_path / "b.safetensors")
    result = alignment({"a": a, "b": b})
    assert f"{float(result.A[0, 1]):.3f}±{float(result.stderr[0, 1]):.3f}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["align", str(tmp_path / "a.txt")]) == 2  # usage errors: one line on stderr, status 2
    assert "cannot load" in capsys.readouterr().err
    assert cli.main(["sketch", "--model", str(tmp_path / "nowhere"), "--texts", str(tmp_path / "a.txt"),
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--model" in capsys.readouterr().err


def test_token_ids_outside_the_vocabulary_and_bad_seeds_are_named(tiny_model):
    """Review: an out-of-range or negative token id reached torch's embedding
    (IndexError "index out of range in self"); max_length=True was taken as 1;
    a negative sample_seed was reported as "generator_seed"."""
    model = tiny_model("llama")
    spec = SketchSpec(d=16, K=V, m=64)
    for bad in (V, -1):
        with pytest.raises(ValueError, match=rf"texts_or_prompts\[1\]: token ids must be in \[0, {V}\).*got {bad}"):
            sketch_model(model, None, [[2, 3, 4], [2, bad, 4]], spec=spec, progress=False)
    with pytest.raises(TypeError, match="lists of int token ids"):
        sketch_model(model, None, [[True, False, True]], spec=spec, progress=False)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        sketch_model(model, None, [[2, 3, 4]], spec=spec, max_length=True, progress=False)
    with pytest.raises(ValueError, match="sample_seed must be a non-negative int"):
        sketch_model(model, None, [[2, 3, 4]], spec=spec, sample=True, labels=None, sample_seed=-1, progress=False)
    assert sketch_model(model, None, [[2, 3, V - 1]], spec=spec, progress=False).count == 2  # the last id is fine


def test_softcapped_sketch_equals_features_of_autograd_head_gradients(tokenizer, tiny_model):
    """Gemma3 with final_logit_softcapping: every kind (first moment included) equals the features
    of the per-position gradient g = ∂CE(model logits_t, y_t)/∂W of the LM head weight, by autograd
    through the model's own forward (its own cap), float64 features from dense ±1 matrices. Error
    model: the model runs in float32 (autograd g and a to ~1e-6 relative), the sketch's features are
    float32: ≲ 1e-5 of the largest entry, within assert_states_close's 1e-5·max + 1e-4 relative."""
    def dense_features(plan):  # (m, n_in) float64: row j = D_b H_N e_i restricted to the input
        H = torch.from_numpy(scipy.linalg.hadamard(plan.N)).double()
        return (plan.signs.double()[plan.idx // plan.N] * H[plan.idx % plan.N])[:, : plan.n_in]

    model = tiny_model("gemma3_softcap")
    spec = SketchSpec(d=16, K=V, m=64, seed=4)
    ids = tokenizer(TEXTS[:3])["input_ids"]
    state = sketch_model(model, tokenizer, TEXTS[:3], spec=spec, batch_size=2, progress=False)
    Ra, Sa, Re, Se = (dense_features(p) for p in spec.plans())
    head = model.get_output_embeddings()
    tied = head.weight
    head.weight = W = torch.nn.Parameter(tied.detach().clone())  # untied: W.grad is the head's gradient alone
    psi = []
    for x in ids:
        for t in range(len(x) - 1):
            a, _ = own_forward(model, x)
            W.grad = None
            logits = model(input_ids=torch.tensor([x])).logits[0, t]
            torch.nn.functional.cross_entropy(logits[None], torch.tensor([x[t + 1]])).backward()
            g, a = W.grad.double(), a[t].double()
            e = g @ a / (a @ a)  # g = e ⊗ a exactly: the error in the linear logits' coordinates
            r_g, s_g = torch.einsum("jk,kd,jd->j", Re, g, Ra), torch.einsum("jk,kd,jd->j", Se, g, Sa)
            root_m = spec.m ** 0.5
            psi.append(torch.stack([r_g * s_g / root_m, (Ra @ a) * (Sa @ a) / root_m, (Re @ e) * (Se @ e) / root_m,
                                    r_g / root_m]))
    head.weight = tied
    model.zero_grad()
    psi = torch.stack(psi, 1)  # (4, n, m)
    expected = SketchState(spec, psi.shape[1], dict(zip(("joint", "activation", "error", "mean"), psi.sum(1))),
                           dict(zip(("joint", "activation", "error", "mean"), psi.square().sum(1))))
    assert_states_close(state, expected)
    torch.testing.assert_close(state.sums["mean"], expected.sums["mean"], rtol=1e-4,
                               atol=1e-5 * float(expected.sums["mean"].abs().max()))
