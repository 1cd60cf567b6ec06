"""Density on the activation manifold (docs/design.md §6): a penalty that keeps paths
near observed activations, and the density-based metric under which the
labelled spline through class centroids is a geodesic (Wurgaft et al.).

- ``knn_sq_distance(points, cloud, k)``: for each point, the mean squared
  Euclidean distance to its k nearest points of the cloud; differentiable in
  the points. Used as the density penalty of ``fisherfast.geodesic.gaga.latent_path``.
- ``kde_log_density(points, centers, sigma)``: log p(x) of the Gaussian kernel
  density p(x) = (1/n) Σ_j exp(−‖x − c_j‖² / (2σ²)) (unnormalized: no
  (2πσ²)^{−d/2}), by log-sum-exp so it never underflows far from the centers.
- ``DensityMetric``: the conformal metric

      M(x) = w(x)² I + εI,   w(x)² = 1 + λ · max(0, −2 log ρ(x)),   ρ(x) = p(x) / max_j p(c_j),

  with p the kernel density of points c_j sampled densely along the
  class-centroid spline (``from_centroids``). −2σ² log ρ(x) is a soft minimum
  of the squared distances ‖x − c_j‖² (up to a constant), so w(x)² ≈ 1 +
  λ·dist(x, curve)²/σ²: a step on the curve costs its Euclidean length, a step
  at distance r from it (1 + λr²/σ²) times more, without saturating (a
  1/(ρ + δ) weight is flat, with zero gradient, far from the curve in high
  dimension, and a solver started there never moves). A minimum-energy path
  between two points of the curve therefore runs along it: the labelled
  spline is (to O(σ)) a geodesic. The metric is not the pullback of a
  feature map, so its discrete energy is the midpoint rule
  Σ_i w(x̄_i)² ‖Δ_i‖², x̄_i = (x_i + x_{i+1})/2, with its exact gradient by
  autograd (``segment_energy``; ``lbfgs_path`` minimizes it); it converges to
  the continuous energy ∫ w² ‖ẋ‖² as T grows.
"""
from __future__ import annotations

import math

import torch

from fisherfast.checks import check_finite, check_int, check_real
from fisherfast.geodesic.metrics import GeodesicMetric, check_eps
from fisherfast.geodesic.solvers import centroid_spline

__all__ = ["knn_sq_distance", "kde_log_density", "DensityMetric"]


def _check_cloud(points, cloud, name: str = "cloud") -> None:
    for n, t in (("points", points), (name, cloud)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2 or t.shape[0] == 0:
            raise TypeError(f"{n}: expected a floating tensor (n, d) with n ≥ 1, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if points.shape[1] != cloud.shape[1]:
        raise ValueError(f"points, {name}: expected the same dimension d, got {points.shape[1]} and {cloud.shape[1]}")


def knn_sq_distance(points: torch.Tensor, cloud: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(n,): mean over the k nearest cloud points of ‖x − c‖² for each x in ``points`` (n, d);
    ``cloud`` (N, d) with N ≥ k. Differentiable in ``points``. Cost O(n·N·d)."""
    _check_cloud(points, cloud)
    check_int("k", k, minimum=1, maximum=cloud.shape[0])
    sq = ((points[:, None, :] - cloud[None].to(points.dtype)) ** 2).sum(-1)
    return sq.topk(k, dim=1, largest=False).values.mean(1)


def kde_log_density(points: torch.Tensor, centers: torch.Tensor, sigma: float) -> torch.Tensor:
    """(n,): log (1/N) Σ_j exp(−‖x − c_j‖² / (2σ²)) for x in ``points`` (n, d), centers (N, d).
    Differentiable in ``points``."""
    _check_cloud(points, centers, "centers")
    check_real("sigma", sigma, minimum=0, min_open=True)
    sq = ((points[:, None, :] - centers[None].to(points.dtype)) ** 2).sum(-1)
    return torch.logsumexp(-sq / (2.0 * sigma ** 2), dim=1) - math.log(centers.shape[0])


class DensityMetric(GeodesicMetric):
    """The conformal density metric w(x)² I + εI (module docstring).

    Args:
        centers: (N, d) points along the curve (``from_centroids`` samples a
            centroid spline).
        sigma: the kernel width σ (units of x).
        strength: λ > 0; at distance r from the curve a step costs about
            (1 + λr²/σ²) times its squared length.
        eps: ε ≥ 0 (default 0: M is positive definite already, w² ≥ 1).

    Cost per point: O(N·d).
    """

    def __init__(self, centers: torch.Tensor, *, sigma: float, strength: float = 1.0, eps: float = 0.0):
        if not isinstance(centers, torch.Tensor) or not centers.is_floating_point() or centers.ndim != 2 or \
                centers.shape[0] == 0:
            raise TypeError("centers: expected a floating tensor (N, d) with N ≥ 1")
        check_finite("centers", centers)
        check_real("strength", strength, minimum=0, min_open=True)
        if check_eps(eps) is None:
            raise ValueError("eps: expected a float ≥ 0 (the density metric has no relative ε)")
        self.centers = centers.detach()
        self.d, self.sigma, self.strength, self.eps = centers.shape[1], float(sigma), float(strength), float(eps)
        self._log_p_max = float(kde_log_density(self.centers, self.centers, self.sigma).max())

    @classmethod
    def from_centroids(cls, knots: torch.Tensor, *, periodic: bool, samples: int = 256, sigma: float | None = None,
                       strength: float = 1.0, eps: float = 0.0) -> "DensityMetric":
        """The density metric of the cubic spline through class centroids ``knots`` (K, d)
        (``centroid_spline``: periodic for cyclic concepts), sampled at ``samples``
        equally spaced parameters. Default σ: ¼ of the mean distance between
        consecutive centroids."""
        check_int("samples", samples, minimum=2)
        spline, u = centroid_spline(knots, periodic=periodic)
        grid = torch.linspace(float(u[0]), float(u[-1]), samples + (1 if periodic else 0), dtype=torch.float64)
        if periodic:
            grid = grid[:-1]
        centers = torch.from_numpy(spline(grid.numpy())).to(knots.device, knots.dtype)
        if sigma is None:
            sigma = 0.25 * float(u[-1]) / (len(u) - 1)
        return cls(centers, sigma=sigma, strength=strength, eps=eps)

    def __repr__(self) -> str:
        return (f"DensityMetric(d={self.d}, centers={self.centers.shape[0]}, sigma={self.sigma:g}, "
                f"strength={self.strength:g})")

    def weight_sq(self, points: torch.Tensor) -> torch.Tensor:
        """w(x)² = 1 + λ·max(0, −2 log ρ(x)) at each point (n, d) → (n,); differentiable."""
        log_rho = kde_log_density(points, self.centers, self.sigma) - self._log_p_max
        return 1.0 + self.strength * torch.clamp(-2.0 * log_rho, min=0.0)

    def segment_energy(self, path: torch.Tensor) -> torch.Tensor:
        """Σ_i w(x̄_i)² ‖Δ_i‖² (midpoint rule), without the ε term."""
        delta = path[1:] - path[:-1]
        return (self.weight_sq(0.5 * (path[1:] + path[:-1])) * (delta ** 2).sum(-1)).sum()

    def _factor(self, X):
        eye = torch.eye(self.d, dtype=X.dtype, device=X.device)
        return self.weight_sq(X).sqrt()[:, None, None] * eye

    def _features(self, X):
        raise NotImplementedError("DensityMetric is conformal, not a pullback: it has no feature map; its energy "
                                  "is segment_energy (the midpoint rule)")
