"""Running a test body on several CPU processes joined by torch.distributed (gloo on loopback).

``run_workers(worker, args, world, timeout_s)`` spawns ``worker(rank, port, *args)``
on ``world`` processes and fails the test if they do not all finish in time;
inside, ``gloo_group(rank, world, port, timeout_s)`` joins the group and
``leave()`` ends the process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, args: tuple, world: int, timeout_s: float) -> None:
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} gloo workers did not finish within {timeout_s} s")


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def leave() -> None:
    """End a worker with os._exit: gloo's worker threads can still hold finished
    collectives' tensors after destroy_process_group, and if one drops them while
    the interpreter finalizes, the process aborts (SIGABRT, pytorch/pytorch#190489,
    #179291). Any failure before this point still raises, so a nonzero exit reports it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
