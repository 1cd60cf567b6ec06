"""GAGA: a geometry-aware autoencoder of activations (docs/design.md §6).

An encoder E: R^d → R^k and a decoder D: R^k → R^d, each an MLP of
``depth`` hidden layers (Linear → BatchNorm → ReLU) and a linear output, on
standardized inputs (x − μ)/σ (μ the mean, σ the RMS deviation of the
training points). Trained with Adam on full batches (or random batches of
``batch`` points) to minimize a weighted sum of

    distance  mean_{i<j} (‖E(x_i) − E(x_j)‖ − D_ij)² / mean D²
    pointwise mean_i ‖E(x_i) − √(q̄_i/2)‖² / mean D²          (GAGA-Out)
    recon     mean_i ‖D(E(x_i)) − x_i‖² / (d σ²)
    cycle     mean_i ‖E(D(E(x_i))) − E(x_i)‖² / mean D²

over the pairs and points of each batch, with target distances D_ij:

- **GAGA-Out** (``gaga_out``): D_ij the Hellinger distance between the
  concept distributions of x_i and x_j (root-mean-square over carrier
  contexts, as ``ConceptHellingerMetric``); latent dimension k = K, the class
  count; the pointwise term pins each latent to the square root of the
  context-mean class probabilities, √(q̄_{i,k}/2) for k ≤ K (the "other" bin
  dropped), so the latent is the output's own Hellinger coordinates.
- **GAGA-PHATE** (``gaga_phate``): D_ij the distance between PHATE diffusion
  potentials of the unlabelled points (``phate`` package, ``phate_distances``);
  latent dimension chosen (default 3); reconstruction and cycle terms.

After training the BatchNorm layers hold the exact population statistics of
the training points and the model is frozen in eval mode, so E and D are
deterministic, differentiable maps. ``EncoderMetric(E)`` (``GagaFit.metric``)
is the pullback metric J_Eᵀ J_E + εI; ``latent_path`` takes waypoints on the
latent chord E(h₀) → E(h₁), optionally pulled towards the activation cloud by
the kNN density penalty, and decodes them (endpoints h₀, h₁ exactly).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from tqdm.auto import tqdm

from fisherfast.checks import check_int, check_points, check_real, expected
from fisherfast.geodesic.density import knn_sq_distance
from fisherfast.geodesic.evaluate import check_distributions, hellinger_distance
from fisherfast.geodesic.metrics import EncoderMetric, check_eps

__all__ = ["GagaAutoencoder", "GagaFit", "gaga_out", "gaga_phate", "phate_distances", "hellinger_targets",
           "latent_path", "LatentPath"]


def _mlp(sizes, generator, dtype, device) -> torch.nn.Sequential:
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = torch.nn.utils.skip_init(torch.nn.Linear, fan_in, fan_out, dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            for p in (linear.weight, linear.bias):
                p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul(2).sub(1).mul(bound))
        layers.append(linear)
        if i < len(sizes) - 2:
            layers += [torch.nn.BatchNorm1d(fan_out, momentum=None, dtype=dtype, device=device), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


class GagaAutoencoder(torch.nn.Module):
    """Encoder and decoder MLPs (Linear → BatchNorm → ReLU) × depth → Linear, on standardized x.

    ``encode`` (n, d) → (n, k), ``decode`` (n, k) → (n, d); ``forward`` = encode
    (what ``EncoderMetric`` differentiates). Weights drawn U(±1/√fan_in) from a
    generator seeded with ``seed`` (the global random state is left alone).
    """

    def __init__(self, d: int, latent_dim: int, *, width: int, depth: int, mean: torch.Tensor, scale: float,
                 seed: int, dtype=torch.float32, device=None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("mean", mean.detach().to(device, dtype).clone())
        self.scale = float(scale)
        self.encoder = _mlp([d] + [width] * depth + [latent_dim], generator, dtype, device)
        self.decoder = _mlp([latent_dim] + [width] * depth + [d], generator, dtype, device)
        self.d, self.latent_dim = d, latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.mean) / self.scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) * self.scale + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x[None])[0] if x.ndim == 1 else self.encode(x)


@dataclasses.dataclass(frozen=True)
class GagaFit:
    """A trained GAGA autoencoder.

    Attributes:
        autoencoder: the ``GagaAutoencoder`` (eval mode, parameters frozen).
        metric: ``EncoderMetric`` of its encoder (ε as requested; None: relative).
        kind: "out" or "phate".
        targets: (n, n) the target distances D it was trained on (float64).
        losses: {term: [value per step]} of the weighted terms (and "total").
        final: {term: value} over all training points after training.
    """

    autoencoder: GagaAutoencoder
    metric: EncoderMetric
    kind: str
    targets: torch.Tensor
    losses: dict
    final: dict


def hellinger_targets(q: torch.Tensor) -> torch.Tensor:
    """(n, n) D_ij = √((1/C) Σ_c d_H(q_{i,c}, q_{j,c})²) for q (n, B) or (n, C, B); float64."""
    q = check_distributions(q, "q", min_ndim=2)
    if q.ndim not in (2, 3):
        raise ValueError(f"q: expected shape (n, B) or (n, C, B), got {tuple(q.shape)}")
    d_H = hellinger_distance(q[:, None], q[None])
    return d_H if q.ndim == 2 else (d_H ** 2).mean(-1).sqrt()


def phate_distances(points: torch.Tensor, *, knn: int = 5, t="auto", seed: int = 0) -> torch.Tensor:
    """(n, n) Euclidean distances between the PHATE diffusion potentials of ``points`` (n, d)
    (``phate.PHATE(knn=knn, t=t).fit(points).diff_potential``); float64.

    Raises ImportError naming the extra when ``phate`` is not installed."""
    try:
        import phate
    except ImportError as error:          # pragma: no cover - depends on the environment
        raise ImportError("gaga_phate needs the phate package: pip install 'fisherfast[geodesic]'") from error
    X = check_points("points", points, min_n=3, finite=True)
    check_int("knn", knn, minimum=1, maximum=X.shape[0] - 1)
    n, d = X.shape
    # PCA to at most n − 1 components first (lossless for n ≤ d; PHATE's default is 100)
    n_pca = min(100, n - 1) if d > min(100, n - 1) else None
    operator = phate.PHATE(knn=knn, t=t, n_pca=n_pca, n_landmark=None, random_state=seed, verbose=0, n_jobs=1)
    operator.fit(X.detach().to("cpu", torch.float64).numpy())
    potential = torch.from_numpy(operator.diff_potential).double()
    return torch.cdist(potential, potential)


DEFAULT_WEIGHTS = {"out": {"distance": 1.0, "pointwise": 1.0, "recon": 1.0, "cycle": 0.0},
                   "phate": {"distance": 1.0, "pointwise": 0.0, "recon": 1.0, "cycle": 1.0}}


def _train(points, targets, pointwise, kind, latent_dim, *, width, depth, steps, batch, lr, seed, weights, eps,
           progress) -> GagaFit:
    X = check_points("points", points, min_n=3, finite=True).detach()
    n, d = X.shape
    for name, value in (("width", width), ("depth", depth), ("steps", steps), ("latent_dim", latent_dim)):
        check_int(name, value, minimum=1)
    check_int("batch", batch, minimum=2, optional=True)
    check_real("lr", lr, minimum=0, min_open=True)
    check_int("seed", seed, minimum=0)
    w = dict(DEFAULT_WEIGHTS[kind])
    for key, value in (weights or {}).items():
        if key not in w:
            raise ValueError(expected("weights", f"terms among {sorted(w)}", key))
        w[key] = check_real(f"weights[{key!r}]", value, minimum=0)
    eps = check_eps(eps)
    mean = X.mean(0)
    scale = float((X - mean).pow(2).sum(1).mean().sqrt()) / math.sqrt(d)
    if not scale > 0:
        raise ValueError("points: all points coincide; nothing to encode")
    D = targets.to(X.device, X.dtype)
    D2 = float((D ** 2).sum() / max(n * (n - 1), 1))
    if not D2 > 0:
        raise ValueError("targets: every target distance is 0")
    P = None if pointwise is None else pointwise.to(X.device, X.dtype)
    ae = GagaAutoencoder(d, latent_dim, width=width, depth=depth, mean=mean, scale=scale, seed=seed,
                         dtype=X.dtype, device=X.device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)

    def terms(idx):
        x = X[idx]
        z = ae.encode(x)
        i, j = torch.triu_indices(len(idx), len(idx), offset=1, device=X.device)
        out = {"distance": ((z[i] - z[j]).norm(dim=-1) - D[idx[i], idx[j]]).pow(2).mean() / D2}
        if w["pointwise"] > 0:
            out["pointwise"] = (z - P[idx]).pow(2).sum(-1).mean() / D2
        x_hat = ae.decode(z)
        if w["recon"] > 0:
            out["recon"] = (x_hat - x).pow(2).mean() / scale ** 2
        if w["cycle"] > 0:
            out["cycle"] = (ae.encode(x_hat) - z).pow(2).sum(-1).mean() / D2
        out["total"] = sum(w[k] * v for k, v in out.items())
        return out

    losses = {}
    ae.train()
    for _ in tqdm(range(steps), desc=f"GAGA-{kind}", unit="step", disable=not progress):
        idx = torch.arange(n) if batch is None or batch >= n else torch.randperm(n, generator=generator)[:batch]
        values = terms(idx.to(X.device))
        optimizer.zero_grad()
        values["total"].backward()
        optimizer.step()
        for k, v in values.items():
            losses.setdefault(k, []).append(float(v.detach()))
    with torch.no_grad():           # population statistics for BatchNorm (momentum=None: a plain average)
        for module in ae.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.reset_running_stats()
        ae.encode(X)
        ae.decode(ae.encode(X).detach())
        ae.eval()
        ae.requires_grad_(False)
        final = {k: float(v) for k, v in terms(torch.arange(n, device=X.device)).items()}
    return GagaFit(autoencoder=ae, metric=EncoderMetric(ae, d, eps=eps), kind=kind, targets=targets.double(),
                   losses=losses, final=final)


def gaga_out(points: torch.Tensor, q: torch.Tensor, *, width: int = 128, depth: int = 2, steps: int = 1000,
             batch: int | None = 256, lr: float = 1e-3, seed: int = 0, weights: dict | None = None,
             eps: float | None = None, progress: bool = False) -> GagaFit:
    """GAGA-Out: latent dimension K, distances matched to output Hellinger distances plus the
    pointwise √q term (module docstring).

    Args:
        points: (n, d) activations, n ≥ 3; the autoencoder takes their dtype and device.
        q: (n, B) or (n, C, B) their concept distributions (B = K + 1, the last
            bin "other"), e.g. ``concept_distributions(split, contexts, schema, points)``.
        width, depth: hidden width and number of hidden layers of each MLP.
        steps: Adam steps; batch: points per step (None: all); lr: Adam's rate.
        seed: seeds the initialization and batches (same inputs → same model on one machine).
        weights: overrides of {"distance", "pointwise", "recon", "cycle"} (defaults 1, 1, 1, 0).
        eps: ε of the returned metric (None: relative to each chord).

    Cost: steps × (a forward/backward of both MLPs on a batch + O(batch²·K) pairs).
    """
    q = check_distributions(q, "q", min_ndim=2)
    if q.ndim not in (2, 3) or q.shape[0] != check_points("points", points, min_n=3, finite=True).shape[0]:
        raise ValueError(f"q: expected shape ({points.shape[0]}, B) or ({points.shape[0]}, C, B), got "
                         f"{tuple(q.shape)}")
    q_mean = q if q.ndim == 2 else q.mean(1)
    K = q.shape[-1] - 1
    return _train(points, hellinger_targets(q), (q_mean[:, :K] / 2).sqrt(), "out", K, width=width, depth=depth,
                  steps=steps, batch=batch, lr=lr, seed=seed, weights=weights, eps=eps, progress=progress)


def gaga_phate(points: torch.Tensor, *, latent_dim: int = 3, knn: int = 5, t="auto", width: int = 128,
               depth: int = 2, steps: int = 1000, batch: int | None = 256, lr: float = 1e-3, seed: int = 0,
               weights: dict | None = None, eps: float | None = None, progress: bool = False) -> GagaFit:
    """GAGA-PHATE: distances matched to PHATE potential distances of the unlabelled
    ``points`` (``phate_distances(points, knn=knn, t=t, seed=seed)``), with reconstruction
    and cycle terms (weights default 1, 0, 1, 1). Other arguments as ``gaga_out``.

    Cost: PHATE on n points (O(n²) memory) plus the training of ``gaga_out``.
    """
    D = phate_distances(points, knn=knn, t=t, seed=seed)
    return _train(points, D, None, "phate", latent_dim, width=width, depth=depth, steps=steps, batch=batch,
                  lr=lr, seed=seed, weights=weights, eps=eps, progress=progress)


@dataclasses.dataclass(frozen=True)
class LatentPath:
    """``latent_path``'s result: ``path`` (T, d) decoded waypoints (endpoints h₀, h₁ exactly),
    ``latent`` (T, k) their latent points, ``penalty`` the final mean kNN squared distance
    of the interior waypoints to the cloud (None without a cloud)."""

    path: torch.Tensor
    latent: torch.Tensor
    penalty: float | None


def latent_path(autoencoder: GagaAutoencoder, h0: torch.Tensor, h1: torch.Tensor, T: int, *,
                cloud: torch.Tensor | None = None, density_weight: float = 1.0, k: int = 5,
                steps: int = 50) -> LatentPath:
    """Waypoints sampled in the latent space and decoded.

    Without ``cloud``: z_t on the latent chord E(h₀) → E(h₁), x_t = D(z_t).
    With ``cloud`` (N, d) activations: the interior latents minimize, by L-BFGS
    from the chord,

        Σ_t ‖z_{t+1} − z_t‖² / L₀ + λ · mean_t knn_sq_distance(D(z_t), cloud, k) / ρ₀,

    (L₀ the chord's latent energy, ρ₀ the cloud's own mean kNN squared distance,
    λ = ``density_weight``): a latent geodesic kept on the activation manifold.
    The first and last waypoints are set to h₀ and h₁ themselves.
    """
    if not isinstance(autoencoder, GagaAutoencoder):
        raise TypeError(f"autoencoder: expected a GagaAutoencoder, got {type(autoencoder).__name__}")
    for name, h in (("h0", h0), ("h1", h1)):
        if not isinstance(h, torch.Tensor) or h.shape != (autoencoder.d,):
            raise ValueError(f"{name}: expected a tensor of shape ({autoencoder.d},)")
    check_int("T", T, minimum=3)
    check_real("density_weight", density_weight, minimum=0)
    with torch.no_grad():
        z0, z1 = autoencoder.encode(torch.stack([h0, h1]))
        w = torch.linspace(0.0, 1.0, T, dtype=z0.dtype, device=z0.device)[:, None]
        Z = torch.lerp(z0[None], z1[None], w)
    penalty = None
    if cloud is not None:
        check_int("k", k, minimum=1, maximum=cloud.shape[0] - 1)
        with torch.no_grad():
            rho0 = float(knn_sq_distance(cloud, cloud, k + 1).mean()) * (k + 1) / k   # self-distance 0 excluded
            L0 = float(((Z[1:] - Z[:-1]) ** 2).sum()) or 1.0
        interior = Z[1:-1].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([interior], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def objective():
            full = torch.cat([Z[:1], interior, Z[-1:]])
            rho = knn_sq_distance(autoencoder.decode(interior), cloud, k).mean() / rho0
            return ((full[1:] - full[:-1]) ** 2).sum() / L0 + density_weight * rho, rho

        def closure():
            optimizer.zero_grad()
            loss = objective()[0]
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        Z = torch.cat([Z[:1], interior.detach(), Z[-1:]])
    with torch.no_grad():
        path = autoencoder.decode(Z)
        path[0], path[-1] = h0, h1
        if cloud is not None:
            penalty = float(knn_sq_distance(path[1:-1], cloud, k).mean())
    return LatentPath(path=path, latent=Z, penalty=penalty)
