"""`fisherfast info`: versions, CPU features and which op backends can run here."""
from __future__ import annotations

import platform

from fisherfast.cli._args import add_command


def register(sub) -> None:
    add_command(sub, "info", "versions, backends and CPU features").set_defaults(run=run)


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + ",".join(wanted)


def run(args) -> int:
    import torch

    import fisherfast

    print(f"fisherfast {fisherfast.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for name in ("triton", "transformers", "scipy", "numpy"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}")
        except ImportError:
            print(f"{name} not installed")
    print(f"cpu {platform.machine()}  features: {_cpu_features()}")
    print("backends:")
    for status in fisherfast.available_backends().values():
        print(f"  {status}")
    return 0
