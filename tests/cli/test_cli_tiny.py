"""The subcommands end to end on a tiny local model folder (``--model DIR``):
outputs, notices, explanations and what happens when a write fails late."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from fisherfast.sketch import SketchState


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n" + "one two three four five six " * 8 + "\n"
                                        "yes\nthe dog sat on the mat and the cat sat on the dog\n")
    return tmp_path


def _sketch(run_cli, model, out, *extra):
    return run_cli("sketch", "--model", model, "--texts", "texts.txt", "--out", out, "--m", "64", "--no-progress",
                   *extra)


def test_sketch_writes_a_shareable_state_and_reports_truncation(work, run_cli, tiny_model_dir):
    old = os.umask(0o022)
    try:
        result = _sketch(run_cli, tiny_model_dir, "a.safetensors", "--max-length", "10")
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    assert "2 of 4 texts are longer than --max-length 10 tokens (longest 48)" in result.err
    assert "1 of 4 texts are a single token and were skipped" in result.err
    assert stat.S_IMODE(os.stat("a.safetensors").st_mode) == 0o644
    state = SketchState.load("a.safetensors")
    # 3 texts of 6, 10 (truncated from 48) and 10 (from 13) tokens: 5 + 9 + 9 next-token positions
    assert state.count == 23 and state.spec.m == 64 and (state.spec.d, state.spec.K) == (32, 64)
    assert "wrote a.safetensors" in result.out
    assert sorted(os.listdir()) == ["a.safetensors", "texts.txt"]


def test_sketch_texts_drop_a_bom_and_end_lines_only_at_newlines(work, run_cli, tiny_model_dir):
    """Issue 18.5: a UTF-8 BOM stayed in the first text (an extra [UNK] token) and a
    form feed or U+2028 split a text in two (str.splitlines). Lines end at \\n or \\r\\n only."""
    from fisherfast.cli.sketch import read_texts

    body = "the cat sat\x0con the mat\u2028one two\r\n\nthe dog sat\n"
    (work / "bom.txt").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (work / "plain.txt").write_bytes(body.encode())
    want = ["the cat sat\x0con the mat\u2028one two", "the dog sat"]
    assert read_texts("bom.txt") == read_texts("plain.txt") == want
    for name in ("bom", "plain"):
        result = run_cli("sketch", "--model", tiny_model_dir, "--texts", f"{name}.txt", "--out",
                         f"{name}.safetensors", "--m", "64", "--no-progress")
        assert result.code == 0, result.err
    bom, plain = SketchState.load("bom.safetensors"), SketchState.load("plain.safetensors")
    # 8 + 3 words: 7 + 2 next-token positions (a BOM token or a split text would change the count)
    assert bom.count == plain.count == 9
    torch.testing.assert_close(bom.as_tensor(), plain.as_tensor(), rtol=0, atol=0)


def test_sketch_replaces_its_own_output_only_with_force(work, run_cli, tiny_model_dir):
    assert _sketch(run_cli, tiny_model_dir, "a.safetensors").code == 0
    before = open("a.safetensors", "rb").read()
    result = _sketch(run_cli, tiny_model_dir, "a.safetensors", "--seed", "1")
    assert result.code == 2 and "pass --force" in result.err
    assert open("a.safetensors", "rb").read() == before
    assert _sketch(run_cli, tiny_model_dir, "a.safetensors", "--seed", "1", "--force").code == 0
    assert SketchState.load("a.safetensors").spec.seed == 1


def test_a_late_write_failure_keeps_the_result(work, run_cli, tiny_model_dir, monkeypatch):
    from fisherfast.cli import _files

    real, calls = _files.atomic_write, []

    def fails_once(path, write):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(_files, "atomic_write", fails_once)
    result = _sketch(run_cli, tiny_model_dir, "a.safetensors")
    assert result.code == 1 and "No space left on device" in result.err
    [saved] = [name for name in os.listdir() if name.startswith("a.recovered-")]
    assert f"saved it to {os.path.abspath(saved)} instead" in result.err
    assert SketchState.load(saved).count > 0 and not os.path.exists("a.safetensors")


def test_align_explains_its_columns_and_names_the_files_of_each_spec(work, run_cli, tiny_model_dir):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _sketch(run_cli, tiny_model_dir, f"{name}.safetensors", "--seed", str(seed)).code == 0
    result = run_cli("align", "a.safetensors", "b.safetensors", "--out", "h.svg")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    for column in ("A", "S_a", "S_e", "ρ"):
        assert sum(line.startswith(f"{column} ") and len(line.split()) > 4 for line in lines) == 1, column
        assert any(line.split()[:3] == [column, "a", "b"] for line in lines), column
    assert open("h.svg", "rb").read().lstrip().startswith((b"<?xml", b"<svg"))

    result = run_cli("align", "a.safetensors", "c.safetensors")
    line = result.err.strip()
    assert result.code == 2 and "\n" not in line
    assert "a.safetensors: SketchSpec(d=32, K=64, m=64, seed=0" in line
    assert "c.safetensors: SketchSpec(d=32, K=64, m=64, seed=1" in line


def test_spectrum_checks_layers_against_the_folder_config_and_writes_the_plot(work, run_cli, tiny_model_dir,
                                                                              no_model):
    result = run_cli("spectrum", "--model", tiny_model_dir, "--layer", "4")
    assert result.code == 2 and "--layer 4: this model has layers 0..3" in result.err


def test_an_architecture_split_does_not_support_is_refused_before_loading(work, run_cli, tiny_model_dir, no_model):
    import json
    import shutil

    folder = work / "other-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("steer", "--model", folder, "--prompt", "the cat", "--target", "dog", "--layer", "1")
    assert result.code == 2 and "architecture 'bert' cannot be split at a layer" in result.err


def test_spectrum_on_the_tiny_model(work, run_cli, tiny_model_dir):
    (work / "prompts.txt").write_text("the cat sat on the\nthe capital of france is\none two three\n")
    result = run_cli("spectrum", "--model", tiny_model_dir, "--layer", "1", "3", "--prompts", "prompts.txt",
                     "--max-prompts", "2", "--out", "s.pdf", "--no-progress")
    assert result.code == 0, result.err
    assert "last token of 2 prompts" in result.out and "| 1 | 2 |" in result.out and "| 3 | 2 |" in result.out
    assert "shaded band = 10–90% range over prompts" in result.out
    assert open("s.pdf", "rb").read(5) == b"%PDF-"


def test_steer_on_the_tiny_model(work, run_cli, tiny_model_dir):
    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the capital of france is", "--target", "paris",
                     "--layer", "2", "--prob", "0.3", "--new-tokens", "2", "--no-progress")
    assert result.code == 0, result.err
    assert "| fishback |" in result.out and "| euclidean |" in result.out
    assert "generation with the fishback vector hooked in at layer 2" in result.out
    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the cat", "--target", "dog", "--layer", "1",
                     "--method", "euclidean", "--new-tokens", "0", "--no-progress")
    assert result.code == 0 and "| euclidean |" in result.out and "| fishback |" not in result.out
    assert "generation" not in result.out


def _teacher_forced_probability(folder, prompt: str, target: str) -> float:
    """p(target tokens | prompt) as the product of the model's own next-token probabilities."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    p_ids = tokenizer(prompt).input_ids
    t_ids = tokenizer.encode(target, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0].double(), -1)
    return float(sum(logp[len(p_ids) - 1 + i, y] for i, y in enumerate(t_ids)).exp())


