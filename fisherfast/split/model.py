"""``SplitModel``: the upper map f_ℓ of a causal LM at one context, its
Jacobian products and linearization (see the package docstring)."""
from __future__ import annotations

import dataclasses
import inspect
import threading
from typing import Callable, Sequence

import torch
from torch.func import functional_call, jvp as _jvp, vjp as _vjp, vmap

from fisherfast.checks import check_int
from fisherfast.split.architectures import architecture
from fisherfast.split.attention import SplitState, selected
from fisherfast.split.head import Head, head_of
from fisherfast.split.linearization import Linearization
from fisherfast.split.offload import bypass_dispatch_hooks, execution_device, is_offloaded, materialized_parameters
from fisherfast.split.positions import check_positions
from fisherfast.split.sequence import Continuation, run_sequence


def _to_device(value, device):
    """Tensors (also inside tuples) moved to ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


# Keyword arguments a base model passes to its blocks that are cut to the
# queries' rows (and, for the mask, the keys' columns); cache keywords are
# dropped; anything else that is a tensor is refused (its layout is unknown).
_ROW_KWARGS = ("position_ids", "cache_position")
_DROPPED_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params", "use_cache",
                   "output_attentions")


def _rows(value, rows, n_keys, name):
    """One captured block keyword restricted to query rows ``rows`` (a slice) against keys 0..n_keys-1
    (contiguous copies: the upper map reads them once per candidate and tangent)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if name == "attention_mask":
        if not isinstance(value, torch.Tensor) or value.ndim != 4:
            raise ValueError("model: its attention mask is not a 4-D (batch, heads, query, key) mask (flash "
                             "attention?); load it with attn_implementation='eager' or 'sdpa' for SplitModel")
        return value[:, :, rows, :n_keys].contiguous()
    if name == "position_embeddings" and isinstance(value, tuple):
        return tuple(e[..., rows, :].contiguous() for e in value)
    if name in _ROW_KWARGS and isinstance(value, torch.Tensor):
        return value[..., rows].contiguous()
    if isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                           and any(isinstance(v, torch.Tensor) for v in value)):
        raise ValueError(f"model: its decoder blocks take a tensor keyword {name!r} that SplitModel does not know "
                         "how to restrict to one position")
    return value


def _named_arguments(block, args, kwargs) -> dict:
    """A block call's arguments after the hidden states, by name (GPT-2 passes its mask by position)."""
    signature = inspect.signature(block.forward)
    bound = signature.bind(*args, **kwargs).arguments
    named = {}
    for i, (name, value) in enumerate(bound.items()):
        if i == 0:
            continue  # the hidden states
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


class _RecordCache:
    """A stand-in for a transformers Cache in the prefix pass of blocks outside the attention
    interface: ``update(k, v, layer_idx)`` stores k, v (positions < t) and returns them."""

    def __init__(self):
        self.kv = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states.detach(), value_states.detach())
        return key_states, value_states


class _PrefixCache:
    """A stand-in for a transformers Cache in the upper map of blocks outside the attention
    interface: ``update(k, v, layer_idx)`` returns [K_prefix; k], [V_prefix; v] (the prefix
    broadcast over the candidates); the cached prefix is never modified."""

    def __init__(self, kv):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.kv:
            return key_states, value_states
        K, V = self.kv[layer_idx]
        n = key_states.shape[0]
        return (torch.cat([K.expand(n, -1, -1, -1), key_states], dim=2),
                torch.cat([V.expand(n, -1, -1, -1), value_states], dim=2))


@dataclasses.dataclass
class SplitContext:
    """What the upper map needs for one prompt and position, computed once.

    Attributes:
        h: (d,) the model's own hidden state at layer ℓ, position t.
        position: t, the non-negative index into the prompt.
        layer: ℓ.
        input_ids: (t+1,) the prompt up to and including position t.
        kv: {id(attention module): (K, V)} keys/values of positions < t of
            every attention module in blocks ℓ..L-1, each (1, kv heads, t, head_dim).
        block_kwargs: per upper block, the keyword arguments the model's own
            forward passed it (mask row, rotary embeddings, positions) for
            the single query at position t.
        continuation: None, or the ``Continuation`` y₁…y_n read by
            ``SplitModel.sequence_logits``.
    """

    h: torch.Tensor
    position: int
    layer: int
    input_ids: torch.Tensor
    kv: dict
    block_kwargs: list
    owner_id: int
    continuation: "Continuation | None" = None


