"""Streaming FisherSketch of a head Fisher (docs/design.md §7).

Per sample: head input a ∈ R^d, logit error e = p − e_y ∈ R^K, gradient
g = e ⊗ a. The joint feature ψ_j(g) = (r_jᵃ·a)(r_jᵉ·e)(s_jᵃ·a)(s_jᵉ·e)/√m has
E[ψ(g)·ψ(g′)] = (g·g′)² = (a·a′)²(e·e′)², so mean ψ over a task's samples
sketches its empirical head Fisher F̂ = (1/n) Σ g gᵀ and cosines of signatures
estimate ⟨F̂_i, F̂_j⟩ / (‖F̂_i‖‖F̂_j‖).

The first moment, in the same pass: φ_j(g) = (r_jᵃ·a)(r_jᵉ·e)/√m with the
same plans rᵃ, rᵉ, so E[φ(g)·φ(g′)] = g·g′ and mean φ is a random projection
of the mean head gradient ḡ = (1/n) Σ e ⊗ a (its cosines estimate
cos(ḡ_i, ḡ_j), the peer's "mean gradient cosine" restricted to the head).
The fused op accumulates the three second-moment kinds and the first moment
(a fourth row of its state buffers) from the same projections.

Soft-capped heads (Gemma-2/3, ``softcap=c``): p = softmax(c·tanh(z/c)) and
e = (1 − tanh²(z/c)) ⊙ (p − e_y), the gradient of −log p_y with respect to the
linear logits z = W a + b, so g = e ⊗ a is exactly the gradient with respect
to W (``fisher_sketch_update``).
"""
from __future__ import annotations

import math

import torch

from fisherfast.ops import fisher_sketch_update, srht, srht_onehot
from fisherfast.checks import check_finite, check_tensor
from fisherfast.sketch.spec import SketchSpec
from fisherfast.sketch.state import KINDS, MEAN, SketchState


