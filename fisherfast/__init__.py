"""fisherfast: Fisher geometry of language-model activations at vocabulary scale.

The nouns to start from (each also in its subpackage):

    SplitModel, architecture                  fisherfast.split   (the model split at layer ℓ, §2)
    pullback_fisher, PullbackMetric           fisherfast.metric  (G_ℓ = Jᵀ F J, §4)
    ConceptScore, ConceptSchema               fisherfast.concepts (the scores φ and concept sets, §5)
    fishback_direction, steer_to_target,
    steering, SteeringVectors, calibrate      fisherfast.steer   (steering, §5)
    FisherSketcher, SketchSpec, sketch_model,
    SignatureIndex                            fisherfast.sketch  (FisherSketch, §7)
    load_default                              fisherfast.models  (the embedded SmolLM2)
    ops, available_backends                   fisherfast.ops     (the kernels and their backends)

Every name but ``ops`` and ``available_backends`` is imported on first use
(module ``__getattr__``): ``import fisherfast`` imports neither transformers
nor the method subpackages.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fisherfast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from fisherfast import ops  # noqa: E402
from fisherfast.ops import available_backends  # noqa: E402

_HOMES = {
    "SplitModel": "fisherfast.split", "architecture": "fisherfast.split",
    "pullback_fisher": "fisherfast.metric", "PullbackMetric": "fisherfast.metric",
    "ConceptScore": "fisherfast.concepts", "ConceptSchema": "fisherfast.concepts",
    "fishback_direction": "fisherfast.steer", "steer_to_target": "fisherfast.steer", "steering": "fisherfast.steer",
    "SteeringVectors": "fisherfast.steer", "calibrate": "fisherfast.steer",
    "FisherSketcher": "fisherfast.sketch", "SketchSpec": "fisherfast.sketch", "sketch_model": "fisherfast.sketch",
    "SignatureIndex": "fisherfast.sketch",
    "load_default": "fisherfast.models",
}

__all__ = ["ops", "available_backends", "__version__", *_HOMES]


def __getattr__(name: str):
    """The names of ``_HOMES``, imported from their subpackage on first use."""
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
