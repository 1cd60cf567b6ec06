"""Geodesic steering (docs/design.md §6): paths between two hidden states at a layer,
discretized as T waypoints, under a metric (flat, pullback Hellinger over a
concept schema, the pullback through a learned GAGA encoder, the conformal
density metric of the class-centroid curve) with any solver (chord, spline
through class centroids, free-waypoint L-BFGS on the embedded or frozen
energy, GAGA latent waypoints), evaluated in behaviour space (Bhattacharyya
energy, Hellinger arc length, legibility, target probability), on built-in
ordinal tasks (weekdays, months, letters, ages) whose carriers are checked
on the model (``check_task``, ``steerable_layers``)."""
from fisherfast.concepts import ConceptSchema, concept_distributions
from fisherfast.geodesic.density import DensityMetric, kde_log_density, knn_sq_distance
from fisherfast.geodesic.evaluate import (PathEvaluation, bhattacharyya_distance, bhattacharyya_energy,
                                          evaluate_path, hellinger_arc_length, hellinger_distance, legibility)
from fisherfast.geodesic.gaga import (GagaAutoencoder, GagaFit, LatentPath, gaga_out, gaga_phate, hellinger_targets,
                                      latent_path, phate_distances)
from fisherfast.geodesic.metrics import (DEFAULT_EPS_FRACTION, ConceptHellingerMetric, EncoderMetric, FlatMetric,
                                         GeodesicMetric)
from fisherfast.geodesic.solvers import (GeodesicResult, centroid_spline, chord_path, embedded_energy, lbfgs_path,
                                         path_energy, spline_path)
from fisherfast.geodesic.taskcheck import LayerControl, TaskCheck, check_task, near_chance, steerable_layers
from fisherfast.geodesic.tasks import (AGES, CARRIERS, LETTERS, MONTHS, TASKS, WEEKDAYS, ConceptTask, TaskExample,
                                       class_centroids, get_task)

__all__ = ["ConceptSchema", "concept_distributions",
           "GeodesicMetric", "FlatMetric", "ConceptHellingerMetric", "EncoderMetric", "DensityMetric",
           "DEFAULT_EPS_FRACTION", "knn_sq_distance", "kde_log_density",
           "GagaAutoencoder", "GagaFit", "gaga_out", "gaga_phate", "phate_distances", "hellinger_targets",
           "latent_path", "LatentPath",
           "chord_path", "centroid_spline", "spline_path", "path_energy", "embedded_energy", "lbfgs_path",
           "GeodesicResult",
           "hellinger_distance", "bhattacharyya_distance", "hellinger_arc_length", "bhattacharyya_energy",
           "legibility", "PathEvaluation", "evaluate_path",
           "ConceptTask", "TaskExample", "WEEKDAYS", "MONTHS", "LETTERS", "AGES", "TASKS", "CARRIERS", "get_task",
           "class_centroids", "check_task", "TaskCheck", "steerable_layers", "LayerControl", "near_chance"]
