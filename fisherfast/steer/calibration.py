"""Strength to a stated effect over a prompt set, within a side-effect budget
(docs/design.md §5), and the layer sweep built on it.

For a vector v at layer ℓ, added at each prompt's last token
(``steering(positions="prompt_last")``) with strength α ≥ 0, and prompts
i = 1 … R, the model's own forward gives at the prompt's last position

    c_i(α)  = p(T)                  (a ConceptScore without source), or
            = p(T) / (p(T) + p(S))   (with source: the behaviour score b),
    KL_i(α) = KL(p_base,i ‖ p_α,i)   (the next-token distributions),
    KL̃_i(α) = the same with T ∪ S removed and the rest renormalized (off-target).

``calibrate`` finds the smallest α whose aggregate c(α) — the median over
prompts (``mode="median"``) or the minimum (``mode="every"``) — reaches the
target c*, unless max_i KL_i(α) would pass the budget first: then α stops at
the largest α of the crossing bracket with max_i KL_i(α) ≤ budget (the budget
is never exceeded). Search: a scan of α over {0} ∪ a geometric grid (ratio
1.2) up to ``max_scale`` — all grid values of one prompt in one batched
forward, through per-row steering scales — then k-section (7 interior points
per step, batched the same way) in the first bracket where the aggregate
crosses c* (until within ``tol``) or the KL crosses the budget (until the
bracket's relative width is 1e-6). Each
prompt's own limit, from the scan: "target" (its c_i reaches c* before its KL
passes the budget), "budget" (the other way round) or "max_scale" (neither
within the scanned range).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Callable, Mapping, Sequence

import torch

from fisherfast.checks import check_int, check_real

MODES = ("median", "every")
GRID_RATIO = 1.2
GRID_POINTS = 60        # geometric grid from max_scale·1.2⁻⁵⁹ ≈ 2e-5·max_scale to max_scale
SECTIONS = 8            # each refinement step evaluates 7 interior points at once (one batched forward per prompt)
SECTION_STEPS = 12      # 8⁻¹² ≈ 1.5e-11 of the bracket


@dataclasses.dataclass(frozen=True)
class PromptCalibration:
    """One prompt at the calibrated scale.

    Attributes:
        value: c_i(α*), p(T) or b.
        kl: KL(p_base ‖ p_steered) at the prompt's last position (nats).
        off_target_kl: the same with the concept's tokens removed (nats).
        limit: what bounds this prompt alone: "target", "budget" or "max_scale".
        reached: c_i(α*) ≥ c* − tol.
    """

    value: float
    kl: float
    off_target_kl: float
    limit: str
    reached: bool


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        layer: ℓ.
        scale: α*, the strength found (the calibrated vector is α*·v).
        vector: α*·v (d,) or (R, d), in v's dtype.
        target: c*; budget: the KL budget (None: none); mode: "median" / "every".
        bound: what stopped the search: "target" (the aggregate reached c*
            within ``tol``), "budget" (max_i KL_i would pass the budget
            before) or "max_scale" (neither up to max_scale; α* is then the
            scanned α with the highest aggregate within the budget).
        value: the aggregate c(α*) (median or minimum over prompts).
        max_kl, median_off_target_kl: over prompts, at α*.
        prompts: one ``PromptCalibration`` per prompt, in order.
        prompt_summary: {"count", "min_tokens", "max_tokens", "sha256"} of the prompts' token ids.
    """

    layer: int
    scale: float
    vector: torch.Tensor
    target: float
    budget: float | None
    mode: str
    bound: str
    value: float
    max_kl: float
    median_off_target_kl: float
    prompts: tuple
    prompt_summary: Mapping

    def record(self) -> dict:
        """The JSON record kept in a vector file's settings under "calibration"."""
        return {"target": self.target, "budget": self.budget, "layer": self.layer, "mode": self.mode,
                "scale": self.scale, "bound": self.bound, "value": self.value, "max_kl": self.max_kl,
                "median_off_target_kl": self.median_off_target_kl, "prompts": dict(self.prompt_summary),
                "per_prompt": [dataclasses.asdict(p) for p in self.prompts]}

    def steering_vectors(self, model, *, method: str = "", name: str | None = None):
        """The calibrated vector {ℓ: α*·v} as ``SteeringVectors`` of ``model``, with
        :meth:`record` in its settings under "calibration". Raises ValueError
        for per-prompt directions (no single vector)."""
        from fisherfast.steer.vectors import SteeringVectors

        if self.vector.dim() != 1:
            raise ValueError("per-prompt directions have no single vector to save; steer those prompts with "
                             "steering(model, {layer: cal.vector}, positions='prompt_last')")
        return SteeringVectors.for_model(model, {self.layer: self.vector}, method=method, name=name,
                                         settings={"calibration": self.record()})


