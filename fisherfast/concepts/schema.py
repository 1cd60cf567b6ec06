"""Concept schemas and the concept distribution q of a next-token distribution
(docs/design.md §4, concept-restricted mode; §6).

A schema is n_c disjoint sets of token ids C_1..C_{n_c} (entries are a token
id or a sequence of ids, ids in [0, V), sets disjoint) plus the "other" bin of
every remaining token. For next-token probabilities p = softmax(z),

    q = (q_1, …, q_{n_c}, q_other),  q_k = Σ_{t∈C_k} p_t,  q_other = 1 − Σ_k q_k,

a distribution over n_c + 1 bins. ``ConceptSchema.log_distribution`` is the one
computation of q in fisherfast (the metric's concept mode, the geodesic
metric and the path evaluation all use it): each bin is a log-sum-exp of
log p over its tokens in float64 (q_other directly over the uncovered tokens,
never as 1 − Σ_k q_k), so tiny bins keep their relative accuracy and √q has
finite derivatives.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Mapping, Sequence

import torch

from fisherfast.checks import check_contexts, check_int, check_points, expected
from fisherfast.concepts.scores import check_token_ids

__all__ = ["ConceptSchema", "concept_distributions", "check_schema", "concept_schema"]


def _parse(concepts, V: int) -> tuple[list[str], list[torch.Tensor]]:
    if concepts is None:
        raise ValueError("concepts: expected a sequence (or mapping name → entry) of token ids or token-id "
                         "sequences, got None")
    if isinstance(concepts, Mapping):
        names, entries = [str(n) for n in concepts], list(concepts.values())
    elif isinstance(concepts, (list, tuple)):
        names, entries = [str(i) for i in range(len(concepts))], list(concepts)
    else:
        raise TypeError(expected("concepts", "a sequence or mapping of token ids", type(concepts)))
    if not entries:
        raise ValueError("concepts: expected at least one concept, got none")
    seen: dict[int, int] = {}
    token_sets = []
    for i, entry in enumerate(entries):
        single = isinstance(entry, numbers.Integral) and not isinstance(entry, bool)
        ids = check_token_ids(f"concept {names[i]!r}", [entry] if single else entry, vocab_size=V)
        for t in ids.tolist():
            if t in seen:
                raise ValueError(f"concepts: expected disjoint concepts, got token {t} in {names[seen[t]]!r} "
                                 f"and {names[i]!r}")
            seen[t] = i
        token_sets.append(ids)
    return names, token_sets


class ConceptSchema:
    """n_c disjoint token sets and the "other" bin over a vocabulary of V tokens.

    Args:
        concepts: a non-empty sequence, or a mapping name → entry, whose
            entries are a token id or a sequence (list, tuple, range, tensor)
            of token ids; concepts must be disjoint. A ``ConceptSchema`` is
            returned as it is by ``ConceptSchema.of``.
        vocab_size: V, the model's vocabulary size (``split.V``).

    Attributes:
        names: the n_c concept names (mapping keys, or "0".."n_c-1").
        bins: ``names`` followed by "other" (n_c + 1 entries).
        token_sets: n_c LongTensors of token ids.
        V: the vocabulary size; n_concepts: n_c.

    Raises:
        ValueError: no concepts, an empty concept, an id outside [0, V), or a
            token in two concepts; V not an int ≥ 2.
        TypeError: concepts is neither a sequence nor a mapping.
    """

    def __init__(self, concepts, vocab_size: int):
        vocab_size = check_int("vocab_size", vocab_size, minimum=2)
        names, token_sets = _parse(concepts, vocab_size)
        self.names = tuple(names)
        self.bins = self.names + ("other",)
        self.token_sets = token_sets
        self.V, self.n_concepts = vocab_size, len(token_sets)
        covered = torch.zeros(vocab_size, dtype=torch.bool)
        covered[torch.cat(token_sets)] = True
        self.other_ids = (~covered).nonzero().flatten()

    @classmethod
    def of(cls, concepts, vocab_size: int) -> "ConceptSchema":
        """``concepts`` itself if it is a ConceptSchema over V = ``vocab_size``, else
        ``ConceptSchema(concepts, vocab_size)``."""
        if isinstance(concepts, ConceptSchema):
            if concepts.V != vocab_size:
                raise ValueError(expected("concepts", f"a schema over the model's V = {vocab_size}",
                                          f"one over V = {concepts.V}", raw=True))
            return concepts
        return cls(concepts, vocab_size)

    @property
    def K(self) -> int:
        """Deprecated name of ``n_concepts`` (K is the vocabulary size in ``SketchSpec``)."""
        warnings.warn("ConceptSchema.K is deprecated; use ConceptSchema.n_concepts", DeprecationWarning,
                      stacklevel=2)
        return self.n_concepts

    def __repr__(self) -> str:
        return f"ConceptSchema(n_concepts={self.n_concepts}, V={self.V}, names={list(self.names)})"

    @property
    def concepts(self) -> dict[str, list[int]]:
        """{name: token ids}, a form the constructor takes back."""
        return {name: ids.tolist() for name, ids in zip(self.names, self.token_sets)}

    def index(self, concept, name: str = "concept") -> int:
        """The bin index of a concept given by name or by index in [0, n_c);
        ValueError naming ``name`` otherwise."""
        if isinstance(concept, str) and concept in self.names:
            return self.names.index(concept)
        if isinstance(concept, numbers.Integral) and not isinstance(concept, bool) and \
                0 <= concept < self.n_concepts:
            return int(concept)
        raise ValueError(expected(name, f"one of {list(self.names)} or an int in [0, {self.n_concepts})", concept))

    def check(self, split) -> "ConceptSchema":
        """``self`` if built for the model's vocabulary; ValueError otherwise."""
        if self.V != split.V:
            raise ValueError(expected("schema", f"a schema over the model's V = {split.V}",
                                      f"one over V = {self.V}", raw=True))
        return self

    def log_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """log q (..., n_c + 1) in float64 from logits (..., V); differentiable."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(expected("logits", f"a floating tensor (..., {self.V})", type(logits)))
        if logits.ndim < 1 or logits.shape[-1] != self.V:
            raise ValueError(expected("logits", f"shape (..., {self.V})", logits))
        logp = torch.log_softmax(logits.double(), dim=-1)
        bins = [torch.logsumexp(logp[..., ids.to(logp.device)], dim=-1) for ids in self.token_sets]
        if self.other_ids.numel() == 0:
            # No other token: q_other ≡ 0, a constant (a log-sum-exp over nothing has NaN gradients).
            bins.append(torch.full_like(bins[0], -torch.inf))
        else:
            bins.append(torch.logsumexp(logp[..., self.other_ids.to(logp.device)], dim=-1))
        return torch.stack(bins, dim=-1)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """q (..., n_c + 1) in float64 from logits (..., V)."""
        return self.log_distribution(logits).exp()


def check_schema(split, schema) -> ConceptSchema:
    """``schema`` if it is a ConceptSchema over ``split``'s vocabulary."""
    if not isinstance(schema, ConceptSchema):
        raise TypeError(expected("schema", "a ConceptSchema", type(schema)))
    return schema.check(split)


def concept_distributions(split, contexts: Sequence, schema: ConceptSchema, points: torch.Tensor) -> torch.Tensor:
    """q at each point injected into each context: (n, C, n_c + 1) float64.

    ``points`` (n, d) (or (d,), giving (1, C, n_c + 1)) are hidden states at
    layer ``split.layer``; each replaces the state at the context's position
    (``split.logits(ctx, x)``). Cost: one batched upper-map forward of n
    tokens per context.
    """
    contexts = check_contexts(split, contexts)
    check_schema(split, schema)
    X = check_points("points", points, split.d, dtype=split.W.dtype)
    with torch.no_grad():
        return torch.stack([schema.distribution(split.logits(ctx, X)) for ctx in contexts], dim=1)


def concept_schema(concepts, V: int):
    """Deprecated: ``(list(schema.names), schema.token_sets)`` of ``ConceptSchema(concepts, V)``."""
    warnings.warn("fisherfast.concepts.concept_schema is deprecated; use fisherfast.concepts.ConceptSchema "
                  "(its .names and .token_sets)", DeprecationWarning, stacklevel=2)
    schema = ConceptSchema(concepts, V)
    return list(schema.names), schema.token_sets
