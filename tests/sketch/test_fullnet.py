"""Full-network FisherSketch features against materialized per-sample gradients.

Oracle: per-sample gradients of every parameter from torch.func
(vmap(grad(functional_call))), contracted with the dense random vectors of the
plans, rᵀ_δ G r_a per layer (bias as an extra input column), summed over layers."""
import functools
import math

import pytest
import torch
import transformers
from torch.func import functional_call, grad, vmap

from fisherfast.ops import srht
from fisherfast.sketch import SketchSpec, SketchState, sketch_features
from fisherfast.sketch.fullnet import FullNetworkSketcher, FullNetworkState, linear_layers

V, T, B = 23, 6, 3


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str):
    torch.manual_seed(1)
    if arch == "llama":  # nn.Linear layers, with biases in attention and MLP
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                          attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    else:  # GPT-2: Conv1D layers with biases, nn.Linear head
        config = transformers.GPT2Config(vocab_size=V, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence next-token cross-entropy, summed over positions: (B,)."""
    logp = logits[:, :-1].log_softmax(-1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0].sum(-1)


def dense(plan, n: int) -> torch.Tensor:
    """(n, m) matrix whose column j is the plan's ±1 vector r_j."""
    return srht(torch.eye(n, dtype=torch.float64), plan)


def oracle_features(model, sketcher, ids):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x):
        return sequence_losses(functional_call(model, params, (x[None],)).logits, x[None])[0]

    G = vmap(grad(loss), in_dims=(None, 0))(params, ids)  # per-sample gradients, materialized
    rg = sg = 0
    for name, module in sketcher.modules.items():
        W = G[f"{name}.weight"].double()
        if isinstance(module, torch.nn.Linear):  # weight (d_out, d_in)
            W = W.transpose(1, 2)
        if module.bias is not None:  # bias = one more input column of ones
            W = torch.cat([W, G[f"{name}.bias"].double()[:, None, :]], dim=1)
        ra, sa, rd, sd = sketcher.specs[name].plans()
        d_in, d_out = W.shape[1:]
        rg = rg + torch.einsum("bio,ij,oj->bj", W, dense(ra, d_in), dense(rd, d_out))
        sg = sg + torch.einsum("bio,ij,oj->bj", W, dense(sa, d_in), dense(sd, d_out))
    return rg, sg


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_features_equal_materialized_per_sample_gradients(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    sketcher = FullNetworkSketcher(model, m=32, seed=4)
    kinds = {type(module).__name__ for _, module in sketcher.modules.items()}
    assert kinds == ({"Linear"} if arch == "llama" else {"Conv1D", "Linear"})
    with sketcher.capture():
        rg, sg = sketcher.features(sequence_losses(model(input_ids=ids).logits, ids))
    want_rg, want_sg = oracle_features(model, sketcher, ids)
    torch.testing.assert_close(rg, want_rg, rtol=1e-4, atol=1e-4 * float(want_rg.abs().max()))
    torch.testing.assert_close(sg, want_sg, rtol=1e-4, atol=1e-4 * float(want_sg.abs().max()))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_update_accumulates_psi_and_merges():
    model = tiny_model("gpt2")
    ids = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(1))
    whole = FullNetworkSketcher(model, m=16)
    halves = FullNetworkSketcher(model, m=16)
    with whole.capture():
        rg, sg = whole.features(sequence_losses(model(input_ids=ids).logits, ids))
        model(input_ids=ids)  # a forward pass whose losses never reach update: dropped by the next update
        whole.update(sequence_losses(model(input_ids=ids).logits, ids))
    with halves.capture():
        for part in (ids[:B], ids[B:]):
            halves.update(sequence_losses(model(input_ids=part).logits, part))
    psi = rg * sg / math.sqrt(16)
    assert whole.state.count == halves.state.count == 2 * B
    torch.testing.assert_close(whole.state.sum, psi.sum(0), rtol=1e-5, atol=1e-6 * float(psi.abs().max()))
    torch.testing.assert_close(halves.state.sum, whole.state.sum, rtol=1e-4, atol=1e-5 * float(psi.abs().max()))
    torch.testing.assert_close(whole.state.signature(), (psi.sum(0) / (2 * B)).float(), rtol=1e-4, atol=1e-6)
    var = psi.var(0)
    torch.testing.assert_close(whole.state.stderr(), (var / (2 * B)).sqrt(), rtol=1e-3, atol=1e-8)


def test_head_only_equals_head_sketch():
    """Only lm_head, loss = CE at the last position: δ = p − e_y = e, a = head input,
    so the feature is the head sketch's joint feature under the same spec."""
    model = tiny_model("llama")
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    sketcher = FullNetworkSketcher(model, m=32, layers=["lm_head"])
    captured = {}
    with sketcher.capture():
        handle = model.lm_head.register_forward_pre_hook(lambda mod, args: captured.__setitem__("a", args[0]))
        logits = model(input_ids=ids[:, :-1]).logits[:, -1]
        handle.remove()
        sketcher.update(torch.nn.functional.cross_entropy(logits, ids[:, -1], reduction="none"))
    a, p = captured["a"][:, -1].detach(), logits.detach().softmax(-1)
    psi = sketch_features(a, (p, ids[:, -1]), sketcher.specs["lm_head"])["joint"]
    torch.testing.assert_close(sketcher.state.sum, psi.sum(0), rtol=1e-4, atol=1e-5 * float(psi.abs().max()))


