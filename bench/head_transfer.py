"""Head-only fine-tuning transfer, the ground truth of the source-selection benches
(bench_source_selection, bench_domains).

A source task's (a, y) pairs (head inputs, next-token labels) fine-tune only the
LM head W; the transfer to a target is the drop of the target's mean
cross-entropy, L_t(W₀) − L_t(W). Every function works in W's dtype, streamed
over rows of a (``chunk`` rows at a time), so a 49K–262K vocabulary never holds
more than chunk × V logits.
"""
from __future__ import annotations

import torch


def _logits(W, b, a):
    z = a @ W.T
    return z if b is None else z + b


def mean_cross_entropy(W, b, a, y, chunk: int = 256) -> float:
    """L(W) = (1/N) Σ_t [log Σ_v exp z_tv − z_t,y_t], z_t = W a_t + b; summed in float64."""
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        z = _logits(W, b, a[start:start + chunk])
        rows = torch.arange(z.shape[0])
        total += float((torch.logsumexp(z, -1) - z[rows, y[start:start + chunk]]).double().sum())
    return total / a.shape[0]


def mean_head_gradient(W, b, a, y, chunk: int = 256) -> torch.Tensor:
    """∂L/∂W = (1/N) Σ_t (p_t − e_{y_t}) a_tᵀ, p_t = softmax(z_t): (V, d) in W's dtype."""
    g = torch.zeros_like(W)
    for start in range(0, a.shape[0], chunk):
        a_c = a[start:start + chunk]
        e = torch.softmax(_logits(W, b, a_c), -1)
        e[torch.arange(a_c.shape[0]), y[start:start + chunk]] -= 1
        g.addmm_(e.T, a_c)
    return g / a.shape[0]


def finetune_head(W0, b, a, y, steps: int, step: float, chunk: int = 256) -> torch.Tensor:
    """``steps`` normalized gradient steps W ← W − step·g/‖g‖_F on the source's L (head only; W0 untouched)."""
    W = W0.clone()
    for _ in range(steps):
        g = mean_head_gradient(W, b, a, y, chunk)
        W -= step * g / g.norm()
    return W
