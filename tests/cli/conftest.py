"""Fixtures of the CLI tests: a tiny model folder (so commands run end to end
in a second), an in-process runner that captures the exit status, and a
guard that fails a test if a model is loaded."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fisherfast import cli

WORDS = ("the capital of france is paris london rome berlin a b c d e f g h i j k l m n o p q r s t u v w x y z "
         "one two three four five six seven eight nine ten cat dog sat on mat and but yes no").split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_lm):
    """A local Hugging Face model folder: a random tiny Llama (d = 32, 3 layers)
    with a word-level tokenizer over WORDS (V = 64), built offline."""
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    assert len(vocab) <= 64
    for i in range(len(vocab), 64):
        vocab[f"[unused{i}]"] = i
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    model = tiny_lm("llama", vocab=64, d=32, layers=3, head_scale=10.0, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> Result(code, out, err) of ``fisherfast argv`` in this process."""
    def run(*argv) -> Result:
        code = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command gets as far as loading a model."""
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    for module in cli._subcommand_modules():
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", load_model)

