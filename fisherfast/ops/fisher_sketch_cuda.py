"""cuda backend of the FisherSketch update (csrc/cuda/sketch.cu): the staged
pipeline of ``fisher_sketch_common`` with the CUDA prepare and features
kernels and the cuda fwht. Signature as ``fisher_sketch_reference.update``."""
from __future__ import annotations

import torch

from fisherfast.ops import _backends
from fisherfast.ops.fisher_sketch_common import staged


def update(sums, sumsqs, a, logits, y, u, *plan_tensors) -> None:
    ext = _backends.cuda_extension()
    stream = torch.cuda.current_stream(a.device).cuda_stream
    addr = lambda t: t.data_ptr()  # noqa: E731

    def prepare(logits, re_s, se_s, er, es, Z):
        ext.fisher_sketch_prepare(addr(logits), logits.shape[0], logits.shape[1], addr(er), addr(es), addr(re_s),
                                  re_s.shape[0], re_s.shape[1], addr(se_s), se_s.shape[0], se_s.shape[1], addr(Z),
                                  stream)

    def features(sums, sumsqs, a_r, a_s, er, es, Z, y, ra_i, sa_i, re_i, se_i, re_s, se_s):
        ext.fisher_sketch_features(addr(sums), addr(sumsqs), addr(a_r), addr(a_s), addr(er), addr(es), addr(Z),
                                   addr(y), addr(ra_i), addr(sa_i), addr(re_i), addr(se_i), addr(re_s), addr(se_s),
                                   a_r.shape[1], a_s.shape[1], er.shape[1], es.shape[1], re_s.shape[1],
                                   se_s.shape[1], Z.shape[0], ra_i.shape[0], stream)

    with torch.cuda.device(a.device):
        staged("cuda", prepare, features, sums, sumsqs, a, logits, y, u, *plan_tensors)
