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
with and without the KV cache. Each call's places are read from what the model
receives, not guessed from shapes: the 2-D ``attention_mask`` (which columns
are real tokens; generate passes the mask of the whole sequence) and the
cache's length before the call (``past_key_values.get_seq_length()``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Mapping, Sequence

import torch

from fisherfast.split.architectures import _ARCHS, decoder_blocks
from fisherfast.steer.vectors import SteeringVectors

EDIT_MODES = ("add", "replace")
POSITION_CHOICES = ("prompt_last", "from_prompt_last", "all")
POSITION_ALIASES = {"last": "from_prompt_last"}


def _check_positions(positions):
    if isinstance(positions, str):
        name = POSITION_ALIASES.get(positions, positions)
        if name in POSITION_CHOICES:
            return name
    elif isinstance(positions, Sequence) and positions and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions):
        return tuple(positions)
    raise ValueError(f"positions must be one of {POSITION_CHOICES} (or 'last', an alias of 'from_prompt_last'), "
                     f"or a non-empty list of ints, got {positions!r}")


def _check_prompt_length(prompt_length):
    if prompt_length is None:
        return None
    ok_int = lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1  # noqa: E731
    if ok_int(prompt_length):
        return prompt_length
    if isinstance(prompt_length, Sequence) and prompt_length and all(ok_int(n) for n in prompt_length):
        return tuple(prompt_length)
    raise ValueError(f"prompt_length must be None, an int ≥ 1 or a non-empty list of ints ≥ 1 (one per row), "
                     f"got {prompt_length!r}")


@dataclasses.dataclass
class _Prompt:
    n: torch.Tensor                     # (B,) real tokens in each row's prompt


