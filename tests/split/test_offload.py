"""Models loaded with accelerate's device_map, blocks offloaded to CPU or disk.

Oracle: the same weights held in memory as a plain model (no hooks, no
placeholders): the split model's logits, Jacobian, exact metric, concept
gradient and steered generation must agree.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from fisherfast.metric import pullback_fisher  # noqa: E402
from fisherfast.split import SplitModel  # noqa: E402
from fisherfast.steer import ConceptScore, concept_gradient, steering  # noqa: E402

LAYERS = 4
PROMPT = [3, 14, 15, 9, 2, 6, 5]

# Module names per architecture: (embeddings..., blocks prefix, final norm, head, rotary or None)
_NAMES = {
    "llama": (["model.embed_tokens", "model.rotary_emb"], "model.layers", "model.norm", "lm_head"),
    "gpt2": (["transformer.wte", "transformer.wpe"], "transformer.h", "transformer.ln_f", "lm_head"),
}


def _device_map(arch, disk_blocks, head="cpu"):
    embeddings, blocks, norm, lm_head = _NAMES[arch]
    dm = {name: "cpu" for name in embeddings}
    dm.update({norm: "cpu", lm_head: head})
    dm.update({f"{blocks}.{i}": ("disk" if i in disk_blocks else "cpu") for i in range(LAYERS)})
    return dm


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_lm, tmp_path_factory):
    """(in-memory model, the same weights loaded with blocks 2..3 (and llama's head) offloaded to disk, arch)."""
    arch = request.param
    model = tiny_lm(arch, layers=LAYERS, head_scale=10.0, norm_noise=0.3)
    if arch == "gpt2":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    path = tmp_path_factory.mktemp(f"offload-{arch}")
    model.save_pretrained(path)
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, device_map=_device_map(arch, {2, 3}, head="disk" if arch == "llama" else "cpu"),
        offload_folder=str(path / "offload"),
        attn_implementation="eager")
    offloaded.eval().requires_grad_(False)
    assert offloaded.get_decoder().layers[2].mlp.down_proj.weight.device.type == "meta" if arch == "llama" else \
        offloaded.transformer.h[2].mlp.c_proj.weight.device.type == "meta"
    return model, offloaded, arch


@pytest.mark.parametrize("layer", [1, 3])
def test_split_of_offloaded_model_matches_in_memory(pair, layer):
    model, offloaded, _ = pair
    ref, split = SplitModel(model, layer), SplitModel(offloaded, layer)
    rctx, ctx = ref.context(PROMPT), split.context(PROMPT)
    # Both run the same float64 blocks; accelerate's placement may change summation order
    # (BLAS kernels by layout): ≲ 1e-10 relative of the largest entry; float32 anywhere is ≥ 1e-7.
    torch.testing.assert_close(ctx.h, rctx.h, rtol=1e-10, atol=1e-10 * float(rctx.h.abs().max()))
    h = rctx.h + 0.1 * torch.randn(4, ref.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(split.logits(ctx, h), ref.logits(rctx, h), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(split.jacobian(ctx), ref.jacobian(rctx), rtol=1e-5, atol=1e-8)
    C = torch.randn(3, ref.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(split.vjp(ctx, ctx.h, C), ref.vjp(rctx, rctx.h, C), rtol=1e-5, atol=1e-8)
    G, G0 = pullback_fisher(split, ctx, progress=False).dense(), pullback_fisher(ref, rctx, progress=False).dense()
    assert float((G - G0).norm() / G0.norm()) < 1e-5
    concept = ConceptScore([5, 17])
    q, phi = concept_gradient(split, ctx, ctx.h, concept)
    q0, phi0 = concept_gradient(ref, rctx, rctx.h, concept)
    torch.testing.assert_close(q, q0, rtol=1e-5, atol=1e-8)
    assert phi == pytest.approx(phi0, rel=1e-9)


def test_split_logits_match_offloaded_models_own_forward(pair):
    """The split model's prediction equals the offloaded model's own forward (its hooks active)."""
    _, offloaded, _ = pair
    split = SplitModel(offloaded, 2)
    ctx = split.context(PROMPT)
    own = offloaded(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(split.logits(ctx, ctx.h), own, rtol=1e-6, atol=1e-8)


def test_steered_generation_of_offloaded_model_is_identical(pair):
    model, offloaded, _ = pair
    v = 3.0 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ids = torch.tensor([PROMPT])
    outputs = []
    for m in (model, offloaded):
        with steering(m, {2: v}):
            outputs.append(m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])
    plain = offloaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, outputs[1])  # the vector really steers


def test_meta_placeholders_dispatched_with_offload_match(tiny_lm, tmp_path):
    """init_empty_weights (meta) + load_checkpoint_and_dispatch with blocks and the head offloaded."""
    model = tiny_lm("llama", layers=LAYERS, head_scale=10.0, norm_noise=0.3)
    model.save_pretrained(tmp_path)
    with accelerate.init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float64)
    dispatched = accelerate.load_checkpoint_and_dispatch(
        empty, str(tmp_path), device_map=_device_map("llama", {1, 3}, head="disk"),
        offload_folder=str(tmp_path / "offload"), dtype=torch.float64)
    dispatched.config._attn_implementation = "eager"
    dispatched.eval().requires_grad_(False)
    assert dispatched.lm_head.weight.device.type == "meta"
    ref, split = SplitModel(model, 1), SplitModel(dispatched, 1)
    rctx, ctx = ref.context(PROMPT), split.context(PROMPT)
    torch.testing.assert_close(split.logits(ctx, ctx.h), ref.logits(rctx, rctx.h), rtol=1e-5, atol=1e-8)
    G, G0 = pullback_fisher(split, ctx, progress=False).dense(), pullback_fisher(ref, rctx, progress=False).dense()
    assert float((G - G0).norm() / G0.norm()) < 1e-5


def test_meta_parameter_without_offload_hook_is_a_clear_error(tiny_lm):
    with accelerate.init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(tiny_lm("llama", layers=2).config)
    with pytest.raises(RuntimeError, match="meta device"):
        SplitModel(empty, 1)


@pytest.mark.parametrize("mode, options", [
    ("matrix_free", {}), ("low_rank", {"k": 8, "seed": 0}), ("topk", {"tail_tol": 1e-3}),
    ("monte_carlo", {"n_samples": 64, "seed": 0}), ("concept", {"concepts": [[5], [17, 3]]})])
def test_every_metric_mode_of_offloaded_model_matches(pair, mode, options):
    model, offloaded, _ = pair
    ref, split = SplitModel(model, 1), SplitModel(offloaded, 1)
    rctx, ctx = ref.context(PROMPT), split.context(PROMPT)
    G = pullback_fisher(split, ctx, mode=mode, progress=False, **options).dense()
    G0 = pullback_fisher(ref, rctx, mode=mode, progress=False, **options).dense()
    assert float((G - G0).norm() / G0.norm()) < 1e-5


@pytest.mark.slow
def test_offloaded_exact_metric_peaks_below_in_memory_run():
    """bench/bench_offload.py's measurement (fresh processes, Linux peak RSS): with half the
    upper blocks on disk the exact metric's peak resident set stays below the in-memory run's."""
    from bench_scripts import load_bench

    bench = load_bench("bench_offload.py")
    memory, offload = bench.measure(d=512)
    assert memory["trace"] == pytest.approx(offload["trace"], rel=1e-6)
    assert offload["rss_before_mb"] < memory["rss_before_mb"]
    assert offload["peak_mb"] < memory["peak_mb"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_split_across_cpu_and_gpus_match(tiny_lm, tmp_path):
    """Blocks on different devices (CPU and every visible GPU): activations and tangents follow them."""
    model = tiny_lm("llama", layers=LAYERS, head_scale=10.0, norm_noise=0.3)
    model.save_pretrained(tmp_path)
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": gpus[-1], "lm_head": gpus[0]}
    dm.update({f"model.layers.{i}": ["cpu", *gpus][i % (1 + len(gpus))] for i in range(LAYERS)})
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, device_map=dm, attn_implementation="eager").eval().requires_grad_(False)
    ref, split = SplitModel(model, 1), SplitModel(placed, 1)
    rctx, ctx = ref.context(PROMPT), split.context(PROMPT)
    torch.testing.assert_close(split.logits(ctx, ctx.h).cpu(), ref.logits(rctx, rctx.h), rtol=1e-5, atol=1e-8)
    G, G0 = pullback_fisher(split, ctx, progress=False).dense().cpu(), pullback_fisher(ref, rctx, progress=False).dense()
    assert float((G - G0).norm() / G0.norm()) < 1e-5


def test_sketch_of_offloaded_model_matches_in_memory(pair, tmp_path):
    """sketch_model over a model whose blocks are on disk (and, for llama, the head too:
    materialized once from accelerate's weights map) gives the in-memory state."""
    from fisherfast.sketch import SketchSpec, sketch_model

    model, offloaded, arch = pair
    V, d = model.get_output_embeddings().weight.shape
    spec = SketchSpec(d=d, K=V, m=64, seed=3)
    ids = [PROMPT, [5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1, 8]]
    want = sketch_model(model, None, ids, spec=spec, batch_size=2, progress=False)
    got = sketch_model(offloaded, None, ids, spec=spec, batch_size=2, progress=False)
    assert got.count == want.count
    # The sketch's features are float32 (docs/design.md §7): the float64 head inputs of the two
    # placements differ in their last bits (summation order), which can move a feature by one
    # float32 unit (6e-8 relative); a signed sum over the few rows here then differs by a few
    # units of its largest term, so compare at 1e-6 of the largest entry (|sum| ≤ rows · max|φ|).
    want_t = want.as_tensor()
    torch.testing.assert_close(got.as_tensor(), want_t, rtol=1e-6, atol=1e-6 * float(want_t.abs().max()))
