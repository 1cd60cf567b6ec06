"""Matched concept probability along a ray (docs/design.md §5): the scale α ≥ 0 at
which a fixed direction v (CAA, ActAdd, a probe, a frozen FishBack direction)
— or an h-dependent displacement δ(α) such as INNSteer's — reaches a target
score, φ(h + α v) = φ*.

φ along a ray need not be monotone: it can rise, peak and fall, and a window
above φ* can be narrow (SmolLM2, layer 24, a frozen FishBack direction:
p = 0.394 at α = 32, 0.420 at α = 64, 0.5 near α = 37.4). So the search is

1. a scan on the geometric grid α_k = ``min_scale``·r^k up to ``max_scale``
   (r = ``ratio`` ≤ 1.25), evaluated in batches of candidates (one upper-map
   forward per batch), stopping at the first grid point with φ ≥ φ*;
2. if no grid point reaches φ*: a bounded Brent maximization of φ on
   [α_{k-1}, α_{k+1}] around the ``refine`` highest local maxima of the scan;
3. Brent's root finding (scipy ``brentq``) on the bracket that ends at the
   first grid point (or refined maximum) reaching φ*, which starts below it.

When nothing reaches φ*, ``TargetNotReached`` (a ValueError) reports the best
α and score found, so a comparison can say how close a method got.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from fisherfast.checks import check_finite, check_int, check_real, check_vector, expected
from fisherfast.concepts import check_concept, check_target_score

__all__ = ["scale_to_target", "TargetNotReached"]


def check_start(split, ctx, h) -> torch.Tensor:
    """The starting state: ``ctx.h`` when h is None; for a SplitModel, ctx must
    be one of its contexts and h a (d,) tensor in the model's dtype; h must be
    finite (errors name ctx and h)."""
    if h is None:
        if not hasattr(ctx, "h"):
            raise TypeError(expected("ctx", "a SplitContext from split.context()", type(ctx)))
        h = ctx.h
    from fisherfast.split import SplitModel

    if isinstance(split, SplitModel):  # ctx is its context, h has its shape and dtype
        split.check_point(ctx, h, "h")
    elif not isinstance(h, torch.Tensor) or h.ndim != 1 or not h.is_floating_point():
        raise TypeError(expected("h", "a floating (d,) tensor", h if isinstance(h, torch.Tensor) else type(h)))
    return check_finite("h", h)


class TargetNotReached(ValueError):
    """No scale in [0, max_scale] reaches the target score.

    Attributes:
        best_alpha: the α of the highest score found (scan and refinement).
        best_score: φ there; target_score: φ*.
    """

    def __init__(self, message: str, best_alpha: float, best_score: float, target_score: float):
        super().__init__(message)
        self.best_alpha, self.best_score, self.target_score = best_alpha, best_score, target_score


def scale_to_target(split, ctx, concept, direction, target_score: float, *, h: torch.Tensor | None = None,
                    max_scale: float = 1e3, min_scale: float = 1e-3, ratio: float = 1.2, refine: int = 3,
                    xtol: float = 1e-10, batch_size: int = 32, chunk: int | None = None) -> float:
    """α ≥ 0 with φ(h + δ(α)) = ``target_score`` (module docstring for the search).

    Args:
        split, ctx: a ``SplitModel`` and one of its contexts.
        concept: a ConceptScore or SequenceConcept.
        direction: v (d,), δ(α) = α v; or a callable α ↦ δ(α) (d,) for a
            displacement that depends on h, e.g. ``lambda a: inn.delta(h, a)``
            for INNSteer (cast to h's dtype).
        target_score: φ*.
        h: the starting state (default ``ctx.h``).
        max_scale, min_scale, ratio: the scan grid (ratio in (1, 1.25]).
        refine: local maxima of the scan refined when no grid point reaches φ*.
        xtol: Brent's tolerance on α; batch_size: candidates per batched forward
            (``chunk``: its deprecated name).
    Returns:
        α (float). φ is continuous, so |φ(h + δ(α)) − φ*| is at rounding level.
    Raises:
        ValueError when φ(h) already exceeds φ* or an argument is bad;
        TargetNotReached (a ValueError with ``best_alpha``, ``best_score``)
        when no α ≤ ``max_scale`` reaches φ*.
    """
    from scipy.optimize import brentq, minimize_scalar

    check_concept(concept, split, ctx)
    h = check_start(split, ctx, h)
    max_scale = check_real("max_scale", max_scale, minimum=0, min_open=True)
    min_scale = check_real("min_scale", min_scale, minimum=0, min_open=True, maximum=max_scale, max_open=True)
    xtol = check_real("xtol", xtol, minimum=0, min_open=True)
    ratio = check_real("ratio", ratio, minimum=1, min_open=True, maximum=1.25)
    if chunk is not None:
        warnings.warn("scale_to_target(chunk=) is deprecated; use batch_size=", DeprecationWarning, stacklevel=2)
        batch_size = chunk
    refine, batch_size = check_int("refine", refine, minimum=0), check_int("batch_size", batch_size, minimum=1)
    target_score = check_target_score(concept, target_score)
    if callable(direction) and not isinstance(direction, torch.Tensor):
        displacement: Callable[[float], torch.Tensor] = direction
        check_vector("direction(α)", displacement(min_scale), h.shape[-1])
    else:
        v = check_vector("direction", direction, h.shape[-1])

        def displacement(alpha):
            return alpha * v

    def scores(alphas: list[float]) -> list[float]:
        with torch.no_grad():
            H = h + torch.stack([displacement(a).to(h.dtype) for a in alphas])
            return concept.score(split, ctx, H).tolist()

    def gap(alpha: float) -> float:
        return scores([alpha])[0] - target_score

    phi0 = scores([0.0])[0]
    if phi0 > target_score:
        raise ValueError(expected("target_score", f"a score above φ(h) = {phi0:.6g} (the concept score already "
                                  "exceeds it at h)", target_score))
    if phi0 == target_score:
        return 0.0
    n = math.ceil(math.log(max_scale / min_scale) / math.log(ratio))
    grid = [0.0] + [min_scale * ratio ** k for k in range(n)] + [max_scale]
    scanned = [phi0]
    for start in range(1, len(grid), batch_size):
        scanned += scores(grid[start:start + batch_size])
        hit = next((k for k in range(start, len(scanned)) if scanned[k] >= target_score), None)
        if hit is not None:
            return brentq(gap, grid[hit - 1], grid[hit], xtol=xtol)
    # No grid point reaches φ*: refine the highest local maxima of the scan.
    last = len(grid) - 1
    peaks = [k for k in range(len(grid))
             if (k == 0 or scanned[k] >= scanned[k - 1]) and (k == last or scanned[k] >= scanned[k + 1])]
    best = max(range(len(grid)), key=scanned.__getitem__)
    best_alpha, best_score = grid[best], scanned[best]
    for k in sorted(peaks, key=lambda k: -scanned[k])[:refine]:
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, last)]
        found = minimize_scalar(lambda a: -gap(a), bounds=(lo, hi), method="bounded", options={"xatol": 1e-6 * hi})
        peak, value = float(found.x), target_score - float(found.fun)
        if value >= target_score:
            return brentq(gap, lo, peak, xtol=xtol)
        if value > best_score:
            best_alpha, best_score = peak, value
    raise TargetNotReached(
        f"no scale ≤ max_scale={max_scale:g} reaches target_score {target_score:.6g} along this direction; "
        f"best score {best_score:.6g} at α = {best_alpha:.6g}", best_alpha, best_score, target_score)
