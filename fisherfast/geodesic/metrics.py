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
  concept distributions q (``fisherfast.geodesic.concepts``) through the upper
  map at layer ℓ. Convention (fixed here, used throughout the package):

      d_H(q, q′)² = ½ Σ_b (√q_b − √q′_b)²  ∈ [0, 1],
      J(x) = ∂s/∂x with s(x) = √(q(x) / 2),

  so ‖J(x)(x′ − x)‖² = d_H(q(x), q(x′))² + O(‖x′ − x‖³), and
  JᵀJ = ½ G_H with G_H = J_√qᵀ J_√q = ¼ J_qᵀ diag(1/q) J_q the "concept" mode of
  ``fisherfast.metric.pullback_fisher`` (equivalently JᵀJ = ⅛ · the Fisher
  information of q). With C carrier contexts the metric is their mean,
  JᵀJ = (1/C) Σ_c J_cᵀ J_c: J stacks the C factors J_c / √C (m = C·(K+1)).
  Default ε = 1e-3 (``DEFAULT_EPS``), in squared-Hellinger units per squared
  unit of h: it keeps M positive definite off the ≤ C·K-dimensional span
  where q moves. It is absolute, not relative to the scale of h: on
  SmolLM2-135M at layer 24 (weekday centroids 10–15 apart, T = 8 on the
  chord) the ε term is 0.0297 of a chord energy of 0.0299, so choose ε
  against ‖h₁ − h₀‖² and the Hellinger part when the metric must dominate.
- ``EncoderMetric``: the pullback of the Euclidean metric through a learned
  encoder E: R^d → R^k (GAGA-Out, ``fisherfast.geodesic.encoder``),
  J = ∂E/∂x, plus ε I (default 1e-3).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from fisherfast.geodesic.concepts import ConceptSchema, check_contexts, check_schema

