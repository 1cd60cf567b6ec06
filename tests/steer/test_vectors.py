"""fisherfast.steer.SteeringVectors: safetensors round trip with its metadata
checks, and llama.cpp control-vector GGUF export read back with gguf's own
reader (tensor names, values, metadata keys)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fisherfast.steer import SteeringVectors, steering

D = 32


def sample(dtype=torch.float64, layers=(2, 3, 5)):
    g = torch.Generator().manual_seed(4)
    return SteeringVectors({layer: torch.randn(D, generator=g, dtype=dtype) for layer in layers}, D,
                           model="tiny-llama", method="fishback", settings={"rho": 0.5, "target": [5, 17]})


def test_safetensors_round_trip(tmp_path):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        sv = sample(dtype)
        sv.save(tmp_path / "v.safetensors")
        back = SteeringVectors.load(tmp_path / "v.safetensors", hidden_size=D, model="tiny-llama")
        assert list(back.vectors) == [2, 3, 5]
        for layer, v in sv.vectors.items():
            assert back.vectors[layer].dtype == dtype and torch.equal(back.vectors[layer], v)
        assert (back.hidden_size, back.model, back.method) == (D, "tiny-llama", "fishback")
        assert dict(back.settings) == {"rho": 0.5, "target": [5, 17]}
    from safetensors import safe_open

    with safe_open(tmp_path / "v.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "fisherfast.steering_vectors" and meta["version"] == "1" and "layer" in meta["spec"]


def test_load_checks_hidden_size_model_and_format(tmp_path):
    path = tmp_path / "v.safetensors"
    sample().save(path)
    with pytest.raises(ValueError, match="hidden size 32; expected hidden size 576"):
        SteeringVectors.load(path, hidden_size=576)
    with pytest.raises(ValueError, match="for model 'tiny-llama'; expected model 'SmolLM2'"):
        SteeringVectors.load(path, model="SmolLM2")
    with pytest.raises(FileNotFoundError, match="no steering vectors file"):
        SteeringVectors.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"layer.1": torch.zeros(3)}, tmp_path / "other.safetensors", metadata={"format": "x", "version": "1"})
    with pytest.raises(ValueError, match="is not a fisherfast.steering_vectors file"):
        SteeringVectors.load(tmp_path / "other.safetensors")
    save_file({"layer.1": torch.zeros(3)}, tmp_path / "bad.safetensors", metadata={
        "format": "fisherfast.steering_vectors", "version": "1", "hidden_size": "4", "model": "", "method": "",
        "settings": "{}"})
    with pytest.raises(ValueError, match="corrupted steering vectors"):
        SteeringVectors.load(tmp_path / "bad.safetensors")


def test_gguf_export_round_trip(tmp_path):
    gguf = pytest.importorskip("gguf")
    sv = sample(torch.float64, layers=(2, 3, 5))
    path = tmp_path / "v.gguf"
    sv.export_gguf(path)
    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.get_field(name)
        assert f is not None, name
        return f.contents()

    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == "tiny-llama"
    assert field("controlvector.layer_count") == 3
    assert field("fisherfast.method") == "fishback"
    assert json.loads(field("fisherfast.settings")) == {"rho": 0.5, "target": [5, 17]}
    tensors = {t.name: t for t in reader.tensors}
    # direction.N is added by llama.cpp to the output of block N (0-based) = fisherfast layer N + 1
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.4"]
    for layer, v in sv.vectors.items():
        t = tensors[f"direction.{layer - 1}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
        np.testing.assert_array_equal(np.asarray(t.data), v.to(torch.float32).numpy())
    sv.export_gguf(tmp_path / "hint.gguf", model_hint="llama")
    assert gguf.GGUFReader(tmp_path / "hint.gguf").get_field("controlvector.model_hint").contents() == "llama"


def test_export_rejects_layers_without_a_llama_cpp_counterpart(tmp_path):
    for layer in (0, 1):
        with pytest.raises(ValueError, match=rf"layers \[{layer}\] cannot be exported"):
            sample(layers=(layer, 4)).export_gguf(tmp_path / "v.gguf")
        assert not (tmp_path / "v.gguf").exists()


def test_for_model_and_steering_accept_them(tiny_lm):
    model = tiny_lm("llama", d=D, layers=3, seed=1)
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(D, generator=g, dtype=torch.float64)
    sv = SteeringVectors.for_model(model, {2: delta}, method="euclidean", settings={"layer": 2})
    assert sv.hidden_size == D and sv.model == "llama" and sv.method == "euclidean"
    ids = torch.tensor([[3, 14, 15, 9]])
    with steering(model, sv):
        a = model(input_ids=ids).logits
    with steering(model, {2: delta}):
        b = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"vectors: expected layers in \[0, 3\]"):
        SteeringVectors.for_model(model, {4: delta})


def test_bad_inputs():
    v = torch.zeros(D)
    with pytest.raises(ValueError, match="non-empty"):
        SteeringVectors({}, D)
    with pytest.raises(ValueError, match="vectors: layer: expected an int ≥ 0"):
        SteeringVectors({-1: v}, D)
    with pytest.raises(ValueError, match="vectors: layer: expected an int ≥ 0"):
        SteeringVectors({"3": v}, D)
    with pytest.raises(ValueError, match=r"shape \(33,\) \(hidden_size\)"):
        SteeringVectors({2: v}, D + 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SteeringVectors({2: torch.full((D,), float("nan"))}, D)
    with pytest.raises(ValueError, match="hidden_size"):
        SteeringVectors({2: v}, 0)
    with pytest.raises(ValueError, match="JSON"):
        SteeringVectors({2: v}, D, settings={"x": object()})
    with pytest.raises(TypeError, match="model: expected a str"):
        SteeringVectors({2: v}, D, model=None)
    sv = SteeringVectors({2: v}, D)
    with pytest.raises(TypeError):
        sv.vectors[3] = v  # read-only


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode_and_replace_atomically(tmp_path, mask):
    """save / export_gguf give the mode a plain open() gives (0666 & ~umask;
    safetensors alone wrote 0600 whatever the umask) and leave no temporary file."""
    import os

    old = os.umask(mask)
    try:
        sample().save(tmp_path / "v.safetensors")
        sample().export_gguf(tmp_path / "v.gguf")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~mask
    for name in ("v.safetensors", "v.gguf"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == want, name
    assert sorted(os.listdir(tmp_path)) == ["plain", "v.gguf", "v.safetensors"]


def test_a_failing_save_keeps_the_existing_file(tmp_path, monkeypatch):
    """A write that fails halfway (disk full) leaves the earlier file as it was."""
    import safetensors.torch

    path = tmp_path / "v.safetensors"
    sample().save(path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError):
        sample(layers=(4,)).save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_a_missing_folder_is_named_with_the_given_path(tmp_path):
    for write in (sample().save, sample().export_gguf):
        with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path}/nodir/v.out: folder {tmp_path}/nodir "
                                                    f"does not exist"):
            write(tmp_path / "nodir" / "v.out")
    assert list(tmp_path.iterdir()) == []


def test_saved_steering_files_get_the_umask_mode(tmp_path):
    """Files other tools and users read (vectors, INNSteer) get 0666 less the umask,
    not safetensors' private 0600."""
    import os
    import stat

    from fisherfast.steer import INNSteer, SteeringVectors

    old = os.umask(0o022)
    try:
        SteeringVectors({3: torch.ones(4)}, hidden_size=4).save(tmp_path / "v.safetensors")
        INNSteer(4, n_layers=2, hidden=8).save(tmp_path / "inn.safetensors")
    finally:
        os.umask(old)
    for name in ("v.safetensors", "inn.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["inn.safetensors", "v.safetensors"]


# ------------------------------------------------------------------ model identity

def test_model_identity_is_stable_and_tells_models_apart(tiny_lm, tmp_path):
    """Same weights → same identity, whatever the dtype of the load (float32 and
    bfloat16 hash the same bfloat16-rounded values) or the config's local path;
    other weights, sizes or type → refused on load, the difference named."""
    from fisherfast.steer.vectors import model_identity

    model = tiny_lm("llama", d=D, layers=3, seed=1, dtype=torch.float32)
    model.config._name_or_path = "/home/alice/models/tiny"
    ident = model_identity(model, "tiny")
    assert set(ident) == {"model_type", "layers", "hidden_size", "vocab_size", "weights", "name"}
    assert (ident["model_type"], ident["layers"], ident["hidden_size"], ident["name"]) == ("llama", 3, D, "tiny")
    assert len(ident["weights"]) == 16 and "alice" not in json.dumps(ident)
    again = tiny_lm("llama", d=D, layers=3, seed=1, dtype=torch.bfloat16)
    again.config._name_or_path = "/tmp/elsewhere"
    assert model_identity(again, "tiny") == ident
    delta = torch.ones(D)
    sv = SteeringVectors.for_model(model, {2: delta}, method="caa", name="tiny")
    assert sv.model == "tiny" and dict(sv.identity) == ident
    sv.save(tmp_path / "v.safetensors")
    back = SteeringVectors.load(tmp_path / "v.safetensors", model=again)  # the same weights loaded elsewhere
    assert dict(back.identity) == ident
    finetuned = tiny_lm("llama", d=D, layers=3, seed=1, dtype=torch.float32)
    with torch.no_grad():
        next(finetuned.model.layers[0].parameters()).add_(0.5)
    with pytest.raises(ValueError, match=r"vectors made for llama L=3 d=32 V=61 weights [0-9a-f]{16} \('tiny'\); "
                                         r"this model is llama L=3 d=32 V=61 weights [0-9a-f]{16}: other weights"):
        SteeringVectors.load(tmp_path / "v.safetensors", model=finetuned)
    with pytest.raises(ValueError, match="a different model_type, hidden_size, weights"):
        SteeringVectors.load(tmp_path / "v.safetensors", model=tiny_lm("gpt2", d=48, layers=3))
    with pytest.raises(ValueError, match="a different layers, weights"):
        SteeringVectors.load(tmp_path / "v.safetensors", model=tiny_lm("llama", d=D, layers=4, seed=1))
    gguf = pytest.importorskip("gguf")
    sv.export_gguf(tmp_path / "v.gguf")
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert reader.get_field("controlvector.model_hint").contents() == "tiny"
    assert json.loads(reader.get_field("fisherfast.identity").contents()) == ident


def test_files_without_identity_still_load(tmp_path):
    sample().save(tmp_path / "v.safetensors")
    assert dict(SteeringVectors.load(tmp_path / "v.safetensors").identity) == {}
    with pytest.raises(ValueError, match="identity: expected empty or a model_identity"):
        SteeringVectors({2: torch.zeros(D)}, D, identity={"model_type": "llama"})


# ------------------------------------------------------------------ lm-evaluation-harness export

def lm_eval_steer(model, config):
    """What lm-eval's `steered` model does with a .pt file (lm_eval/models/hf_steered.py,
    0.4.13): for each hookpoint, a forward hook on the module of that name in
    model.base_model.named_modules() adding coefficient·vector (cast to the model's
    dtype) to the output's first element, at every position."""
    modules = dict(model.base_model.named_modules())
    handles = []
    for point, info in config.items():
        assert info["action"] == "add" and info["bias"] is None and info["head_index"] is None
        vec = info["steering_vector"].to(model.dtype) * float(info["steering_coefficient"])

        def hook(module, args, out, vec=vec):
            return (out[0] + vec, *out[1:]) if isinstance(out, tuple) else out + vec
        handles.append(modules[point].register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_lm_eval_export_format_and_logits(tiny_lm, tmp_path, arch):
    model = tiny_lm(arch, d=D, layers=3, seed=1)
    g = torch.Generator().manual_seed(2)
    sv = SteeringVectors.for_model(model, {1: torch.randn(D, generator=g, dtype=torch.float64),
                                           3: torch.randn(D, generator=g, dtype=torch.float64)})
    sv.to_lm_eval(tmp_path / "steer.pt", model, coefficient=0.75)
    config = torch.load(tmp_path / "steer.pt", weights_only=True)
    prefix = "h" if arch == "gpt2" else "layers"
    assert sorted(config) == [f"{prefix}.0", f"{prefix}.2"]  # layer ℓ = the output of block ℓ − 1
    for layer, point in ((1, f"{prefix}.0"), (3, f"{prefix}.2")):
        assert set(config[point]) == {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}
        assert torch.equal(config[point]["steering_vector"], sv.vectors[layer])
        assert config[point]["steering_coefficient"] == 0.75 and config[point]["action"] == "add"
    ids = torch.tensor([[3, 14, 15, 9, 2]])
    handles = lm_eval_steer(model, config)
    try:
        theirs = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    with steering(model, sv, positions="all", scale=0.75):
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)  # the same sum in another order
    assert float((ours - model(input_ids=ids).logits).abs().max()) > 1e-3
    if arch == "llama":
        sv.to_lm_eval(tmp_path / "plain.pt")  # without the model: the Llama pattern
        assert sorted(torch.load(tmp_path / "plain.pt", weights_only=True)) == ["layers.0", "layers.2"]


def test_lm_eval_steered_model_loads_the_file(tiny_lm, tmp_path):
    """With lm-eval installed (optional; 0.4.13 runs here installed with --no-deps):
    its own ``steered`` model, built from a saved model folder and our .pt file,
    gives the logits of ``steering(positions="all", scale=coefficient)``.
    float32: lm-eval rounds coefficient·v in float32, we round the float64
    product once — one ulp of |c·v| (~1e-7) per edited state, carried to the
    logits (|z| ≲ 10) well below 1e-5."""
    hf_steered = pytest.importorskip("lm_eval.models.hf_steered")
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, 61)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    model = tiny_lm("llama", d=D, layers=3, head_scale=10.0, seed=1, dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(2)
    sv = SteeringVectors.for_model(model, {2: torch.randn(D, generator=g), 3: torch.randn(D, generator=g)})
    sv.to_lm_eval(tmp_path / "steer.pt", model, coefficient=1.5)
    lm = hf_steered.SteeredModel(pretrained=str(tmp_path / "model"), steer_path=str(tmp_path / "steer.pt"),
                                 device="cpu", dtype="float32")
    ids = torch.tensor([[3, 14, 15, 9, 2]])
    theirs = lm._model_call(ids)
    with steering(model, sv, positions="all", scale=1.5):
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float((ours - model(input_ids=ids).logits).abs().max()) > 1e-2


def test_lm_eval_export_refusals(tiny_lm, tmp_path):
    model = tiny_lm("llama", d=D, layers=3, seed=1)
    with pytest.raises(ValueError, match="layer 0"):
        SteeringVectors.for_model(model, {0: torch.ones(D)}).to_lm_eval(tmp_path / "a.pt", model)
    sv = SteeringVectors.for_model(model, {2: torch.ones(D)})
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="coefficient"):
            sv.to_lm_eval(tmp_path / "a.pt", coefficient=bad)
    with pytest.raises(ValueError, match="other weights"):
        sv.to_lm_eval(tmp_path / "a.pt", tiny_lm("llama", d=D, layers=3, seed=2))
    with pytest.raises(ValueError, match="block"):
        sv.to_lm_eval(tmp_path / "a.pt", hookpoint="layers")
    assert list(tmp_path.iterdir()) == []
