"""The multi-token upper map of ``SplitModel.sequence_logits`` (docs/design.md §5,
multi-token concepts): h at (ℓ, t) edited, blocks ℓ..L-1 run over positions
t..t+n-1 together, the continuation's lower-layer states held fixed.

Kept apart from ``fisherfast.split`` (which builds the ``Continuation`` in
``SplitModel.context``) so the single-token path — the one the Jacobian and
metric use — stays as it is.
"""
from __future__ import annotations

import dataclasses

import torch

ATTN_SEQUENCE = "fisherfast_split_sequence"


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Tokens y₁…y_n after position t, for logits at positions t..t+n-1.

    Attributes:
        ids: (n,) y₁…y_n (y_n is predicted, never fed in).
        x: (n-1, d) the lower-layer states at layer ℓ of y₁…y_{n-1} (positions
            t+1..t+n-1), fixed: the edit at (ℓ, t) cannot reach below layer ℓ.
        block_kwargs: per upper block, the keyword arguments for the n queries
            at positions t..t+n-1 against keys 0..t+n-1.
    """

    ids: torch.Tensor
    x: torch.Tensor
    block_kwargs: list


def sequence_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                       split_prefix=None, split_softmax_fp32=True, **kwargs):
    """Eager attention of n queries (positions t..t+n-1) against the cached prefix
    and themselves; registered with transformers' AttentionInterface under
    ``ATTN_SEQUENCE`` and selected only inside ``SplitModel.sequence_logits``.

    query (N, H, n, hd); key, value (N, Hkv, n, hd); split_prefix: (K, V), each
    (1, Hkv, t, hd), or None at t = 0; attention_mask (1, 1, n, t+n) additive
    (causal among the n). Query head j uses kv head j // (H/Hkv), as
    transformers' repeat_kv.
    """
    N, H, n, hd = query.shape
    g = H // key.shape[1]
    if scaling is None:
        scaling = hd ** -0.5
    if split_prefix is not None:
        K, V = split_prefix
        key = torch.cat([K.expand(N, -1, -1, -1), key], dim=2)
        value = torch.cat([V.expand(N, -1, -1, -1), value], dim=2)
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    p = attention_probabilities((query @ key.transpose(-1, -2)) * scaling, attention_mask, softcap,
                                split_softmax_fp32, query.dtype, value.dtype)
    return (p @ value).transpose(1, 2), None


def attention_probabilities(s, attention_mask, softcap, softmax_fp32: bool, query_dtype, value_dtype):
    """Softmax of scaled scores s as the model's eager attention takes it: soft-capped
    (Gemma), plus the additive mask, in float32 where the model does (cast back to
    the query's dtype), else in the scores' dtype (cast to the values')."""
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if attention_mask is not None:
        s = s + attention_mask
    if softmax_fp32:
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(query_dtype)
    return torch.softmax(s, dim=-1).to(value_dtype)


def run_sequence(split, ctx, h: torch.Tensor) -> torch.Tensor:
    """Logits (..., n, V) for checked h (..., d); the caller selects ``ATTN_SEQUENCE``."""
    cont = ctx.continuation
    lead, n, d = h.shape[:-1], cont.ids.shape[0], split.d
    y = h.reshape(-1, 1, d)
    y = torch.cat([y, cont.x[None].expand(y.shape[0], n - 1, d)], dim=1)
    for j, i in enumerate(split._upper):
        kw = dict(cont.block_kwargs[j], split_prefix=ctx.kv.get(i), split_softmax_fp32=split._softmax_fp32)
        y = split._call_block(j, y, kw)
    return split.logits_from_head_input(split._apply_norm(y)).reshape(*lead, n, -1)