def test_steer_reports_a_multi_token_target_as_a_sequence(work, run_cli, tiny_model_dir):
    """' the cat the' (a repeated token) is steered as p(y₁…y_n | prompt), which the
    report prints at its start: the model's own teacher-forced product."""
    prompt, target = "one two three", "the cat the"
    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", prompt, "--target", target, "--layer", "2",
                     "--prob", "0.001", "--method", "euclidean", "--new-tokens", "0", "--no-progress")
    assert result.code == 0, result.err
    header = next(line for line in result.out.splitlines() if line.startswith("raise "))
    assert "the sequence 'the' + 'cat' + 'the'" in header
    p0 = float(header.split(" from ")[1].split(" to ")[0])
    assert p0 == pytest.approx(_teacher_forced_probability(tiny_model_dir, prompt, target), abs=6e-4)
    alternatives = run_cli("steer", "--model", tiny_model_dir, "--prompt", prompt, "--target", "the cat",
                           "--as", "alternatives", "--layer", "2", "--prob", "0.5", "--method", "euclidean",
                           "--new-tokens", "0", "--no-progress")
    assert alternatives.code == 0, alternatives.err
    assert "as alternative next tokens" in next(line for line in alternatives.out.splitlines()
                                                if line.startswith("raise "))
    repeated = run_cli("steer", "--model", tiny_model_dir, "--prompt", prompt, "--target", target,
                       "--as", "alternatives", "--layer", "2", "--no-progress")
    assert repeated.code == 2 and "repeats a token" in repeated.err


