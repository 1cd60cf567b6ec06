"""What the FisherSketch backends share (docs/design.md §7): label sampling by
inverse CDF, the closed-form one-hot features, and the staged GPU pipeline
(prepare → FWHT → features) that the triton and cuda backends run with their
own prepare and features kernels."""
from __future__ import annotations

import torch

from fisherfast.ops.fwht import fwht
from fisherfast.ops.srht import parity

N_KINDS = 3  # rows of the state buffers: joint, activation, error


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


def staged(backend: str, prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    """GPU pipeline of one chunk: prepare (softmax → signed error buffers, Z) → FWHT (the fwht op,
    same backend) → sample y ∼ p when given u → features (gather, one-hot, ψ, float64 sums)."""
    ra_s, ra_i, sa_s, sa_i, re_s, re_i, se_s, se_i = plan_tensors
    rows, K = logits.shape
    er = logits.new_zeros(rows, re_s.numel())
    es = logits.new_zeros(rows, se_s.numel())
    Z = logits.new_empty(rows)
    prepare(logits, re_s, se_s, er, es, Z)
    if y is None:  # before the transform, block 0 of er holds ±q = ±exp(z − z_max)
        y = sample_labels(er[:, :K].abs(), u)
    a_r, a_s = signed_padded(a, ra_s), signed_padded(a, sa_s)
    for buf, n in ((a_r, ra_s.shape[1]), (a_s, sa_s.shape[1]), (er, re_s.shape[1]), (es, se_s.shape[1])):
        fwht(buf.view(-1, n), inplace=True, backend=backend)
    features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s)
