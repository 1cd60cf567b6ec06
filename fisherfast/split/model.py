"""``SplitModel``: the upper map f_ℓ of a causal LM at one context, its
Jacobian products and linearization (see the package docstring)."""
from __future__ import annotations

import contextlib
import inspect
import dataclasses
from typing import Callable, Sequence

import torch
from torch.func import functional_call, jvp as _jvp, vjp as _vjp, vmap

from fisherfast.split.architectures import architecture
from fisherfast.split.attention import _ATTN_NAME, _RecordKV, _register_attention
from fisherfast.split.head import Head, head_of
from fisherfast.split.linearization import Linearization
from fisherfast.split.offload import bypass_dispatch_hooks, execution_device, is_offloaded, materialized_parameters
from fisherfast.split.sequence import ATTN_SEQUENCE, Continuation, run_sequence


class _Stop(Exception):
    """Raised by the lower-pass hook once block ℓ's input is captured."""


def _to_device(value, device):
    """Tensors (also inside tuples) moved to ``device``; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@dataclasses.dataclass
class SplitContext:
    """What the upper map needs for one prompt and position, computed once.

    Attributes:
        h: (d,) the model's own hidden state at layer ℓ, position t.
        position: t, the non-negative index into the prompt.
        layer: ℓ.
        input_ids: (t+1,) the prompt up to and including position t.
        kv: {layer_idx: (K, V)} keys/values of positions < t in blocks ℓ..L-1,
            each (1, heads, t, head_dim).
        block_kwargs: per upper block, the keyword arguments (mask, rotary
            embeddings) for a single query at position t.
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
        model: a ``*ForCausalLM`` of one of ``SUPPORTED_MODEL_TYPES`` (GPT-2,
            Llama — covers SmolLM2 and Llama-3 —, Qwen2, GPT-NeoX, Gemma3 text).
        layer: ℓ ∈ [0, L]; h at layer ℓ is the input of block ℓ (ℓ = L: the
            last block's output before the final norm).

    Attributes:
        model_type, num_layers (L), d, V, layer,
        W: (V, d) unembedding (detached), b: (V,) bias or None,
        logit_softcap: Gemma3's final soft-capping constant c or None.
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
        # offloaded blocks are loaded per call (``_block_params``), see fisherfast._offload.
        self._params = [None if is_offloaded(self._blocks[i]) else materialized_parameters(self._blocks[i])
                        for i in self._upper]
        self._norm_params = materialized_parameters(self._norm)
        # where each upper block and the norm compute (fixed by the placement; looked up once, not per call)
        self._devices = [execution_device(self._blocks[i]) for i in self._upper]
        self._norm_device = execution_device(self._norm)
        self._configs = self._attention_configs()
        self._softmax_fp32 = self.model_type != "gpt2"
        _register_attention()

    # ------------------------------------------------------------------ context
    def context(self, input_ids, attention_mask=None, position: int = -1, continuation=None) -> SplitContext:
        """Run the lower pass once and cache what the upper map needs.

        Args:
            input_ids: (T,) or (1, T) token ids in [0, V) (a list of ints is accepted).
            attention_mask: optional (T,) or (1, T) 0/1 padding mask; position t
                must be a real token.
            position: t ∈ [-T, T-1] (negative counts from the end). Position
                ids are 0..T-1, as in ``model(input_ids)``.
            continuation: optional tokens y₁…y_n (n ≥ 1, repeats allowed) that
                follow position t, for ``sequence_logits`` (logits at t..t+n-1
                with h edited at t); the prompt after t is dropped.

        Returns:
            SplitContext with ``h`` the model's own (d,) state at (ℓ, t).

        Raises:
            ValueError naming ``input_ids``/``continuation`` for ids outside
            [0, V) (before any work), and for bad shapes, positions or masks.

        Cost: one forward of the model through blocks 0..ℓ-1 on positions
        0..t (0..t+n-1 with a continuation), and one pass of blocks ℓ..L-1
        over positions 0..t-1.
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
        if self.model.training:
            raise ValueError("model: is in training mode (dropout makes the upper map random); call model.eval()")
        ids = ids[:, : t + 1]
        fed, fed_mask = ids, mask
        if cont is not None:  # y₁…y_{n-1} are fed in; y_n is only predicted
            fed = torch.cat([ids, cont[:, :-1]], dim=1)
            fed_mask = None if mask is None else torch.cat([mask, mask.new_ones(1, cont.shape[1] - 1)], dim=1)
        x_all = self._lower(fed, fed_mask)
        x = x_all[:, : t + 1]                                       # (1, t+1, d): input of block ℓ
        device = x.device
        keep = torch.ones(t + 1, dtype=torch.bool, device=device) if mask is None else mask[0].bool()
        prefix = _RecordKV()
        with torch.no_grad(), self._attn("eager"):
            if t > 0:
                y = x[:, :t]
                pos = torch.arange(t, device=device)
                for j, i in enumerate(self._upper):
                    kw = self._block_kwargs(i, y, pos, keep[:t], t)
                    y = self._call_block(j, y, {**kw, self._arch.cache_kwarg: prefix})
            block_kwargs = [self._block_kwargs(i, x[:, t:], torch.tensor([t], device=device), keep, t + 1)
                            for i in self._upper]
            sequence = None
            if cont is not None:
                n = cont.shape[1]
                keep_all = torch.cat([keep, torch.ones(n - 1, dtype=torch.bool, device=device)])
                pos = torch.arange(t, t + n, device=device)
                sequence = Continuation(ids=cont[0].clone(), x=x_all[0, t + 1:].detach().clone(),
                                        block_kwargs=[self._block_kwargs(i, x_all[:, t:], pos, keep_all, t + n)
                                                      for i in self._upper])
        # block i's attention records under its layer_idx, which is i. Padded
        # prefix keys are masked out, but their rows can hold NaN (a query
        # with every key masked); zero them so NaN·0 cannot leak into f_ℓ.
        real = keep[:t].view(1, 1, t, 1)
        kv = {i: (torch.where(real, k, 0.0).detach(), torch.where(real, v, 0.0).detach())
              for i, (k, v) in prefix.kv.items()}
        return SplitContext(h=x[0, t].detach().clone(), position=t, layer=self.layer, input_ids=ids[0].clone(),
                            kv=kv, block_kwargs=block_kwargs, owner_id=id(self), continuation=sequence)

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
        with self._attn(_ATTN_NAME):
            return self._residual(ctx, h)

    def head_input(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """a = N(r_L(h)): h (..., d), any batch of candidates for ``ctx`` → (..., d)."""
        h = self._check_h(ctx, h, "h", batched=True)
        return self._head_input(ctx, h)

    def logits(self, ctx: SplitContext, h: torch.Tensor) -> torch.Tensor:
        """z = W a + b (then Gemma3's soft-cap c·tanh(z/c)): h (..., d) → (..., V)."""
        h = self._check_h(ctx, h, "h", batched=True)
        return self.logits_from_head_input(self._head_input(ctx, h))

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
        with self._attn(ATTN_SEQUENCE):
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
        (k×d)·(d×d_ff)-sized matmul per weight matrix).
        """
        h = self._check_h(ctx, h, "h", batched=False)
        V_in = self._check_vectors(tangents, "tangents")
        chunk = self._check_chunk(chunk)
        f = self._fn(ctx)
        with self._attn(_ATTN_NAME):
            a, Bt = vmap(lambda v: _jvp(f, (h,), (v,)), chunk_size=chunk)(V_in)
        return a[0], Bt

    def vjp(self, ctx: SplitContext, h: torch.Tensor, cotangents: torch.Tensor, chunk: int | None = None):
        """Reverse mode: rows Bᵀ c_i, i.e. c_i @ B, for cotangents c (k, d) → (k, d).

        One forward of h, then k reverse passes batched with vmap (``chunk`` as in jvp).
        """
        h = self._check_h(ctx, h, "h", batched=False)
        C = self._check_vectors(cotangents, "cotangents")
        chunk = self._check_chunk(chunk)
        with self._attn(_ATTN_NAME):
            if any(params is None for params in self._params):
                return self._vjp_blockwise(ctx, h, C, chunk)
            _, pullback = _vjp(self._fn(ctx), h)
            return vmap(lambda c: pullback(c)[0], chunk_size=chunk)(C)

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
                y = self._call_block(j, y, self._upper_kwargs(ctx, j))
        _, pullback = _vjp(lambda r: self._apply_norm(r), y.reshape(d))
        cot = vmap(lambda c: pullback(c)[0], chunk_size=chunk)(C)          # rows c_iᵀ J_N
        for j in reversed(range(len(self._upper))):
            kw = self._upper_kwargs(ctx, j)
            _, pullback = _vjp(lambda x, j=j, kw=kw: self._call_block(j, x.reshape(1, 1, d), kw).reshape(d),
                               inputs[j].reshape(d))
            cot = vmap(lambda c: pullback(c)[0], chunk_size=chunk)(cot)  # on block j's input device
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
        with self._attn(_ATTN_NAME):
            a, pullback = _vjp(self._fn(ctx), h)
        return Linearization(self, a, pullback)

    def norm_jacobian(self, ctx: SplitContext, r: torch.Tensor) -> torch.Tensor:
        """J_N = ∂N/∂r (d, d) of the final norm at the last residual r (d,)."""
        r = self._check_h(ctx, r, "r", batched=False)
        return torch.func.jacfwd(self._apply_norm)(r)

    # ----------------------------------------------------------------- private
    def _fn(self, ctx) -> Callable:
        """h ↦ a for torch.func transforms; the caller holds ``self._attn(_ATTN_NAME)``."""
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
        with self._attn(_ATTN_NAME):
            return self._apply_norm(self._residual(ctx, h))

    def _upper_kwargs(self, ctx, j):
        """Keyword arguments of upper block j for the one query at position t."""
        return dict(ctx.block_kwargs[j], split_prefix=ctx.kv.get(self._upper[j]),
                    split_softmax_fp32=self._softmax_fp32)

    def _block_params(self, j):
        """Upper block j's parameters: kept ones, or an offloaded block's loaded for this call only."""
        params = self._params[j]
        return params if params is not None else materialized_parameters(self._blocks[self._upper[j]])

    def _call_block(self, j, y, kwargs):
        """Upper block j (model block ``self._upper[j]``) on y with explicit parameters, on the
        block's own device (activations and keyword tensors follow it; accelerate's hooks bypassed)."""
        block = self._blocks[self._upper[j]]
        device = self._devices[j] or y.device
        kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        with bypass_dispatch_hooks([block]):
            return functional_call(block, self._block_params(j), (y.to(device),), kwargs)

    def _residual(self, ctx, h):
        """Blocks ℓ..L-1 on one token per candidate: h (..., d) → r_L (..., d); eager attention needed."""
        lead = h.shape[:-1]
        y = h.reshape(-1, 1, self.d)
        for j in range(len(self._upper)):
            y = self._call_block(j, y, self._upper_kwargs(ctx, j))
        return y.reshape(*lead, self.d)

    def _lower(self, ids, mask):
        """The model's own forward up to the input of block ℓ (or the final norm at ℓ = L)."""
        target = self._blocks[self.layer] if self.layer < self.num_layers else self._norm
        captured = {}

        def hook(module, args, kwargs):
            captured["x"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self._base(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "x" not in captured:
            raise RuntimeError(f"the lower pass of {type(self.model).__name__} never reached layer {self.layer}")
        return captured["x"].detach()

    def _block_kwargs(self, i, x, pos, keep, n_keys):
        """Keyword arguments of block i for queries at positions ``pos`` against keys 0..n_keys-1.

        The additive mask (1, 1, q, n_keys) is 0 where key j is visible to query
        p: j ≤ p (causal), key j not padding, and p − j < window on sliding-
        window layers (transformers' sliding_window_overlay); else the dtype's
        min, as transformers' eager masks.
        """
        config = self.model.config
        kpos = torch.arange(n_keys, device=x.device)
        visible = (kpos[None, :] <= pos[:, None]) & keep[None, :n_keys]
        layer_types = getattr(config, "layer_types", None)
        layer_type = layer_types[i] if layer_types is not None else "full_attention"
        if layer_type == "sliding_attention":
            visible = visible & (kpos[None, :] > pos[:, None] - config.sliding_window)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~visible, torch.finfo(x.dtype).min)[None, None]
        kw = {"attention_mask": mask}
        if self._arch.rotary:
            rot = self._arch.rotary[0]
            per_type = "layer_type" in inspect.signature(type(rot).forward).parameters
            args = (x, pos[None]) + ((layer_type,) if per_type else ())
            kw["position_embeddings"] = tuple(e.detach() for e in rot(*args))
        return kw

    def _attention_configs(self):
        seen = {}
        for i in self._upper:
            for m in self._blocks[i].modules():
                c = getattr(m, "config", None)
                if c is not None and hasattr(c, "_attn_implementation"):
                    seen[id(c)] = c
        return list(seen.values())

    @contextlib.contextmanager
    def _attn(self, name):
        """Select attention implementation ``name`` for the upper blocks, restoring it afterwards."""
        saved = [(c, c._attn_implementation) for c in self._configs]
        try:
            for c, impl in saved:
                if impl != name:
                    c._attn_implementation = name
            yield
        finally:
            for c, impl in saved:
                if c._attn_implementation != impl:
                    c._attn_implementation = impl

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
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
        return chunk
