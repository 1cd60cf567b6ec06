"""Merge FisherSketch states (head or full-network) across processes with
torch.distributed (docs/design.md §7).

States are sums, so the merged state of shards is their elementwise sum: one
all-reduce (SUM) of the float64 buffers (a head state's (8, m) sums and sums
of squares of the joint, activation, error and first-moment features, (6, m)
without the first moment; a full-network
state's (2, m)) plus the count, carried in the same float64 message (exact for
counts below 2⁵³). Every rank ends with the state of the union of all ranks'
data. Before the sum, a MIN and a MAX all-reduce of the spec fields (for a
full-network state: m, the layer count and a fingerprint of the layer specs)
check that every rank sketched under the same spec.

Backends: gloo reduces CPU tensors; NCCL needs them on the current CUDA device,
where they are moved for the collective. Cost: two all-reduces of ≤ 6 int64 and
one of 8m + 1 (head; 6m + 1 without the first moment) or 2m + 1 float64 (about 256 KB at m = 4096).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fisherfast.sketch.fullnet import FullNetworkState
from fisherfast.sketch.state import SketchState


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _spec_fields(state) -> list[int]:
    """Integers that agree across ranks exactly when their states' specs do."""
    if isinstance(state, SketchState):
        spec = state.spec
        return [spec.d, spec.K, spec.m, spec.seed, spec.version, int(state.has_mean)]
    return [state.m, len(state.specs), state.fingerprint()]


def all_reduce_state(state: SketchState | FullNetworkState, group=None) -> SketchState | FullNetworkState:
    """The merged state of every rank's ``state`` in ``group`` (default: the world).

    Works for head states (SketchState) and full-network states
    (FullNetworkState). Collective: every rank of the group must call it. The
    input is not modified; the result lives on the input's device.

    Raises:
        TypeError: ``state`` is not a SketchState or FullNetworkState.
        RuntimeError: torch.distributed is not initialized.
        ValueError: the ranks' specs differ (raised on every rank).
    """
    if not isinstance(state, (SketchState, FullNetworkState)):
        raise TypeError(f"state: expected a SketchState or FullNetworkState, got {type(state).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_state needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    device = _collective_device(group)
    fields = torch.tensor(_spec_fields(state), dtype=torch.int64, device=device)
    low, high = fields.clone(), fields.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        what = (f"{state.spec}, the group's (d, K, m, seed, version, first moment)" if isinstance(state, SketchState)
                else f"{len(state.specs)} layer specs, the group's (m, layers, spec fingerprint)")
        raise ValueError(f"all ranks must share one spec; this rank has {what} range from {low.tolist()} "
                         f"to {high.tolist()}")
    buffers = state.as_tensor()
    home = buffers.device
    buffers = buffers.to(device)
    message = torch.cat([buffers.reshape(-1), torch.tensor([float(state.count)], dtype=torch.float64, device=device)])
    dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group)
    count = int(message[-1].item())
    specs = state.spec if isinstance(state, SketchState) else state.specs
    return type(state).from_tensor(specs, count, message[:-1].view_as(buffers).to(home))
