"""Spectrum diagnostics of a PSD metric (docs/design.md §4).

For a metric G with eigenvalues λ₁ ≥ … ≥ λ_d ≥ 0:

- participation ratio PR = (Σλ)² / Σλ² ∈ [1, d] (the effective rank),
  reported as PR/d;
- rank at 90% / 99% of the trace: the fewest leading eigenvalues whose sum
  reaches 0.9 / 0.99 · Σλ;
- relative spectral deviation from Euclidean ‖G − λ̄I‖₂ / ‖G‖₂ with
  λ̄ = tr(G)/d: 0 for a multiple of the identity, → 1 for a strongly
  anisotropic metric.
"""
from __future__ import annotations

import dataclasses

import torch

from fisherfast.checks import check_finite


@dataclasses.dataclass(frozen=True)
class MetricDiagnostics:
    """Spectrum summary of a metric G with eigenvalues λ₁ ≥ … ≥ λ_d ≥ 0 (docs/design.md §4).

    Attributes:
        d: dimension.
        trace: Σλ = tr(G).
        lambda_max: λ₁ = ‖G‖₂.
        participation_ratio: PR = (Σλ)² / Σλ² ∈ [1, d], the effective rank.
        pr_over_d: PR / d.
        rank90, rank99: the fewest leading eigenvalues whose sum reaches
            90% / 99% of the trace.
        rel_spectral_deviation: ‖G − λ̄I‖₂ / ‖G‖₂ with λ̄ = tr(G)/d; 0 for a
            multiple of the identity (Euclidean), → 1 for a strongly
            anisotropic metric (FishBack reports > 0.97 on GPT-2).
    """
    d: int
    trace: float
    lambda_max: float
    participation_ratio: float
    pr_over_d: float
    rank90: int
    rank99: int
    rel_spectral_deviation: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def spectrum_diagnostics(eigenvalues) -> MetricDiagnostics:
    """``MetricDiagnostics`` from all d eigenvalues of a PSD metric (any order).

    Round-off negatives (a PSD matrix computed in floating point) are clamped
    to 0 first. Cost O(d log d).

    Raises:
        ValueError: no eigenvalues, a NaN/Inf among them, or all zero.
    """
    lam = torch.as_tensor(eigenvalues).detach().to("cpu", torch.float64).flatten()
    if lam.numel() == 0:
        raise ValueError("eigenvalues: expected at least one, got none")
    check_finite("eigenvalues", lam)
    lam = lam.clamp_min(0).sort(descending=True).values
    d, total = lam.numel(), float(lam.sum())
    if total <= 0:
        raise ValueError("eigenvalues: expected a nonzero metric, got all zero (the metric is zero: its diagnostics are undefined)")
    pr = total ** 2 / float((lam ** 2).sum())
    cumulative = torch.cumsum(lam, 0) / total

    def rank_at(fraction: float) -> int:
        # Tolerance: the last partial sum is 1 only up to rounding.
        return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1

    lam_bar = total / d
    # G − λ̄I has eigenvalues λ_i − λ̄; its 2-norm is the larger end.
    deviation = max(abs(float(lam[0]) - lam_bar), abs(float(lam[-1]) - lam_bar)) / float(lam[0])
    return MetricDiagnostics(d=d, trace=total, lambda_max=float(lam[0]), participation_ratio=pr,
                             pr_over_d=pr / d, rank90=rank_at(0.90), rank99=rank_at(0.99),
                             rel_spectral_deviation=deviation)
