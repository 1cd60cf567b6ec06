"""Compile recorded Triton launches ahead of time for NVIDIA GPUs, no GPU needed.

Run as a script (never under TRITON_INTERPRET, so ``triton.jit`` gives real
JIT functions): ``python triton_aot.py LAUNCHES.json OUT.json CC`` (CC: the
compute capability, e.g. 80 or 90). Each launch
record names a kernel (module, name), the Triton type of every runtime
argument ("*fp32", "i32", ...), the constexpr values and the launch options
(num_warps, num_stages). Every distinct specialization is compiled through the
full pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin with Triton's bundled
ptxas) for sm_CC; OUT.json gets, per specialization, the shared memory the
kernel needs or the compiler's error.
"""
from __future__ import annotations

import importlib
import json
import sys

def compile_one(launch: dict, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature = dict(launch["types"])
    signature.update({name: "constexpr" for name in launch["constexprs"]})
    source = ASTSource(fn=kernel, signature=signature, constexprs=launch["constexprs"])
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=launch["options"])
    except Exception as err:  # the compiler's message is the result
        return {"error": f"{type(err).__name__}: {err}"[:2000]}
    return {"shared": int(compiled.metadata.shared), "cubin_bytes": len(compiled.asm["cubin"])}


def main(launches_path: str, out_path: str, capability: str) -> None:
    with open(launches_path) as f:
        launches = json.load(f)
    results = [{"launch": launch, "outcome": compile_one(launch, int(capability))} for launch in launches]
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
