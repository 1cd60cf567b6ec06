"""Deprecated module: ``ConceptSchema`` and ``concept_distributions`` live in
``fisherfast.concepts`` (re-exported by ``fisherfast.geodesic``)."""
import warnings

from fisherfast.concepts import ConceptSchema, concept_distributions  # noqa: F401

warnings.warn("fisherfast.geodesic.concepts is deprecated; import from fisherfast.concepts (or fisherfast.geodesic)",
              DeprecationWarning, stacklevel=2)
