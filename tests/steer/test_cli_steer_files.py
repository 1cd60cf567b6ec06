"""`fisherfast steer --save / --lm-eval` on the CLI tests' tiny model folder:
the files hold the printed FishBack vector (read back by SteeringVectors.load
with the model's identity checked, and as lm-eval's steered format); bad paths
are refused before the model loads."""
from __future__ import annotations

import torch

from cli.conftest import no_model, run_cli, tiny_model_dir  # noqa: F401  (fixtures)
from fisherfast.steer import SteeringVectors


def test_save_and_lm_eval_files(tmp_path, run_cli, tiny_model_dir):  # noqa: F811
    import transformers

    save, lm_eval = tmp_path / "v.safetensors", tmp_path / "v.pt"
    result = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the cat", "--target", "dog", "--layer", "2",
                     "--method", "fishback", "--new-tokens", "0", "--no-progress", "--save", save, "--lm-eval",
                     lm_eval)
    assert result.code == 0, result.err
    assert f"wrote {save}" in result.out and f"wrote {lm_eval}" in result.out
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    vectors = SteeringVectors.load(save, model=model)  # the identity of the same weights, loaded again
    assert list(vectors.vectors) == [2] and vectors.method == "fishback"
    assert vectors.settings["target"] == "dog" and vectors.settings["layer"] == 2
    config = torch.load(lm_eval, weights_only=True)
    assert list(config) == ["layers.1"]  # block ℓ − 1's output
    assert torch.equal(config["layers.1"]["steering_vector"], vectors.vectors[2])
    again = run_cli("steer", "--model", tiny_model_dir, "--prompt", "the cat", "--target", "dog", "--layer", "2",
                    "--save", save)
    assert again.code == 2 and "--save" in again.err and "--force" in again.err


def test_bad_output_paths_are_refused_before_loading(tmp_path, run_cli, no_model):  # noqa: F811
    base = ("steer", "--prompt", "a", "--target", "b", "--layer", "2")
    for option, path, message in (("--save", tmp_path / "v.gguf", "must end in .safetensors"),
                                  ("--lm-eval", tmp_path / "v.safetensors", "must end in .pt or .pth"),
                                  ("--lm-eval", tmp_path / "nodir" / "v.pt", "does not exist")):
        result = run_cli(*base, option, path)
        assert result.code == 2 and option in result.err and message in result.err, result.err
    result = run_cli("steer", "--prompt", "a", "--target", "b", "--layer", "0", "--lm-eval", tmp_path / "v.pt")
    assert result.code == 2 and "layer 0" in result.err
