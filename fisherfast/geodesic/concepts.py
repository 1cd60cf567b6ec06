"""Concept schemas and the concept distribution q of a next-token distribution
(docs/design.md §4, concept-restricted mode; §6).

A schema is K disjoint sets of token ids C_1..C_K (the rules of
``fisherfast.metric.pullback_fisher(mode="concept")``: entries are a token id
or a sequence of ids, ids in [0, V), sets disjoint) plus the "other" bin of
every remaining token. For next-token probabilities p = softmax(z),

    q = (q_1, …, q_K, q_other),  q_k = Σ_{t∈C_k} p_t,  q_other = 1 − Σ_k q_k,

a distribution over B = K + 1 bins. Each bin is computed as a log-sum-exp of
log p over its tokens in float64 (q_other directly over the uncovered tokens,
never as 1 − Σ_k q_k), so tiny bins keep their relative accuracy and √q has
finite derivatives.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fisherfast.concepts import concept_schema


class ConceptSchema:
    """K disjoint token sets and the "other" bin over a vocabulary of V tokens.

    Args:
        concepts: a non-empty sequence, or a mapping name → entry, whose
            entries are a token id or a sequence of token ids (as
            ``pullback_fisher(mode="concept", concepts=...)``).
        vocab_size: V, the model's vocabulary size (``split.V``).

    Attributes:
        names: the K concept names (mapping keys, or "0".."K-1").
        bins: ``names`` followed by "other" (B = K + 1 entries).
        token_sets: K LongTensors of token ids.
        V, K.
    """

    def __init__(self, concepts, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size: expected an int ≥ 2 (the model's V), got {vocab_size!r}")
        names, token_sets = concept_schema(concepts, vocab_size)
        self.names = tuple(names)
        self.bins = self.names + ("other",)
        self.token_sets = token_sets
        self.V, self.K = vocab_size, len(token_sets)
        covered = torch.zeros(vocab_size, dtype=torch.bool)
        covered[torch.cat(token_sets)] = True
        self._other_ids = (~covered).nonzero().flatten()

    def __repr__(self) -> str:
        return f"ConceptSchema(K={self.K}, V={self.V}, names={list(self.names)})"

    @property
    def concepts(self) -> dict[str, list[int]]:
        """{name: token ids}, the form ``pullback_fisher(concepts=...)`` takes."""
        return {name: ids.tolist() for name, ids in zip(self.names, self.token_sets)}

    def index(self, concept) -> int:
        """The bin index of a concept given by name or by index in [0, K)."""
        if isinstance(concept, str):
            if concept not in self.names:
                raise ValueError(f"concept: expected one of {list(self.names)}, got {concept!r}")
            return self.names.index(concept)
        if isinstance(concept, bool) or not isinstance(concept, int) or not 0 <= concept < self.K:
            raise ValueError(f"concept: expected a name or an int in [0, {self.K}), got {concept!r}")
        return concept

    def log_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """log q (..., B) in float64 from logits (..., V); differentiable."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits: expected a floating tensor (..., {self.V}), got {type(logits).__name__}")
        if logits.ndim < 1 or logits.shape[-1] != self.V:
            raise ValueError(f"logits: expected shape (..., {self.V}), got {tuple(logits.shape)}")
        logp = torch.log_softmax(logits.double(), dim=-1)
        bins = [torch.logsumexp(logp[..., ids.to(logp.device)], dim=-1) for ids in self.token_sets]
        if self._other_ids.numel() == 0:
            # No other token: q_other ≡ 0, a constant (a log-sum-exp over nothing has NaN gradients).
            bins.append(torch.full_like(bins[0], -torch.inf))
        else:
            bins.append(torch.logsumexp(logp[..., self._other_ids.to(logp.device)], dim=-1))
        return torch.stack(bins, dim=-1)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """q (..., B) in float64 from logits (..., V)."""
        return self.log_distribution(logits).exp()


def concept_distributions(split, contexts: Sequence, schema: ConceptSchema, points: torch.Tensor) -> torch.Tensor:
    """q at each point injected into each context: (n, C, B) float64.

    ``points`` (n, d) (or (d,), giving (1, C, B)) are hidden states at layer
    ``split.layer``; each replaces the state at the context's position
    (``split.logits(ctx, x)``). Cost: one batched upper-map forward of n
    tokens per context.
    """
    contexts = check_contexts(split, contexts)
    check_schema(split, schema)
    X = check_points(split, points, "points")
    with torch.no_grad():
        return torch.stack([schema.distribution(split.logits(ctx, X)) for ctx in contexts], dim=1)


# --------------------------------------------------------------------------- shared checks

def check_contexts(split, contexts) -> list:
    """A non-empty list of SplitContexts of ``split`` (one context is wrapped)."""
    from fisherfast.split import SplitContext

    ctx_list = [contexts] if isinstance(contexts, SplitContext) else contexts
    if not isinstance(ctx_list, (list, tuple)) or not ctx_list:
        raise TypeError(f"contexts: expected a SplitContext or a non-empty list of them (from split.contexts), "
                        f"got {type(contexts).__name__}")
    for i, ctx in enumerate(ctx_list):
        if not isinstance(ctx, SplitContext):
            raise TypeError(f"contexts[{i}]: expected a SplitContext, got {type(ctx).__name__}")
        if ctx.owner_id != id(split):
            raise ValueError(f"contexts[{i}]: was made by another SplitModel (a different model or layer)")
    return list(ctx_list)


def check_schema(split, schema) -> ConceptSchema:
    if not isinstance(schema, ConceptSchema):
        raise TypeError(f"schema: expected a ConceptSchema, got {type(schema).__name__}")
    if schema.V != split.V:
        raise ValueError(f"schema: built for V = {schema.V}, the model has V = {split.V}")
    return schema


def check_points(split, points, name: str) -> torch.Tensor:
    """(n, d) in the model's dtype; a (d,) tensor becomes (1, d)."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(points).__name__}")
    if points.dtype != split.W.dtype:
        raise TypeError(f"{name}: expected the model's dtype {split.W.dtype}, got {points.dtype}")
    X = points[None] if points.ndim == 1 else points
    if X.ndim != 2 or X.shape[1] != split.d or X.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (n, {split.d}) or ({split.d},), got {tuple(points.shape)}")
    return X

