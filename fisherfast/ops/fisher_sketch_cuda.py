"""cuda backend of the FisherSketch update (csrc/cuda/sketch.cu): the staged
pipeline of ``fisher_sketch_common`` with the CUDA prepare and features
kernels and the cuda fwht. Signature as ``fisher_sketch_reference.update``."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from fisherfast.ops import _backends
from fisherfast.ops.fisher_sketch_common import staged


def update(sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=None) -> None:
    ext = _backends.cuda_extension()
    stream = torch.cuda.current_stream(a.device).cuda_stream
    dl = lambda x: to_dlpack(x)  # noqa: E731  (the C++ side's typed views)

    def prepare(logits, re_s, se_s, er, es, Z):
        ext.fisher_sketch_prepare(*map(dl, (logits, er, es, re_s, se_s, Z)), stream)

    def features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s):
        ext.fisher_sketch_features(*map(dl, (sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s)),
                                   stream)

    with torch.cuda.device(a.device):
        staged("cuda", prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors, softcap=softcap)
