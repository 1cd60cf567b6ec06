"""Atomic writes with the umask mode, and results that survive a failing write."""
from __future__ import annotations

import os
import stat

import pytest

from fisherfast.persist import atomic_write
from fisherfast.cli._args import UsageError
from fisherfast.cli._files import PLOT, SKETCH, check_output, write_output


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test, restoring the old one."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_gives_the_umask_mode_not_0600(tmp_path, umask, mask):
    from safetensors.torch import save_file
    import torch

    umask(mask)
    path = tmp_path / "x.safetensors"
    atomic_write(path, lambda tmp: save_file({"a": torch.zeros(2)}, tmp))  # safetensors alone leaves 0600
    assert _mode(path) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")

    def fails(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_the_temporary_keeps_the_extension(tmp_path):
    seen = []
    atomic_write(tmp_path / "plot.svg", lambda tmp: (seen.append(tmp), open(tmp, "w").write("<svg/>")))
    assert seen[0].endswith(".svg") and os.path.dirname(seen[0]) == str(tmp_path)


def test_write_output_falls_back_when_the_folder_vanished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "gone"
    gone.mkdir()
    target = check_output(str(gone / "s.png"), PLOT, force=False)
    gone.rmdir()  # after the check, before the write: a late failure
    ok = write_output(target, lambda tmp: open(tmp, "wb").write(b"\x89PNG\r\n\x1a\nresult"), "plot")
    assert not ok
    [saved] = [p for p in tmp_path.iterdir() if p.name.startswith("s.recovered-")]
    assert saved.suffix == ".png" and saved.read_bytes().endswith(b"result")
    err = capsys.readouterr().err
    assert f"saved it to {saved}" in err and "could not write the plot" in err


def test_write_output_tries_the_same_folder_first(tmp_path, monkeypatch):
    calls = []
    real = atomic_write

    def first_fails(path, write):
        calls.append(os.path.dirname(path))
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(path, write)

    monkeypatch.setattr("fisherfast.cli._files.atomic_write", first_fails)
    assert not write_output(str(tmp_path / "a.png"), lambda tmp: open(tmp, "wb").write(b"x"), "plot")
    assert calls == [str(tmp_path), str(tmp_path)]


def test_force_replaces_only_the_same_kind(tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n....")
    assert check_output(str(png), PLOT, force=True) == str(png)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(UsageError, match="not a plot file"):
        check_output(str(fake), PLOT, force=True)
    svg = tmp_path / "p.svg"
    svg.write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG under an .svg name is not an SVG
    with pytest.raises(UsageError, match="not a plot file"):
        check_output(str(svg), PLOT, force=True)
    with pytest.raises(UsageError, match="not a FisherSketch state file"):
        check_output(_foreign_safetensors(tmp_path), SKETCH, force=True)


def _foreign_safetensors(folder) -> str:
    from safetensors.torch import save_file
    import torch

    path = str(folder / "model.safetensors")
    save_file({"w": torch.zeros(1)}, path)
    return path


def test_sketch_state_save_gives_the_umask_mode(tmp_path, umask):
    import torch

    from fisherfast.sketch import SketchSpec, SketchState
    from fisherfast.sketch.sketcher import FisherSketcher

    sketcher = FisherSketcher(SketchSpec(d=4, K=8, m=16))
    sketcher.update(torch.randn(3, 4, dtype=torch.float64), logits=torch.randn(3, 8, dtype=torch.float64),
                    y=torch.tensor([0, 5, 7]))
    umask(0o027)
    sketcher.state.save(tmp_path / "s.safetensors")
    assert _mode(tmp_path / "s.safetensors") == 0o640
    assert SketchState.load(tmp_path / "s.safetensors").count == 3


def test_write_output_says_so_when_nothing_can_be_written(tmp_path, monkeypatch, capsys):
    def always_fails(path, write):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("fisherfast.cli._files.atomic_write", always_fails)
    assert not write_output(str(tmp_path / "a.png"), lambda tmp: None, "plot")
    err = capsys.readouterr().err
    assert "could not write the plot" in err and "Read-only file system" in err and "nor to the working folder" in err
