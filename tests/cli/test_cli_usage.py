"""Every user mistake ends in one line on stderr and exit status 2, before any
model loads (the ``no_model`` fixture fails the test if one does), and never
touches an existing file."""
from __future__ import annotations

import pytest
import torch

from fisherfast import available_backends


def error_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert result.code == 2, result
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert lines[0].startswith("fisherfast") and ": error: " in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder with the files the cases below refer to."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("precious\n")
    (tmp_path / "keep.txt").write_text("keep\n")
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n")
    (tmp_path / "latin1.txt").write_bytes("the caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"), metadata={"format": "pt"})
    return tmp_path


STEER = ["steer", "--prompt", "the capital of france is", "--target", " london"]
CASES = {
    # output paths
    "sketch-out-txt": (["sketch", "--texts", "texts.txt", "--out", "precious.txt"], "must end in .safetensors"),
    "sketch-out-nodir": (["sketch", "--texts", "texts.txt", "--out", "nodir/x.safetensors"], "does not exist"),
    "spectrum-out-nodir": (["spectrum", "--layer", "3", "--out", "nodir/x.png"], "does not exist"),
    "align-out-nodir": (["align", "a.safetensors", "--out", "nodir/h.png"], "does not exist"),
    "spectrum-out-txt": (["spectrum", "--layer", "3", "--out", "keep.txt"], "must end in .png, .pdf or .svg"),
    "spectrum-out-exists": (["spectrum", "--layer", "3", "--out", "plot.png"], "pass --force"),
    "sketch-out-foreign": (["sketch", "--texts", "texts.txt", "--out", "weights.safetensors", "--force"],
                           "is not a FisherSketch state file"),
    "spectrum-out-folder": (["spectrum", "--layer", "3", "--out", "sub.png"], "is a folder"),
    "demo-out-file": (["demo", "--out", "precious.txt"], "not a folder"),
    "demo-out-nodir": (["demo", "--out", "nodir/demo"], "does not exist"),
    # layers
    "steer-layer-99": ([*STEER, "--layer", "99"], "--layer 99: this model has layers 0..30"),
    "steer-layer-neg": ([*STEER, "--layer", "-1"], "--layer -1: this model has layers 0..30"),
    "spectrum-layer-31": (["spectrum", "--layer", "3", "31"], "--layer 31"),
    "spectrum-layer-twice": (["spectrum", "--layer", "3", "5", "3"], "--layer 3 is given more than once"),
    # input files
    "sketch-texts-latin1": (["sketch", "--texts", "latin1.txt", "--out", "s.safetensors"],
                            "--texts latin1.txt is not UTF-8 text (byte 0xe9 on line 1)"),
    "sketch-texts-missing": (["sketch", "--texts", "none.txt", "--out", "s.safetensors"], "cannot read --texts"),
    "sketch-texts-blank": (["sketch", "--texts", "blank.txt", "--out", "s.safetensors"], "no non-empty line"),
    "spectrum-prompts-latin1": (["spectrum", "--layer", "3", "--prompts", "latin1.txt"], "not UTF-8 text"),
    "spectrum-prompts-missing": (["spectrum", "--layer", "3", "--prompts", "none.txt"], "cannot read --prompts"),
    "spectrum-prompts-blank": (["spectrum", "--layer", "3", "--prompts", "blank.txt"], "no non-empty lines"),
    "align-missing": (["align", "a.safetensors"], "cannot load a.safetensors"),
    "align-foreign": (["align", "weights.safetensors"], "cannot load weights.safetensors"),
    # numbers
    "max-prompts-0": (["spectrum", "--layer", "3", "--max-prompts", "0"], "--max-prompts: expected an integer ≥ 1"),
    "m-0": (["sketch", "--texts", "texts.txt", "--out", "s.safetensors", "--m", "0"], "--m/--features: expected an integer ≥ 1"),
    "seed-neg": (["sketch", "--texts", "texts.txt", "--out", "s.safetensors", "--seed", "-2"], "--seed"),
    "batch-0": (["sketch", "--texts", "texts.txt", "--out", "s.safetensors", "--batch-size", "0"], "--batch-size"),
    "max-length-0": (["sketch", "--texts", "texts.txt", "--out", "s.safetensors", "--max-length", "0"],
                     "--max-length"),
    "prob-1.5": ([*STEER, "--layer", "3", "--prob", "1.5"], "--prob: expected a number in (0, 1)"),
    "prob-text": ([*STEER, "--layer", "3", "--prob", "half"], "--prob"),
    "tail-tol-0": (["spectrum", "--layer", "3", "--tail-tol", "0"], "--tail-tol"),
    "new-tokens-neg": ([*STEER, "--layer", "3", "--new-tokens", "-1"], "--new-tokens"),
    "layer-text": ([*STEER, "--layer", "x"], "--layer: invalid int value"),
    "empty-prompt": (["steer", "--prompt", " ", "--target", "x", "--layer", "3"], "--prompt: expected a non-empty"),
    "empty-target": (["steer", "--prompt", "x", "--target", "", "--layer", "3"], "--target: expected a non-empty"),
    # a byte that is not UTF-8 in an argument reaches argv as a lone surrogate (os.fsdecode), which the
    # tokenizer cannot encode: refused at parse time, not a TypeError traceback after the model loaded
    "prompt-not-utf8": (["steer", "--prompt", b"the caf\xe9 is".decode("utf-8", "surrogateescape"), "--target", "x",
                         "--layer", "3"], "--prompt: expected UTF-8 text, got the byte 0xe9 at character 7"),
    "target-not-utf8": (["steer", "--prompt", "x", "--target", b" lon\xffdon".decode("utf-8", "surrogateescape"),
                         "--layer", "3"], "--target: expected UTF-8 text, got the byte 0xff at character 4"),
    # model
    "model-missing": (["sketch", "--texts", "texts.txt", "--out", "s.safetensors", "--model", "nomodel"],
                      "--model must be 'default' or a local Hugging Face model folder"),
    "unknown-command": (["frobnicate"], "invalid choice"),
    # the signature index
    "index-no-action": (["index"], "the following arguments are required: ACTION"),
    "index-add-out-txt": (["index", "add", "precious.txt", "texts.txt"], "INDEX precious.txt: a signature index "
                          "file must end in .safetensors"),
    "index-add-foreign": (["index", "add", "weights.safetensors", "texts.txt"],
                          "INDEX weights.safetensors exists and is not a signature index file"),
    "index-add-nodir": (["index", "add", "nodir/i.safetensors", "texts.txt"], "does not exist"),
    "index-add-not-a-state": (["index", "add", "i.safetensors", "texts.txt"], "cannot load texts.txt"),
    "index-add-missing": (["index", "add", "i.safetensors", "none.safetensors"], "cannot load none.safetensors"),
    "index-add-name-twice": (["index", "add", "i.safetensors", "a.safetensors", "b.safetensors", "--name", "x"],
                             "--name names one STATE"),
    "index-query-missing": (["index", "query", "none.safetensors", "t.safetensors"], "cannot load the index "
                            "none.safetensors"),
    "index-query-foreign": (["index", "query", "weights.safetensors", "t.safetensors"],
                            "is not a fisherfast.sketch.index file"),
    "index-query-k-0": (["index", "query", "i.safetensors", "t.safetensors", "--k", "0"],
                        "--k: expected an integer ≥ 1"),
    "index-list-missing": (["index", "list", "none.safetensors"],
                           "fisherfast index list: error: cannot load the index none.safetensors"),
    "index-add-names-the-action": (["index", "add", "i.safetensors", "none.safetensors"],
                                   "fisherfast index add: error: cannot load none.safetensors"),
    "index-query-names-the-action": (["index", "query", "none.safetensors", "t.safetensors"],
                                     "fisherfast index query: error: cannot load the index none.safetensors"),
    "index-add-name-spaces": (["index", "add", "i.safetensors", "texts.txt", "--name", " x"],
                              "fisherfast index add: error: --name: expected a non-empty name without surrounding "
                              "spaces, got ' x'"),
    "index-add-file-name-spaces": (["index", "add", "i.safetensors", " x.safetensors"],
                                   "STATE  x.safetensors: its file name gives the domain name ' x'"),
}


