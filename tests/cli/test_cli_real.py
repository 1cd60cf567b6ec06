"""The CLI on the embedded SmolLM2-135M-Instruct (slow)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_embedded_shape_matches_the_loaded_model():
    from fisherfast.cli._model import EMBEDDED_SHAPE
    from fisherfast.models import load_default

    model, _ = load_default()
    head = model.get_output_embeddings()
    assert (EMBEDDED_SHAPE.model_type, EMBEDDED_SHAPE.layers, EMBEDDED_SHAPE.d, EMBEDDED_SHAPE.V) == \
        (model.config.model_type, model.config.num_hidden_layers, head.in_features, head.out_features)


def test_demo_writes_what_it_promises(run_cli, tmp_path):
    from fisherfast.sketch import SketchState
    from fisherfast.sketch.tasks import VERBALIZERS

    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--no-progress")
    assert result.code == 0, result.err
    assert "Paris" in result.out
    assert "== steering ==" in result.out and "| fishback | True |" in result.out and "| euclidean | True |" in result.out
    assert (out / "fishersketch_verbalizers.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metric_spectrum.png").read_bytes()[:4] == b"\x89PNG"
    states = {name: SketchState.load(out / "signatures" / f"{name}.safetensors") for name in VERBALIZERS}
    assert all(state.count == 8 for state in states.values())
    # the files align to the table the demo printed
    aligned = run_cli("align", *(out / "signatures" / f"{name}.safetensors" for name in VERBALIZERS))
    assert aligned.code == 0
    printed = result.out.split("head-Fisher alignment (FisherSketch)")[1]
    first_row = next(line for line in aligned.out.splitlines() if line.startswith("yes_no ") and "±" in line)
    assert first_row.split()[:3] == next(line for line in printed.splitlines() if line.startswith("yes_no ")).split()[:3]
    # a second run refuses to replace them without --force
    again = run_cli("demo", "--out", out)
    assert again.code == 2 and "pass --force" in again.err


def test_steer_command_on_the_embedded_model(run_cli):
    result = run_cli("steer", "--prompt", "The capital of France is", "--target", " London", "--layer", "24",
                     "--new-tokens", "2", "--no-progress")
    assert result.code == 0, result.err
    assert "from 0.012 to 0.5" in result.out
    assert "| fishback | True |" in result.out and "generation with the fishback vector" in result.out
