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
    z   = head(a) = s·(W a + b), then the final soft-cap c·tanh(z/c) where
          the model has one (``head.Head``: Cohere/Granite scales, Gemma-2/3 caps).

and B = ∂a/∂h = J_N A with A = ∂r_L/∂h, J_N = ∂N/∂r at r_L (docs/design.md §2).

How the context is held fixed: ``SplitModel.context`` runs the model's own
forward once on the prompt up to position t, recording the input of block ℓ,
the keyword arguments the model passes each upper block (mask, rotary
embeddings, positions: the model's own, sliding windows and layer types
included) and the keys/values of every attention module of blocks ℓ..L-1.
The upper map then runs position t alone through blocks ℓ..L-1 with those
keywords restricted to row t, attending to the recorded prefix keys/values
plus its own. Cost per candidate h or per tangent: one token through L-ℓ
blocks, O((L-ℓ)·(d·d_ff + d² + t·d)), plus the head; the prefix is never
recomputed.

The model is not mutated: its parameters are used detached (through
``torch.func.functional_call``), so torch.func transforms never build graphs
for them whatever their ``requires_grad``, and its config is never switched.
Attention: while a SplitModel method runs, transformers' attention lookup
returns the split's own eager attention in the calling thread only
(``attention``), whatever the model was loaded with; another thread's
``model(ids)`` meanwhile runs the model's own. Mixture-of-experts layers run
their per-expert loop the same way. float64 models compute in float64
throughout (``precision``). The model must be in eval mode (dropout would
make f_ℓ random); every method refuses a model in training mode.

Which models: ``architecture`` finds the parts from the model itself and
says why a model is refused (recurrent / state-space layers, attention
outside transformers' attention interface); ``SUPPORTED_MODEL_TYPES`` are
the types verified by the architecture matrix (tests/split/test_matrix.py).

Modules: ``model`` (SplitModel, SplitContext), ``architectures`` (where a
model keeps its parts, discovered), ``head`` (the output head and its
metric), ``attention`` (the split's attention, selected per call and thread),
``precision`` (float64 models in float64), ``positions`` (the positions
limit), ``sequence`` (multi-token continuations), ``linearization`` (one
recorded forward, many products), ``offload`` (accelerate device maps),
``batch`` (final hidden states of whole batches).
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
