import subprocess
import sys

import pytest

from fisherfast import available_backends
from fisherfast.cli import main


def test_info_lists_every_backend_with_its_state(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, status in available_backends().items():
        assert str(status) in out


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fisherfast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["no-such-command"])


@pytest.mark.slow
def test_demo_runs_on_the_embedded_model(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "== steering ==" in out and "| fishback | True |" in out and "| euclidean | True |" in out


def test_steer_rejects_a_bad_probability_before_loading_a_model():
    with pytest.raises(SystemExit, match="--prob must be in"):
        main(["steer", "--prompt", "x", "--target", " y", "--layer", "3", "--prob", "1.5", "--model", "/nonexistent"])


@pytest.mark.slow
def test_steer_command_on_the_embedded_model(capsys):
    assert main(["steer", "--prompt", "The capital of France is", "--target", " London", "--layer", "24",
                 "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "| fishback | True |" in out and "generation with the fishback vector" in out
