"""INNSteer: steering by translation in the latent space of an invertible
network trained on the activations of two behaviours (docs/design.md §5).

The network φ: R^d → R^d is a per-coordinate standardization followed by
affine coupling layers (RealNVP):

    x = (h − μ) / σ,
    layer k:  y_a = x_a,   y_b = x_b ⊙ exp(s_k(x_a)) + t_k(x_a),
    s_k = c · tanh(ŝ_k / c)   (ŝ_k, t_k from one MLP of x_a; |s_k| < c = max_log_scale),

with (a, b) a seeded random split of the coordinates into halves, swapped on
the next layer so every coordinate is transformed. The inverse is exact,
x_b = (y_b − t_k(y_a)) ⊙ exp(−s_k(y_a)), and the log-determinant per sample is

    log|det ∂φ/∂h| = −Σ_j log σ_j + Σ_k Σ_b s_k.

μ and σ (the pooled mean and standard deviation of the training activations;
σ_j = 1 where a coordinate is constant) are part of φ, so the density and the
inverse are those of h itself. The last layer of every MLP starts at zero,
so an untrained φ is the standardization alone.

Training (``fit``), full batch, Adam for a fixed number of steps, minimizes

    L = NLL / d + separation · max(0, margin − ‖z̄⁺ − z̄⁻‖)² + logdet_weight · mean_i (ℓ_i / d)²,
    NLL = mean_i [½‖z_i‖² + (d/2) log 2π − log|det ∂φ/∂h(h_i)|],

z_i = φ(h_i) over both classes pooled, z̄± the latent class means, ℓ_i = Σ_k Σ_b s_k
the couplings' log-determinant (the standardization's is constant and left
out). The NLL (per dimension, so the weights mean the same at any d) fits
φ(h) to N(0, I); the hinge asks the class means to be ``margin`` apart; the
regularizer keeps the couplings near volume-preserving, so that a latent
translation stays a modest move in activation space. The default margin 2 is
the distance of two equal classes that fill the unit prior variance along
their mean difference with no spread of their own; classes of any balance
can reach it without contradicting N(0, I).

Steering: v = z̄⁺ − z̄⁻ at the end of training, and

    steer(h, α) = φ⁻¹(φ(h) + α v),   δ = steer(h, α) − h,

δ being an activation-space displacement for ``fisherfast.steer.steering`` or
``cost_ratio``. δ depends on h, so matched concept probability is a search over
α on the callable α ↦ δ(h, α):
``scale_to_target(split, ctx, concept, lambda a: inn.delta(ctx.h, a), target)``. Cost: one pass of φ or φ⁻¹ is O(n · n_layers · hidden · (d + hidden));
``fit`` is ``steps`` forward and backward passes over all samples.
"""
from __future__ import annotations

import json
import math
import os

import torch

from fisherfast.persist import atomic_write, read_versioned
from fisherfast.checks import check_finite, check_int, check_real, expected

FORMAT = "fisherfast.innsteer"
VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MARGIN = 2.0


class _AffineCoupling(torch.nn.Module):
    """One RealNVP layer: y_a = x_a, y_b = x_b ⊙ exp(s(x_a)) + t(x_a), |s| < c."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, hidden: int, max_log_scale: float, dtype):
        super().__init__()
        self.max_log_scale = max_log_scale
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        # y = cat(y_a, y_b)[:, unpermute] puts every coordinate back in place
        self.register_buffer("unpermute", torch.argsort(torch.cat([a, b])), persistent=False)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(a), hidden, dtype=dtype), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden, dtype=dtype), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2 * len(b), dtype=dtype))

    def reset(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init (U(±1/√fan_in)) from ``generator``; last layer zero."""
        linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for linear in linears[:-1]:
                bound = 1.0 / math.sqrt(linear.in_features)
                for p in (linear.weight, linear.bias):
                    p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator))
            linears[-1].weight.zero_()
            linears[-1].bias.zero_()

    def _scale_shift(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(x_a).chunk(2, dim=-1)
        c = self.max_log_scale
        return c * torch.tanh(raw_s / c), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, self.a], x[:, self.b]
        s, t = self._scale_shift(x_a)
        return torch.cat([x_a, x_b * torch.exp(s) + t], dim=1)[:, self.unpermute], s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, self.a], y[:, self.b]
        s, t = self._scale_shift(y_a)
        return torch.cat([y_a, (y_b - t) * torch.exp(-s)], dim=1)[:, self.unpermute]


