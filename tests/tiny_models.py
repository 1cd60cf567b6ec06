"""Random-init tiny causal LMs: the one factory shared by the tests and the
benches (also importable from spawned worker processes, which have no
fixtures).

Every model is built from transformers' own config of its type
(``AutoConfig.for_model(model_type, ...)``) with tiny sizes and random
weights, so a new type needs at most a line in ``_EXTRA`` (sizes its config
names differently, or a mixture-of-experts / latent-attention shape)."""
from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text")

# The decoder-only types of the architecture matrix (tests/split): every family
# the issue tracker named, including the hybrid / state-space ones.
MATRIX_TYPES = (
    "llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text", "mistral", "ministral", "qwen3", "qwen2_moe",
    "qwen3_moe", "mixtral", "olmo", "olmo2", "olmo3", "olmoe", "gemma", "gemma2", "phi", "phi3", "granite",
    "granitemoe", "cohere", "cohere2", "stablelm", "starcoder2", "gptj", "falcon", "deepseek_v3", "gpt_oss",
    "smollm3", "glm4", "exaone4", "seed_oss", "hunyuan_v1_dense", "arcee", "apertus", "helium", "bitnet",
    "jamba", "falcon_h1", "lfm2", "mamba",
)

# Per-type config keywords beyond the common sizes (``d``: hidden size, ``heads``).
def _extra(model_type: str, d: int, heads: int, layers: int, window: int) -> dict:
    hd = d // heads
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=d, shared_expert_intermediate_size=d)
    table = {
        "qwen2_moe": dict(moe, decoder_sparse_step=1, mlp_only_layers=[]),
        "qwen3_moe": dict(moe, decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2),
        "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0, embedding_multiplier=2.0,
                           residual_multiplier=0.5, attention_multiplier=hd ** -0.5),
        "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                        attention_multiplier=hd ** -0.5),
        "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=window,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]),
        "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                            moe_intermediate_size=d, first_k_dense_replace=1, q_lora_rank=d // 2,
                            kv_lora_rank=d // 2, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6,
                            head_dim=4, rope_interleave=True, num_key_value_heads=heads),
        "gemma2": dict(sliding_window=window, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                       head_dim=hd, query_pre_attn_scalar=hd),
        "gemma3_text": dict(sliding_window=window, head_dim=hd, query_pre_attn_scalar=hd,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(layers)]),
        "gemma": dict(head_dim=hd),
        "cohere": dict(logit_scale=0.5, use_qk_norm=False),
        "cohere2": dict(logit_scale=0.5, sliding_window=window, head_dim=hd,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]),
        "mistral": dict(sliding_window=window, head_dim=hd),
        "ministral": dict(sliding_window=window, head_dim=hd),
        "starcoder2": dict(sliding_window=window),
        "phi": dict(partial_rotary_factor=0.5),
        "stablelm": dict(partial_rotary_factor=0.5),
        "glm4": dict(partial_rotary_factor=0.5, head_dim=hd),
        "smollm3": dict(no_rope_layer_interval=2),
        "gptj": dict(rotary_dim=hd // 2, n_positions=64),
        "falcon": dict(new_decoder_architecture=False, parallel_attn=True, alibi=False),
        "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                      num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2,
                      use_mamba_kernels=False),
        "falcon_h1": dict(mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_n_heads=4, mamba_d_head=2 * d // 4,
                          mamba_n_groups=1, head_dim=hd, mamba_chunk_size=4, mamba_d_ssm=None),
        "lfm2": dict(layer_types=["conv" if i % 2 == 0 else "full_attention" for i in range(layers)],
                     block_ff_dim=2 * d, conv_L_cache=2),
        "mamba": dict(state_size=4, conv_kernel=2, expand=2, use_mambapy=True),
        "exaone4": dict(sliding_window=window, head_dim=hd),
        "hunyuan_v1_dense": dict(head_dim=hd),
        "helium": dict(head_dim=hd),
    }
    return table.get(model_type, {})


