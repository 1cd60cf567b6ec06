"""Sharding ``pullback_fisher``'s points across torch.distributed ranks.

Opt-in: ``pullback_fisher(..., distributed=True)`` (the default group) or
``distributed=<ProcessGroup>``. Sharding is never switched on just because a
process group exists, so code that already runs one independent metric per
rank keeps doing so. Every rank passes the same contexts (and points);
rank r computes points r, r + W, r + 2W, … (W ranks), the per-rank sums of
G are all-reduced (SUM) and divided by the total number of points, and
per-point reports (τ, kept tokens, concept q) are gathered in point order.
Every rank ends with the same metric, equal to the single-process one up to
floating-point summation order.

Backends: gloo reduces CPU tensors; NCCL needs them on the current CUDA
device, where they are moved for the collective. Cost: one all-reduce of d²
numbers per dense metric (d·k per matrix-free product, which is collective:
every rank must apply the same products in the same order).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fisherfast.checks import expected


def resolve_group(distributed) -> tuple[Any, int, int]:
    """(group, rank, world size) for ``distributed`` = None/False (no sharding:
    (None, 0, 1)), True (the default group) or a ProcessGroup.

    Raises:
        RuntimeError: sharding asked for without an initialized process group.
        TypeError: ``distributed`` is none of the above.
    """
    if distributed is None or distributed is False:
        return None, 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed: sharding the points needs an initialized torch.distributed process "
                           "group (torch.distributed.init_process_group)")
    if distributed is True:
        group = None
    elif isinstance(distributed, dist.ProcessGroup):
        group = distributed
    else:
        raise TypeError(expected("distributed", "None, a bool or a torch.distributed ProcessGroup",
                                 type(distributed)))
    return group, dist.get_rank(group), dist.get_world_size(group)


def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Σ over the group's ranks of x (returned in x's dtype and device)."""
    import torch.distributed as dist

    buffer = x.to(_collective_device(group)).contiguous().clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(x.device)


def broadcast_from_first(x: torch.Tensor, group) -> torch.Tensor:
    """The group's first rank's x on every rank."""
    import torch.distributed as dist

    buffer = x.to(_collective_device(group)).contiguous().clone()
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(buffer, src=src, group=group)
    return buffer.to(x.device)


def gather_in_order(records: Sequence[tuple[int, Any]], group, n: int) -> list:
    """Every rank's (point index, record) pairs as one list in point order 0..n-1."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(records), group=group)
    merged = dict(pair for part in parts for pair in part)
    return [merged[i] for i in range(n)]