def _write_jsonl(path, rows):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_sketch_of_a_dataset_equals_the_same_texts_from_a_file(work, run_cli, tiny_model_dir):
    lines = (work / "texts.txt").read_text().splitlines()
    _write_jsonl(work / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(lines)])
    assert _sketch(run_cli, tiny_model_dir, "file.safetensors").code == 0
    result = run_cli("sketch", "--model", tiny_model_dir, "--dataset", "corpus.jsonl", "--text-field", "text",
                     "--out", "data.safetensors", "--m", "64", "--no-progress")
    assert result.code == 0, result.err
    a, b = SketchState.load("file.safetensors"), SketchState.load("data.safetensors")
    assert a.count == b.count > 0
    torch.testing.assert_close(b.as_tensor(), a.as_tensor(), rtol=1e-12, atol=0)


def test_sketch_of_prompt_answer_pairs_and_dataset_mistakes(work, run_cli, tiny_model_dir, no_model):
    _write_jsonl(work / "qa.jsonl", [{"q": "the capital of france is", "a": "paris"}, {"q": "one two", "a": "three"}])
    usage = [
        (["--dataset", "qa.jsonl"], "--dataset needs --text-field, or --prompt-field with --answer-field"),
        (["--dataset", "qa.jsonl", "--prompt-field", "q"], "--prompt-field needs --answer-field"),
        (["--texts", "texts.txt", "--text-field", "text"], "--text-field applies only to --dataset, not --texts"),
        (["--texts", "texts.txt", "--prompt-field", "q", "--answer-field", "a"],
         "--prompt-field, --answer-field apply only to --dataset, not --texts"),
        # the corpus's fields are checked on its first row before the model loads (no_model)
        (["--dataset", "qa.jsonl", "--text-field", "nofield"], "qa.jsonl has no field 'nofield'; its fields are"),
        (["--dataset", "qa.jsonl", "--prompt-field", "q", "--answer-field", "nofield"], "has no field 'nofield'"),
        (["--dataset", "qa.jsonl", "--prompt-field", "nofield", "--answer-field", "a"], "has no field 'nofield'"),
        (["--dataset", "texts.txt", "--text-field", "text"], "--dataset texts.txt: path: expected a file ending"),
        (["--dataset", "missing.jsonl", "--text-field", "text"], "--dataset missing.jsonl: no such file or folder"),
    ]
    for extra, message in usage:
        result = run_cli("sketch", "--model", tiny_model_dir, "--out", "x.safetensors", *extra)
        assert result.code == 2 and message in result.err, (extra, result.err)
        assert not os.path.exists("x.safetensors")


def test_sketch_of_pairs_labels_the_answer_token(work, run_cli, tiny_model_dir):
    _write_jsonl(work / "qa.jsonl", [{"q": "the capital of france is", "a": "paris"}, {"q": "one two", "a": "three"}])
    result = run_cli("sketch", "--model", tiny_model_dir, "--dataset", "qa.jsonl", "--prompt-field", "q",
                     "--answer-field", "a", "--out", "qa.safetensors", "--m", "64", "--no-progress")
    assert result.code == 0, result.err
    assert SketchState.load("qa.safetensors").count == 2  # one labelled position per prompt
    missing = run_cli("sketch", "--model", tiny_model_dir, "--dataset", "qa.jsonl", "--text-field", "text",
                      "--out", "t.safetensors", "--no-progress")
    assert missing.code == 2 and "text" in missing.err and "q" in missing.err  # names the fields it has


