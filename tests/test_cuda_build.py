"""Every CUDA source compiles and links with nvcc for sm_80 and sm_90.

No GPU is needed: this checks the code the CUDA backend would run (the GPU
itself is only reachable on machines that have one). Each source is compiled
for both architectures in one nvcc call (the front end parsing pybind11 costs
far more than a second architecture), the calls run in parallel, one per core,
and the objects are linked as setup.py links the module (static cudart)."""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sysconfig

import pybind11
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _nvcc():
    explicit = os.environ.get("FISHERFAST_NVCC")
    if explicit:
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def test_every_cuda_source_is_collected():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"module.cu", "fwht.cu"} <= names


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or FISHERFAST_NVCC, or put nvcc on PATH)")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = _nvcc()
    flags = [
        "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr",
        "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + pybind11.get_include(),
        "-I" + sysconfig.get_paths()["include"], *GENCODE,
    ]  # fmt: skip
    objects = [str(tmp_path / (os.path.basename(src) + ".o")) for src in SOURCES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_run, [nvcc, "-c", src, "-o", obj, *flags]) for src, obj in zip(SOURCES, objects)]
        for job in jobs:
            job.result()
    out = tmp_path / "_C_cuda.so"
    _run([nvcc, "-shared", "-o", str(out), "-cudart", "static", *objects, *GENCODE])
    assert out.stat().st_size > 0