def tiny_config(model_type: str, *, vocab: int = 61, d: int = 32, layers: int = 2, heads: int = 4,
                sliding_window: int = 3, **overrides):
    """transformers' own config of ``model_type`` at tiny sizes (eager attention)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads // 2, intermediate_size=2 * d, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type in ("gpt2", "gptj"):
        common.update(n_positions=64, n_inner=2 * d)
        common.pop("num_key_value_heads")
    if model_type == "mamba":
        common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    config = tf.AutoConfig.for_model(model_type, **{**common, **_extra(model_type, d, heads, layers, sliding_window),
                                                    **overrides})
    config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):  # the loop over experts; grouped_mm has no float64
        config._experts_implementation = "eager"
    return config


def tiny_causal_lm(arch: str = "llama", *, vocab: int = 61, d: int = 32, layers: int = 3, heads: int = 4,
                   head_scale: float = 1.0, norm_noise: float = 0.0, dtype: torch.dtype = torch.float64,
                   attn: str = "eager", sliding_window: int | None = None, logit_softcap: float | None = None,
                   seed: int = 0, **config_overrides):
    """A random-init Hugging Face causal LM of model type ``arch`` (any type
    ``tiny_config`` can size, e.g. ``MATRIX_TYPES``), in eval mode with
    gradients off.

    head_scale multiplies the unembedding (random init alone gives an almost
    uniform p; 10–25 gives a peaked one). norm_noise perturbs the norm weights
    so the norm Jacobian is not a plain projection. sliding_window makes
    sliding layers really slide on prompts longer than it (qwen2: only then
    are sliding layers on); logit_softcap is the final soft-capping constant
    (Gemma-2/3).
    """
    import transformers as tf

    torch.manual_seed(seed)
    overrides = dict(config_overrides)
    if arch == "qwen2" and sliding_window:
        overrides.update(use_sliding_window=True, max_window_layers=1)
    if arch in ("gemma3_text", "gemma2") and logit_softcap is not None:
        overrides["final_logit_softcapping"] = logit_softcap
    if arch == "gemma3_text":
        overrides.setdefault("final_logit_softcapping", logit_softcap)
    if arch == "gpt_neox":
        overrides.setdefault("rotary_pct", 0.5)
    config = tiny_config(arch, vocab=vocab, d=d, layers=layers, heads=heads,
                         sliding_window=sliding_window or 3, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn, experts_implementation="eager")
    model = model.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
        for name, p in model.named_parameters():
            if norm_noise and ("norm" in name or "ln_" in name):
                p.add_(norm_noise * torch.randn_like(p))
            if name.endswith("sinks"):  # gpt_oss initializes its attention sinks to 0
                p.copy_(torch.randn_like(p))
    return model


def _from_transformers() -> bool:
    """Whether the nearest caller outside torch and this module is transformers' modeling code
    (``transformers.models.*``, ``transformers.integrations.*``; not ``PreTrainedModel.float()``)."""
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torch") or name == __name__):
            return name.startswith(("transformers.models.", "transformers.integrations."))
        frame = frame.f_back
    return False


class float64_everywhere:
    """Within the block, float64 tensors are never cast down to float32 by transformers'
    modeling code (``softmax(..., dtype=torch.float32)``, ``.to(torch.float32)``,
    ``.type(torch.float32)``, ``.float()``); every other cast runs as written.

    transformers takes the attention softmax, RMS-norm variances and MoE router
    logits in float32 (written for half precision), which truncates a float64
    model to float32 in its own code (~1e-7). Within the block a float64 model
    computes in float64 throughout, so its forward and autograd are float64
    oracles for SplitModel, which computes float64 models in float64 (its own
    mechanism: fisherfast.split.precision). tests/conftest.py applies it to
    every test."""

    def __enter__(self):
        import torch.nn.functional as F

        self._saved = to, to_float, to_type, softmax = torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax

        def keep_to(tensor, *args, **kwargs):
            if tensor.dtype == torch.float64 and (torch.float32 in args or kwargs.get("dtype") is torch.float32) \
                    and _from_transformers():
                args = tuple(torch.float64 if arg is torch.float32 else arg for arg in args)
                if kwargs.get("dtype") is torch.float32:
                    kwargs["dtype"] = torch.float64
            return to(tensor, *args, **kwargs)

        def keep_float(tensor, *args, **kwargs):
            if tensor.dtype == torch.float64 and _from_transformers():
                return tensor
            return to_float(tensor, *args, **kwargs)

        def keep_type(tensor, dtype=None, *args, **kwargs):
            if dtype is None:
                return to_type(tensor)
            if dtype is torch.float32 and tensor.dtype == torch.float64 and _from_transformers():
                return tensor
            return to_type(tensor, dtype, *args, **kwargs)

        def keep_softmax(input, dim=None, _stacklevel=3, dtype=None):
            if dtype is torch.float32 and input.dtype == torch.float64 and _from_transformers():
                dtype = torch.float64
            return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

        torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax = keep_to, keep_float, keep_type, keep_softmax
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        torch.Tensor.to, torch.Tensor.float, torch.Tensor.type, F.softmax = self._saved
        return False
