"""Reference backend of the FisherSketch update (docs/design.md §7): the formula of
``fisher_sketch``'s docstring in pure PyTorch, one chunk of rows. Signature of
every backend: (sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs,
sa_idx, re_signs, re_idx, se_signs, se_idx, softcap) -> None, a and logits float32
contiguous, y int64 or None, u float64 or None (exactly one given), softcap a
float c > 0 (logits are the capped z′ = c·tanh(z/c)) or None; sums, sumsqs with
3 rows, or 4 with the first moment."""
from __future__ import annotations

import math

import torch

from fisherfast.ops.fisher_sketch_common import N_KINDS, onehot_features, sample_labels, softcap_slope
from fisherfast.ops.srht import srht_reference


def update(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx,
           re_signs, re_idx, se_signs, se_idx, softcap=None) -> None:
    """Pure-PyTorch oracle: the formula of ``fisher_sketch``'s docstring, one chunk of rows."""
    m = ra_idx.shape[0]
    p = torch.softmax(logits, dim=-1)
    if y is None:
        y = sample_labels(p, u)
    s = torch.ones_like(p) if softcap is None else softcap_slope(logits, softcap)  # e = s ⊙ (p − e_y)
    s_y = s.gather(1, y[:, None])
    u_a = srht_reference(a, ra_signs, ra_idx, backend="reference")
    v_a = srht_reference(a, sa_signs, sa_idx, backend="reference")
    u_e = srht_reference(s * p, re_signs, re_idx, backend="reference") - s_y * onehot_features(y, re_signs, re_idx)
    v_e = srht_reference(s * p, se_signs, se_idx, backend="reference") - s_y * onehot_features(y, se_signs, se_idx)
    psi_act = u_a.double() * v_a.double() / math.sqrt(m)
    psi_err = u_e.double() * v_e.double() / math.sqrt(m)
    psi_joint = psi_act * psi_err * math.sqrt(m)
    psis = [psi_joint, psi_act, psi_err]
    if sums.shape[0] > N_KINDS:  # the first moment φ = u^a u^e / √m
        psis.append(u_a.double() * u_e.double() / math.sqrt(m))
    for k, psi in enumerate(psis):
        sums[k] += psi.sum(0)
        sumsqs[k] += psi.square().sum(0)
