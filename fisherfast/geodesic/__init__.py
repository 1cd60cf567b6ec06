"""Geodesic steering (DESIGN.md §6): paths between two hidden states at a layer,
discretized as T waypoints, under a metric (flat, pullback Hellinger over a
concept schema, learned GAGA-Out encoder) with any solver (chord, spline
through class centroids, free-waypoint L-BFGS), evaluated in behaviour space
(Bhattacharyya energy, Hellinger arc length, legibility, target probability),
on built-in ordinal tasks (weekdays, months, letters, ages)."""
from fisherfast.geodesic.concepts import ConceptSchema, concept_distributions
from fisherfast.geodesic.encoder import (EncoderFit, GagaEncoder, distance_matching_loss, target_distances,
                                         train_gaga_encoder)
from fisherfast.geodesic.evaluate import (PathEvaluation, bhattacharyya_distance, bhattacharyya_energy,
                                          evaluate_path, hellinger_arc_length, hellinger_distance, legibility)
from fisherfast.geodesic.metrics import (DEFAULT_EPS_FRACTION, ConceptHellingerMetric, EncoderMetric, FlatMetric,
                                         GeodesicMetric)
from fisherfast.geodesic.solvers import (GeodesicResult, centroid_spline, chord_path, embedded_energy, lbfgs_path,
                                         path_energy, spline_path)
from fisherfast.geodesic.tasks import (AGES, LETTERS, MONTHS, TASKS, WEEKDAYS, ConceptTask, TaskExample,
                                       class_centroids, get_task)

__all__ = ["ConceptSchema", "concept_distributions",
           "GeodesicMetric", "FlatMetric", "ConceptHellingerMetric", "EncoderMetric", "DEFAULT_EPS_FRACTION",
           "GagaEncoder", "EncoderFit", "train_gaga_encoder", "target_distances", "distance_matching_loss",
           "chord_path", "centroid_spline", "spline_path", "path_energy", "embedded_energy", "lbfgs_path",
           "GeodesicResult",
           "hellinger_distance", "bhattacharyya_distance", "hellinger_arc_length", "bhattacharyya_energy",
           "legibility", "PathEvaluation", "evaluate_path",
           "ConceptTask", "TaskExample", "WEEKDAYS", "MONTHS", "LETTERS", "AGES", "TASKS", "get_task",
           "class_centroids"]
