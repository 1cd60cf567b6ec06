"""Deprecated module: the concepts and ``concept_gradient`` live in ``fisherfast.concepts``
(re-exported by ``fisherfast.steer``)."""
import warnings

from fisherfast.concepts import ConceptScore, SequenceConcept, concept_gradient  # noqa: F401

warnings.warn("fisherfast.steer.concept is deprecated; import from fisherfast.concepts (or fisherfast.steer)",
              DeprecationWarning, stacklevel=2)