@pytest.mark.parametrize("argv, expected", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_line_and_exit_2_before_any_model_loads(argv, expected, files, run_cli, no_model):
    (files / "sub.png").mkdir()
    line = error_line(run_cli(*argv))
    assert expected in line
    assert (files / "precious.txt").read_text() == "precious\n" and (files / "keep.txt").read_text() == "keep\n"
    assert not any(p.name.startswith(".") or "partial" in p.name for p in files.iterdir())


def test_help_shows_defaults_and_explains_the_plot(run_cli):
    result = run_cli("sketch", "--help")
    assert result.code == 0 and "(default: 4096)" in result.out and "(default: 512)" in result.out
    result = run_cli("spectrum", "--help")
    assert "shaded band = 10–90% range over prompts" in " ".join(result.out.split())
    assert "(default: exact)" in result.out


def test_every_subcommand_is_listed(run_cli):
    out = run_cli("--help").out
    for name in ("info", "demo", "spectrum", "sketch", "align", "select", "index", "steer"):
        assert f"\n    {name} " in out


def test_info_lists_every_backend_with_its_state(run_cli):
    result = run_cli("info")
    assert result.code == 0
    for status in available_backends().values():
        assert str(status) in result.out


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    for module in ("fisherfast", "fisherfast.cli"):
        result = subprocess.run([sys.executable, "-m", module, "steer", "--layer", "99", "--prompt", "x", "--target",
                                 "y"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--layer 99" in result.stderr
