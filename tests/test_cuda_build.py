"""The CUDA extension really holds sm_80 and sm_90 machine code for every kernel,
and both extensions export every function the Python adapters call.

No GPU is needed. The checks read the built shared object itself, not the
build's settings: its ``.nv_fatbin`` section is a list of fatbin containers
(magic 0xBA55ED50), each a list of entries (kind 1 = PTX, 2 = ELF cubin) whose
header carries the target architecture; every cubin is an ELF file with
e_machine EM_CUDA (190) and the SM number in bits 8–15 of e_flags. A kernel
counts as built for sm_XY when its (mangled) name is in the symbol strings of
a cubin whose own ELF header says sm_XY.

Two shared objects are checked: the one built in the tree (if any), and one
compiled here from csrc/cuda with nvcc (if present), as setup.py links it."""
from __future__ import annotations

import ast
import concurrent.futures
import glob
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
REQUIRED_SM = (80, 90)  # A100 and H100/H200: the GPUs fisherfast targets
FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190


def _load_setup():
    """setup.py as a module (its setup() call runs only as __main__): the build's nvcc flags."""
    spec = importlib.util.spec_from_file_location("fisherfast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_setup()


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name → contents of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name, kind, _, _, offset, size, *_ in headers:
        label = data[names_at + name: data.index(b"\0", names_at + name)].decode()
        out[label] = b"" if kind == 8 else data[offset: offset + size]  # SHT_NOBITS has no bytes
    return out


def fatbin_entries(fatbin: bytes):
    """(kind, arch from the entry header, payload) for every entry of every container."""
    entries, offset = [], 0
    while offset + 16 <= len(fatbin):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", fatbin, offset)
        if magic != FATBIN_MAGIC:  # containers are padded to an alignment
            offset += 8
            continue
        p, end = offset + header_size, offset + header_size + size
        while p < end:
            kind, _, entry_header, payload_size = struct.unpack_from("<HHIQ", fatbin, p)
            arch, = struct.unpack_from("<I", fatbin, p + 28)
            entries.append((kind, arch, fatbin[p + entry_header: p + entry_header + payload_size]))
            p += entry_header + payload_size
        offset = end
    return entries


def kernels_by_sm(so_path: str) -> tuple[dict[int, set[str]], set[int]]:
    """SM number (from each cubin's own ELF header) → kernel names found in it; and the PTX archs."""
    fatbin = elf_sections(open(so_path, "rb").read()).get(".nv_fatbin", b"")
    cubins, ptx = {}, set()
    for kind, arch, payload in fatbin_entries(fatbin):
        if kind == 1:
            ptx.add(arch)
        elif kind == 2 and payload[:4] == b"\x7fELF":
            machine, = struct.unpack_from("<H", payload, 18)
            flags, = struct.unpack_from("<I", payload, 48)
            assert machine == EM_CUDA, f"cubin with e_machine {machine}"
            sm = (flags >> 8) & 0xFF
            assert sm == arch, f"fatbin entry says sm_{arch}, its cubin says sm_{sm}"
            strings = elf_sections(payload).get(".strtab", b"").decode("latin-1")
            cubins.setdefault(sm, set()).update(KERNEL_RE.findall(strings))
    return cubins, ptx


def kernel_names() -> set[str]:
    """Every __global__ function defined in csrc/cuda."""
    names = set()
    for src in SOURCES:
        names |= set(re.findall(r"__global__\s+void\s+(\w+)", open(src).read()))
    return names


KERNEL_RE = re.compile("|".join(sorted(kernel_names())) or "$^")


def assert_every_kernel_built_for_each_sm(so_path: str) -> None:
    cubins, ptx = kernels_by_sm(so_path)
    expected = kernel_names()
    assert expected, "no __global__ kernels found in csrc/cuda"
    for sm in REQUIRED_SM:
        missing = expected - cubins.get(sm, set())
        assert not missing, f"{os.path.basename(so_path)}: no sm_{sm} code for {sorted(missing)} (cubins: {sorted(cubins)})"
    assert max(REQUIRED_SM) in ptx, f"no PTX for compute_{max(REQUIRED_SM)} (newer GPUs JIT it); PTX archs: {sorted(ptx)}"


def adapter_calls() -> dict[str, set[str]]:
    """Extension name (_C / _C_cuda) → attributes the Python adapters use on it:
    ``_backends.cpu_extension().X`` / ``cuda_extension().X``, or ``ext.X`` in a
    function that bound ``ext`` to one of them."""
    which = {"cpu_extension": "_C", "cuda_extension": "_C_cuda"}
    calls = {"_C": set(), "_C_cuda": set()}
    for path in glob.glob(os.path.join(ROOT, "fisherfast", "ops", "*.py")):
        for fn in ast.walk(ast.parse(open(path).read())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            bound = None
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in which:
                    bound = which[node.func.attr]
            for node in ast.walk(fn):
                if not isinstance(node, ast.Attribute):
                    continue
                target = node.value
                if isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute) and target.func.attr in which:
                    calls[which[target.func.attr]].add(node.attr)
                elif isinstance(target, ast.Name) and target.id == "ext" and bound:
                    calls[bound].add(node.attr)
    calls["_C_cuda"].add("probe")  # _backends asks it, on first use, whether CUDA is usable
    return calls


def module_exports(so_path: str, name: str) -> set[str]:
    """dir() of an extension module loaded from ``so_path`` in a fresh process."""
    code = ("import importlib.machinery, importlib.util, json, sys\n"
            f"loader = importlib.machinery.ExtensionFileLoader({'fisherfast.' + name!r}, sys.argv[1])\n"
            "spec = importlib.util.spec_from_loader(loader.name, loader)\n"
            "module = importlib.util.module_from_spec(spec); loader.exec_module(module)\n"
            "print(json.dumps(dir(module)))")
    res = subprocess.run([sys.executable, "-c", code, so_path], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def built(name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "fisherfast", f"{name}.*.so")))


