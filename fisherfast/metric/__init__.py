"""Pullback Fisher metric of the next-token distribution at a layer (docs/design.md §4).

    G_ℓ(h) = Jᵀ F J = Bᵀ G_head B,   KL(p(h) ‖ p(h+δ)) = ½ δᵀ G_ℓ δ + O(‖δ‖³).

- ``pullback_fisher`` (``pullback.py``): the metric in one of its modes
  (exact, matrix_free, low_rank, topk, monte_carlo, concept, auto), averaged
  over points (``points.py``), optionally sharded across torch.distributed
  ranks; ``check_mode_options`` is its check of which options a mode reads.
- ``PullbackMetric`` (``operator.py``): the base type of the result, a
  symmetric PSD linear operator (``@``, ``.T``, ``damped(λ)``, ``to_scipy()``,
  ``dense()``, ``eig(k)``, ``trace()``, ``diagnostics()``), implemented by
  ``DenseMetric``, ``LowRankMetric``, ``MatrixFreeMetric`` and
  ``DampedMetric``; ``MetricReport`` records what each mode reports.
- ``spectrum_diagnostics`` / ``MetricDiagnostics`` (``diagnostics.py``):
  PR/d, rank at 90/99% of the trace, relative spectral deviation.
- ``spectrum_survey``, ``survey_table``, ``plot_spectra`` (``survey.py``).
"""
from fisherfast.deprecation import moved_names
from fisherfast.metric.diagnostics import MetricDiagnostics, spectrum_diagnostics
from fisherfast.metric.operator import (DampedMetric, DenseMetric, LowRankMetric, MatrixFreeMetric, MetricReport,
                                        PullbackMetric)
from fisherfast.metric.pullback import METRIC_MODES, MODE_OPTIONS, auto_mode, check_mode_options, pullback_fisher
from fisherfast.metric.survey import SpectrumSurvey, plot_spectra, spectrum_survey, survey_table

__all__ = ["pullback_fisher", "PullbackMetric", "DenseMetric", "LowRankMetric", "MatrixFreeMetric", "DampedMetric",
           "MetricReport", "MetricDiagnostics", "spectrum_diagnostics", "SpectrumSurvey", "spectrum_survey",
           "survey_table", "plot_spectra", "auto_mode", "check_mode_options", "METRIC_MODES",
           "MODE_OPTIONS"]

_P = "fisherfast.metric.pullback"
__getattr__ = moved_names(__name__, {
    "MODES": (_P, "METRIC_MODES", "use METRIC_MODES"),
    "work_dtype": ("fisherfast.checks", "compute_dtype", "use fisherfast.checks.compute_dtype"),
    "concept_schema": ("fisherfast.concepts.schema", "concept_schema", "use fisherfast.concepts.ConceptSchema"),
    **{name: (_P, name, f"the constant stays in {_P}")
       for name in ("AUTO_EXACT_MAX_D", "DEFAULT_K", "DEFAULT_TRACE_PROBES", "DEFAULT_TAIL_TOL",
                    "DEFAULT_N_SAMPLES")},
})
