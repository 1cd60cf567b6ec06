"""Reference backend of the FisherSketch update (docs/design.md §7): the formula of
``fisher_sketch``'s docstring in pure PyTorch, one chunk of rows. Signature of
every backend: (sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs,
sa_idx, re_signs, re_idx, se_signs, se_idx) -> None, a and logits float32
contiguous, y int64 or None, u float64 or None (exactly one given)."""
from __future__ import annotations

import math

import torch

from fisherfast.ops.fisher_sketch_common import onehot_features, sample_labels
from fisherfast.ops.srht import srht_reference


def update(sums, sumsqs, a, logits, y, u, ra_signs, ra_idx, sa_signs, sa_idx,
                            re_signs, re_idx, se_signs, se_idx) -> None:
    """Pure-PyTorch oracle: the formula of ``fisher_sketch``'s docstring, one chunk of rows."""
    m = ra_idx.shape[0]
    p = torch.softmax(logits, dim=-1)
    if y is None:
        y = sample_labels(p, u)
    u_a = srht_reference(a, ra_signs, ra_idx, backend="reference")
    v_a = srht_reference(a, sa_signs, sa_idx, backend="reference")
    u_e = srht_reference(p, re_signs, re_idx, backend="reference") - onehot_features(y, re_signs, re_idx)
    v_e = srht_reference(p, se_signs, se_idx, backend="reference") - onehot_features(y, se_signs, se_idx)
    psi_act = u_a.double() * v_a.double() / math.sqrt(m)
    psi_err = u_e.double() * v_e.double() / math.sqrt(m)
    psi_joint = psi_act * psi_err * math.sqrt(m)
    for k, psi in enumerate((psi_joint, psi_act, psi_err)):
        sums[k] += psi.sum(0)
        sumsqs[k] += psi.square().sum(0)