__all__ = ["GeodesicMetric", "FlatMetric", "ConceptHellingerMetric", "EncoderMetric", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-3


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float ≥ 0, got {eps!r}")
    return float(eps)


class GeodesicMetric:
    """Base class: M(x) = J(x)ᵀJ(x) + εI from a factor J (see the module docstring).

    Subclasses set ``d`` and ``eps`` and implement ``_factor(X)``: (n, d) → (n, m, d).
    """

    d: int
    eps: float

    def factor(self, points: torch.Tensor) -> torch.Tensor:
        """J at each point: (n, d) → (n, m, d), or (d,) → (m, d); detached."""
        X = self._check_points(points)
        J = self._factor(X).detach()
        return J[0] if points.ndim == 1 else J

    def matrix(self, points: torch.Tensor) -> torch.Tensor:
        """M = JᵀJ + εI at each point: (n, d) → (n, d, d), or (d,) → (d, d)."""
        J = self.factor(points)
        eye = torch.eye(self.d, dtype=J.dtype, device=J.device)
        return J.transpose(-1, -2) @ J + self.eps * eye

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
        if not isinstance(points, torch.Tensor) or not points.is_floating_point():
            raise TypeError(f"points: expected a floating tensor of shape (d,) or (n, d), got "
                            f"{type(points).__name__}" + (f" of dtype {points.dtype}"
                                                           if isinstance(points, torch.Tensor) else ""))
        X = points[None] if points.ndim == 1 else points
        if X.ndim != 2 or X.shape[1] != self.d or X.shape[0] == 0:
            raise ValueError(f"points: expected shape ({self.d},) or (n, {self.d}) with n ≥ 1, "
                             f"got {tuple(points.shape)}")
        return X


class FlatMetric(GeodesicMetric):
    """M = I: J = I (d×d) at every point, ε = 0."""

    def __init__(self, d: int):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d: expected a positive int, got {d!r}")
        self.d, self.eps = d, 0.0

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
    ‖J(x)(x′−x)‖² ≈ d_H², JᵀJ = ½ · pullback_fisher(mode="concept")).

    Args:
        split: a ``SplitModel``.
        contexts: one ``SplitContext`` or a list (the carrier prompts; x
            replaces the state at each context's position).
        schema: a ``ConceptSchema`` with V = split.V.
        eps: ε ≥ 0 (default 1e-3).
        chunk: cotangents per vmapped VJP batch (None: all K+1 at once).
        progress: a tqdm bar over the points of each ``factor`` call.

    Cost per point and context: one upper-map forward, the head Jacobian
    ∂s/∂a (K+1 reverse products through the V×d head, batched) and K+1 VJPs
    through the upper blocks (batched): J_c = (∂s/∂a) B.
    """

    def __init__(self, split, contexts, schema: ConceptSchema, *, eps: float = DEFAULT_EPS,
                 chunk: int | None = None, progress: bool = False):
        self.contexts = check_contexts(split, contexts)
        self.schema = check_schema(split, schema)
        self.split, self.d, self.eps = split, split.d, check_eps(eps)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
        self.chunk, self.progress = chunk, progress

    def __repr__(self) -> str:
        return (f"ConceptHellingerMetric(d={self.d}, layer={self.split.layer}, contexts={len(self.contexts)}, "
                f"bins={list(self.schema.bins)}, eps={self.eps})")

    def _s_of_head_input(self, a):
        """s = √(q/2) (K+1,) as a function of the head input a."""
        log_q = self.schema.log_distribution(self.split.logits_from_head_input(a))
        return torch.exp(0.5 * log_q) / math.sqrt(2.0)

    def _factor(self, X):
        if X.dtype != self.split.W.dtype:
            raise TypeError(f"points: expected the model's dtype {self.split.W.dtype}, got {X.dtype}")
        scale = 1.0 / math.sqrt(len(self.contexts))
        out = []
        for x in tqdm(X, desc="concept Hellinger factor", disable=not self.progress or len(X) < 2, leave=False):
            blocks = []
            for ctx in self.contexts:
                a = self.split.head_input(ctx, x)
                S_a = torch.func.jacrev(self._s_of_head_input)(a)          # (K+1, d) ∂s/∂a
                blocks.append(self.split.vjp(ctx, x, S_a.to(x.dtype), chunk=self.chunk))   # rows (∂s_b/∂a) B
            out.append(torch.cat(blocks) * scale)
        return torch.stack(out)

    def _features(self, X):
        """s(x) = [√(q_c(x)/2) / √C]_c (n, C·(K+1)): one batched upper-map forward per context."""
        if X.dtype != self.split.W.dtype:
            raise TypeError(f"points: expected the model's dtype {self.split.W.dtype}, got {X.dtype}")
        scale = 1.0 / math.sqrt(2.0 * len(self.contexts))
        blocks = [torch.exp(0.5 * self.schema.log_distribution(self.split.logits(ctx, X))) * scale
                  for ctx in self.contexts]
        return torch.cat(blocks, dim=-1)


class EncoderMetric(GeodesicMetric):
    """M = J_Eᵀ J_E + εI, J_E = ∂E/∂x of an encoder E: R^d → R^k (GAGA-Out).

    Args:
        encoder: a ``torch.nn.Module`` mapping (d,) → (k,) (and batches);
            its parameters are used as they are (freeze them after training).
        d: the input dimension.
        eps: ε ≥ 0 (default 1e-3).

    Cost: k reverse products of E per point (``torch.func.jacrev``, vmapped).
    """

    def __init__(self, encoder: torch.nn.Module, d: int, *, eps: float = DEFAULT_EPS):
        if not isinstance(encoder, torch.nn.Module):
            raise TypeError(f"encoder: expected a torch.nn.Module, got {type(encoder).__name__}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d: expected a positive int, got {d!r}")
        self.encoder, self.d, self.eps = encoder, d, check_eps(eps)

    def __repr__(self) -> str:
        return f"EncoderMetric(d={self.d}, eps={self.eps}, encoder={type(self.encoder).__name__})"

    def _factor(self, X):
        return torch.func.vmap(torch.func.jacrev(self.encoder))(X)

    def _features(self, X):
        return self.encoder(X)