def test_select_ranks_candidates_by_the_cosine_of_their_signatures(work, run_cli, tiny_model_dir):
    import numpy as np

    texts = {"a": "the cat sat on the mat\nthe dog sat on the mat\n",
             "b": "the cat sat on the dog\nthe mat sat on the cat\n",
             "c": "one two three four five six\nseven eight nine ten one two\n"}
    for name, body in texts.items():
        (work / f"{name}.txt").write_text(body)
        assert run_cli("sketch", "--model", tiny_model_dir, "--texts", f"{name}.txt", "--out", f"{name}.safetensors",
                       "--m", "256", "--no-progress").code == 0
    result = run_cli("select", "a.safetensors", "b.safetensors", "c.safetensors")
    assert result.code == 0, result.err
    rows = [line.split("|") for line in result.out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    mu = {n: SketchState.load(f"{n}.safetensors").signature().double().numpy() for n in texts}
    cos = {n: float(mu["a"] @ mu[n] / np.linalg.norm(mu["a"]) / np.linalg.norm(mu[n])) for n in ("b", "c")}
    want = sorted(cos, key=lambda n: -cos[n])
    assert [r[2].strip() for r in rows] == want
    for r in rows:
        assert float(r[3].split("±")[0]) == pytest.approx(cos[r[2].strip()], abs=5e-4)
    assert "ρ    A / (S_a·S_e)" in result.out
    bad = run_cli("select", "a.safetensors", "texts.txt")
    assert bad.code == 2 and "cannot load texts.txt" in bad.err


def test_index_add_list_query_on_the_tiny_model(work, run_cli, tiny_model_dir):
    """Issue 21.4: states from `fisherfast sketch` go into an index (created, appended, merged),
    `list` shows them, `query` prints what SignatureIndex.query returns; a repeated name is one
    line and exit 2 with the index file untouched."""
    from fisherfast.sketch import SignatureIndex

    texts = {"a": "the cat sat on the mat\nthe dog sat on the mat\n",
             "b": "the cat sat on the dog\nthe mat sat on the cat\n",
             "c": "one two three four five six\nseven eight nine ten one two\n",
             "d": "yes no yes no\nno yes no yes yes\n",
             "t": "the dog sat on the cat\nthe cat sat on the mat\n"}
    for name, body in texts.items():
        (work / f"{name}.txt").write_text(body)
        assert run_cli("sketch", "--model", tiny_model_dir, "--texts", f"{name}.txt", "--out", f"{name}.safetensors",
                       "--m", "256", "--no-progress").code == 0
    created = run_cli("index", "add", "i.safetensors", "a.safetensors", "b.safetensors")
    assert created.code == 0, created.err
    assert "created with 2 domains: i.safetensors holds 2" in created.out
    assert run_cli("index", "add", "i.safetensors", "c.safetensors", "--name", "numbers").code == 0
    assert run_cli("index", "add", "j.safetensors", "d.safetensors").code == 0
    merged = run_cli("index", "add", "i.safetensors", "j.safetensors")
    assert merged.code == 0 and "i.safetensors holds 4" in merged.out
    before = (work / "i.safetensors").read_bytes()
    again = run_cli("index", "add", "i.safetensors", "a.safetensors")
    assert again.code == 2 and again.err.count("\n") == 1 and "already holds a domain named 'a'" in again.err
    assert (work / "i.safetensors").read_bytes() == before
    (work / "other").mkdir()  # two STATEs of one command that give one domain name
    (work / "other" / "e.safetensors").write_bytes((work / "d.safetensors").read_bytes())
    (work / "e.safetensors").write_bytes((work / "c.safetensors").read_bytes())
    clash = run_cli("index", "add", "i.safetensors", "e.safetensors", os.path.join("other", "e.safetensors"))
    assert clash.code == 2 and clash.err.count("\n") == 1 and "gives the domain name 'e', as does STATE" in clash.err
    assert (work / "i.safetensors").read_bytes() == before
    listed = run_cli("index", "list", "i.safetensors")
    assert listed.code == 0 and "4 domains under SketchSpec(d=32, K=64, m=256" in listed.out
    assert [line.split()[0] for line in listed.out.splitlines()[1:]] == ["a", "b", "numbers", "d"]
    result = run_cli("index", "query", "i.safetensors", "t.safetensors", "--k", "3")
    assert result.code == 0, result.err
    rows = [line.split("|") for line in result.out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    want = SignatureIndex.load("i.safetensors").query(SketchState.load("t.safetensors"), k=3)
    assert [r[2].strip() for r in rows] == [h.name for h in want] and len(rows) == 3
    for r, h in zip(rows, want):
        assert r[3].strip() == f"{h.A:.3f} ± {h.A_stderr:.3f}" and r[7].strip() == f"{h.G:.3f} ± {h.G_stderr:.3f}"
    assert "G    cosine of the mean head gradients" in result.out
    one = run_cli("index", "list", "j.safetensors")
    assert "j.safetensors: 1 domain under" in one.out and "  (all kinds, with variances)" in one.out
    # a bare signature beside them: its row lacks S_a…G ("—") and says so; the others' rows are unchanged
    mixed = SignatureIndex.load("i.safetensors")
    mixed.add("sig", SketchState.load("c.safetensors").signature())
    mixed.save("m.safetensors")
    shown = run_cli("index", "query", "m.safetensors", "t.safetensors", "--k", "5")
    assert shown.code == 0, shown.err
    cells = {r[2].strip(): [c.strip() for c in r[3:8]] for r in (line.split("|") for line in shown.out.splitlines()
                                                                if line.startswith("| ") and line[2].isdigit())}
    before = {r[2].strip(): [c.strip() for c in r[3:8]] for r in rows}
    assert all(cells[name] == before[name] for name in before) and "—" not in str(before)
    assert cells["sig"][0] != "—" and cells["sig"][1:] == ["—"] * 4
    assert "sig holds a bare signature (A only); its ± is the projection part only" in shown.out
    assert "(a bare signature (A only))" in run_cli("index", "list", "m.safetensors").out


def test_align_kind_mean_prints_the_first_moment_cosines(work, run_cli, tiny_model_dir):
    from fisherfast.sketch import alignment

    for name in ("a", "b"):
        (work / f"{name}.txt").write_text("the cat sat on the mat\n" if name == "a" else "one two three four\n")
        assert run_cli("sketch", "--model", tiny_model_dir, "--texts", f"{name}.txt", "--out", f"{name}.safetensors",
                       "--m", "64", "--no-progress").code == 0
    result = run_cli("align", "a.safetensors", "b.safetensors", "--kind", "mean")
    assert result.code == 0, result.err
    assert "G    cosine of the mean head gradients" in result.out
    want = alignment([SketchState.load(f"{n}.safetensors") for n in "ab"], kind="mean")
    row = next(line for line in result.out.splitlines() if line.startswith("a "))
    assert row.split()[2] == f"{float(want.A[0, 1]):.3f}±{float(want.stderr[0, 1]):.3f}"


def test_sketch_under_torchrun_equals_one_process(work, tiny_model_dir):
    """torchrun --nproc-per-node 2 -m fisherfast sketch: rank-sharded corpus, all-reduced
    state written by rank 0, equal to one process's (gloo on the CPU)."""
    import subprocess
    import sys

    _write_jsonl(work / "corpus.jsonl", [{"text": t} for t in
                                         ("the cat sat on the mat", "one two three four", "yes no yes no yes",
                                          "the dog sat on the cat and the mat", "a b c d e f g")])
    common = ["sketch", "--model", str(tiny_model_dir), "--dataset", "corpus.jsonl", "--text-field", "text",
              "--features", "64", "--no-progress", "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-m", "fisherfast", *common, "--out", "one.safetensors"], env=env, check=True,
                   timeout=300, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fisherfast", *common, "--out", "two.safetensors"], env=env, timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "by 2 processes" in run.stdout
    one, two = SketchState.load("one.safetensors"), SketchState.load("two.safetensors")
    assert one.count == two.count > 0
    assert_sums_agree(two, one)


# Error model of two runs of one float32 model over the same rows (issue 18.3). Ranks take whole batches
# of the one-process batching, so each row's forward pass is the same and the sums differ by float64
# summation order (~1e-16 relative) -- when the BLAS rounds a product the same way in both runs. It need not
# (MKL's results may depend on the threads or on the operands' memory alignment), so the runs are held to
# what a float32 forward promises instead: per row, each feature ψ_j is off by at most DELTA times the
# feature's own scale over the rows, RMS_j = √(Q_j / n) (float32 rounding, u = 6e-8, amplified ~10³ at most
# through 3 layers, a softmax over 64 logits and four 64-point projections that may cancel), so
# |ΔS_j| ≤ n·DELTA·RMS_j = DELTA·√(n·Q_j) and |ΔQ_j| ≤ 2·DELTA·Q_j (+ float64 order, 1e-12 relative).
# A missing, repeated or mislabelled row moves S_j by about RMS_j, ≥ 1/(DELTA·√n) ≈ 2·10³ times the bound.
DELTA = 1e-4


def assert_sums_agree(got: SketchState, want: SketchState) -> None:
    assert got.spec == want.spec and got.count == want.count
    n = want.count
    for kind in want.sums:
        Q = want.sumsqs[kind]
        bound_S = DELTA * (n * Q).sqrt() + 1e-12 * Q.sqrt()
        bound_Q = 2 * DELTA * Q + 1e-300
        excess_S = float(((got.sums[kind] - want.sums[kind]).abs() / bound_S).max())
        excess_Q = float(((got.sumsqs[kind] - Q).abs() / bound_Q).max())
        assert excess_S <= 1 and excess_Q <= 1, (kind, excess_S, excess_Q)


def test_steer_with_a_target_as_alternative_tokens(work, run_cli, tiny_model_dir):
    """--as alternatives: a repeated token is one usage line, not a traceback;
    distinct tokens are reported as what is scored (alternative next tokens),
    and the start probability is p(cat) + p(dog) from the model's own forward."""
    import re

    import torch
    import transformers

    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the cat", "--target", "dog dog",
                     "--as", "alternatives", "--layer", "1", "--no-progress")
    assert result.code == 2 and result.out.count("\n") <= 1
    assert result.err.startswith("fisherfast steer: error: --target 'dog dog'") and "repeats a token" in result.err
    assert "Traceback" not in result.err and result.err.count("\n") == 1
    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the cat", "--target", "cat dog",
                     "--as", "alternatives", "--layer", "1", "--new-tokens", "0", "--method", "euclidean",
                     "--no-progress")
    assert result.code == 0, result.err
    line = next(line for line in result.out.splitlines() if line.startswith("raise "))
    assert line.startswith("raise p('cat' + 'dog') as alternative next tokens after 'the cat' from ")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        p = model(ids).logits[0, -1].softmax(-1)
    want = float(p[tokenizer.convert_tokens_to_ids("cat")] + p[tokenizer.convert_tokens_to_ids("dog")])
    assert re.search(r" from (\d\.\d{3}) ", line).group(1) == f"{want:.3f}"


def test_sums_agree_fails_for_a_missing_row():
    """The error model above cannot hide a lost row: the state without one row's features is rejected."""
    from fisherfast.sketch import FisherSketcher, SketchSpec

    g = torch.Generator().manual_seed(0)
    spec = SketchSpec(d=32, K=64, m=64)
    a, z, y = torch.randn(30, 32, generator=g), 3 * torch.randn(30, 64, generator=g), torch.randint(0, 64, (30,))
    full, less = FisherSketcher(spec), FisherSketcher(spec)
    full.update(a, logits=z, y=y)
    less.update(a[:29], logits=z[:29], y=y[:29])
    less.update(a[:1], logits=z[:1], y=y[:1])  # same count, one row twice and one missing
    assert_sums_agree(full.state, full.state)
    with pytest.raises(AssertionError):
        assert_sums_agree(less.state, full.state)