def _check_prompts(prompts, V: int) -> list[torch.Tensor]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected a non-empty sequence of token-id sequences")
    out = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p) if not isinstance(p, torch.Tensor) else p
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"prompts[{i}]: expected a non-empty 1-D sequence of token ids, got {p!r}")
        if int(t.min()) < 0 or int(t.max()) >= V:
            raise ValueError(f"prompts[{i}]: token ids must be in [0, {V}), got {t.tolist()}")
        out.append(t.to(torch.long))
    return out


def _summary(prompts) -> dict:
    digest = hashlib.sha256(json.dumps([p.tolist() for p in prompts]).encode()).hexdigest()[:16]
    lengths = [p.numel() for p in prompts]
    return {"count": len(prompts), "min_tokens": min(lengths), "max_tokens": max(lengths), "sha256": digest}


class _Measure:
    """c_i, KL_i and KL̃_i of every prompt for a batch of scales. Only the last
    token is steered, so each prompt's prefix runs once, unsteered, and its
    cache is copied for every batch of scales (one row per scale)."""

    def __init__(self, model, layer, v, prompts, concept):
        from fisherfast.steer.hooks import steering

        self.model, self.layer, self.concept = model, layer, concept
        self.v = [v if v.dim() == 1 else v[i] for i in range(len(prompts))]  # each prompt's direction
        self.steering = steering
        device = model.get_output_embeddings().weight.device
        self.ids = [p.to(device) for p in prompts]
        base, norms, self.prefix = [], [], []
        with torch.no_grad():
            for ids in self.ids:
                out = model(input_ids=ids[None], output_hidden_states=True)
                base.append(out.logits[0, -1])
                norms.append(out.hidden_states[layer][0, -1].norm())
                cache = model(input_ids=ids[None, :-1], use_cache=True).past_key_values if len(ids) > 1 else None
                self.prefix.append(cache if hasattr(cache, "batch_repeat_interleave") else None)
        self.base = torch.stack(base)                 # (R, V)
        self.state_norm = float(torch.stack(norms).median())  # median ‖h_ℓ‖ at the prompts' last tokens

    def value(self, logits):
        phi = self.concept(logits.to(torch.float64))
        return phi.exp() if self.concept.source is None else torch.sigmoid(phi)

    def __call__(self, scales: torch.Tensor):
        """(R, A) c, KL, KL̃ at the A scales."""
        import copy

        from fisherfast.steer.iterate import off_target_kl

        A = scales.numel()
        cs, kls, offs = [], [], []
        for i, ids in enumerate(self.ids):  # one block per prompt: each is its own prompt
            with torch.no_grad(), self.steering(self.model, {self.layer: self.v[i]}, positions="prompt_last",
                                                scale=scales):
                if self.prefix[i] is not None:  # the prefix's cache, one copy per scale; the block's prompt is
                    cache = copy.deepcopy(self.prefix[i])  # this call's cached + new tokens, its last one steered
                    cache.batch_repeat_interleave(A)
                    out = self.model(input_ids=ids[None, -1:].expand(A, 1), past_key_values=cache)
                else:
                    out = self.model(input_ids=ids[None].expand(A, -1))
            z = out.logits[:, -1].to(torch.float64)  # (A, V)
            base = self.base[i].to(torch.float64).expand_as(z)
            lp, lq = torch.log_softmax(base, -1), torch.log_softmax(z, -1)
            cs.append(self.value(z))
            kls.append((lp.exp() * (lp - lq)).sum(-1).clamp(min=0))
            offs.append(off_target_kl(self.concept, base, z))
        return torch.stack(cs), torch.stack(kls), torch.stack(offs)


