"""cpu backend of the FisherSketch update (csrc/cpu/sketch.cpp): the whole
pipeline per row (one row of transform scratch per thread, OpenMP over rows,
fwht.h kernels). Signature as ``fisher_sketch_reference.update``."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends


def update(sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=None) -> None:
    ext = _backends.cpu_extension()
    rows, m = a.shape[0], plan_tensors[1].shape[0]
    threads = max(1, min(ext.fisher_sketch_max_threads(), rows))
    per_thread = sum(signs.numel() for signs in plan_tensors[::2])  # one row's transform buffers
    scratch = torch.empty(threads, per_thread, dtype=torch.float32)
    acc = torch.empty(threads, 2 * sums.shape[0], m, dtype=torch.float64)
    dl = lambda x: None if x is None else to_dlpack(x)  # noqa: E731  (the C++ side's typed views)
    ext.fisher_sketch_update(*map(dl, (sums, sumsqs, a, logits, y, u, *plan_tensors, scratch, acc)), threads,
                            0.0 if softcap is None else softcap)