def test_adapters_call_each_extension():
    calls = adapter_calls()
    assert {"fwht", "srht", "softmax_fisher_lse_update", "fisher_sketch_update"} <= calls["_C"]
    assert {"fwht", "softmax_fisher_stats", "fisher_sketch_prepare", "probe"} <= calls["_C_cuda"]


@pytest.mark.skipif(not built("_C"), reason="fisherfast._C is not built in the tree")
def test_cpu_extension_exports_what_the_adapters_call():
    missing = adapter_calls()["_C"] - module_exports(built("_C")[0], "_C")
    assert not missing, f"fisherfast._C lacks {sorted(missing)}"


@pytest.mark.skipif(not built("_C_cuda"), reason="fisherfast._C_cuda is not built in the tree")
def test_built_cuda_extension_has_sm80_sm90_code_and_exports():
    so = built("_C_cuda")[0]
    assert_every_kernel_built_for_each_sm(so)
    missing = adapter_calls()["_C_cuda"] - module_exports(so, "_C_cuda")
    assert not missing, f"fisherfast._C_cuda lacks {sorted(missing)}"


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(BUILD.find_nvcc() is None,
                    reason="nvcc not found (set CUDA_HOME or FISHERFAST_NVCC, or put nvcc on PATH)")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    """Compile and link csrc/cuda as setup.py does (one nvcc call per source,
    in parallel), then read the result: sm_80 and sm_90 cubins for every
    kernel, PTX for newer GPUs, every function the adapters call."""
    nvcc, flags = BUILD.find_nvcc(), BUILD.nvcc_compile_flags()
    objects = [str(tmp_path / (os.path.basename(src) + ".o")) for src in SOURCES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_run, [nvcc, "-c", src, "-o", obj, *flags]) for src, obj in zip(SOURCES, objects)]
        for job in jobs:
            job.result()
    out = tmp_path / "_C_cuda.so"
    _run([nvcc, "-shared", "-o", str(out), "-cudart", "static", *objects, *BUILD.nvcc_gencode_flags()])
    assert_every_kernel_built_for_each_sm(str(out))
    missing = adapter_calls()["_C_cuda"] - module_exports(str(out), "_C_cuda")
    assert not missing, f"the linked module lacks {sorted(missing)}"
