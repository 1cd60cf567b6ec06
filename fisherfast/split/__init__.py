"""Split a Hugging Face causal LM at layer ℓ (docs/design.md §2, §4).

The upper map f_ℓ sends the hidden state h ∈ R^d at layer ℓ, position t, to the
head input a (after the final norm N) and to the logits z = W a + b, with the
context held fixed: every position < t, at every layer, is what the model
computed for the prompt. Causality makes this exact: positions < t never see
position t, so their keys and values in the upper blocks do not depend on h.

Layer convention: h at layer ℓ is the input of decoder block ℓ (ℓ = 0: the
embedding output, after any positional embedding or embedding scale; this is
``hidden_states[ℓ]`` of Hugging Face's ``output_hidden_states`` for ℓ < L).
ℓ = L is the output of the last block *before* the final norm, so the upper
map is the norm alone. The upper map is

    r_L = blocks_{L-1} ∘ … ∘ blocks_ℓ (h)        (the last residual)
    a   = N(r_L)                                  (the head input)
    z   = W a + b, then whatever the model applies to its logits
          (Gemma3's final soft-capping c·tanh(z/c)).

and B = ∂a/∂h = J_N A with A = ∂r_L/∂h, J_N = ∂N/∂r at r_L (docs/design.md §2).

How the context is held fixed: ``SplitModel.context`` runs the model once on
the prompt up to position t (the lower pass, the model's own forward, stopped
at block ℓ) and then runs blocks ℓ..L-1 over the prefix 0..t-1, recording
their keys and values. The upper map then runs position t alone through
blocks ℓ..L-1, attending to the recorded prefix keys/values plus its own. Cost
per candidate h or per tangent: one token through L-ℓ blocks,
O((L-ℓ)·(d·d_ff + d² + t·d)), plus the head; the prefix is never recomputed.

The model is not mutated: its parameters are used detached (through
``torch.func.functional_call``), so torch.func transforms never build graphs
for them whatever their ``requires_grad``. Attention: forward-mode AD needs
an eager (plain matmul/softmax) attention (docs/design.md §9), so whatever the
model was loaded with, ``config._attn_implementation`` is switched for the
duration of each call and restored afterwards (not thread-safe for one model
shared across threads): to "eager" for the prefix pass, and to
"fisherfast_split" (registered once with transformers' AttentionInterface) for
the upper map. That function is eager attention of one query against
[K_prefix; k_t], written so the cached prefix is never copied per candidate
or per tangent. The model must be in eval mode (dropout would make f_ℓ
random).

Modules: ``model`` (SplitModel, SplitContext), ``architectures`` (where each
supported model keeps its parts), ``attention`` (the prefix recorder and the
upper map's attention), ``sequence`` (multi-token continuations),
``linearization`` (one recorded forward, many products), ``offload``
(accelerate device maps), ``batch`` (final hidden states of whole batches).
"""
from fisherfast.split.architectures import (REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, Architecture, architecture,
                                            decoder_blocks)
from fisherfast.split.batch import OutputHead, final_head_inputs, output_head
from fisherfast.split.head import Head
from fisherfast.split.linearization import Linearization
from fisherfast.split.model import SplitContext, SplitModel
from fisherfast.split.sequence import Continuation

__all__ = ["SplitModel", "SplitContext", "Continuation", "Linearization", "SUPPORTED_MODEL_TYPES",
           "REFUSED_MODEL_TYPES", "Architecture", "architecture", "decoder_blocks", "Head", "OutputHead", "output_head",
           "final_head_inputs"]
