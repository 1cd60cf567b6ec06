"""Metrics for geodesic paths between hidden states (docs/design.md §6).

Every metric is given by a factor: at a point x ∈ R^d, a matrix J(x) (m×d)
with

    M(x) = J(x)ᵀ J(x) + ε I,

so that the squared length of a small step δ is ‖J(x) δ‖² + ε‖δ‖², and the
discrete path energy of ``fisherfast.geodesic.solvers`` needs only J at the
waypoints. ``factor`` returns J detached from any autograd graph (the solvers
freeze it); ``matrix`` returns M. Each factor is the Jacobian of a feature
map s: R^d → R^m (J = ∂s/∂x), and ``features`` returns s itself,
differentiable, for the solver's embedded energy Σ‖s(x_{i+1}) − s(x_i)‖².

- ``FlatMetric``: J = I, ε = 0, so M = I.
- ``ConceptHellingerMetric``: the pullback of the Hellinger distance between
  concept distributions q (``fisherfast.concepts.ConceptSchema``) through the upper
  map at layer ℓ. Convention (fixed here, used throughout the package):

      d_H(q, q′)² = ½ Σ_b (√q_b − √q′_b)²  ∈ [0, 1],
      J(x) = ∂s/∂x with s(x) = √(q(x) / 2),

  so ‖J(x)(x′ − x)‖² = d_H(q(x), q(x′))² + O(‖x′ − x‖³), and
  J = J_s / √2 with J_s = ∂√q/∂x the Hellinger rows of
  ``fisherfast.concepts.hellinger_rows`` — the same rows the "concept" mode
  of ``fisherfast.metric.pullback_fisher`` uses for G_H = J_sᵀ J_s — so
  JᵀJ = ½ G_H (= ⅛ · the Fisher information of q): the ½ is the d_H²
  convention, nothing else. With C carrier contexts the metric is their mean,
  JᵀJ = (1/C) Σ_c J_cᵀ J_c: J stacks the C factors J_c / √C
  (m = C·(n_c+1)). ε keeps M positive definite off the ≤ C·n_c-dimensional
  span where q moves.
- ``EncoderMetric``: the pullback of the Euclidean metric through a learned
  encoder E: R^d → R^k (GAGA, ``fisherfast.geodesic.gaga``),
  J = ∂E/∂x, plus ε I.

Choosing ε (``eps=None``, the default of the concept and encoder metrics):
ε is set relative to the chord between the endpoints of each path,

    ε = f · E_J(chord) / Σ_i ‖Δ_i‖²,   E_J(chord) = Σ_i ‖s(x_{i+1}) − s(x_i)‖²,

so the ε term is the fraction f (``eps_fraction``, default 1%) of the chord's
metric energy (for the concept metric, its Hellinger energy Σ d_H²) and the
metric part dominates. An absolute ε is in squared metric units per squared
unit of h, and h is large: on SmolLM2-135M at layer 24 (‖h‖ ≈ 400, weekday
centroids 10–15 apart, a chord of ~288 units) ε = 1e-3 makes the embedded
energy 10.57 of which the Hellinger part is 0.195, and the solver then
barely moves (3.5 units). Solvers resolve a relative ε with
``metric.resolved(h0, h1, T)`` (a copy with ε fixed) and report the value
they used; pass a float to fix ε yourself.
"""
from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from fisherfast.checks import check_contexts, check_int, check_points, check_real
from fisherfast.concepts import ConceptSchema, check_schema, hellinger_rows

__all__ = ["GeodesicMetric", "FlatMetric", "ConceptHellingerMetric", "EncoderMetric", "DEFAULT_EPS_FRACTION"]

DEFAULT_EPS_FRACTION = 0.01


def check_eps(eps) -> float | None:
    """A finite float ≥ 0, or None (relative to the chord)."""
    return check_real("eps", eps, minimum=0, optional=True)


def check_eps_fraction(fraction) -> float:
    return check_real("eps_fraction", fraction, minimum=0, min_open=True)