def test_bad_inputs():
    model = tiny_model("gpt2")
    ids = torch.randint(0, V, (B, T))
    with pytest.raises(TypeError, match="nn.Module"):
        FullNetworkSketcher("model")
    with pytest.raises(ValueError, match="layers must name"):
        FullNetworkSketcher(model, layers=["transformer.wte"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        FullNetworkSketcher(torch.nn.ReLU())
    with pytest.raises(ValueError, match="m: expected an int ≥ 1, got 0"):
        FullNetworkSketcher(model, m=0)
    sketcher = FullNetworkSketcher(model, m=8)
    with pytest.raises(RuntimeError, match="capture"):
        sketcher.update(torch.zeros(B, requires_grad=True))
    with sketcher.capture():
        losses = sequence_losses(model(input_ids=ids).logits, ids)
        with pytest.raises(ValueError, match="1-D floating"):
            sketcher.update(losses[:, None])
        with pytest.raises(ValueError, match="no grad graph"):
            sketcher.update(losses.detach())
        with pytest.raises(ValueError, match="batch of 3"):
            sketcher.update(losses[:2])
    with pytest.raises(ValueError, match="different layers"):
        sketcher.state.merge(FullNetworkState(FullNetworkSketcher(model, m=8, seed=1).specs))
    assert [n for n, _ in linear_layers(model)][-1] == "lm_head"
    assert all(isinstance(s, SketchSpec) for s in sketcher.specs.values())


def sketched_state(seed: int = 0) -> tuple[FullNetworkSketcher, FullNetworkState]:
    model = tiny_model("gpt2")
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    sketcher = FullNetworkSketcher(model, m=16, seed=seed)
    with sketcher.capture():
        sketcher.update(sequence_losses(model(input_ids=ids).logits, ids))
    return sketcher, sketcher.state


def test_save_load_round_trip_and_spec_checks(tmp_path):
    sketcher, state = sketched_state()
    path = tmp_path / "full.safetensors"
    state.save(path)
    loaded = FullNetworkState.load(path, specs=sketcher.specs)
    assert loaded.specs == state.specs and loaded.count == state.count
    assert torch.equal(loaded.sum, state.sum) and torch.equal(loaded.sumsq, state.sumsq)
    assert loaded.merge(state).count == 2 * state.count  # same specs: mergeable
    other, _ = sketched_state(seed=1)
    with pytest.raises(ValueError, match="other layer specs"):
        FullNetworkState.load(path, specs=other.specs)
    with pytest.raises(FileNotFoundError):
        FullNetworkState.load(tmp_path / "absent.safetensors")


def test_load_rejects_other_formats_and_corruption(tmp_path):
    from safetensors.torch import save_file

    _, state = sketched_state()
    head = tmp_path / "head.safetensors"
    SketchState(SketchSpec(d=4, K=8, m=16)).save(head)
    with pytest.raises(ValueError, match="fullnet_state"):
        FullNetworkState.load(head)
    meta = {"format": "fisherfast.sketch.fullnet_state", "version": "1", "specs": state.specs_json(),
            "count": str(state.count)}
    cases = {
        "version": ({"sum": state.sum, "sumsq": state.sumsq}, {**meta, "version": "99"}, "version"),
        "header": ({"sum": state.sum, "sumsq": state.sumsq}, {**meta, "specs": "{not json"}, "corrupted"),
        "names": ({"sum": state.sum}, meta, "corrupted"),
        "shape": ({"sum": state.sum[:8].clone(), "sumsq": state.sumsq}, meta, "shape"),
        "negative": ({"sum": state.sum, "sumsq": -state.sumsq - 1}, meta, "negative"),
        "nan": ({"sum": torch.full_like(state.sum, float("nan")), "sumsq": state.sumsq}, meta, "finite"),
    }
    for name, (tensors, metadata, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=match):
            FullNetworkState.load(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="readable"):
        FullNetworkState.load(garbage)


def test_state_checks_its_buffers():
    _, state = sketched_state()
    with pytest.raises(TypeError, match="specs"):
        FullNetworkState({})
    with pytest.raises(ValueError, match=r"sum: expected a float64 tensor of shape \(m = 16,\)"):
        FullNetworkState(state.specs, 1, torch.zeros(3, dtype=torch.float64))
    mixed = {**state.specs, "extra": SketchSpec(d=4, K=4, m=8)}
    with pytest.raises(ValueError, match="one m"):
        FullNetworkState(mixed)
    back = FullNetworkState.from_tensor(state.specs, state.count, state.as_tensor())
    assert torch.equal(back.sum, state.sum) and torch.equal(back.sumsq, state.sumsq)
