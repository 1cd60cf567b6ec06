"""Random-init tiny causal LMs for the tests: one factory for every architecture
(also importable from spawned worker processes, which have no fixtures)."""
from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma3_text")


def tiny_causal_lm(arch: str = "llama", *, vocab: int = 61, d: int = 32, layers: int = 3, heads: int = 4,
                   head_scale: float = 1.0, norm_noise: float = 0.0, dtype: torch.dtype = torch.float64,
                   attn: str = "eager", sliding_window: int | None = None, logit_softcap: float | None = None,
                   seed: int = 0):
    """A random-init Hugging Face causal LM of ``arch`` (one of ``TINY_ARCHS``),
    in eval mode with gradients off.

    head_scale multiplies the unembedding (random init alone gives an almost
    uniform p; 10–25 gives a peaked one). norm_noise perturbs the norm weights
    so the norm Jacobian is not a plain projection. sliding_window (qwen2,
    gemma3_text) makes sliding layers really slide on prompts longer than it;
    logit_softcap is Gemma3's final soft-capping constant.
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * d, max_position_embeddings=64)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=heads // 2))
    elif arch == "qwen2":
        window = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1) \
            if sliding_window else {}
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=heads // 2, **window))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads,
                                                 n_positions=64, bos_token_id=0, eos_token_id=0))
    elif arch == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, rotary_pct=0.5, tie_word_embeddings=False))
    elif arch == "gemma3_text":
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, num_key_value_heads=heads // 2, head_dim=d // heads, sliding_window=sliding_window or 3,
            layer_types=kinds, final_logit_softcapping=logit_softcap))
    else:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    model.config._attn_implementation = attn
    model = model.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
        if norm_noise:
            for name, p in model.named_parameters():
                if "norm" in name or "ln_" in name:
                    p.add_(norm_noise * torch.randn_like(p))
    return model
