"""The op layer: one public function per op, each dispatching to the
reference / cpu / triton / cuda backend (see ``_backends``). This package is
the only place that knows about backends."""
from fisherfast.ops._backends import BACKENDS, BackendStatus, available_backends
from fisherfast.ops.fwht import fwht
from fisherfast.ops.srht import SRHTPlan, srht, srht_onehot

__all__ = ["BACKENDS", "BackendStatus", "available_backends", "fwht", "srht", "srht_onehot", "SRHTPlan"]
