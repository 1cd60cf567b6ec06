"""Load a script of bench/ as a module (bench/ is not a package: its scripts run
as ``python bench/NAME.py``), for the tests that run a bench's ``--quick`` mode
or read its data."""
from __future__ import annotations

import importlib.util
import os
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_bench(file: str):
    """``bench/<file>`` imported under its own name (registered in sys.modules,
    where dataclasses look their module up); bench/ is put on sys.path so a
    script's ``from _harness import ...`` / ``from steer_data import ...`` work."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    name = os.path.splitext(file)[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
