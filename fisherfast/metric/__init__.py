"""Pullback Fisher metric of the next-token distribution at a layer (docs/design.md §4).

    G_ℓ(h) = Jᵀ F J = Bᵀ G_head B,   KL(p(h) ‖ p(h+δ)) = ½ δᵀ G_ℓ δ + O(‖δ‖³).

- ``pullback_fisher`` (``pullback.py``): the metric in one of its modes
  (exact, matrix_free, low_rank, topk, monte_carlo, concept, auto), averaged
  over points, optionally sharded across torch.distributed ranks.
- ``PullbackMetric`` (``operator.py``): the base type of the result, a
  symmetric PSD linear operator (``@``, ``.T``, ``damped(λ)``, ``to_scipy()``,
  ``dense()``, ``eig(k)``, ``trace()``, ``diagnostics()``), implemented by
  ``DenseMetric``, ``LowRankMetric``, ``MatrixFreeMetric`` and
  ``DampedMetric``; ``MetricReport`` records what each mode reports.
- ``spectrum_diagnostics`` / ``MetricDiagnostics`` (``diagnostics.py``):
  PR/d, rank at 90/99% of the trace, relative spectral deviation.
- ``spectrum_survey``, ``survey_table``, ``plot_spectra`` (``survey.py``).
"""
from fisherfast.metric.diagnostics import MetricDiagnostics, spectrum_diagnostics
from fisherfast.metric.operator import (DampedMetric, DenseMetric, LowRankMetric, MatrixFreeMetric, MetricReport,
                                        PullbackMetric)
from fisherfast.metric.pullback import (AUTO_EXACT_MAX_D, DEFAULT_K, DEFAULT_N_SAMPLES, DEFAULT_TAIL_TOL,
                                        DEFAULT_TRACE_PROBES, METRIC_MODES, MODES, auto_mode, pullback_fisher,
                                        work_dtype)
from fisherfast.concepts import concept_schema
from fisherfast.metric.survey import SpectrumSurvey, plot_spectra, spectrum_survey, survey_table

__all__ = ["pullback_fisher", "PullbackMetric", "DenseMetric", "LowRankMetric", "MatrixFreeMetric", "DampedMetric",
           "MetricReport", "MetricDiagnostics", "spectrum_diagnostics", "SpectrumSurvey", "spectrum_survey",
           "survey_table", "plot_spectra", "concept_schema", "auto_mode", "work_dtype", "METRIC_MODES", "MODES",
           "AUTO_EXACT_MAX_D", "DEFAULT_K", "DEFAULT_TRACE_PROBES", "DEFAULT_TAIL_TOL", "DEFAULT_N_SAMPLES"]
