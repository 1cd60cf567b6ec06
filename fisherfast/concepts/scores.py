"""Concept scores: what steering raises, and the checks of token ids (docs/design.md §5).

Two kinds of concept score φ at layer ℓ, position t of a ``SplitModel``, both
with one interface — ``concept.score(split, ctx, h)`` (φ, differentiable in h),
``concept.probability(split, ctx, h)``, ``concept.removed_tokens`` (what
off-target distortion leaves out) and ``concept.check(split, ctx)`` (raises
before any work):

``ConceptScore(target, source=None)``: a *set* of alternative next tokens T,

    log-probability  φ(z) = log Σ_{v∈T} p_v = logsumexp(z_T) − logsumexp(z)
    log-odds         φ(z) = log Σ_{v∈T} p_v − log Σ_{v∈S} p_v

with z the next-token logits at t; probability Σ_{v∈T} p_v.

``SequenceConcept(tokens)``: a *sequence* y₁…y_n continuing the prompt,

    φ(h) = log p(y₁…y_n | prompt) = Σ_i log p(y_i | prompt, y_<i),

the edited state h at (ℓ, t) reaching positions t+1…t+n−1 through attention
in blocks ℓ…L−1 while every lower-layer state stays fixed
(``SplitModel.context(ids, continuation=tokens)`` and
``SplitModel.sequence_logits``); probability exp φ, the model's own
teacher-forced probability of the continuation. Repeated ids are fine
(" Washington D.C." may repeat "."). Its off-target distortion is measured on
the next-token distribution at t with y₁ removed.

``check_token_ids`` is the one validation of token ids used by every module
that takes them: non-empty, ints (Python or integer tensors, never bool), in
[0, V) when V is known, repeated ids allowed only where the kind permits.
"""
from __future__ import annotations

import numbers

import torch

from fisherfast.checks import check_real, expected

__all__ = ["check_token_ids", "check_logits", "check_target_score", "ConceptScore", "SequenceConcept", "check_concept",
           "CONCEPT_TYPES"]


def check_token_ids(name: str, ids, *, vocab_size: int | None = None, allow_repeats: bool = False) -> torch.Tensor:
    """Validated token ids as a LongTensor (n,) on the CPU.

    Args:
        name: the argument's name, for the error message.
        ids: a sequence (list, tuple, range) of ints or an integer tensor (flattened).
        vocab_size: V; ids must lie in [0, V) (None: only ≥ 0 is checked).
        allow_repeats: whether an id may occur twice (a sequence: yes; a set: no).
    Raises:
        ValueError naming ``name``: empty, not ints (bools and floats rejected),
        negative or ≥ V, or repeated when not allowed.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(expected(name, "integer token ids", f"a tensor of dtype {ids.dtype}", raw=True))
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, range)) or len(ids) == 0:
        raise ValueError(expected(name, "a non-empty sequence of token ids", ids))
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(expected(name, "int token ids", ids))
    ids = [int(i) for i in ids]
    bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
    if bad:
        bound = "≥ 0" if vocab_size is None else f"in [0, {vocab_size})"
        raise ValueError(expected(name, f"token ids {bound}", f"{bad[0]} (outside the vocabulary)", raw=True))
    if not allow_repeats and len(set(ids)) != len(ids):
        raise ValueError(expected(name, "distinct token ids", f"repeated ones: {ids!r}", raw=True))
    return torch.tensor(ids, dtype=torch.long)


def check_logits(logits, top: int, what: str = "(..., V)") -> None:
    """ValueError unless logits is a floating (…, V) tensor with V > top (the largest token id used)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(expected("logits", f"a floating tensor of shape {what}",
                                  logits if isinstance(logits, torch.Tensor) else type(logits)))
    V = logits.shape[-1]
    if top >= V:
        raise ValueError(expected("logits", f"more than {top} logits (the largest token id)",
                                  f"{V}: token id {top} is outside the vocabulary", raw=True))


