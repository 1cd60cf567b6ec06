"""Apply steering vectors inside a Hugging Face model's forward pass or generation
through removable hooks (docs/design.md §5, the steering-vectors / TransformerLens
convention).

Layer convention (as in ``fisherfast.split``): the hidden state at layer ℓ < L
is the input of decoder block ℓ (a forward pre-hook edits it), at ℓ = L the
output of the last block before the final norm (a forward hook edits it). So
a vector δ found with ``SplitModel(model, ℓ)`` at the prompt's last position
has, applied here with ``positions="prompt_last"`` (or the default), exactly
the effect the split model predicts: ``model(ids).logits[:, -1] ==
split.logits(ctx, ctx.h + δ)``.

Positions name places in the whole sequence — prompt plus generated tokens —
never in one forward call, so a ``steering(...)`` block gives the same tokens
with and without the KV cache, in every decoding mode of ``generate``. Inside
``generate`` the prompt is what ``generate`` was given (its ``input_ids`` or
``inputs_embeds`` and ``attention_mask``): every forward call it makes
continues that prompt, whatever its batch (beam search and
``num_return_sequences`` repeat each prompt row m times, consecutively) or its
number of new tokens (assisted and prompt-lookup decoding send several
candidate tokens at once, and crop the cache when they are rejected). Each
call's places are read from what the model receives: the 2-D
``attention_mask`` when there is one (its width is cached + new tokens),
else ``cache_position``, else the cache's length, else — for a recurrent
cache that does not count tokens (Mamba) — the tokens this block has seen.
Outside ``generate`` the first forward call in the block is the prompt (see
:func:`steering`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref
from typing import Mapping, Sequence

import torch

from fisherfast.checks import check_int, expected
from fisherfast.split import architecture
from fisherfast.steer.vectors import SteeringVectors

EDIT_MODES = ("add", "replace")
POSITION_CHOICES = ("prompt_last", "from_prompt_last", "all")
DEPRECATED_POSITIONS = {"last": "from_prompt_last"}  # old spelling → name; warns, goes in the next version
# generate() options whose forward calls are not a continuation of the prompt, refused before generation
REFUSED_GENERATE_OPTIONS = {
    "custom_generate": "a custom decoding loop (custom_generate)",
    "negative_prompt_ids": "classifier-free guidance with a negative prompt (negative_prompt_ids)",
    "dola_layers": "DoLa decoding (dola_layers)",
    "penalty_alpha": "contrastive search (penalty_alpha)",
}
CACHE_KWARGS = ("past_key_values", "cache_params", "layer_past")


def _check_positions(positions):
    if isinstance(positions, str):
        name = DEPRECATED_POSITIONS.get(positions, positions)
        if name != positions:
            warnings.warn(f"positions={positions!r} is deprecated and goes in the next version; use {name!r}",
                          DeprecationWarning, stacklevel=3)
        if name in POSITION_CHOICES:
            return name
    elif isinstance(positions, Sequence) and positions and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions):
        return tuple(positions)
    raise ValueError(expected("positions", f"one of {POSITION_CHOICES} or a non-empty list of ints", positions))


def _check_prompt_length(prompt_length):
    if prompt_length is None:
        return None
    ok_int = lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1  # noqa: E731
    if ok_int(prompt_length):
        return prompt_length
    if isinstance(prompt_length, Sequence) and prompt_length and all(ok_int(n) for n in prompt_length):
        return tuple(prompt_length)
    raise ValueError(f"prompt_length: expected None, an int ≥ 1 or a non-empty list of ints ≥ 1 (one per row), "
                     f"got {prompt_length!r}")


def _check_vectors(vectors, L: int, d: int):
    """{ℓ: detached copy of v_ℓ, (d,) or (R, d)} and R (None when every vector is (d,))."""
    if isinstance(vectors, SteeringVectors):
        vectors = vectors.vectors
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors: expected a non-empty mapping {layer: (d,) or (rows, d) tensor} or a SteeringVectors")
    rows, clean = None, {}
    for layer, v in vectors.items():
        check_int("vectors: layer", layer, minimum=0, maximum=L)
        if (not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() not in (1, 2)
                or v.shape[-1] != d or v.shape[0] == 0):
            raise ValueError(f"vectors[{layer}]: expected a floating tensor of shape ({d},) or (rows, {d}), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"vectors[{layer}] contains NaN or Inf")
        if v.dim() == 2:
            if rows is not None and rows != v.shape[0]:
                raise ValueError(f"vectors: per-row vectors must all have the same number of rows, got {rows} and "
                                 f"{v.shape[0]} (vectors[{layer}])")
            rows = v.shape[0]
        clean[layer] = v.detach().clone()
    return clean, rows


def _check_scale(scale, layers, rows):
    """{ℓ: (R,) or () float64 tensor} from a number, a per-row sequence, or a mapping per layer."""
    def one(s, name):
        t = torch.as_tensor(s, dtype=torch.float64) if not isinstance(s, torch.Tensor) else s.detach().double()
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] == 0) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected a finite number or a 1-D sequence of one number per row, got {s!r}")
        return t

    try:
        if isinstance(scale, Mapping):
            unknown = sorted(set(scale) - set(layers), key=str)
            if unknown:
                raise ValueError(f"scale: layers {unknown} have no vector")
            out = {layer: one(scale.get(layer, 1.0), f"scale[{layer}]") for layer in layers}
        else:
            t = one(scale, "scale")
            out = dict.fromkeys(layers, t)
    except (TypeError, RuntimeError):
        raise ValueError(f"scale: expected a number, one number per row, or {{layer: that}}, got {scale!r}") from None
    for layer, t in out.items():
        if t.dim() == 1:
            if rows is not None and t.shape[0] != rows:
                raise ValueError(f"scale for layer {layer} has {t.shape[0]} rows; the vectors have {rows}")
            rows = t.shape[0]
    return out, rows


def _cache_length(past):
    """Tokens held by a cache; 0 for an empty recurrent state, None for a filled one
    (it does not count its tokens)."""
    if past is None:
        return 0
    try:
        return int(past.get_seq_length())
    except (AttributeError, TypeError, ValueError):
        states = [getattr(layer, "has_previous_state", None) for layer in getattr(past, "layers", ())]
        filled = any(any(s.values()) if isinstance(s, dict) else bool(s) for s in states if s is not None)
        return None if filled else 0


class _Tracker:
    """Follows one block's sequences through the model's forward calls (in the
    block's own thread) and says, for each call, which of its (row, column)
    places to edit, and which row of the per-row vectors each batch row takes.

    Index k of a token = number of real (mask = 1) tokens before it in its row,
    over prompt and generated tokens: what its position would be if the row
    ran alone. Pads are never edited.
    """

    def __init__(self, base, positions, prompt_length, rows):
        self.signature = inspect.signature(base.forward)
        self.positions = positions
        self.prompt_length = prompt_length
        self.rows = rows                       # R per-row vectors / scales, or None
        self.generating: torch.Tensor | None = None  # (B₀, n₀) bool mask of generate()'s prompt while it runs
        self.n: torch.Tensor | None = None      # (B₀,) the prompt's real-token count per row
        # outside generate: the sequence so far (B, T[, d]) and its (B, T) bool mask of real tokens, None when
        # it cannot be followed
        self.seq: torch.Tensor | None = None
        self.seq_mask: torch.Tensor | None = None
        self.seen = 0                           # columns of the sequence so far (for recurrent caches)
        self.where: torch.Tensor | None = None  # (B, q) bool for the call in progress; None: edit nothing
        self.row_index: torch.Tensor | None = None  # (B,) long: the per-row vector of each batch row

    # ------------------------------------------------------------ generate()

    def start_generate(self, x, mask):
        B0, n0 = x.shape[0], x.shape[1]
        real = torch.ones(B0, n0, dtype=torch.bool, device=x.device) if mask is None else mask.to(torch.bool)
        if tuple(real.shape) != (B0, n0):
            raise ValueError(f"generate: attention_mask of shape {tuple(real.shape)} for a prompt of shape "
                             f"{(B0, n0)}")
        self._check_rows(B0, "generate's batch")
        self.n = self._prompt_counts(real)
        self.generating = real
        self.seq = self.seq_mask = None
        self.seen = 0

    def end_generate(self):
        self.generating = None
        self.n = None  # the next plain call is a new prompt

    # ------------------------------------------------------------ each forward call

    def begin(self, module, args, kwargs):
        self.where = self.row_index = None
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x = bound.get("input_ids")
        if x is None:
            x = bound.get("inputs_embeds")
        if x is None:  # the model will raise its own error
            return
        B, q = x.shape[0], x.shape[1]
        mask = bound.get("attention_mask")
        flat = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        past = next((bound[k] for k in CACHE_KWARGS if bound.get(k) is not None), None)
        if flat is not None:
            if flat.shape[0] != B or flat.shape[1] < q:
                raise ValueError(f"steering reads a 2-D attention_mask of shape (batch, cached + new tokens) = "
                                 f"({B}, ≥ {q}), got {tuple(flat.shape)}")
            n_past = flat.shape[1] - q
        elif isinstance(bound.get("cache_position"), torch.Tensor) and bound["cache_position"].numel():
            n_past = int(bound["cache_position"].reshape(-1)[0])
        else:
            n_past = _cache_length(past)
            if n_past is None:  # a filled recurrent state: the tokens this block has seen in this sequence
                n_past = self.seen
        if self.generating is not None:
            real = self._generate_mask(B, n_past, q, flat, x.device)
        else:
            real = self._plain_call(x, flat, n_past)
        k = real.cumsum(-1) - 1  # (B, n_past + q): index among the row's real tokens
        m = B // self.n.shape[0]
        n = self.n.repeat_interleave(m)
        where = self._select(k[:, -q:], real[:, -q:], n)
        self.seen = n_past + q
        if bool(where.any()):  # one check per call, not per block
            self.where = where
            if self.rows is not None:
                self.row_index = torch.arange(B, device=x.device) // (B // self.rows)

    def end(self, *_):
        self.where = self.row_index = None

    def _check_rows(self, B, what):
        if self.rows is not None and (B < self.rows or B % self.rows):
            raise ValueError(f"per-row steering of {self.rows} rows cannot apply to {what} of {B} rows (it must "
                             f"be the rows, each repeated m times consecutively, as beam search does)")

    def _prompt_counts(self, real):
        B = real.shape[0]
        if self.prompt_length is None:
            n = real.sum(-1)
        else:
            lengths = (self.prompt_length,) * B if isinstance(self.prompt_length, int) else self.prompt_length
            if len(lengths) != B:
                raise ValueError(f"prompt_length has {len(lengths)} entries for a batch of {B} rows")
            n = torch.tensor(lengths, device=real.device)
        if isinstance(self.positions, tuple):
            low = min(self.positions)
            short = (n + low < 0).nonzero()
            if low < 0 and len(short):
                row = int(short[0, 0])
                raise ValueError(f"positions {list(self.positions)}: {low} reaches before the start of row {row}'s "
                                 f"prompt of {int(n[row])} tokens")
        return n

    def _generate_mask(self, B, n_past, q, flat, device):
        """(B, n_past + q) real-token mask of a call inside generate: the given 2-D
        mask, else the prompt's mask followed by generated (always real) tokens."""
        P = self.generating
        B0, n0 = P.shape
        if B % B0:
            raise ValueError(f"a forward call of batch {B} inside generate of {B0} prompt rows")
        if flat is not None:
            return flat.to(torch.bool)
        P = P.repeat_interleave(B // B0, 0)
        T = n_past + q
        if T <= n0:
            return P[:, :T]
        return torch.cat([P, torch.ones(B, T - n0, dtype=torch.bool, device=device)], 1)

    def _plain_call(self, x, flat, n_past):
        """The real-token mask of a call outside generate; records a new prompt when it starts one."""
        B, q = x.shape[0], x.shape[1]
        if flat is not None:
            real = flat.to(torch.bool)
        else:  # no 2-D mask: the past as followed so far, every new token real
            s = self.seq_mask
            past = s[:, :n_past] if s is not None and s.shape[0] == B and s.shape[1] >= n_past \
                else torch.ones(B, n_past, dtype=torch.bool, device=x.device)
            real = torch.cat([past, torch.ones(B, q, dtype=torch.bool, device=x.device)], 1)
        if self._starts_prompt(x, real, n_past):
            self._check_rows(B, "a forward call")
            self.n = self._prompt_counts(real)
        elif self.n.shape[0] != B:
            raise ValueError(f"a forward call of batch {B} continues a prompt of batch {self.n.shape[0]}; "
                             f"open a new steering block for a new batch")
        self._follow(x, real, n_past)
        return real

    def _starts_prompt(self, x, real, n_past) -> bool:
        """The first call in the block is the prompt; a later call that reuses a
        cache continues it. A later call without cached tokens continues it only
        when its tokens are exactly the sequence so far plus one token (each step
        of a hand-written loop without cache); any other such call is a new
        prompt — e.g. a second prompt that extends the first one's output."""
        if self.n is None:
            return True
        if n_past > 0:
            return False
        s = self.seq
        if (s is None or x.dtype != s.dtype or x.dim() != s.dim() or x.shape[0] != s.shape[0]
                or x.shape[1] != s.shape[1] + 1 or x.shape[2:] != s.shape[2:]):
            return True
        return not (torch.equal(x[:, :-1], s) and torch.equal(real[:, :-1], self.seq_mask))

    def _follow(self, x, real, n_past):
        """Extend the sequence so far with this call's tokens."""
        s = self.seq
        if n_past == 0:
            self.seq, self.seq_mask = x, real
        elif (s is not None and s.shape[1] >= n_past and x.dtype == s.dtype and x.dim() == s.dim()
              and x.shape[2:] == s.shape[2:]):
            self.seq, self.seq_mask = torch.cat([s[:, :n_past], x], 1), real
        else:
            self.seq = self.seq_mask = None

    def _select(self, k, real, n):
        n = n[:, None]
        if self.positions == "prompt_last":
            hit = k == n - 1
        elif self.positions == "from_prompt_last":
            hit = k >= n - 1
        elif self.positions == "all":
            hit = torch.ones_like(real)
        else:  # absolute indices; negative ones count from the prompt's end
            wanted = torch.tensor(self.positions, device=k.device)
            wanted = torch.where(wanted < 0, n + wanted, wanted)  # (B, m)
            hit = (k[:, :, None] == wanted[:, None, :]).any(-1)
        return hit & real


class _ModelSteering:
    """The blocks open on one model, and the ``generate`` wrapper that tells each
    block of the calling thread where its prompt starts. One per model, shared
    by all threads; installed with the first open block, removed with the last."""

    def __init__(self, model):
        self.blocks: list[_Block] = []
        self.had_own = "generate" in vars(model)
        self.own = vars(model).get("generate")
        original = model.generate
        shared = self

        @functools.wraps(original)
        def generate(*args, **kwargs):
            mine = [b for b in shared.blocks if b.thread == threading.get_ident()]
            if not mine:
                return original(*args, **kwargs)
            for option, mode in REFUSED_GENERATE_OPTIONS.items():
                if kwargs.get(option) is not None:
                    raise ValueError(f"steering does not support {mode}: its extra forward calls are not a "
                                     f"continuation of the prompt")
            bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            extra = bound.get("kwargs", {})
            x = extra.get("inputs_embeds")
            if x is None:
                x = bound.get("inputs") if bound.get("inputs") is not None else extra.get("input_ids")
            if x is None:
                return original(*args, **kwargs)  # generate makes its own start token; plain-call rules
            for b in mine:
                b.tracker.start_generate(x, extra.get("attention_mask"))
            try:
                return original(*args, **kwargs)
            finally:
                for b in mine:
                    b.tracker.end_generate()

        self.wrapper = generate
        model.generate = generate

    def remove(self, model):
        if vars(model).get("generate") is self.wrapper:
            if self.had_own:
                model.generate = self.own
            else:
                del model.generate


_OPEN: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelSteering]" = weakref.WeakKeyDictionary()
_OPEN_LOCK = threading.Lock()


class _Block:
    def __init__(self, tracker):
        self.tracker = tracker
        self.thread = threading.get_ident()
        self.open = True

    def active(self) -> bool:
        """The hooks act only in the block's own thread, while it is open."""
        return self.open and threading.get_ident() == self.thread


def _recompile(model, base):
    """Drop the code torch.compile made for this model's forwards, so the next
    compiled call retraces with the hooks as they are now: code compiled while
    a module had no hooks never looks for them (torch._dynamo skips guards on
    empty hook dicts). Costs one recompilation per block entry and exit, only
    where compiled code exists."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo.eval_frame import remove_from_cache
    except ImportError:  # a torch without dynamo compiles nothing
        return
    for code in {type(model).forward.__code__, type(base).forward.__code__, torch.nn.Module._call_impl.__code__}:
        if _debug_get_cache_entry_list(code):
            remove_from_cache(code)


@contextlib.contextmanager
def steering(model, vectors, *, positions="from_prompt_last", mode: str = "add", prompt_length=None, scale=1.0):
    """Within the block, the forward passes of ``model`` have their hidden states at
    each layer ℓ in ``vectors`` edited, h ← h + s·v_ℓ ("add") or h ← s·v_ℓ
    ("replace"), at ``positions``. Hooks are removed on exit, also on error.
    Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    Positions count each row's real tokens over the whole sequence (prompt and
    generated): index k is the token's position as if its row ran alone, so
    padded batches (left or right, with their ``attention_mask``) steer what
    each prompt steers alone, and pads are never edited. n = the prompt's
    real-token count (per row):

    - ``"prompt_last"``: k = n − 1 only (the prompt's last token; generated
      tokens see it through the cache or through attention).
    - ``"from_prompt_last"`` (default; ``"last"``, its old alias, warns): every k ≥ n − 1,
      the prompt's last token and each generated token (the usual CAA / ActAdd
      way; what a llama.cpp control vector does after the prompt).
    - ``"all"``: every token, prompt included (what llama.cpp control vectors do).
    - a list of ints: those indices k; a negative p means n + p (−1 is the
      prompt's last token). An index past the prompt is steered when
      generation reaches it; none ever raises mid-generation.

    Inside ``model.generate(...)`` the prompt is generate's input, in every
    decoding mode: greedy, sampling, beam search (with
    ``num_return_sequences``), static and sliding-window caches, assisted and
    prompt-lookup decoding, ``inputs_embeds``, with or without the cache, and
    recurrent (state-space) caches. Modes whose forward calls are not a
    continuation of the prompt are refused before generation starts:
    ``custom_generate``, ``negative_prompt_ids``, DoLa, contrastive search.
    Outside generate, the prompt is the first forward call inside the block; a
    later call that reuses a cache continues it; a later call without cached
    tokens continues it when its tokens are the sequence so far plus one
    token, else it is a new prompt. ``prompt_length`` (an int, or one per
    row, counting real tokens) overrides the detected length. Blocks run
    outside the model's own forward (``SplitModel``'s upper pass) are not
    edited. Pass the attention mask with every call of a padded batch
    (generate does).

    Per-row steering: a (R, d) vector at a layer, or ``scale`` with one number
    per row, steers row r of the batch with its own s_r·v_{ℓ,r}; a batch of
    m·R rows (beam search, ``num_return_sequences``) gives rows m·r … m·r + m − 1
    row r's vector.

    Threads: a block steers only the forward calls made in the thread that
    opened it (so blocks in several threads on one model each steer their own
    calls); run ``generate`` in the thread that opened the block.
    torch.compile: a compiled model is steered inside the block and plain
    after it. The hooks run eagerly (a graph break each), and code compiled
    for the model's forward before the block (which never looks for hooks) is
    dropped on entry and exit, so the next compiled call retraces: one
    recompilation per block where compiled code exists (``fullgraph=True``
    code fails to retrace with dynamo's error). A ``torch.compile``'d wrapper
    passed as ``model`` is refused: pass the module it wraps.

    Args:
        model: a Hugging Face causal LM whose decoder blocks
            ``fisherfast.split.architecture`` finds (any decoder-only type,
            hybrid and state-space ones included).
        vectors: {layer ℓ ∈ [0, L]: (d,) or (R, d) floating tensor}, or a
            ``fisherfast.steer.SteeringVectors``.
        positions: see above.
        mode: "add" or "replace".
        prompt_length: None (detect) or the prompt's real-token count(s).
        scale: s, a number, a sequence / (R,) tensor of one number per row,
            or {ℓ: either} (layers left out get 1).

    Raises:
        ValueError: for a bad layer, vector, scale, positions, mode or
            prompt_length, before any hook is registered; for a generate
            option that cannot be steered, or a batch that is not a multiple
            of the per-row count, before generation starts; for a call whose
            attention mask is not (batch, cached + new tokens) or whose batch
            differs from its prompt's, before that call edits anything.

    Example::

        with steering(model, {12: delta}):
            out = model.generate(**inputs, max_new_tokens=20)
    """
    if hasattr(model, "_orig_mod") and isinstance(model, torch.nn.Module):
        raise ValueError("steering: model is a torch.compile'd module, whose compiled code never runs the steering "
                         "hooks; pass the uncompiled model (model._orig_mod)")
    arch = architecture(model)
    base, blocks = arch.base, arch.blocks
    L = len(blocks)
    where_spec = _check_positions(positions)
    if mode not in EDIT_MODES:
        raise ValueError(f"mode: expected one of {EDIT_MODES}, got {mode!r}")
    lengths = _check_prompt_length(prompt_length)
    if arch.head is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings to read the hidden size from")
    d = arch.head.weight.shape[1]
    table, rows = _check_vectors(vectors, L, d)
    scales, rows = _check_scale(scale, list(table), rows)
    if rows is not None:
        table = {layer: (v.double() * (scales[layer][:, None] if scales[layer].dim() else scales[layer]))
                 .to(v.dtype).expand(rows, d) for layer, v in table.items()}
    else:
        table = {layer: (v.double() * scales[layer]).to(v.dtype) for layer, v in table.items()}

    tracker = _Tracker(base, where_spec, lengths, rows)
    block = _Block(tracker)
    cast: dict = {}

    def edit(hidden, layer):
        if not block.active() or tracker.where is None:
            return hidden
        where = tracker.where
        if hidden.dim() != 3 or hidden.shape[:2] != where.shape:
            raise RuntimeError(f"expected hidden states of shape (batch, seq, d) = {(*where.shape, '·')}, "
                               f"got {tuple(hidden.shape)}")
        key = (layer, hidden.device, hidden.dtype)
        if key not in cast:
            cast[key] = table[layer].to(device=hidden.device, dtype=hidden.dtype)
        v = cast[key]
        if tracker.row_index is not None:
            v = v[tracker.row_index][:, None, :]  # (B, 1, d)
        new = hidden + v if mode == "add" else v.expand_as(hidden)
        return torch.where(where[..., None], new, hidden)

    # every hook runs eagerly, also inside code torch.compile traces in the block (a graph break): compiled code
    # keeps calling the hooks it saw, which do nothing once the block is closed
    def pre_hook(layer):
        @torch.compiler.disable
        def hook(module, args, kwargs):
            if args:
                return (edit(args[0], layer), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], layer)}
        return hook

    def post_hook(layer):
        @torch.compiler.disable
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0], layer), *output[1:])
            return edit(output, layer)
        return hook

    @torch.compiler.disable
    def begin(module, args, kwargs):
        if block.active():
            tracker.begin(module, args, kwargs)

    @torch.compiler.disable
    def end(*_):
        if block.open and threading.get_ident() == block.thread:
            tracker.end()

    handles = []
    with _OPEN_LOCK:
        shared = _OPEN.get(model)
        if shared is None:
            shared = _OPEN[model] = _ModelSteering(model)
        shared.blocks.append(block)
    try:
        handles.append(base.register_forward_pre_hook(begin, with_kwargs=True))
        handles.append(base.register_forward_hook(end, always_call=True))
        for layer in table:
            if layer < L:
                handles.append(blocks[layer].register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
            else:
                handles.append(blocks[L - 1].register_forward_hook(post_hook(layer)))
        _recompile(model, base)
        yield model
    finally:
        block.open = False
        for handle in handles:
            handle.remove()
        _recompile(model, base)
        with _OPEN_LOCK:
            shared.blocks.remove(block)
            if not shared.blocks:
                shared.remove(model)
                del _OPEN[model]
