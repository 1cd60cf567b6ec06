"""Corpus inputs (local datasets files, streamed) and sharded sketching.

Oracles: the rows written to the files (read back in order); sketch_model on
the same texts or prompts (its own tests hold it to the model's own forward);
and for 2 gloo processes (torchrun's sharding), the single-process state of
the same corpus: counts exactly equal, sums to float64 round-off (ranks take
whole batches of the single-process batching, so every row goes through the
same forward pass)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import transformers

from fisherfast.sketch import SketchSpec, SketchState, read_corpus, sketch_corpus, sketch_model
from fisherfast.sketch.corpus import check_corpus, init_distributed_from_env, shard
from _distributed import leave, run_workers  # noqa: E402  (tests/)
from test_model import TEXTS, V, WORDS, assert_states_close, tiny_tokenizer

datasets = pytest.importorskip("datasets")  # in the test extra
WORLD = 2
TIMEOUT_S = 120
ROWS = [{"text": t, "prompt": t, "answer": WORDS[12 + i % 4], "n": i} for i, t in enumerate(TEXTS * 2)]
SPEC = SketchSpec(d=16, K=V, m=64, seed=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm("llama", vocab=V, d=16, layers=2, heads=2, head_scale=8.0)  # float64


def write_files(folder) -> dict[str, str]:
    ds = datasets.Dataset.from_list(ROWS)
    paths = {"jsonl": os.path.join(folder, "c.jsonl"), "parquet": os.path.join(folder, "c.parquet"),
             "arrow": os.path.join(folder, "arrow_dir")}
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ROWS)
    ds.to_parquet(paths["parquet"])
    ds.save_to_disk(paths["arrow"])  # a folder holding data-00000-of-00001.arrow
    return paths


def test_read_corpus_formats_and_fields(tmp_path):
    for fmt, path in write_files(tmp_path).items():
        assert list(read_corpus(path, text_field="text")) == [r["text"] for r in ROWS], fmt
        assert list(read_corpus(path, prompt_field="prompt", answer_field="answer")) == \
            [(r["prompt"], r["answer"]) for r in ROWS], fmt
        with pytest.raises(ValueError, match=r"no field 'txt'; its fields are \['answer', 'n', 'prompt', 'text'\]"):
            read_corpus(path, text_field="txt")
    path = write_files(tmp_path)["jsonl"]
    with pytest.raises(TypeError, match="row 0 field 'n' is int"):
        list(read_corpus(path, text_field="n"))
    with pytest.raises(ValueError, match="not both"):
        read_corpus(path, text_field="text", prompt_field="prompt")
    with pytest.raises(ValueError, match="both prompt_field and answer_field"):
        read_corpus(path, prompt_field="prompt")
    with pytest.raises(FileNotFoundError, match="no corpus"):
        read_corpus(tmp_path / "none.jsonl", text_field="text")
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="expected a file ending"):
        read_corpus(tmp_path / "c.csv", text_field="text")
    assert list(shard(iter(range(7)), 1, 3)) == [1, 4]


def test_check_corpus_raises_what_read_corpus_raises(tmp_path):
    """check_corpus (the CLI's check before a model loads) accepts what read_corpus reads and
    rejects, with read_corpus' message, each field choice, path and field it rejects."""
    for fmt, path in write_files(tmp_path).items():
        assert check_corpus(path, text_field="text") is None, fmt
        assert check_corpus(path, prompt_field="prompt", answer_field="answer") is None, fmt
        for kwargs in (dict(text_field="txt"), dict(prompt_field="prompt", answer_field="nofield"),
                       dict(prompt_field="nofield", answer_field="answer")):
            with pytest.raises(ValueError, match="no field") as checked:
                check_corpus(path, **kwargs)
            with pytest.raises(ValueError) as read:
                read_corpus(path, **kwargs)
            assert str(checked.value) == str(read.value)
    with pytest.raises(ValueError, match="both prompt_field and answer_field"):
        check_corpus(tmp_path / "c.jsonl", prompt_field="prompt")
    with pytest.raises(FileNotFoundError, match="no corpus"):
        check_corpus(tmp_path / "none.jsonl", text_field="text")
    (tmp_path / "empty.jsonl").write_text("")
    assert check_corpus(tmp_path / "empty.jsonl", text_field="text") is None  # no rows: nothing to sketch, no error
    assert list(read_corpus(tmp_path / "empty.jsonl", text_field="text")) == []  # was a StopIteration traceback
    assert not init_distributed_from_env() or dist.is_initialized()  # outside torchrun: nothing to do


def test_sketch_corpus_equals_sketch_model(tmp_path, model, tokenizer):
    path = write_files(tmp_path)["jsonl"]
    texts = [r["text"] for r in ROWS]
    got = sketch_corpus(model, tokenizer, path, spec=SPEC, text_field="text", batch_size=5, progress=False)
    assert_states_close(got, sketch_model(model, tokenizer, texts, spec=SPEC, batch_size=3, progress=False))
    pairs = sketch_corpus(model, tokenizer, path, spec=SPEC, prompt_field="prompt", answer_field="answer",
                          batch_size=4, progress=False)
    labels = [WORDS.index(r["answer"]) for r in ROWS]
    assert_states_close(pairs, sketch_model(model, tokenizer, texts, spec=SPEC, labels=labels, progress=False))
    sampled = sketch_corpus(model, tokenizer, texts, spec=SPEC, sample=True, batch_size=5, progress=False)
    assert_states_close(sampled, sketch_model(model, tokenizer, texts, spec=SPEC, sample=True, batch_size=5,
                                              progress=False))
    from_list = sketch_corpus(model, tokenizer, [(r["prompt"], r["answer"]) for r in ROWS], spec=SPEC, progress=False)
    assert_states_close(from_list, pairs)


@pytest.mark.parametrize("source, kwargs, error, match", [
    (["the cat", ("a", "Yes")], {}, TypeError, "only texts or only"),
    ([("the cat", "very big")], {}, ValueError, "exactly one"),
    ([3], {}, TypeError, "texts .str. or .prompt, answer. pairs"),
    (42, {}, TypeError, "source: expected a path"),
    (["the cat"], {"text_field": "text"}, ValueError, "field names apply to a path"),
    (["the cat"], {"batch_size": 0}, ValueError, "batch_size"),
    (["the cat"], {"spec": SketchSpec(d=8, K=V)}, ValueError, "d = 16"),
])
def test_sketch_corpus_bad_inputs(source, kwargs, error, match, model, tokenizer):
    with pytest.raises(error, match=match):
        sketch_corpus(model, tokenizer, source, progress=False, **kwargs)


def _worker(rank: int, port: int, folder: str) -> None:
    """Rank ``rank`` of a gloo group sketches its shard of the corpus and saves the merged state
    (then leaves with os._exit: see test_distributed._worker for the gloo teardown race)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert init_distributed_from_env("gloo")  # as under torchrun
    try:
        model, tokenizer = load(folder)
        for name, fields in (("text", dict(text_field="text")),
                             ("pair", dict(prompt_field="prompt", answer_field="answer"))):
            state = sketch_corpus(model, tokenizer, os.path.join(folder, "c.jsonl"), spec=SPEC, batch_size=3,
                                  progress=False, **fields)
            state.save(os.path.join(folder, f"{name}{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
    leave()


def load(folder: str):
    """The saved float64 model with sdpa attention (float64 throughout; Llama's eager attention takes its
    softmax in float32, so a row's head input would depend on its batch's padding at 1e-7) and tokenizer."""
    path = os.path.join(folder, "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_two_processes_equal_one(tmp_path, model, tokenizer):
    write_files(tmp_path)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run_workers(_worker, (str(tmp_path),), WORLD, TIMEOUT_S)
    path = str(tmp_path / "c.jsonl")
    model, tokenizer = load(str(tmp_path))
    for name, fields in (("text", dict(text_field="text")),
                         ("pair", dict(prompt_field="prompt", answer_field="answer"))):
        # the workers' batch size: each batch is then the same forward pass, so the sums agree to float64
        # summation order by construction (the float64 model is not what makes them agree)
        single = sketch_corpus(model, tokenizer, path, spec=SPEC, batch_size=3, progress=False, **fields)
        ranks = [SketchState.load(tmp_path / f"{name}{r}.safetensors") for r in range(WORLD)]
        for merged in ranks:
            assert merged.count == single.count
            for kind in ("joint", "activation", "error"):
                torch.testing.assert_close(merged.sums[kind], single.sums[kind], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(merged.sumsqs[kind], single.sumsqs[kind], rtol=1e-10, atol=1e-12)


def test_read_corpus_path_of_wrong_type_names_path():
    """Review: read_corpus(None) raised os.fspath's TypeError without naming path."""
    for path in (None, 3):
        with pytest.raises(TypeError, match="path: expected a str or os.PathLike"):
            read_corpus(path, text_field="text")