class GeodesicMetric:
    """Base class: M(x) = J(x)ᵀJ(x) + εI from a factor J (see the module docstring).

    Subclasses set ``d`` and ``eps`` (a float, or None: relative to the
    chord, ``eps_fraction`` of its metric energy; module docstring) and
    implement ``_factor(X)``: (n, d) → (n, m, d) and ``_features(X)``.
    """

    d: int
    eps: float | None
    eps_fraction: float = DEFAULT_EPS_FRACTION

    def segment_energy(self, path: torch.Tensor) -> torch.Tensor:
        """The metric's discrete energy of a path (T, d) without the ε term, differentiable:
        Σ_i ‖s(x_{i+1}) − s(x_i)‖² for a pullback (overridden by metrics without features)."""
        S = self.features(path)
        return ((S[1:] - S[:-1]) ** 2).sum()

    def chord_eps(self, h0: torch.Tensor, h1: torch.Tensor, T: int) -> float:
        """ε = eps_fraction · segment_energy(chord) / Σ‖Δ_i‖² on the T-point chord from h0 to h1
        (0 when the metric part does not move along it). Cost: ``features`` at T points."""
        T = check_int("T", T, minimum=2)
        w = torch.linspace(0.0, 1.0, T, dtype=h0.dtype, device=h0.device)[:, None]
        chord = torch.lerp(h0[None], h1[None], w)
        with torch.no_grad():
            E_J = float(self.segment_energy(chord))
            step2 = float(((chord[1:] - chord[:-1]) ** 2).sum())
        if step2 == 0.0:
            raise ValueError("h0, h1: the endpoints coincide; ε relative to the chord is undefined")
        return self.eps_fraction * E_J / step2

    def with_eps(self, eps: float) -> "GeodesicMetric":
        """A shallow copy with the absolute ε = ``eps``."""
        out = copy.copy(self)
        out.eps = check_eps(eps)
        if out.eps is None:
            raise ValueError("eps: expected a float ≥ 0, got None")
        return out

    def resolved(self, h0: torch.Tensor, h1: torch.Tensor, T: int) -> "GeodesicMetric":
        """``self`` when ε is absolute, else a copy with ε = ``chord_eps(h0, h1, T)``."""
        return self if self.eps is not None else self.with_eps(self.chord_eps(h0, h1, T))

    def require_eps(self) -> float:
        if self.eps is None:
            raise ValueError("metric: its ε is relative to a chord (eps=None); fix it first with "
                             "metric.resolved(h0, h1, T) or metric.with_eps(value)")
        return self.eps

    def factor(self, points: torch.Tensor) -> torch.Tensor:
        """J at each point: (n, d) → (n, m, d), or (d,) → (m, d); detached."""
        X = self._check_points(points)
        J = self._factor(X).detach()
        return J[0] if points.ndim == 1 else J

    def matrix(self, points: torch.Tensor) -> torch.Tensor:
        """M = JᵀJ + εI at each point: (n, d) → (n, d, d), or (d,) → (d, d)."""
        eps = self.require_eps()
        J = self.factor(points)
        eye = torch.eye(self.d, dtype=J.dtype, device=J.device)
        return J.transpose(-1, -2) @ J + eps * eye

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """s at each point, J = ∂s/∂x: (n, d) → (n, m), or (d,) → (m,); differentiable."""
        X = self._check_points(points)
        S = self._features(X)
        return S[0] if points.ndim == 1 else S

    def _factor(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _features(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_points(self, points) -> torch.Tensor:
        return check_points("points", points, self.d)


class FlatMetric(GeodesicMetric):
    """M = I: J = I (d×d) at every point, ε = 0."""

    def __init__(self, d: int):
        self.d, self.eps = check_int("d", d, minimum=1), 0.0

    def __repr__(self) -> str:
        return f"FlatMetric(d={self.d})"

    def _factor(self, X):
        return torch.eye(self.d, dtype=X.dtype, device=X.device).expand(X.shape[0], self.d, self.d)

    def _features(self, X):
        return X


class ConceptHellingerMetric(GeodesicMetric):
    """Pullback Hellinger metric over a concept schema at layer ``split.layer``, plus εI.

    J(x) stacks, over the C contexts, J_c(x)/√C with J_c = ∂s_c/∂x,
    s_c(x) = √(q_c(x)/2) and q_c(x) the concept distribution of
    softmax(split.logits(ctx_c, x)) (module docstring for the convention:
    ‖J(x)(x′−x)‖² ≈ d_H², J_c = ``hellinger_rows`` / √2, JᵀJ = ½ ·
    pullback_fisher(mode="concept")).

    Args:
        split: a ``SplitModel``.
        contexts: one ``SplitContext`` or a list (the carrier prompts; x
            replaces the state at each context's position).
        schema: a ``ConceptSchema`` with V = split.V.
        eps: ε ≥ 0, or None (default): ``eps_fraction`` of each chord's
            Hellinger energy (module docstring).
        eps_fraction: f for ``eps=None`` (default 0.01).
        chunk: cotangents per vmapped VJP batch (None: all n_c+1 at once).
        progress: a tqdm bar over the points of each ``factor`` call.

    Cost per point and context: one upper-map forward, the head Jacobian
    ∂s/∂a (n_c+1 reverse products through the V×d head, batched) and n_c+1
    VJPs through the upper blocks (batched): ``hellinger_rows``.
    """

    def __init__(self, split, contexts, schema: ConceptSchema, *, eps: float | None = None,
                 eps_fraction: float = DEFAULT_EPS_FRACTION, chunk: int | None = None, progress: bool = False):
        self.contexts = check_contexts(split, contexts)
        self.schema = check_schema(split, schema)
        self.split, self.d, self.eps = split, split.d, check_eps(eps)
        self.eps_fraction = check_eps_fraction(eps_fraction)
        self.chunk, self.progress = check_int("chunk", chunk, minimum=1, optional=True), progress

    def __repr__(self) -> str:
        return (f"ConceptHellingerMetric(d={self.d}, layer={self.split.layer}, contexts={len(self.contexts)}, "
                f"bins={list(self.schema.bins)}, eps={self.eps})")

    def _factor(self, X):
        if X.dtype != self.split.W.dtype:
            raise TypeError(f"points: expected the model's dtype {self.split.W.dtype}, got {X.dtype}")
        scale = 1.0 / math.sqrt(2.0 * len(self.contexts))     # J_c = J_s / √2, stacked over C contexts / √C
        out = []
        for x in tqdm(X, desc="concept Hellinger factor", disable=not self.progress or len(X) < 2, leave=False):
            blocks = [hellinger_rows(self.split, ctx, x, self.schema, chunk=self.chunk)[0] for ctx in self.contexts]
            out.append(torch.cat(blocks) * scale)
        return torch.stack(out)

    def _features(self, X):
        """s(x) = [√(q_c(x)/2) / √C]_c (n, C·(n_c+1)): one batched upper-map forward per context."""
        if X.dtype != self.split.W.dtype:
            raise TypeError(f"points: expected the model's dtype {self.split.W.dtype}, got {X.dtype}")
        scale = 1.0 / math.sqrt(2.0 * len(self.contexts))
        blocks = [torch.exp(0.5 * self.schema.log_distribution(self.split.logits(ctx, X))) * scale
                  for ctx in self.contexts]
        return torch.cat(blocks, dim=-1)


class EncoderMetric(GeodesicMetric):
    """M = J_Eᵀ J_E + εI, J_E = ∂E/∂x of an encoder E: R^d → R^k (GAGA, ``fisherfast.geodesic.gaga``).

    Args:
        encoder: a ``torch.nn.Module`` mapping (d,) → (k,) (and batches);
            its parameters are used as they are (freeze them after training).
        d: the input dimension.
        eps: ε ≥ 0, or None (default): ``eps_fraction`` of each chord's
            energy ‖E(x_{i+1}) − E(x_i)‖² summed (module docstring).
        eps_fraction: f for ``eps=None`` (default 0.01).

    Cost: k reverse products of E per point (``torch.func.jacrev``, vmapped).
    """

    def __init__(self, encoder: torch.nn.Module, d: int, *, eps: float | None = None,
                 eps_fraction: float = DEFAULT_EPS_FRACTION):
        if not isinstance(encoder, torch.nn.Module):
            raise TypeError(f"encoder: expected a torch.nn.Module, got {type(encoder).__name__}")
        self.encoder, self.d, self.eps = encoder, check_int("d", d, minimum=1), check_eps(eps)
        self.eps_fraction = check_eps_fraction(eps_fraction)

    def __repr__(self) -> str:
        return f"EncoderMetric(d={self.d}, eps={self.eps}, encoder={type(self.encoder).__name__})"

    def _factor(self, X):
        return torch.func.vmap(torch.func.jacrev(self.encoder))(X)

    def _features(self, X):
        return self.encoder(X)