class INNSteer(torch.nn.Module):
    """An invertible network φ trained to steer between two behaviours (module docstring).

    Args:
        d: activation dimension (≥ 2).
        n_layers: affine coupling layers; hidden: width of their two-hidden-layer MLPs.
        max_log_scale: the bound c on each coupling's log-scale.
        seed: the coordinate splits and initial weights (the global RNG is not used).
        dtype: torch.float32 or torch.float64; inputs must have it.

    Example::

        inn = INNSteer(d=576, seed=0)
        inn.fit(h_pos, h_neg)
        with steering(model, {12: inn.delta(h, 1.0)}):
            out = model.generate(**inputs, max_new_tokens=20)
    """

    def __init__(self, d: int, n_layers: int = 6, hidden: int = 128, *, max_log_scale: float = 2.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d = check_int("d", d, minimum=2)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.max_log_scale = check_real("max_log_scale", max_log_scale, minimum=0, min_open=True)
        self.seed = check_int("seed", seed)
        if dtype not in DTYPES.values():
            raise ValueError(expected("dtype", "torch.float32 or torch.float64", dtype))
        generator = torch.Generator().manual_seed(seed)
        couplings = []
        for k in range(self.n_layers):
            if k % 2 == 0:
                perm = torch.randperm(d, generator=generator)
                a, b = perm[: d // 2], perm[d // 2:]
            else:
                a, b = b, a
            couplings.append(_AffineCoupling(a.sort().values, b.sort().values, self.hidden, self.max_log_scale, dtype))
        self.couplings = torch.nn.ModuleList(couplings)
        self.register_buffer("mean", torch.zeros(d, dtype=dtype))
        self.register_buffer("scale", torch.ones(d, dtype=dtype))
        self.register_buffer("latent_direction", torch.zeros(d, dtype=dtype))
        self.fitted = False
        self._reset_couplings()

    def _reset_couplings(self) -> None:
        generator = torch.Generator().manual_seed(self.seed + 1)  # seed + 1: not the stream of the splits
        for coupling in self.couplings:
            coupling.reset(generator)

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def config(self) -> dict:
        """The constructor arguments (JSON-serializable) plus whether φ is fitted."""
        return {"d": self.d, "n_layers": self.n_layers, "hidden": self.hidden, "max_log_scale": self.max_log_scale,
                "seed": self.seed, "dtype": str(self.dtype).removeprefix("torch."), "fitted": self.fitted}

    # -- validation -----------------------------------------------------------------------------------------------
    def _check_batch(self, name: str, h, *, allow_vector: bool = False) -> torch.Tensor:
        dims = (1, 2) if allow_vector else (2,)
        if not isinstance(h, torch.Tensor) or h.dim() not in dims or h.shape[-1] != self.d:
            shape = f"({self.d},) or (n, {self.d})" if allow_vector else f"(n, {self.d})"
            raise ValueError(expected(name, f"a tensor of shape {shape}", h if isinstance(h, torch.Tensor)
                                      else type(h)))
        if h.dtype != self.dtype:
            raise TypeError(expected(name, f"the network's dtype {self.dtype} (convert it with .to({self.dtype}) "
                                     f"or build INNSteer(dtype={h.dtype}))", h.dtype))
        if h.device != self.mean.device:
            raise ValueError(expected(name, f"the network's device {self.mean.device}", h.device))
        return check_finite(name, h)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("INNSteer is not fitted: call fit(h_pos, h_neg) first")

    # -- the map --------------------------------------------------------------------------------------------------
    def _couplings_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, ℓ): the couplings applied to standardized x, ℓ = Σ_k Σ_b s_k per sample."""
        ell = x.new_zeros(x.shape[0])
        for coupling in self.couplings:
            x, s_sum = coupling(x)
            ell = ell + s_sum
        return x, ell

    def _phi(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, log|det ∂φ/∂h|, ℓ) without input checks."""
        z, ell = self._couplings_forward((h - self.mean) / self.scale)
        return z, ell - torch.log(self.scale).sum(), ell

    def _phi_inverse(self, z: torch.Tensor) -> torch.Tensor:
        for coupling in reversed(self.couplings):
            z = coupling.inverse(z)
        return z * self.scale + self.mean

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, logdet) = (φ(h), log|det ∂φ/∂h|) for h of shape (n, d): z (n, d), logdet (n,)."""
        z, logdet, _ = self._phi(self._check_batch("h", h))
        return z, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """h = φ⁻¹(z) for z of shape (n, d), exact up to rounding."""
        return self._phi_inverse(self._check_batch("z", z))

    def nll(self, h: torch.Tensor) -> torch.Tensor:
        """mean_i [½‖φ(h_i)‖² + (d/2) log 2π − log|det ∂φ/∂h(h_i)|]: the negative
        log-likelihood of h (n, d) under the density φ pulls back from N(0, I), nats per sample."""
        z, logdet = self(h)
        return self._nll(z, logdet)

    def _nll(self, z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        return (0.5 * z.square().sum(dim=1) + 0.5 * self.d * math.log(2 * math.pi) - logdet).mean()

    # -- training -------------------------------------------------------------------------------------------------
    def fit(self, h_pos: torch.Tensor, h_neg: torch.Tensor, *, steps: int = 500, lr: float = 1e-3,
            separation: float = 1.0, margin: float = DEFAULT_MARGIN, logdet_weight: float = 0.01,
            progress: bool = True) -> list[float]:
        """Train φ on the two behaviours and set the latent direction v = z̄⁺ − z̄⁻.

        Every call starts afresh: μ, σ from the pooled h_pos ∪ h_neg, the couplings
        from the seeded init, so the result depends only on the data, the
        arguments and the seed.

        Args:
            h_pos, h_neg: (n±, d) activations of the behaviour to steer towards and
                away from (n⁺, n⁻ ≥ 1), in the network's dtype and device.
            steps: full-batch Adam steps; lr: its learning rate.
            separation, margin, logdet_weight: the weights and margin of the objective L
                (module docstring).
            progress: show a tqdm bar over the steps.
        Returns:
            L at each step, evaluated before that step's update.
        """
        from tqdm.auto import tqdm

        h_pos, h_neg = self._check_batch("h_pos", h_pos), self._check_batch("h_neg", h_neg)
        if h_pos.shape[0] < 1 or h_neg.shape[0] < 1:
            raise ValueError(f"h_pos, h_neg: expected at least one sample of each behaviour, got {h_pos.shape[0]} "
                             f"and {h_neg.shape[0]}")
        steps = check_int("steps", steps, minimum=1)
        lr = check_real("lr", lr, minimum=0, min_open=True)
        separation = check_real("separation", separation, minimum=0)
        margin = check_real("margin", margin, minimum=0, min_open=True)
        logdet_weight = check_real("logdet_weight", logdet_weight, minimum=0)

        h = torch.cat([h_pos, h_neg])
        n_pos = h_pos.shape[0]
        with torch.no_grad():
            self.mean.copy_(h.mean(dim=0))
            std = h.std(dim=0, correction=0)
            self.scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))
            self.latent_direction.zero_()
        self.fitted = False
        self._reset_couplings()
        optimizer = torch.optim.Adam(self.couplings.parameters(), lr=lr)
        losses = []
        for _ in tqdm(range(steps), desc="INNSteer", unit="step", disable=not progress):
            optimizer.zero_grad(set_to_none=True)
            z, logdet, ell = self._phi(h)
            gap = torch.linalg.vector_norm(z[:n_pos].mean(dim=0) - z[n_pos:].mean(dim=0))
            loss = (self._nll(z, logdet) / self.d + separation * torch.relu(margin - gap).square()
                    + logdet_weight * (ell / self.d).square().mean())
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            z, _, _ = self._phi(h)
            self.latent_direction.copy_(z[:n_pos].mean(dim=0) - z[n_pos:].mean(dim=0))
        self.fitted = True
        return losses

    # -- steering -------------------------------------------------------------------------------------------------
    @property
    def direction(self) -> torch.Tensor:
        """The latent steering direction v = z̄⁺ − z̄⁻ (d,) of the training activations."""
        self._check_fitted()
        return self.latent_direction.detach().clone()

    def steer(self, h: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """φ⁻¹(φ(h) + α v) for h of shape (d,) or (n, d), same shape out.

        α = 0 returns a copy of h exactly (not the rounding of φ⁻¹(φ(h)))."""
        self._check_fitted()
        h = self._check_batch("h", h, allow_vector=True)
        alpha = check_real("alpha", alpha)
        if alpha == 0:
            return h.detach().clone()
        with torch.no_grad():
            z, _, _ = self._phi(h.reshape(-1, self.d))
            return self._phi_inverse(z + alpha * self.latent_direction).reshape(h.shape)

    def delta(self, h: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """δ = steer(h, α) − h, the displacement in activation space ((d,) or (n, d)).

        Unlike CAA, δ depends on h: for a hook, compute it at the activation it is added to."""
        return self.steer(h, alpha) - h

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the weights, μ, σ and v to a safetensors file (atomically, with the
        umask's file mode); the config and format version go in its metadata."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(self.config())}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "INNSteer":
        """Read a file written by :meth:`save` (onto ``device``, default CPU).

        Raises FileNotFoundError when absent; ValueError naming the file for another
        format or version, a damaged file, or tensors that do not fit the config.
        Never unpickles."""
        meta, tensors = read_versioned(path, FORMAT, VERSION, "INNSteer file")
        try:
            config = json.loads(meta["config"])
            fitted = config.pop("fitted")
            dtype = DTYPES[config.pop("dtype")]
            inn = cls(**config, dtype=dtype)
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} has a corrupted INNSteer config: {err!r}") from None
        if not isinstance(fitted, bool):
            raise ValueError(f"{path} has a corrupted INNSteer config: fitted={fitted!r}")
        state = inn.state_dict()
        if set(tensors) != set(state):
            raise ValueError(f"{path} is corrupted: tensors {sorted(tensors)}, expected {sorted(state)}")
        for name, t in tensors.items():
            if t.dtype != dtype or t.shape != state[name].shape or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path} is corrupted: {name} must be finite {dtype} of shape "
                                 f"{tuple(state[name].shape)}, got {t.dtype} {tuple(t.shape)}")
        if not bool((tensors["scale"] > 0).all()):
            raise ValueError(f"{path} is corrupted: scale must be positive")
        inn.load_state_dict(tensors)
        inn.fitted = fitted
        return inn.to(device) if device is not None else inn
