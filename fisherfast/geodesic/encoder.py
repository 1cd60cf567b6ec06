"""GAGA-Out: a learned encoder whose Euclidean distances match Hellinger distances
of concept distributions (DESIGN.md §6).

Given points x_1..x_n ∈ R^d (hidden states at a layer) and their concept
distributions q_i (one per carrier context c, from
``fisherfast.geodesic.concepts.concept_distributions``), the target distance
of a pair is

    D(x_i, x_j) = √( (1/C) Σ_c d_H(q_{i,c}, q_{j,c})² ),

the Hellinger distance for one context (d_H² = ½ Σ_b (√q − √q′)², the
package convention) and the root-mean-square over several, matching the
context-averaged ``ConceptHellingerMetric``. An MLP E: R^d → R^k is trained
with Adam on random pairs i ≠ j to minimize the distance-matching loss

    L(E) = mean_{(i,j)} (‖E(x_i) − E(x_j)‖ − D(x_i, x_j))²,

and ``EncoderMetric(E)`` is the metric J_Eᵀ J_E + εI. The distances are
matched between the given points only: the metric is trustworthy where the
points are dense (sample them along and around the paths of interest).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from tqdm.auto import tqdm

from fisherfast.geodesic.evaluate import check_distributions, hellinger_distance
from fisherfast.geodesic.metrics import EncoderMetric, check_eps

__all__ = ["GagaEncoder", "EncoderFit", "train_gaga_encoder", "target_distances", "distance_matching_loss"]


class GagaEncoder(torch.nn.Module):
    """E(x) = L₃ tanh(L₂ tanh(L₁ (x − μ)/σ)): d → width → width → k.

    μ (d,) and σ (a scalar, the RMS deviation of the training points) are
    fixed buffers, so the layers see standardized inputs; tanh keeps E smooth
    (its Jacobian is the metric factor). Weights and biases are drawn
    U(−1/√fan_in, 1/√fan_in) from a generator seeded with ``seed``, without
    touching the global random state.
    """

    def __init__(self, d: int, *, width: int, out_dim: int, mean: torch.Tensor, scale: float, seed: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", mean.detach().to(device, dtype).clone())
        self.scale = float(scale)
        self.layers = torch.nn.ModuleList()
        for fan_in, fan_out in ((d, width), (width, width), (width, out_dim)):
            layer = torch.nn.utils.skip_init(torch.nn.Linear, fan_in, fan_out, dtype=dtype, device=device)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul(2).sub(1).mul(bound))
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.mean) / self.scale
        for layer in self.layers[:-1]:
            y = torch.tanh(layer(y))
        return self.layers[-1](y)


def target_distances(q: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """D(x_i, x_j) for index tensors i, j into q (n, B) or (n, C, B): float64."""
    d_H = hellinger_distance(q[i], q[j])
    return d_H if q.ndim == 2 else (d_H ** 2).mean(-1).sqrt()


def distance_matching_loss(encoder: torch.nn.Module, points: torch.Tensor, q: torch.Tensor) -> float:
    """L(E) over all n(n−1)/2 pairs i < j (module docstring). Cost O(n²·k)."""
    n = points.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    with torch.no_grad():
        E = encoder(points)
        D = target_distances(q, i, j).to(E.dtype)
        return float(((E[i] - E[j]).norm(dim=-1) - D).pow(2).mean())


@dataclasses.dataclass
class EncoderFit:
    """The outcome of ``train_gaga_encoder``.

    Attributes:
        encoder: the trained ``GagaEncoder`` (parameters frozen).
        metric: ``EncoderMetric(encoder)`` with the requested ε.
        losses: the minibatch loss at each step.
        initial_loss, final_loss: L(E) over all pairs before and after training.
    """

    encoder: GagaEncoder
    metric: EncoderMetric
    losses: list[float]
    initial_loss: float
    final_loss: float


def train_gaga_encoder(points: torch.Tensor, q: torch.Tensor, *, width: int = 128, out_dim: int = 16,
                       steps: int = 500, batch_pairs: int = 256, lr: float = 1e-3, seed: int = 0,
                       eps: float | None = None, progress: bool = True) -> EncoderFit:
    """Train E so ‖E(x_i) − E(x_j)‖ ≈ D(x_i, x_j) (module docstring); return it with its metric.

    Args:
        points: (n, d) floating, n ≥ 2; the encoder takes their dtype and device.
        q: (n, B) or (n, C, B) concept distributions of the points (one per
            context), e.g. ``concept_distributions(split, contexts, schema, points)``.
        width, out_dim: hidden width and k.
        steps: Adam steps; batch_pairs: random pairs i ≠ j per step.
        lr: Adam learning rate.
        seed: seeds the initialization and the pair sampling (same seed, same
            inputs → the same encoder, bit for bit, on one machine).
        eps: ε of the returned metric.
        progress: a tqdm bar over the steps.

    Cost: steps × (2·batch_pairs forward/backward passes of the MLP).
    """
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError(f"points: expected a floating tensor (n, d), got {type(points).__name__}")
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"points: expected shape (n, d) with n ≥ 2, got {tuple(points.shape)}")
    q = check_distributions(q, "q", min_ndim=2)
    if q.ndim not in (2, 3) or q.shape[0] != points.shape[0]:
        raise ValueError(f"q: expected shape ({points.shape[0]}, B) or ({points.shape[0]}, C, B) (one row per "
                         f"point), got {tuple(q.shape)}")
    for name, value in (("width", width), ("out_dim", out_dim), ("steps", steps), ("batch_pairs", batch_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: expected a float > 0, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    eps = check_eps(eps)

    X = points.detach()
    n, d = X.shape
    mean = X.mean(0)
    scale = float((X - mean).pow(2).mean().sqrt())
    if not scale > 0:
        raise ValueError("points: all points coincide; nothing to encode")
    q = q.to(X.device)
    encoder = GagaEncoder(d, width=width, out_dim=out_dim, mean=mean, scale=scale, seed=seed, dtype=X.dtype,
                          device=X.device)
    initial = distance_matching_loss(encoder, X, q)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="GAGA-Out encoder", unit="step", disable=not progress):
        i = torch.randint(n, (batch_pairs,), generator=generator)
        j = (i + torch.randint(1, n, (batch_pairs,), generator=generator)) % n    # j ≠ i
        i, j = i.to(X.device), j.to(X.device)
        D = target_distances(q, i, j).to(X.dtype)
        loss = ((encoder(X[i]) - encoder(X[j])).norm(dim=-1) - D).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    encoder.requires_grad_(False)
    final = distance_matching_loss(encoder, X, q)
    return EncoderFit(encoder=encoder, metric=EncoderMetric(encoder, d, eps=eps), losses=losses,
                      initial_loss=initial, final_loss=final)