class SplitModel:
    """A Hugging Face causal LM split at layer ℓ (see the module docstring).

    Args:
        model: a causal LM whose parts ``fisherfast.split.architecture`` finds
            and does not refuse (verified on ``SUPPORTED_MODEL_TYPES``).
        layer: ℓ ∈ [0, L]; h at layer ℓ is the input of block ℓ (ℓ = L: the
            last block's output before the final norm).

    Raises:
        ValueError naming ``model`` with ``architecture(model).split_refusal``
        for a model that cannot be split exactly (recurrent/state-space layers,
        attention outside transformers' attention interface in blocks taking
        no cache, no Linear head). Blocks whose attention is their own code
        but which take a cache (GPT-J, Falcon) get the cached prefix through it.

    Mixture-of-experts blocks: the map, its Jacobian and every gradient are
    those of the network with the routing the model picks at h (the top-k
    experts and their weights as functions of h; the selection itself is
    piecewise constant, so its derivative is zero almost everywhere) — what
    autograd through the model's own forward gives.

    Attributes:
        model_type, num_layers (L), d, V, layer,
        head: the ``Head`` (W, b, logit scale, soft-cap);
        W: (V, d) unembedding (detached), b: (V,) bias or None (the head's),
        logit_softcap: the final soft-capping constant c or None.
    """

    def __init__(self, model, layer: int):
        arch = architecture(model)
        if arch.split_refusal is not None:
            raise ValueError(f"model: SplitModel cannot split {arch.split_refusal}")
        self.model = model
        self.model_type = arch.model_type
        self._arch = arch
        self._base = arch.base
        self._blocks = arch.blocks
        self.num_layers = len(self._blocks)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer: expected an int in [0, {self.num_layers}], got {type(layer).__name__}")
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}] (L = {self.num_layers}), got {layer}")
        self.layer = layer
        self._norm = arch.norm
        self.head: Head = head_of(model, arch.head)  # an offloaded head is loaded once, here
        self.V, self.d = self.head.W.shape
        self._upper = list(range(layer, self.num_layers))
        # Parameters of blocks held in memory are kept (detached views); those of
        # offloaded blocks are loaded per call (``_block_params``), see fisherfast.split.offload.
        self._params = [None if is_offloaded(self._blocks[i]) else materialized_parameters(self._blocks[i])
                        for i in self._upper]
        self._norm_params = materialized_parameters(self._norm)
        # where each upper block and the norm compute (fixed by the placement; looked up once, not per call)
        self._devices = [execution_device(self._blocks[i]) for i in self._upper]
        self._norm_device = execution_device(self._norm)
        self._float64 = self.head.W.dtype == torch.float64  # float64 models: float64 throughout (precision.py)
        self._loop_tangents = False  # set when vmap cannot batch the upper map (data-dependent MoE routing)
        # Blocks whose attention is their own code (GPT-J, Falcon) get the prefix through their cache keyword.
        self._cache_path = not arch.attention_interface

    # ------------------------------------------------------------------ context
    def context(self, input_ids, attention_mask=None, position: int = -1, continuation=None) -> SplitContext:
        """Run the model's own forward once on the prompt and cache what the upper map needs.

        Args:
            input_ids: (T,) or (1, T) token ids in [0, V) (a list of ints is accepted).
            attention_mask: optional (T,) or (1, T) 0/1 padding mask; position t
                must be a real token.
            position: t ∈ [-T, T-1] (negative counts from the end). Position
                ids are those of ``model(input_ids)``.
            continuation: optional tokens y₁…y_n (n ≥ 1, repeats allowed) that
                follow position t, for ``sequence_logits`` (logits at t..t+n-1
                with h edited at t); the prompt after t is dropped.

        Returns:
            SplitContext with ``h`` the model's own (d,) state at (ℓ, t).

        Raises:
            ValueError naming ``input_ids``/``continuation`` for ids outside
            [0, V) or more tokens than the model's positions (before any
            work), for bad shapes, positions or masks; naming ``model`` for a
            model in training mode or whose outputs at the prompt are not finite.

        Cost: one forward of the model on positions 0..t (0..t+n-1 with a
        continuation) with eager attention, recording the upper blocks'
        keys/values, then one token through blocks ℓ..L-1 (the finiteness check).
        """
        ids = self._check_ids(input_ids, "input_ids")
        self._check_vocab(ids, "input_ids")
        cont = None
        if continuation is not None:
            cont = self._check_ids(continuation, "continuation")
            self._check_vocab(cont, "continuation")
        T = ids.shape[1]
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position: expected an int, got {type(position).__name__}")
        if not -T <= position < T:
            raise ValueError(f"position: expected an int in [{-T}, {T - 1}] for a prompt of length {T}, got {position}")
        t = position % T
        mask = None
        if attention_mask is not None:
            mask = self._check_ids(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(ids.shape)} like input_ids, "
                                 f"got {tuple(mask.shape)}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask: expected 0/1 entries")
            if int(mask[0, t]) != 1:
                raise ValueError(f"attention_mask: position {t} is padding; choose a real token")
            mask = mask[:, : t + 1]
        self._check_eval()
        ids = ids[:, : t + 1]
        fed, fed_mask = ids, mask
        if cont is not None:  # y₁…y_{n-1} are fed in; y_n is only predicted
            fed = torch.cat([ids, cont[:, :-1]], dim=1)
            fed_mask = None if mask is None else torch.cat([mask, mask.new_ones(1, cont.shape[1] - 1)], dim=1)
        check_positions(self.model, fed.shape[1], "input_ids" if cont is None else "input_ids + continuation")
        x_all, captured, recorded = self._record(fed, fed_mask)
        x = x_all[:, : t + 1]                                       # (1, t+1, d): input of block ℓ
        keep = torch.ones(t + 1, dtype=torch.bool, device=x.device) if mask is None else mask[0].bool()
        block_kwargs = [{k: _rows(v, slice(t, t + 1), t + 1, k) for k, v in kw.items()} for kw in captured]
        sequence = None
        if cont is not None:
            n = cont.shape[1]
            sequence = Continuation(ids=cont[0].clone(), x=x_all[0, t + 1:].detach().clone(),
                                    block_kwargs=[{k: _rows(v, slice(t, t + n), t + n, k) for k, v in kw.items()}
                                                  for kw in captured])
        if self._cache_path:  # blocks outside the attention interface: their cache records the prefix
            recorded = self._record_prefix(x_all[:, :t], captured, t)
        # Padded prefix keys are masked out, but zero them so NaN·0 cannot leak into f_ℓ.
        real = keep[:t].view(1, 1, t, 1)
        kv = {key: (torch.where(real, k[:, :, :t], 0.0), torch.where(real, v[:, :, :t], 0.0))
              for key, (k, v) in recorded.items()}
        if self._cache_path:
            cache = {self._arch.cache_kwarg: _PrefixCache(kv)}
            block_kwargs = [{**kw, **cache} for kw in block_kwargs]
            if sequence is not None:
                sequence = dataclasses.replace(sequence, block_kwargs=[{**kw, **cache}
                                                                       for kw in sequence.block_kwargs])
        ctx = SplitContext(h=x[0, t].detach().clone(), position=t, layer=self.layer, input_ids=ids[0].clone(),
                           kv=kv, block_kwargs=block_kwargs, owner_id=id(self), continuation=sequence)
        self._check_finite(ctx)
        return ctx

    def contexts(self, prompts_ids: Sequence, position: int = -1) -> list[SplitContext]:
        """``[self.context(ids, position=position) for ids in prompts_ids]``."""
        if isinstance(prompts_ids, torch.Tensor) and prompts_ids.ndim == 1:
            raise TypeError("prompts_ids: expected a sequence of prompts (a list of id tensors or lists), "
                            "got a single 1-D tensor; use context() for one prompt")
        return [self.context(ids, position=position) for ids in prompts_ids]

    # --------------------------------------------------------------- upper map
    def residual(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """r_L: h (..., d) → the last residual (..., d) before the final norm."""
        h = self._check_h(ctx, h, "h", batched=True)
        with self._selected(ctx):
            return self._residual(ctx, h)

    def head_input(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """a = N(r_L(h)): h (..., d), any batch of candidates for ``ctx`` → (..., d)."""
        h = self._check_h(ctx, h, "h", batched=True)
        return self._head_input(ctx, h)

    def logits(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """The model's logits (``head.logits``: z = s(W a + b), soft-capped where the model does): h (..., d) → (..., V)."""
        h = self._check_h(ctx, h, "h", batched=True)
        return self.head.logits(self._head_input(ctx, h))

    def sequence_logits(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., n, V) at positions t..t+n-1 for h (..., d) at (ℓ, t):
        row i predicts y_{i+1} of ``ctx.continuation`` (built by
        ``context(..., continuation=y)``).

        Blocks ℓ..L-1 run over the n positions t..t+n-1 together (causal among
        them, attending to the cached prefix), with the continuation's
        lower-layer states fixed, so the edit at t reaches the later positions
        only through attention in the upper blocks — as a hook adding to block
        ℓ's input at t alone does in the model's own forward. Cost: n tokens
        through L-ℓ blocks per candidate.
        """
        h = self._check_h(ctx, h, "h", batched=True)
        if ctx.continuation is None:
            raise ValueError("ctx: has no continuation; build it with split.context(ids, continuation=tokens)")
        with self._selected(ctx):
            return run_sequence(self, ctx, h)

    @property
    def W(self) -> torch.Tensor:
        """(V, d) unembedding of ``head`` (detached)."""
        return self.head.W

    @property
    def b(self) -> torch.Tensor | None:
        """(V,) bias of ``head`` or None."""
        return self.head.b

    @property
    def logit_softcap(self) -> float | None:
        """The head's final soft-capping constant c (``head.softcap``) or None."""
        return self.head.softcap

    def logits_from_head_input(self, a: torch.Tensor) -> torch.Tensor:
        """The model's logits for head inputs a (..., d): ``head.logits(a)``."""
        return self.head.logits(a)

    def jvp(self, ctx: SplitContext, h: torch.Tensor, tangents: torch.Tensor, chunk: int | None = None):
        """Forward mode: (a, Bt) with a = f(h) (d,) and Bt[i] = B tangents[i], B = ∂a/∂h = J_N A.

        Args:
            h: (d,); tangents: (k, d); chunk: tangents per vmapped batch (None: all
                k at once, the fastest; an int bounds memory to about
                chunk·(d_ff + heads·t) floats per intermediate).
        Cost: k JVPs of one token through L-ℓ blocks, batched with vmap (one
        (k×d)·(d×d_ff)-sized matmul per weight matrix); one JVP at a time
        where vmap cannot batch the map (data-dependent mixture-of-experts routing).
        """
        h = self._check_h(ctx, h, "h", batched=False)
        V_in = self._check_vectors(tangents, "tangents")
        chunk = self._check_chunk(chunk)
        f = self._fn(ctx)
        with self._selected(ctx):
            Bt = self._map(lambda v: _jvp(f, (h,), (v,))[1], V_in, chunk)
            a = f(h)
        return a, Bt

    def vjp(self, ctx: SplitContext, h: torch.Tensor, cotangents: torch.Tensor, chunk: int | None = None):
        """Reverse mode: rows Bᵀ c_i, i.e. c_i @ B, for cotangents c (k, d) → (k, d).

        One forward of h, then k reverse passes batched with vmap (``chunk`` as in jvp).
        """
        h = self._check_h(ctx, h, "h", batched=False)
        C = self._check_vectors(cotangents, "cotangents")
        chunk = self._check_chunk(chunk)
        with self._selected(ctx):
            if any(params is None for params in self._params):
                return self._vjp_blockwise(ctx, h, C, chunk)
            _, pullback = _vjp(self._fn(ctx), h)
            return self._map(lambda c: pullback(c)[0], C, chunk)

    def _vjp_blockwise(self, ctx, h, C, chunk):
        """``vjp`` one block at a time, for models with offloaded blocks: one forward keeps
        only each block's input, then each block's pullback is built (its weights loaded),
        applied and dropped, last block first. Weights held at once: one block's, instead
        of every upper block's that a whole-map pullback keeps; cost: two forwards."""
        d = self.d
        inputs = []
        with torch.no_grad():
            y = h.reshape(1, 1, d)
            for j in range(len(self._upper)):
                inputs.append(y)
                y = self._call_block(j, y, ctx.block_kwargs[j])
        _, pullback = _vjp(lambda r: self._apply_norm(r), y.reshape(d))
        cot = self._map(lambda c: pullback(c)[0], C, chunk)          # rows c_iᵀ J_N
        for j in reversed(range(len(self._upper))):
            kw = ctx.block_kwargs[j]
            _, pullback = _vjp(lambda x, j=j, kw=kw: self._call_block(j, x.reshape(1, 1, d), kw).reshape(d),
                               inputs[j].reshape(d))
            cot = self._map(lambda c: pullback(c)[0], cot, chunk)  # on block j's input device
        return cot.to(h.device)

    def jacobian(self, ctx: SplitContext, h: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """B = ∂a/∂h = J_N A (d, d) at h (default ``ctx.h``): d reverse products, vmapped ``chunk`` at a time.

        Row i is e_iᵀB = Bᵀe_i (``vjp`` of the identity rows). Reverse mode is
        the one choice for the whole Jacobian (``pullback_fisher``'s exact mode
        calls this): on SmolLM2 at layer 15, one thread, d VJPs took 1.1–1.5 s
        against 2.1–3.3 s for d forward-mode JVPs (chunk 64 / all at once;
        bench/bench_metric.py ``--jacobian``). Cost: one forward and d
        backward passes of one token through L-ℓ blocks.
        """
        if h is None:
            h = ctx.h
        h = self._check_h(ctx, h, "h", batched=False)
        return self.vjp(ctx, h, torch.eye(self.d, dtype=h.dtype, device=h.device), chunk=chunk)

    def linearize(self, ctx: SplitContext, h: torch.Tensor | None = None) -> "Linearization":
        """The upper map linearized at h (default ``ctx.h``): a = f(h) and products with B = ∂a/∂h
        that reuse one recorded forward (``Linearization``).

        For many products at one point (a matrix-free metric, CG): ``jvp`` and
        ``vjp`` re-run f on every call, ``Linearization`` never does. Memory:
        the recorded forward of one token through L-ℓ blocks (and, after the
        first ``Linearization.jvp``, its backward graph).
        """
        if h is None:
            h = ctx.h
        h = self._check_h(ctx, h, "h", batched=False)
        with self._selected(ctx):
            a, pullback = _vjp(self._fn(ctx), h)
        return Linearization(self, a, pullback)

    def norm_jacobian(self, ctx: SplitContext, r: torch.Tensor) -> torch.Tensor:
        """J_N = ∂N/∂r (d, d) of the final norm at the last residual r (d,)."""
        r = self._check_h(ctx, r, "r", batched=False)
        with self._selected(ctx):
            return torch.func.jacfwd(self._apply_norm)(r)

    def check_point(self, ctx: SplitContext, h: torch.Tensor, name: str = "h", batched: bool = False) -> torch.Tensor:
        """``h`` checked as a point for ``ctx`` (TypeError/ValueError naming ``name``): a tensor of the
        model's dtype, shape (d,) (or (..., d) when ``batched``), ``ctx`` made by this SplitModel, the
        model in eval mode. Returns h."""
        return self._check_h(ctx, h, name, batched=batched)

    # ----------------------------------------------------------------- private
    def _selected(self, ctx):
        """This thread's attention: the upper map's, attending to ``ctx``'s cached prefix."""
        return selected(SplitState(prefix=ctx.kv, float64=self._float64))

    def _map(self, fn, X, chunk):
        """Rows fn(x_i) for X (k, ...): vmapped ``chunk`` at a time; one at a time when vmap
        cannot batch fn (a mixture-of-experts block's data-dependent routing), remembered."""
        if X.shape[0] == 1:
            return fn(X[0])[None]
        if not self._loop_tangents:
            try:
                return vmap(fn, chunk_size=chunk)(X)
            except RuntimeError as err:
                if "vmap" not in str(err) and "batch" not in str(err).lower():
                    raise
                self._loop_tangents = True
        return torch.stack([fn(x) for x in X])

    def _fn(self, ctx) -> Callable:
        """h ↦ a for torch.func transforms; the caller holds ``self._selected(ctx)``."""
        def f(h):
            return self._apply_norm(self._residual(ctx, h))
        return f

    def _apply_norm(self, r):
        """a = N(r) on the head's device (where W is), whatever device r and the norm are on."""
        device = self._norm_device or r.device
        with bypass_dispatch_hooks([self._norm]):
            a = functional_call(self._norm, self._norm_params, (r.to(device),))
        return a.to(self.W.device)

    def _head_input(self, ctx, h):
        with self._selected(ctx):
            return self._apply_norm(self._residual(ctx, h))

    def _block_params(self, j):
        """Upper block j's parameters: kept ones, or an offloaded block's loaded for this call only."""
        params = self._params[j]
        return params if params is not None else materialized_parameters(self._blocks[self._upper[j]])

    def _call_block(self, j, y, kwargs):
        """Upper block j (model block ``self._upper[j]``) on y with explicit parameters, on the
        block's own device (activations and keyword tensors follow it; accelerate's hooks bypassed).
        Returns the block's hidden states (blocks returning a tuple give its first entry)."""
        block = self._blocks[self._upper[j]]
        device = self._devices[j] or y.device
        kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        with bypass_dispatch_hooks([block]):
            out = functional_call(block, self._block_params(j), (y.to(device),), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _residual(self, ctx, h):
        """Blocks ℓ..L-1 on one token per candidate: h (..., d) → r_L (..., d)."""
        lead = h.shape[:-1]
        y = h.reshape(-1, 1, self.d)
        for j in range(len(self._upper)):
            y = self._call_block(j, y, ctx.block_kwargs[j])
        return y.reshape(*lead, self.d)

    def _record(self, ids, mask):
        """The model's own forward on ``ids`` with ``attend`` recording the upper blocks' keys/values.

        Returns (x, kwargs, kv): x (1, T, d) the input of block ℓ (of the final norm at ℓ = L);
        kwargs, per upper block, the keyword arguments the base model passed it (cache ones
        dropped); kv {id(attention module): (K, V)} over all T positions."""
        me = threading.get_ident()
        captured, kwargs = {}, [None] * len(self._upper)

        def capture_input(module, args, kw):
            if threading.get_ident() == me and "x" not in captured:
                captured["x"] = args[0] if args else kw["hidden_states"]

        def capture_kwargs(j):
            def hook(module, args, kw):
                if threading.get_ident() == me and kwargs[j] is None:
                    kwargs[j] = {k: v for k, v in _named_arguments(module, args, kw).items()
                                 if k not in _DROPPED_KWARGS}
            return hook

        target = self._blocks[self.layer] if self.layer < self.num_layers else self._norm
        handles = [target.register_forward_pre_hook(capture_input, with_kwargs=True)]
        handles += [self._blocks[i].register_forward_pre_hook(capture_kwargs(j), with_kwargs=True)
                    for j, i in enumerate(self._upper)]
        attention = {id(m): None for i in self._upper for m in self._blocks[i].modules()}
        state = SplitState(record=attention, float64=self._float64)
        try:
            with torch.no_grad(), selected(state):
                self._base(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        recorded = {key: kv for key, kv in attention.items() if kv is not None}
        for j, i in enumerate(self._upper):
            if not self._cache_path and not any(id(m) in recorded for m in self._blocks[i].modules()):
                raise ValueError(f"model: block {i} of {self.model_type!r} computed no attention through "
                                 "transformers' attention interface; SplitModel cannot hold its context fixed")
        if "x" not in captured:
            raise RuntimeError(f"the forward of {type(self.model).__name__} never reached layer {self.layer}")
        return captured["x"].detach(), kwargs, recorded

    def _record_prefix(self, x, captured, t):
        """Blocks ℓ..L-1 over positions 0..t-1 (x (1, t, d), the model's own block keywords cut to
        them) with a recording cache: {layer index: (K, V)} as each block's cache receives them."""
        cache = _RecordCache()
        if t == 0:
            return {}
        with torch.no_grad(), selected(SplitState(float64=self._float64)):
            y = x
            for j in range(len(self._upper)):
                kw = {k: _rows(v, slice(0, t), t, k) for k, v in captured[j].items()}
                y = self._call_block(j, y, {**kw, self._arch.cache_kwarg: cache})
        return cache.kv

    def _check_eval(self):
        if self.model.training:
            raise ValueError("model: is in training mode (dropout makes the upper map random); call model.eval()")

    def _check_finite(self, ctx):
        """ValueError naming ``model`` when its state at (ℓ, t) or its logits there are not finite."""
        if not bool(torch.isfinite(ctx.h).all()):
            raise ValueError(f"model: its hidden state at layer {self.layer}, position {ctx.position} is not "
                             "finite (NaN/Inf); check the weights and dtype")
        with torch.no_grad():
            z = self.head.logits(self._head_input(ctx, ctx.h))
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"model: its logits at position {ctx.position} are not finite (NaN/Inf); check the "
                             "weights and dtype (half precision overflows?)")

    def _check_ids(self, ids, name):
        if isinstance(ids, (list, tuple)):
            ids = torch.tensor(ids, dtype=torch.long)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor or list of ints, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"{name}: expected integer ids, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"{name}: expected shape (T,) or (1, T) with T ≥ 1, got {tuple(ids.shape)}")
        return ids.to(self.W.device)

    def _check_vocab(self, ids, name):
        """Token ids must index the input embedding: [0, V_in)."""
        V_in = self.model.get_input_embeddings().num_embeddings
        bad = ids[(ids < 0) | (ids >= V_in)]
        if bad.numel():
            raise ValueError(f"{name}: token ids must be in [0, {V_in}) (the model's vocabulary), got {int(bad[0])}")

    def _check_h(self, ctx, h, name, batched):
        self._check_eval()
        if not isinstance(ctx, SplitContext):
            raise TypeError(f"ctx: expected a SplitContext from SplitModel.context(), got {type(ctx).__name__}")
        if ctx.owner_id != id(self):
            raise ValueError("ctx: was made by another SplitModel (a different model or layer)")
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(h).__name__}")
        if h.dtype != self.W.dtype:
            raise TypeError(f"{name}: expected dtype {self.W.dtype} (the model's), got {h.dtype}")
        if batched:
            if h.ndim < 1 or h.shape[-1] != self.d:
                raise ValueError(f"{name}: expected shape (..., {self.d}), got {tuple(h.shape)}")
        elif tuple(h.shape) != (self.d,):
            raise ValueError(f"{name}: expected shape ({self.d},), got {tuple(h.shape)}")
        return h

    def _check_vectors(self, v, name):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
        if v.dtype != self.W.dtype:
            raise TypeError(f"{name}: expected dtype {self.W.dtype} (the model's), got {v.dtype}")
        if v.ndim != 2 or v.shape[1] != self.d or v.shape[0] == 0:
            raise ValueError(f"{name}: expected shape (k, {self.d}) with k ≥ 1, got {tuple(v.shape)}")
        return v

    @staticmethod
    def _check_chunk(chunk):
        if chunk is None:
            return None
        return check_int("chunk", chunk, minimum=1)
