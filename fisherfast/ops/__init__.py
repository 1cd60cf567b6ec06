"""The op layer: one public function per op, each dispatching to the
reference / cpu / triton / cuda backend (see ``_backends``). This package is
the only place that knows about backends."""
from fisherfast.ops._backends import BACKENDS, BackendStatus, available_backends
from fisherfast.ops.fwht import fwht
from fisherfast.ops.fisher_sketch import fisher_sketch_update
from fisherfast.ops.srht import SRHTPlan, srht, srht_onehot
from fisherfast.ops.softmax_fisher import (TruncatedGram, lm_logsumexp, softmax_fisher_gram, softmax_fisher_gram_topk,
                                          softmax_fisher_matmat, softmax_fisher_quad)

__all__ = ["BACKENDS", "BackendStatus", "available_backends", "fwht", "srht", "srht_onehot", "SRHTPlan", "fisher_sketch_update",
           "lm_logsumexp", "softmax_fisher_matmat", "softmax_fisher_quad", "softmax_fisher_gram", "softmax_fisher_gram_topk",
           "TruncatedGram"]
