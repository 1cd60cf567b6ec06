"""cpu backend of the FisherSketch update (csrc/cpu/sketch.cpp): the whole
pipeline per row (one row of transform scratch per thread, OpenMP over rows,
fwht.h kernels). Signature as ``fisher_sketch_reference.update``."""
from __future__ import annotations

import torch

from fisherfast.ops import _backends
from fisherfast.ops.fisher_sketch_common import N_KINDS


def _plan_args(plan_tensors) -> list:
    args = []
    for signs, idx in zip(plan_tensors[::2], plan_tensors[1::2]):
        args += [signs.data_ptr(), idx.data_ptr(), signs.shape[0], signs.shape[1]]
    return args


def update(sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    ext = _backends.cpu_extension()
    (rows, d), K, m = a.shape, logits.shape[1], plan_tensors[1].shape[0]
    threads = max(1, min(ext.fisher_sketch_max_threads(), rows))
    per_thread = sum(signs.numel() for signs in plan_tensors[::2])  # one row's transform buffers
    scratch = torch.empty(threads, per_thread, dtype=torch.float32)
    acc = torch.empty(threads, 2 * N_KINDS, m, dtype=torch.float64)
    ext.fisher_sketch_update(
        sums.data_ptr(), sumsqs.data_ptr(), a.data_ptr(), logits.data_ptr(), 0 if y is None else y.data_ptr(),
        0 if u is None else u.data_ptr(), rows, d, K, m, *_plan_args(plan_tensors), scratch.data_ptr(),
        acc.data_ptr(), threads)