class ConceptScore:
    """φ over next-token logits: the log-probability of ``target`` tokens, or with
    ``source`` their log-odds against the source tokens (module docstring).

    Args:
        target: token ids T (distinct).
        source: token ids S (distinct, disjoint from T), or None for the log-probability.

    Calling it on logits (..., V) gives φ (...); ``target_probability(logits)``
    gives Σ_{v∈T} p_v (...). ``score``/``probability`` do the same at a hidden
    state h (..., d) through ``split.logits``.
    """

    def __init__(self, target, source=None):
        self.target = check_token_ids("target", target)
        self.source = None if source is None else check_token_ids("source", source)
        if self.source is not None and set(self.target.tolist()) & set(self.source.tolist()):
            raise ValueError(expected("source", "token ids disjoint from target", self.source.tolist()))

    @property
    def kind(self) -> str:
        return "log_probability" if self.source is None else "log_odds"

    @property
    def removed_tokens(self) -> torch.Tensor:
        """T ∪ S: the tokens off-target distortion leaves out."""
        return self.target if self.source is None else torch.cat([self.target, self.source])

    def _top(self) -> int:
        return int(self.removed_tokens.max())

    def _check(self, logits: torch.Tensor) -> None:
        check_logits(logits, self._top())

    def check(self, split, ctx=None) -> None:
        """Raise ValueError if a token id is ≥ the model's vocabulary size."""
        if self._top() >= split.V:
            raise ValueError(expected("concept", f"token ids in [0, {split.V}) (the model's vocabulary)",
                                      self._top()))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        on_target = torch.logsumexp(logits[..., self.target.to(logits.device)], dim=-1)
        if self.source is None:
            return on_target - torch.logsumexp(logits, dim=-1)
        return on_target - torch.logsumexp(logits[..., self.source.to(logits.device)], dim=-1)

    def target_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Σ_{v∈T} p_v (...)."""
        self._check(logits)
        return torch.softmax(logits, dim=-1)[..., self.target.to(logits.device)].sum(-1)

    def score(self, split, ctx, h: torch.Tensor) -> torch.Tensor:
        """φ(h) (...) for h (..., d): the score of ``split.logits(ctx, h)``."""
        return self(split.logits(ctx, h))

    def probability(self, split, ctx, h: torch.Tensor) -> torch.Tensor:
        """Σ_{v∈T} p_v(h) (...)."""
        return self.target_probability(split.logits(ctx, h))

    def __repr__(self) -> str:
        source = "" if self.source is None else f", source={self.source.tolist()}"
        return f"ConceptScore(target={self.target.tolist()}{source})"


class SequenceConcept:
    """φ(h) = log p(y₁…y_n | prompt) for the token sequence ``tokens`` (module docstring).

    Args:
        tokens: y₁…y_n (n ≥ 1; repeated ids allowed).

    ``score(split, ctx, h)`` needs a context built with the same continuation,
    ``split.context(prompt_ids, continuation=concept.tokens)``. Calling the
    concept on teacher-forced logits (..., n, V) (row i predicts y_{i+1})
    gives Σ_i log p(y_i) (...).
    """

    kind = "sequence"

    def __init__(self, tokens):
        if isinstance(tokens, torch.Tensor) and tokens.dim() != 1:
            raise ValueError(expected("tokens", "a 1-D sequence of token ids", tokens))
        self.tokens = check_token_ids("tokens", tokens, allow_repeats=True)

    @property
    def removed_tokens(self) -> torch.Tensor:
        """y₁: off-target distortion is the next-token distribution at t without it."""
        return self.tokens[:1]

    def check(self, split, ctx=None) -> None:
        """Raise ValueError if a token is outside the vocabulary or ``ctx`` does not
        carry this continuation."""
        top = int(self.tokens.max())
        if top >= split.V:
            raise ValueError(expected("concept", f"token ids in [0, {split.V}) (the model's vocabulary)", top))
        if ctx is None:
            return
        continuation = getattr(ctx, "continuation", None)
        if continuation is None:
            raise ValueError("ctx: expected a context with the SequenceConcept's continuation, got one without: "
                             "split.context(prompt_ids, continuation=concept.tokens)")
        if not torch.equal(continuation.ids.cpu(), self.tokens):
            raise ValueError(f"ctx: expected the concept's continuation {self.tokens.tolist()}, got "
                             f"{continuation.ids.tolist()}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        n = len(self.tokens)
        check_logits(logits, int(self.tokens.max()), f"(..., {n}, V)")
        if logits.dim() < 2 or logits.shape[-2] != n:
            raise ValueError(expected("logits", f"shape (..., {n}, V) (one row per token)", logits))
        logp = torch.log_softmax(logits, dim=-1)
        index = self.tokens.to(logits.device).expand(*logits.shape[:-1])[..., None]
        return logp.gather(-1, index)[..., 0].sum(-1)

    def score(self, split, ctx, h: torch.Tensor) -> torch.Tensor:
        """φ(h) (...) for h (..., d), from ``split.sequence_logits(ctx, h)``."""
        self.check(split, ctx)
        return self(split.sequence_logits(ctx, h))

    def probability(self, split, ctx, h: torch.Tensor) -> torch.Tensor:
        """p(y₁…y_n | prompt) = exp φ(h) (...)."""
        return self.score(split, ctx, h).exp()

    def __repr__(self) -> str:
        return f"SequenceConcept(tokens={self.tokens.tolist()})"


CONCEPT_TYPES = (ConceptScore, SequenceConcept)


def check_target_score(concept, target_score) -> float:
    """φ* as a float: finite, and ≤ 0 for a log-probability or sequence concept
    (p ≤ 1), so an unreachable target is refused before any work."""
    target_score = check_real("target_score", target_score)
    if concept.kind in ("log_probability", "sequence") and target_score > 0:
        raise ValueError(expected("target_score", f"a number ≤ 0 for a {concept.kind} concept (a log-probability: "
                                  "p ≤ 1; for p* pass math.log(p*))", target_score))
    return target_score


def check_concept(concept, split=None, ctx=None):
    """``concept`` if it is a ConceptScore or SequenceConcept that fits ``split`` and
    ``ctx`` (when given); TypeError/ValueError otherwise."""
    if not isinstance(concept, CONCEPT_TYPES):
        raise TypeError(expected("concept", "a ConceptScore or SequenceConcept", type(concept)))
    if split is not None:
        concept.check(split, ctx)
    return concept
