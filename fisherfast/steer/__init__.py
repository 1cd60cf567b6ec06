"""Steering hidden states along the Fisher geometry (docs/design.md §5): concept
scores and their gradients, FishBack (minimum-distortion) and baseline
directions with their cost ratio, iterated steering to a target score,
matched-probability scaling of fixed directions, off-target distortion,
hooks that apply vectors inside a model's forward pass or generation (every
decoding mode, per-row vectors and strengths), strength calibrated to a target
within a KL budget and a layer sweep, and steering vectors as files
(safetensors, llama.cpp GGUF, lm-evaluation-harness)."""
from fisherfast.deprecation import moved_names
from fisherfast.concepts import ConceptScore, SequenceConcept, concept_gradient
from fisherfast.steer.directions import (actadd_direction, caa_direction, cost_ratio, euclidean_direction,
                                         fishback_direction, probe_direction, solve_metric)
from fisherfast.steer.hooks import steering
from fisherfast.steer.vectors import SteeringVectors
from fisherfast.steer.calibration import Calibration, PromptCalibration, calibrate, sweep_layers
from fisherfast.steer.innsteer import INNSteer
from fisherfast.steer.iterate import (MethodResult, SteeringResult, compare_methods, evaluate_delta, off_target_kl,
                                      steer_to_target)
from fisherfast.steer.scale import TargetNotReached, scale_to_target

__all__ = ["ConceptScore", "SequenceConcept", "concept_gradient", "fishback_direction", "euclidean_direction",
           "caa_direction", "actadd_direction", "probe_direction", "solve_metric", "cost_ratio",
           "steering", "SteeringResult", "MethodResult", "steer_to_target", "scale_to_target", "TargetNotReached",
           "evaluate_delta", "off_target_kl", "compare_methods", "INNSteer",
           "SteeringVectors", "calibrate", "sweep_layers", "Calibration", "PromptCalibration"]

# helpers that left this namespace: each stays in its module
__getattr__ = moved_names(__name__, {
    "scale_to_first_order": ("fisherfast.steer.directions", "scale_to_first_order",
                             "use fisherfast.steer.directions.scale_to_first_order"),
    "model_identity": ("fisherfast.steer.vectors", "model_identity", "use fisherfast.steer.vectors.model_identity"),
    "concept": ("fisherfast.concepts", None, "the concepts live in fisherfast.concepts"),  # the moved submodule
})