def _aggregate(c: torch.Tensor, mode: str) -> torch.Tensor:
    """(A,) median (lower median for an even count) or minimum over prompts of (R, A)."""
    return c.median(0).values if mode == "median" else c.min(0).values


def calibrate(model, vector: torch.Tensor, layer: int, prompts, concept, target: float, *,
              kl_budget: float | None = None, mode: str = "median", tol: float = 1e-3,
              max_scale: float | None = None) -> Calibration:
    """Scale ``vector`` at ``layer`` so that the concept reaches ``target`` over
    ``prompts``, stopping where the KL budget would be passed (module docstring).

    Args:
        model: a Hugging Face causal LM (eval mode).
        vector: v (d,) floating, or (R, d): one direction per prompt (e.g.
            FishBack's at each prompt, from ``steer_to_target`` or
            ``fishback_direction`` on ``SplitModel(model, ℓ)``), all scaled by
            one α; apply the result to the same prompts as a batch,
            ``steering(model, {ℓ: cal.vector}, positions="prompt_last")``.
        layer: ℓ ∈ [0, L] (``fisherfast.split`` convention).
        prompts: R ≥ 1 prompts, each a 1-D sequence of token ids.
        concept: a ``ConceptScore``: c = p(T) without source, b =
            p(T)/(p(T)+p(S)) with one.
        target: c* ∈ (0, 1).
        kl_budget: None, or the largest max_i KL(p_base,i ‖ p_steered,i)
            allowed (nats, > 0).
        mode: "median" (the median over prompts reaches c*; for an even R the
            lower median) or "every" (every prompt reaches c*).
        tol: |aggregate − c*| at which the search stops (in (0, 1)).
        max_scale: the largest α scanned; default 4·median‖h_ℓ‖/‖v‖ (a step
            four times the state's norm at the prompts' last tokens).

    Returns:
        A ``Calibration``: α*, α*·v, which limit bound the search and, per
        prompt, c_i, KL_i, KL̃_i and its own limit.

    Raises:
        ValueError: a bad argument (named), before any forward pass.
    """
    from fisherfast.concepts import ConceptScore
    from fisherfast.split import architecture

    arch = architecture(model)
    L, (V, d) = arch.num_layers, arch.head.weight.shape
    check_int("layer", layer, minimum=0, maximum=L)
    ids = _check_prompts(prompts, V)
    if not isinstance(vector, torch.Tensor) or tuple(vector.shape) not in ((d,), (len(ids), d)) \
            or not vector.is_floating_point() or not bool(torch.isfinite(vector).all()) \
            or not bool(vector.reshape(-1, d).any(-1).all()):
        raise ValueError(f"vector: expected a finite floating tensor of shape ({d},) or (prompts, {d}) = "
                         f"({len(ids)}, {d}) with no zero row, got {getattr(vector, 'shape', type(vector).__name__)}")
    if not isinstance(concept, ConceptScore):
        raise ValueError(f"concept: expected a ConceptScore (p(T), or b = p(T)/(p(T)+p(S)) with a source), got "
                         f"{type(concept).__name__}")
    if int(concept.removed_tokens.max()) >= V:
        raise ValueError(f"concept: token id {int(concept.removed_tokens.max())} is outside the vocabulary of {V}")
    for name, x in (("target", target), ("tol", tol)):
        check_real(name, x, minimum=0, maximum=1, min_open=True, max_open=True)
    check_real("kl_budget", kl_budget, minimum=0, min_open=True, optional=True)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_real("max_scale", max_scale, minimum=0, min_open=True, optional=True)

    measure = _Measure(model, layer, vector.detach(), ids, concept)
    if max_scale is None:
        max_scale = 4 * measure.state_norm / float(vector.reshape(-1, d).norm(dim=-1).median())
    grid = torch.cat([torch.zeros(1, dtype=torch.float64),
                      max_scale * GRID_RATIO ** -torch.arange(GRID_POINTS - 1, -1, -1, dtype=torch.float64)])
    c, kl, off = measure(grid)
    budget = math.inf if kl_budget is None else float(kl_budget)
    agg = _aggregate(c, mode)
    over = (kl.max(0).values > budget).nonzero()
    j_budget = int(over[0]) if len(over) else None
    hit = (agg >= target).nonzero()
    j_target = int(hit[0]) if len(hit) else None

    def at(alpha):
        return measure(torch.tensor([alpha], dtype=torch.float64))

    def interior(lo, hi):
        return lo + (hi - lo) * torch.arange(1, SECTIONS, dtype=torch.float64) / SECTIONS

    bound = None
    if j_target is not None and (j_budget is None or j_target < j_budget):
        alpha = float(grid[j_target])
        lo = float(grid[j_target - 1]) if j_target else 0.0
        for _ in range(SECTION_STEPS if j_target else 0):  # k-section on the aggregate's crossing of c*
            points = interior(lo, alpha)
            m = _aggregate(measure(points)[0], mode)
            close = (m - target).abs() <= tol
            if bool(close.any()):
                alpha = float(points[int(close.nonzero()[0])])
                break
            up = (m >= target).nonzero()
            k = int(up[0]) if len(up) else SECTIONS - 1
            lo, alpha = (float(points[k - 1]) if k else lo), (float(points[k]) if len(up) else alpha)
        if float(at(alpha)[1].max()) <= budget:
            bound = "target"
        else:  # the KL is not monotone in α: the budget's bracket below α
            j_budget, grid[j_target] = j_target, alpha
    if bound is None and j_budget is not None:
        lo, hi = float(grid[j_budget - 1]), float(grid[j_budget])
        for _ in range(SECTION_STEPS):  # k-section keeping lo within the budget
            points = interior(lo, hi)
            over = (measure(points)[1].max(0).values > budget).nonzero()
            k = int(over[0]) if len(over) else SECTIONS - 1
            if len(over):
                lo, hi = (float(points[k - 1]) if k else lo), float(points[k])
            else:
                lo = float(points[-1])
            if hi - lo <= 1e-6 * hi:
                break
        alpha, bound = lo, "budget"
    elif bound is None:
        feasible = kl.max(0).values <= budget
        alpha, bound = float(grid[int(torch.where(feasible, agg, -math.inf).argmax())]), "max_scale"

    c1, kl1, off1 = (t[:, 0] for t in at(alpha))
    limits = []
    for i in range(len(ids)):
        t_i = (c[i] >= target).nonzero()
        b_i = (kl[i] > budget).nonzero()
        t_i = int(t_i[0]) if len(t_i) else None
        b_i = int(b_i[0]) if len(b_i) else None
        limits.append("target" if t_i is not None and (b_i is None or t_i < b_i) else
                      "budget" if b_i is not None else "max_scale")
    per_prompt = tuple(PromptCalibration(float(c1[i]), float(kl1[i]), float(off1[i]), limits[i],
                                         bool(c1[i] >= target - tol)) for i in range(len(ids)))
    vec = (vector.detach().double() * alpha).to(vector.dtype)
    return Calibration(layer=layer, scale=alpha, vector=vec, target=float(target),
                       budget=None if kl_budget is None else float(kl_budget), mode=mode, bound=bound,
                       value=float(_aggregate(c1[:, None], mode)[0]), max_kl=float(kl1.max()),
                       median_off_target_kl=float(off1.median()), prompts=per_prompt, prompt_summary=_summary(ids))


def sweep_layers(model, directions, layers, prompts, concept, target: float, **options) -> list[Calibration]:
    """:func:`calibrate` at each layer: what reaching ``target`` costs there (KL and
    off-target KL at the calibrated strength, and whether the budget bound it),
    so the layer can be chosen by cost.

    Args:
        directions: {ℓ: v_ℓ (d,)} or a callable ℓ ↦ v_ℓ (e.g. a CAA direction
            computed at each layer).
        layers: the layers to sweep (ints in [0, L], non-empty).
        options: passed to :func:`calibrate` (kl_budget, mode, tol, max_scale).

    Returns:
        One ``Calibration`` per layer, in the order of ``layers``.
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: expected a non-empty sequence of ints, got {layers!r}")
    if isinstance(directions, Mapping):
        missing = [layer for layer in layers if layer not in directions]
        if missing:
            raise ValueError(f"directions has no vector for layers {missing}")
        get: Callable = directions.__getitem__
    elif callable(directions):
        get = directions
    else:
        raise ValueError("directions: expected a mapping {layer: (d,) tensor} or a callable layer → (d,) tensor")
    return [calibrate(model, get(layer), layer, prompts, concept, target, **options) for layer in layers]
