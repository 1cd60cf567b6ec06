"""Attention of the split, selected per call and per thread (docs/design.md §2, §9).

Models whose blocks use transformers' attention interface look their
attention function up on every call (``ALL_ATTENTION_FUNCTIONS.get_interface
(config._attn_implementation, default)``). While a ``SplitModel`` method runs,
``selected(state)`` makes that lookup return ``attend`` *in the calling
thread only*: the model's config is never touched, so another thread's plain
``model(ids)`` runs the model's own attention meanwhile. Mixture-of-experts
layers are switched the same way to their plain per-expert loop (the
model's own ``eager`` experts forward), which forward- and reverse-mode AD
both handle. The lookups are wrapped once per process
(``install_lookup_wrappers``); with no selection active in a thread the
wrappers return exactly what transformers would.

``attend`` is eager attention written once for every family the matrix
covers: grouped-query heads, scaling, score soft-capping (Gemma-2), sinks
(gpt-oss: ``module.sinks``), v heads of another size than q/k (DeepSeek-V3),
and the model's mask (additive float, boolean, or None = causal). Its
softmax runs in float32 for half-precision and float32 models, as the
models' own eager attention, and in float64 for float64 models (issue 18.4:
float64 models get float64 accuracy end to end). Two modes:

- record (``SplitState.record`` set): the model's own forward over a
  prompt; the keys/values of every attention module named in ``record``
  are stored (its prefix, later).
- split (``SplitState.prefix`` set): the upper map; the query rows attend to
  the cached prefix keys/values of their module plus their own keys. For
  one query the prefix products are one matmul per kv head against the
  unbatched cache, so vmap over d tangents never copies the cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

from fisherfast.split.precision import keep_float64

__all__ = ["SplitState", "selected", "attend", "install_lookup_wrappers"]

_local = threading.local()
_install_lock = threading.Lock()
_installed = False


@dataclasses.dataclass
class SplitState:
    """What ``attend`` does in this thread: record keys/values (``record``: {id(module): None}
    filled with (K, V)) or attend to cached ones (``prefix``: {id(module): (K, V)}, each (1, Hkv, t, hd))."""

    record: dict | None = None
    prefix: dict | None = None
    float64: bool = False  # a float64 model: transformers' float32 downcasts skipped (``keep_float64``)
    calls: int = 0


def current() -> SplitState | None:
    return getattr(_local, "state", None)


@contextlib.contextmanager
def selected(state: SplitState):
    """Within the block, in this thread only, attention goes through ``attend`` with ``state``,
    mixture-of-experts layers through their per-expert loop, and (``state.float64``) transformers'
    float32 downcasts of float64 tensors are skipped (``fisherfast.split.precision``)."""
    install_lookup_wrappers()
    saved = current()
    _local.state = state
    try:
        with keep_float64() if state.float64 else contextlib.nullcontext():
            yield state
    finally:
        _local.state = saved


def install_lookup_wrappers() -> None:
    """Wrap transformers' attention and experts lookups once per process (see the module docstring)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ALL_ATTENTION_FUNCTIONS.get_interface

        def get_attention(name, default):
            return attend if current() is not None else original(name, default)

        ALL_ATTENTION_FUNCTIONS.get_interface = get_attention
        try:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        except ImportError:  # a transformers without pluggable experts: their forward is the loop already
            ALL_EXPERTS_FUNCTIONS = None
        if ALL_EXPERTS_FUNCTIONS is not None:
            original_experts = ALL_EXPERTS_FUNCTIONS.get_interface

            def get_experts(name, default):
                return default if current() is not None else original_experts(name, default)

            ALL_EXPERTS_FUNCTIONS.get_interface = get_experts
        _installed = True


def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Eager attention (see the module docstring). query (B, H, q, hd); key (B, Hkv, k, hd);
    value (B, Hkv, k, hd_v); attention_mask (B or 1, 1, q, ≥k) additive or boolean, or None
    (causal, the last query at the last key) → ((B, q, H, hd_v), None)."""
    state = current()
    state.calls += 1
    if state.record is not None and id(module) in state.record:
        state.record[id(module)] = (key.detach(), value.detach())
    prefix = None
    if state.prefix is not None:
        if id(module) not in state.prefix:
            raise RuntimeError(f"fisherfast.split: no cached prefix for attention module {type(module).__name__}")
        prefix = state.prefix[id(module)]
        if prefix[0].shape[2] == 0:
            prefix = None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    B, H, q, hd = query.shape
    Hkv = key.shape[1]
    g = H // Hkv  # query head j uses kv head j // g, as transformers' repeat_kv
    work = torch.promote_types(query.dtype, torch.float32)
    if q == 1 and prefix is not None:
        return _attend_one(module, query, key, value, attention_mask, scaling, softcap, prefix, work)
    if prefix is not None:
        K, V = prefix
        key = torch.cat([K.expand(B, -1, -1, -1), key], dim=2)
        value = torch.cat([V.expand(B, -1, -1, -1), value], dim=2)
    key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    s = (query @ key.transpose(-1, -2)) * scaling
    p = _probabilities(module, s, attention_mask, softcap, work).to(value.dtype)
    return (p @ value).transpose(1, 2), None


def _attend_one(module, query, key, value, attention_mask, scaling, softcap, prefix, work):
    """One query against [K_prefix; k]: the prefix products are 2-D matmuls per kv head."""
    B, H, _, hd = query.shape
    Hkv = key.shape[1]
    g = H // Hkv
    K, V = prefix
    qg = query.reshape(B, Hkv, g, hd)
    s_self = (qg * key).sum(-1, keepdim=True) * scaling                      # (B, Hkv, g, 1)
    s = torch.cat([_per_kv_head(qg, K[0].transpose(1, 2)) * scaling, s_self], dim=-1)
    p = _probabilities(module, s.reshape(B, H, 1, -1), attention_mask, softcap, work).to(value.dtype)
    p = p.reshape(B, Hkv, g, -1)
    out = p[..., -1:] * value + _per_kv_head(p[..., :-1], V[0])              # (B, Hkv, g, hd_v)
    return out.reshape(B, H, 1, -1).transpose(1, 2), None


def _per_kv_head(x, M):
    """(n, Hkv, g, a) × (Hkv, a, b) → (n, Hkv, g, b), one 2-D matmul per kv head.

    Under vmap a batched x against the unbatched cache M then folds the vmap
    dimension into the rows of each matmul; a broadcasting 4-D matmul or
    einsum would instead copy M once per vmapped tangent (measured: 40% of a
    Jacobian's time at t = 200 on SmolLM2).
    """
    n, Hkv, g, a = x.shape
    return torch.stack([(x[:, j].reshape(n * g, a) @ M[j]).reshape(n, g, -1) for j in range(Hkv)], dim=1)


def _probabilities(module, s, attention_mask, softcap, work):
    """softmax over keys of the scaled scores s (B, H, q, k): soft-capped, masked, with the
    module's sinks as extra logits (dropped after the softmax), in dtype ``work``."""
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    q, k = s.shape[-2:]
    if attention_mask is None:  # causal, bottom-right aligned
        visible = torch.ones(q, k, dtype=torch.bool, device=s.device).tril(k - q)
        s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., :k], torch.finfo(s.dtype).min)
    else:
        s = s + attention_mask[..., :k].to(s.dtype)
    s = s.to(work)
    sinks = getattr(module, "sinks", None)
    if sinks is None:
        return torch.softmax(s, dim=-1)
    column = sinks.to(work).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