class _Tracker:
    """Follows one sequence (or batch of rows) through the model's forward calls
    and says, for each call, which of its (row, column) places to edit.

    Index k of a token = number of real (mask = 1) tokens before it in its row,
    over prompt and generated tokens: what its position would be if the row
    ran alone. Pads are never edited.
    """

    def __init__(self, base, positions, prompt_length):
        self.signature = inspect.signature(base.forward)
        self.positions = positions
        self.prompt_length = prompt_length
        self.prompt: _Prompt | None = None
        # the sequence so far (B, T[, d]): input_ids / inputs_embeds of the calls since the prompt, and its
        # (B, T) bool mask of real tokens; None when it cannot be followed (a cache filled outside the block)
        self.seq: torch.Tensor | None = None
        self.seq_mask: torch.Tensor | None = None
        self.where: torch.Tensor | None = None  # (B, q) bool for the call in progress; None: edit nothing

    def begin(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x = bound.get("input_ids")
        if x is None:
            x = bound.get("inputs_embeds")
        if x is None:  # the model will raise its own error
            return
        B, q = x.shape[0], x.shape[1]
        past = bound.get("past_key_values")
        n_past = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        mask = bound.get("attention_mask")
        if mask is None:
            real = torch.ones(B, n_past + q, dtype=torch.bool, device=x.device)
        elif mask.dim() != 2 or tuple(mask.shape) != (B, n_past + q):
            raise ValueError(f"steering reads a 2-D attention_mask of shape (batch, cached + new tokens) = "
                             f"({B}, {n_past + q}), got {tuple(mask.shape)}")
        else:
            real = mask.to(torch.bool)
        k = real.cumsum(-1) - 1  # (B, n_past + q): index among the row's real tokens
        if self._starts_prompt(x, real, n_past):
            self._record(x, real, n_past)
        elif self.prompt.n.shape[0] != B:
            raise ValueError(f"a forward call of batch {B} continues a prompt of batch {self.prompt.n.shape[0]}; "
                             f"open a new steering block for a new batch")
        self._follow(x, real, n_past)
        where = self._select(k[:, -q:], real[:, -q:])
        self.where = where if bool(where.any()) else None  # one check per call, not per block

    def end(self, *_):
        self.where = None

    def _starts_prompt(self, x, real, n_past) -> bool:
        """The first call in the block is the prompt; a later call that reuses a
        cache continues it. A later call without cached tokens (with or without
        an empty cache) continues it only when its tokens are exactly the
        sequence so far plus one token (each step of ``generate(use_cache=False)``
        re-runs the whole sequence); any other such call is a new prompt — e.g.
        a second ``generate`` whose prompt extends the first one's (a chat turn)."""
        if self.prompt is None:
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
        elif (s is not None and s.shape[1] == n_past and x.dtype == s.dtype and x.dim() == s.dim()
              and x.shape[2:] == s.shape[2:]):
            self.seq, self.seq_mask = torch.cat([s, x], 1), real
        else:
            self.seq = self.seq_mask = None

    def _record(self, x, real, n_past):
        B = x.shape[0]
        if self.prompt_length is None:
            n = real.sum(-1)
        else:
            lengths = (self.prompt_length,) * B if isinstance(self.prompt_length, int) else self.prompt_length
            if len(lengths) != B:
                raise ValueError(f"prompt_length has {len(lengths)} entries for a batch of {B} rows")
            n = torch.tensor(lengths, device=x.device)
        if isinstance(self.positions, tuple):
            low = min(self.positions)
            short = (n + low < 0).nonzero()
            if low < 0 and len(short):
                row = int(short[0, 0])
                raise ValueError(f"positions {list(self.positions)}: {low} reaches before the start of row {row}'s "
                                 f"prompt of {int(n[row])} tokens")
        self.prompt = _Prompt(n)

    def _select(self, k, real):
        n = self.prompt.n[:, None]
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


def _edit(hidden: torch.Tensor, vector: torch.Tensor, where: torch.Tensor, mode: str) -> torch.Tensor:
    if hidden.dim() != 3 or hidden.shape[:2] != where.shape:
        raise RuntimeError(f"expected hidden states of shape (batch, seq, d) = {(*where.shape, '·')}, "
                           f"got {tuple(hidden.shape)}")
    v = vector.to(device=hidden.device, dtype=hidden.dtype)
    new = hidden + v if mode == "add" else v.expand_as(hidden)
    return torch.where(where[..., None], new, hidden)


@contextlib.contextmanager
def steering(model, vectors, *, positions="from_prompt_last", mode: str = "add", prompt_length=None):
    """Within the block, the forward passes of ``model`` have their hidden states at
    each layer ℓ in ``vectors`` edited, h ← h + v_ℓ ("add") or h ← v_ℓ
    ("replace"), at ``positions``. Hooks are removed on exit, also on error.
    Works under ``torch.no_grad()`` and ``torch.inference_mode()``.

    Positions count each row's real tokens over the whole sequence (prompt and
    generated): index k is the token's position as if its row ran alone, so
    padded batches (left or right, with their ``attention_mask``) steer what
    each prompt steers alone, and pads are never edited. n = the prompt's
    real-token count (per row):

    - ``"prompt_last"``: k = n − 1 only (the prompt's last token; generated
      tokens see it through the cache or through attention).
    - ``"from_prompt_last"`` (default; ``"last"`` is its alias): every k ≥ n − 1,
      the prompt's last token and each generated token (the usual CAA / ActAdd
      way; what a llama.cpp control vector does after the prompt).
    - ``"all"``: every token, prompt included (what llama.cpp control vectors do).
    - a list of ints: those indices k; a negative p means n + p (−1 is the
      prompt's last token). An index past the prompt is steered when
      generation reaches it; none ever raises mid-generation.

    The prompt is the first forward call inside the block. A later call that
    reuses a KV cache continues it; a later call without cached tokens continues
    it when its tokens are the sequence so far plus one token (each step of
    ``generate(use_cache=False)``), else it is a new prompt — so several
    ``generate`` calls in one block each steer their own prompt, also when one
    prompt extends another's output. ``prompt_length`` (an int, or one per row, counting real
    tokens) overrides the detected length. Blocks run outside the model's own
    forward (``SplitModel``'s upper pass) are not edited. Pass the attention
    mask with every call of a padded batch (generate does).

    Args:
        model: a supported Hugging Face causal LM (``fisherfast.split``).
        vectors: {layer ℓ ∈ [0, L]: (d,) floating tensor}, or a
            ``fisherfast.steer.SteeringVectors``.
        positions: see above.
        mode: "add" or "replace".
        prompt_length: None (detect) or the prompt's real-token count(s).

    Raises:
        ValueError: for a bad layer, vector, positions, mode or prompt_length,
            before any hook is registered; for a call whose attention mask is
            not (batch, cached + new tokens) or whose batch differs from its
            prompt's, before that call edits anything.

    Example::

        with steering(model, {12: delta}):
            out = model.generate(**inputs, max_new_tokens=20)
    """
    blocks = decoder_blocks(model)
    L = len(blocks)
    where_spec = _check_positions(positions)
    if mode not in EDIT_MODES:
        raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
    lengths = _check_prompt_length(prompt_length)
    if isinstance(vectors, SteeringVectors):
        vectors = vectors.vectors
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty mapping {layer: (d,) tensor} or a SteeringVectors")
    d = model.get_output_embeddings().weight.shape[1]
    for layer, v in vectors.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= L:
            raise ValueError(f"vectors: layer must be an int in [0, {L}], got {layer!r}")
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (d,) or not v.is_floating_point():
            raise ValueError(f"vectors[{layer}] must be a floating tensor of shape ({d},), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"vectors[{layer}] contains NaN or Inf")

    base = getattr(model, _ARCHS[model.config.model_type].base)
    tracker = _Tracker(base, where_spec, lengths)

    def edit(hidden, vector):
        if tracker.where is None:
            return hidden
        return _edit(hidden, vector, tracker.where, mode)

    def pre_hook(vector):
        def hook(module, args, kwargs):
            if args:
                return (edit(args[0], vector), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], vector)}
        return hook

    def post_hook(vector):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0], vector), *output[1:])
            return edit(output, vector)
        return hook

    handles = []
    try:
        handles.append(base.register_forward_pre_hook(tracker.begin, with_kwargs=True))
        handles.append(base.register_forward_hook(tracker.end, always_call=True))
        for layer, v in vectors.items():
            v = v.detach().clone()
            if layer < L:
                handles.append(blocks[layer].register_forward_pre_hook(pre_hook(v), with_kwargs=True))
            else:
                handles.append(blocks[L - 1].register_forward_hook(post_hook(v)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
