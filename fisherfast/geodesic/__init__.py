"""Geodesic steering (docs/design.md §6): paths between two hidden states at a layer,
discretized as T waypoints, under a metric (flat, pullback Hellinger over a
concept schema, the pullback through a learned GAGA encoder, the conformal
density metric of the class-centroid curve) with any solver (chord, spline
through class centroids, free-waypoint L-BFGS on the embedded or frozen
energy, GAGA latent waypoints), evaluated in behaviour space (Bhattacharyya
energy, Hellinger arc length, legibility, target probability), on built-in
ordinal tasks (weekdays, months, letters, ages) whose carriers are checked
on the model (``check_task``, ``steerable_layers``)."""
from fisherfast.deprecation import moved_names
from fisherfast.geodesic.density import DensityMetric
from fisherfast.geodesic.evaluate import (PathEvaluation, bhattacharyya_distance, bhattacharyya_energy,
                                          evaluate_path, hellinger_arc_length, hellinger_distance, legibility)
from fisherfast.geodesic.gaga import GagaAutoencoder, GagaFit, LatentPath, gaga_out, gaga_phate, latent_path
from fisherfast.geodesic.metrics import ConceptHellingerMetric, EncoderMetric, FlatMetric, GeodesicMetric
from fisherfast.geodesic.solvers import (GeodesicResult, centroid_spline, chord_path, embedded_energy, lbfgs_path,
                                         path_energy, spline_path)
from fisherfast.geodesic.taskcheck import LayerControl, TaskCheck, check_task, steerable_layers
from fisherfast.geodesic.tasks import TASKS, ConceptTask, TaskExample, class_centroids, get_task

__all__ = ["GeodesicMetric", "FlatMetric", "ConceptHellingerMetric", "EncoderMetric", "DensityMetric",
           "GagaAutoencoder", "GagaFit", "gaga_out", "gaga_phate", "latent_path", "LatentPath",
           "chord_path", "centroid_spline", "spline_path", "path_energy", "embedded_energy", "lbfgs_path",
           "GeodesicResult",
           "hellinger_distance", "bhattacharyya_distance", "hellinger_arc_length", "bhattacharyya_energy",
           "legibility", "PathEvaluation", "evaluate_path",
           "ConceptTask", "TaskExample", "TASKS", "get_task", "class_centroids", "check_task", "TaskCheck",
           "steerable_layers", "LayerControl"]

# names that left this namespace: each stays in its module (or moved to fisherfast.concepts)
__getattr__ = moved_names(__name__, {
    **{name: ("fisherfast.concepts", name, f"use fisherfast.concepts.{name}")
       for name in ("ConceptSchema", "concept_distributions")},
    "concepts": ("fisherfast.concepts", None, "the concepts live in fisherfast.concepts"),  # the moved submodule
    **{name: (f"fisherfast.geodesic.{module}", name, f"use fisherfast.geodesic.{module}.{name}")
       for module, names in (("metrics", ("DEFAULT_EPS_FRACTION",)),
                             ("density", ("knn_sq_distance", "kde_log_density")),
                             ("gaga", ("phate_distances", "hellinger_targets")),
                             ("tasks", ("WEEKDAYS", "MONTHS", "LETTERS", "AGES", "CARRIERS")),
                             ("taskcheck", ("near_chance",)))
       for name in names},
})
