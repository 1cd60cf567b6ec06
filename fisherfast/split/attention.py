"""The attention functions of the upper map: the prefix recorder and eager
attention of one query against the cached prefix keys/values plus its own
(registered with transformers' AttentionInterface)."""
from __future__ import annotations

import torch

from fisherfast.split.sequence import ATTN_SEQUENCE, attention_probabilities, sequence_attention


class _RecordKV:
    """A stand-in for a transformers Cache during the prefix pass.

    ``update(k, v, layer_idx)`` stores k, v (the keys/values of positions < t
    in that block) and returns them unchanged.
    """

    def __init__(self):
        self.kv = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


_ATTN_NAME = "fisherfast_split"


def _split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     split_prefix=None, split_softmax_fp32=True, **kwargs):
    """Attention of one query (position t) against the cached prefix and itself.

    Registered with transformers' AttentionInterface and selected only while
    SplitModel runs the upper map, so the model's own attention modules (their
    projections, rotary, q/k norms) compute q, k, v for position t and this
    function replaces the eager score/softmax/sum. It equals eager attention
    over the keys [K_prefix; k_t] but never expands the prefix per candidate:
    the prefix products are one matmul with the (unbatched) cache, so vmap over
    d tangents costs O(d·t·heads·head_dim), not d copies of the cache.

    query (n, H, 1, hd); key, value (n, Hkv, 1, hd); split_prefix: (K, V), each
    (1, Hkv, t, hd), or None at t = 0; attention_mask (1, 1, 1, t+1) additive.
    """
    n, H, q_len, hd = query.shape
    Hkv = key.shape[1]
    g = H // Hkv  # query head j uses kv head j // g, as transformers' repeat_kv
    if scaling is None:
        scaling = hd ** -0.5
    q = query.reshape(n, Hkv, g, hd)
    s_self = (q * key).sum(-1, keepdim=True) * scaling                   # (n, Hkv, g, 1)
    if split_prefix is not None:
        K, V = split_prefix
        s = torch.cat([_per_kv_head(q, K[0].transpose(1, 2)) * scaling, s_self], dim=-1)
    else:
        s = s_self
    p = attention_probabilities(s, attention_mask, softcap, split_softmax_fp32, query.dtype, value.dtype)
    out = p[..., -1:] * value                                          # (n, Hkv, g, hd)
    if split_prefix is not None:
        out = out + _per_kv_head(p[..., :-1], V[0])
    return out.reshape(n, H, q_len, hd).transpose(1, 2), None


def _per_kv_head(x, M):
    """(n, Hkv, g, a) × (Hkv, a, b) → (n, Hkv, g, b), one 2-D matmul per kv head.

    Under vmap a batched x against the unbatched cache M then folds the vmap
    dimension into the rows of each matmul; a broadcasting 4-D matmul or
    einsum would instead copy M once per vmapped tangent (measured: 40% of a
    Jacobian's time at t = 200 on SmolLM2).
    """
    n, Hkv, g, a = x.shape
    return torch.stack([(x[:, j].reshape(n * g, a) @ M[j]).reshape(n, g, -1) for j in range(Hkv)], dim=1)


def _register_attention():
    from transformers import AttentionInterface

    for name, fn in ((_ATTN_NAME, _split_attention), (ATTN_SEQUENCE, sequence_attention)):
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, fn)
