"""Spectrum surveys: the pullback metric's diagnostics per prompt and of the
prompt-averaged metric at a layer, as a markdown table and a plot (docs/design.md §4)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from fisherfast.checks import check_contexts
from fisherfast.metric.diagnostics import spectrum_diagnostics
from fisherfast.metric.operator import DenseMetric, MetricReport, PullbackMetric
from fisherfast.metric.pullback import pullback_fisher


@dataclasses.dataclass
class SpectrumSurvey:
    """Per-point spectra of the metric at one layer and their mean metric.

    Attributes:
        layer: ℓ.
        mode: the ``pullback_fisher`` mode used per point.
        per_point: ``MetricDiagnostics`` of G_ℓ at each point (context).
        eigenvalues: (n, d) float64, each point's eigenvalues, descending.
        mean_metric: (1/n) Σ_i G_ℓ(point i) as a dense ``PullbackMetric``.
    """
    layer: int
    mode: str
    per_point: list
    eigenvalues: torch.Tensor
    mean_metric: PullbackMetric

    def summary(self) -> dict:
        """{field: (mean, min, max)} of the per-point diagnostics, plus
        ``mean_metric``: the diagnostics of the averaged metric."""
        out = {}
        for field in ("pr_over_d", "rank90", "rank99", "rel_spectral_deviation"):
            values = [getattr(diag, field) for diag in self.per_point]
            out[field] = (sum(values) / len(values), min(values), max(values))
        out["mean_metric"] = self.mean_metric.diagnostics()
        return out


def spectrum_survey(split, contexts, *, mode: str = "exact", progress: bool = True, **options) -> SpectrumSurvey:
    """G_ℓ at each context (``pullback_fisher(split, ctx, mode=mode, **options)``),
    its diagnostics, and the mean metric over the contexts. Cost: one
    ``pullback_fisher`` per context plus a d×d eigendecomposition each."""
    ctx_list = check_contexts(split, contexts)
    from tqdm.auto import tqdm

    per_point, spectra, total = [], [], None
    for ctx in tqdm(ctx_list, desc=f"survey {mode}, layer {split.layer}", leave=False,
                    disable=not progress or len(ctx_list) < 2):
        G = pullback_fisher(split, ctx, mode=mode, progress=False, **options)
        lam = G.eigenvalues()
        per_point.append(spectrum_diagnostics(lam))
        spectra.append(lam)
        total = G.dense().clone() if total is None else total + G.dense()
    mean = DenseMetric(total / len(ctx_list), report=MetricReport(mode=mode, n_points=len(ctx_list)))
    return SpectrumSurvey(layer=split.layer, mode=mode, per_point=per_point, eigenvalues=torch.stack(spectra),
                          mean_metric=mean)


def survey_table(surveys: Sequence[SpectrumSurvey]) -> str:
    """A markdown table of surveys, one row per layer: per-prompt mean [min–max]
    of PR/d and of ‖G − λ̄I‖₂/‖G‖₂, mean ranks at 90/99% of the trace, and the
    same diagnostics of the prompt-averaged metric."""
    lines = ["| layer | prompts | PR/d per prompt, mean [min–max] | rank90 / rank99 (mean) "
             "| ‖G−λ̄I‖₂/‖G‖₂ per prompt, mean [min–max] | averaged G: PR/d | averaged G: rank90 / rank99 "
             "| averaged G: ‖G−λ̄I‖₂/‖G‖₂ |",
             "|---|---|---|---|---|---|---|---|"]
    for survey in surveys:
        s = survey.summary()
        m = s["mean_metric"]
        pr, dev = s["pr_over_d"], s["rel_spectral_deviation"]
        lines.append(f"| {survey.layer} | {len(survey.per_point)} | {pr[0]:.2%} [{pr[1]:.2%}–{pr[2]:.2%}] "
                     f"| {s['rank90'][0]:.1f} / {s['rank99'][0]:.1f} | {dev[0]:.4f} [{dev[1]:.4f}–{dev[2]:.4f}] "
                     f"| {m.pr_over_d:.2%} | {m.rank90} / {m.rank99} | {m.rel_spectral_deviation:.4f} |")
    return "\n".join(lines)


def plot_spectra(surveys: Sequence[SpectrumSurvey], path) -> None:
    """PNG of the normalized eigenvalue spectra λ_i/λ₁ (log scale) per layer:
    the median over prompts (band: 10–90% quantiles) and the averaged metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for survey in surveys:
        lam = survey.eigenvalues.clamp_min(0)
        norm = lam / lam[:, :1]
        floor = 1e-12
        idx = np.arange(1, lam.shape[1] + 1)
        q10, q50, q90 = (torch.quantile(norm, q, dim=0).clamp_min(floor).numpy() for q in (0.1, 0.5, 0.9))
        line, = ax.semilogy(idx, q50, label=f"layer {survey.layer} (median of {lam.shape[0]} prompts)")
        ax.fill_between(idx, q10, q90, color=line.get_color(), alpha=0.2,
                        label=f"layer {survey.layer}, 10–90% of prompts")
        mean_lam = survey.mean_metric.eigenvalues().clamp_min(0)
        ax.semilogy(idx, (mean_lam / mean_lam[0]).clamp_min(floor).numpy(), "--", color=line.get_color(),
                    label=f"layer {survey.layer}, averaged G")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("λ_i / λ_1")
    ax.set_title("Pullback Fisher metric spectrum")
    ax.set_ylim(bottom=1e-8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