def check_masked_logits(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    """ValueError unless ``logits`` (B, K) are finite or −inf (a mask), every row keeps
    one finite logit, and no label ``y`` (B,) falls on a masked class."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise ValueError("logits contains NaN or +inf values (−inf is accepted as a mask: probability zero)")
    if logits.dim() != 2 or logits.shape[0] == 0:
        return
    masked = torch.isneginf(logits)
    if bool(masked.any()):
        empty = masked.all(dim=1).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"logits row {int(empty[0])} is −inf everywhere: every class masked, no distribution")
        if isinstance(y, torch.Tensor) and y.dim() == 1 and y.shape[0] == logits.shape[0] \
                and not y.is_floating_point() and bool(((y >= 0) & (y < logits.shape[1])).all()):
            on_mask = masked.gather(1, y.long().to(logits.device)[:, None]).flatten().nonzero().flatten()
            if on_mask.numel():
                i = int(on_mask[0])
                raise ValueError(f"y[{i}] = {int(y[i])} is a masked class (logit −inf, probability zero)")


class FisherSketcher:
    """Accumulates the FisherSketch state of one task, batch by batch.

    Args:
        spec: the SketchSpec (d, K, m, seed).
        device: where the state lives (default: the device of the first batch).
        generator_seed: seed of the generator that draws y ∼ p for
            ``update(..., sample=True)`` (default: ``spec.seed``).
        backend: force an op backend ("reference", "cpu", "triton", "cuda").
        mean: also sketch the first moment (the mean head gradient; default True).

    The state is 4 × 2 × m float64 (256 KB at m = 4096; 192 KB without the
    first moment) whatever the data size.
    """

    def __init__(self, spec: SketchSpec, *, device=None, generator_seed: int | None = None,
                 backend: str | None = None, mean: bool = True):
        if not isinstance(spec, SketchSpec):
            raise TypeError(f"spec must be a SketchSpec, got {type(spec).__name__}")
        if generator_seed is not None and (not isinstance(generator_seed, int) or generator_seed < 0):
            raise ValueError(f"generator_seed must be a non-negative int, got {generator_seed!r}")
        if not isinstance(mean, bool):
            raise TypeError(f"mean must be a bool, got {type(mean).__name__}")
        self.spec, self.backend, self.mean = spec, backend, mean
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self._sums = self._sumsqs = None
        self._generator = torch.Generator().manual_seed(spec.seed if generator_seed is None else generator_seed)
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device: torch.device) -> None:
        rows = len(KINDS) + (1 if self.mean else 0)  # the op's fourth row: the first moment Σφ, Σφ²
        self._sums = torch.zeros(rows, self.spec.m, dtype=torch.float64, device=device)
        self._sumsqs = torch.zeros_like(self._sums)

    def update(self, a: torch.Tensor, *, logits: torch.Tensor | None = None, W: torch.Tensor | None = None,
               b: torch.Tensor | None = None, y: torch.Tensor | None = None, sample: bool = False,
               softcap: float | None = None, chunk_rows: int | None = None) -> None:
        """Add a batch: a (B, d) and logits (B, K) or the head (W (K, d), b (K,));
        labels y (B,) for the empirical Fisher, or ``sample=True`` to draw
        y ∼ softmax(logits) (true Fisher) from this sketcher's seeded generator.
        ``softcap=c`` for a soft-capped head: the logits given are the capped
        c·tanh(z/c) (with W, b the op caps them), and the error is the exact
        gradient with respect to the linear logits (module docstring).

        A logit of −inf is a mask: that class has probability zero (e = p − e_y
        is 0 there and y ∼ p never draws it). Raises ValueError for NaN or +inf
        logits, a row with every logit −inf (no distribution), or a label y on
        a masked class (its log-likelihood is −inf); all before any work."""
        check_tensor("a", a, ndim=2)
        if a.shape[1] != self.spec.d:
            raise ValueError(f"a must have shape (B, d = {self.spec.d}), got {tuple(a.shape)}")
        if not isinstance(sample, bool):
            raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
        if sample == (y is not None):
            raise ValueError("give labels y, or sample=True to draw y ∼ p (not both)")
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                    or not math.isfinite(softcap) or softcap <= 0):
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
        check_finite("a", a)  # one NaN row would make every later sum NaN
        if isinstance(logits, torch.Tensor):
            check_masked_logits(logits, y)
        K = logits.shape[-1] if isinstance(logits, torch.Tensor) else W.shape[0] if isinstance(W, torch.Tensor) else None
        if K is not None and K != self.spec.K:
            raise ValueError(f"the head must have K = {self.spec.K} classes (spec), got {K}")
        if self._sums is None:
            self.device = a.device
            self._allocate(a.device)
        if a.device != self.device:
            raise ValueError(f"a is on {a.device} but the sketcher's state is on {self.device}")
        u = torch.rand(a.shape[0], generator=self._generator, dtype=torch.float64).to(a.device) if sample else None
        fisher_sketch_update(self._sums, self._sumsqs, a, self.spec.plans(), logits=logits, W=W, b=b, y=y, u=u,
                             softcap=softcap, chunk_rows=chunk_rows, backend=self.backend)
        self.count += a.shape[0]

    @property
    def state(self) -> SketchState:
        """A snapshot of the current state (copies of the buffers)."""
        if self._sums is None:
            return SketchState(self.spec, mean=self.mean)
        sums = {k: self._sums[i].clone() for i, k in enumerate(KINDS)}
        sumsqs = {k: self._sumsqs[i].clone() for i, k in enumerate(KINDS)}
        if self.mean:
            sums[MEAN], sumsqs[MEAN] = self._sums[len(KINDS)].clone(), self._sumsqs[len(KINDS)].clone()
        return SketchState(self.spec, self.count, sums, sumsqs)


def sketch_features(a: torch.Tensor, e, spec: SketchSpec) -> dict[str, torch.Tensor]:
    """Per-sample features {kind: (B, m) float64} from explicit errors, for the
    kinds joint, activation, error and the first moment "mean".

    ``e`` is either the error rows (B, K) (any vectors, e.g. per-position
    backpropagated errors) or a pair (p, y) of probabilities (B, K) and labels
    (B,), meaning e = p − e_y with the one-hot part in closed form. Unfused:
    the rows of e are materialized; use FisherSketcher for streams."""
    check_tensor("a", a, ndim=2)
    if a.shape[1] != spec.d:
        raise ValueError(f"a must have shape (B, d = {spec.d}), got {tuple(a.shape)}")
    ra, sa, re, se = spec.plans()
    if isinstance(e, tuple):
        if len(e) != 2:
            raise ValueError("e must be a (B, K) tensor or a pair (p, y)")
        p, y = e
        check_tensor("p", p, ndim=2)
        if tuple(p.shape) != (a.shape[0], spec.K):
            raise ValueError(f"p must have shape (B = {a.shape[0]}, K = {spec.K}), got {tuple(p.shape)}")
        u_e = srht(p.float(), re) - srht_onehot(y, re)
        v_e = srht(p.float(), se) - srht_onehot(y, se)
    else:
        check_tensor("e", e, ndim=2)
        if tuple(e.shape) != (a.shape[0], spec.K):
            raise ValueError(f"e must have shape (B = {a.shape[0]}, K = {spec.K}), got {tuple(e.shape)}")
        u_e, v_e = srht(e.float(), re), srht(e.float(), se)
    u_a, v_a = srht(a.float(), ra), srht(a.float(), sa)
    root_m = math.sqrt(spec.m)
    psi_act = u_a.double() * v_a.double() / root_m
    psi_err = u_e.double() * v_e.double() / root_m
    return {"joint": psi_act * psi_err * root_m, "activation": psi_act, "error": psi_err,
            MEAN: u_a.double() * u_e.double() / root_m}
