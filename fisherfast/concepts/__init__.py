"""The one home of concept quantities (docs/design.md §4–§6).

- ``scores``: ``ConceptScore`` (a set of next tokens: log-probability or
  log-odds) and ``SequenceConcept`` (a multi-token continuation), the scores φ
  steering raises, and the checks of token ids, logits and target scores.
- ``gradient``: ``concept_gradient``, q = ∇_h φ at a hidden state.
- ``schema``: ``ConceptSchema``, n_c disjoint token sets plus "other", and the
  one computation of the concept distribution q (``log_distribution``,
  ``concept_distributions``).
- ``hellinger``: ``hellinger_rows``, J_s = ∂√q/∂h, used by both the metric's
  concept mode (G_H = J_sᵀJ_s) and the geodesic concept metric (J_s/√2).
"""
from fisherfast.concepts.gradient import concept_gradient
from fisherfast.concepts.hellinger import hellinger_rows
from fisherfast.concepts.schema import ConceptSchema, check_schema, concept_distributions, concept_schema
from fisherfast.concepts.scores import (CONCEPT_TYPES, ConceptScore, SequenceConcept, check_concept, check_logits,
                                        check_target_score, check_token_ids)

__all__ = ["ConceptScore", "SequenceConcept", "concept_gradient", "ConceptSchema", "concept_distributions",
           "hellinger_rows", "check_token_ids", "check_logits", "check_target_score", "check_concept",
           "check_schema", "CONCEPT_TYPES", "concept_schema"]
