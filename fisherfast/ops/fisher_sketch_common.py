"""What the FisherSketch backends share (docs/design.md §7): label sampling by
inverse CDF, the closed-form one-hot features, the soft-cap slope, and the staged GPU pipeline
(prepare → FWHT → features) that the triton and cuda backends run with their
own prepare and features kernels."""
from __future__ import annotations

import torch

from fisherfast.ops.fwht import fwht
from fisherfast.ops.srht import parity

N_KINDS = 3  # rows of the state buffers: joint, activation, error (a fourth: the first moment)


def softcap_slope(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """s = 1 − tanh²(z/c) = 1 − (z′/c)² from the capped logits z′ = c·tanh(z/c), in z′'s dtype;
    a −inf mask (probability zero) gets s = 0."""
    t = (logits / softcap).clamp(-1.0, 1.0)
    return (1.0 - t) * (1.0 + t)


def onehot_features(y: torch.Tensor, signs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """srht(e_y) rows for labels y (R,): D_b[y]·(−1)^popcount(i & y) at each gathered (b, i)."""
    n = signs.shape[1]
    block, i = idx // n, idx % n
    y = y.long().unsqueeze(-1)
    return signs[block, y] * (1 - 2 * parity(i & y)).to(signs.dtype)


def sample_labels(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y = min{k : Σ_{i≤k} p_i > u·Σ_i p_i} per row (inverse CDF, float64 running sum)."""
    c = torch.cumsum(p.double(), dim=-1)
    y = torch.searchsorted(c, (u.double() * c[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return y.clamp_(max=p.shape[-1] - 1)


def signed_padded(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """(R, n_blocks·N): D_b x̃ for every sign block (x zero-padded to N), ready for the FWHT."""
    n_blocks, n = signs.shape
    out = x.new_zeros(x.shape[0], n_blocks, n)
    out[:, :, : x.shape[1]] = x.unsqueeze(1) * signs[:, : x.shape[1]]
    return out.view(x.shape[0], n_blocks * n)


def apply_softcap(er: torch.Tensor, es: torch.Tensor, Z: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                  re_s: torch.Tensor, se_s: torch.Tensor, softcap: float) -> None:
    """Soft-capped head, before the transform: er, es hold D_b q (q = exp(z′ − z′_max)) and the
    features step will form H D er / Z − H D e_y. Scale q by s = 1 − (z′/c)² and add
    Z·(1 − s_y)·D_b[y] at y, so that step yields H D (s ⊙ p) − s_y H D e_y = H D (s ⊙ (p − e_y))."""
    rows, K = logits.shape
    s = softcap_slope(logits, softcap)
    s_y = s.gather(1, y[:, None]).squeeze(1)
    r = torch.arange(rows, device=logits.device)
    for buf, signs in ((er, re_s), (es, se_s)):
        view = buf.view(rows, signs.shape[0], signs.shape[1])
        view[:, :, :K] *= s[:, None, :]
        view[r, :, y] += (Z * (1.0 - s_y))[:, None] * signs[:, y].T


def staged(backend: str, prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors,
           softcap: float | None = None) -> None:
    """GPU pipeline of one chunk: prepare (softmax → signed error buffers, Z) → sample y ∼ p when
    given u → the soft-cap slope (``apply_softcap``) → FWHT (the fwht op, same backend) → features
    (gather, one-hot, ψ, float64 sums; and the first moment when sums has four rows)."""
    ra_s, ra_i, sa_s, sa_i, re_s, re_i, se_s, se_i = plan_tensors
    rows, K = logits.shape
    er = logits.new_zeros(rows, re_s.numel())
    es = logits.new_zeros(rows, se_s.numel())
    Z = logits.new_empty(rows)
    prepare(logits, re_s, se_s, er, es, Z)
    if y is None:  # before the transform, block 0 of er holds ±q = ±exp(z − z_max)
        y = sample_labels(er[:, :K].abs(), u)
    if softcap is not None:
        apply_softcap(er, es, Z, logits, y, re_s, se_s, softcap)
    a_r, a_s = signed_padded(a, ra_s), signed_padded(a, sa_s)
    for buf, n in ((a_r, ra_s.shape[1]), (a_s, sa_s.shape[1]), (er, re_s.shape[1]), (es, se_s.shape[1])):
        fwht(buf.view(-1, n), inplace=True, backend=backend)
    features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s)
