"""Every CUDA source compiles and links with nvcc for sm_80 and sm_90.

No GPU is needed: this checks the code the CUDA backend would run (the GPU
itself is only reachable on machines that have one). Each source is compiled
for both architectures in one nvcc call (the front end parsing pybind11 costs
far more than a second architecture), the calls run in parallel, one per core,
and the objects are linked as setup.py links the module (static cudart)."""
from __future__ import annotations

import concurrent.futures
import glob
import importlib.util
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _load_setup():
    """setup.py as a module (its setup() call runs only as __main__): the build's own nvcc flags."""
    spec = importlib.util.spec_from_file_location("fisherfast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_setup()


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def test_every_cuda_source_is_collected():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"module.cu", "fwht.cu"} <= names


def test_build_targets_sm80_and_sm90_with_ptx():
    flags = " ".join(BUILD.nvcc_gencode_flags())
    for arch in ("80", "90"):
        assert f"arch=compute_{arch},code=sm_{arch}" in flags
    assert "code=compute_90" in flags


@pytest.mark.skipif(BUILD.find_nvcc() is None,
                    reason="nvcc not found (set CUDA_HOME or FISHERFAST_NVCC, or put nvcc on PATH)")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc, flags = BUILD.find_nvcc(), BUILD.nvcc_compile_flags()
    objects = [str(tmp_path / (os.path.basename(src) + ".o")) for src in SOURCES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_run, [nvcc, "-c", src, "-o", obj, *flags]) for src, obj in zip(SOURCES, objects)]
        for job in jobs:
            job.result()
    out = tmp_path / "_C_cuda.so"
    _run([nvcc, "-shared", "-o", str(out), "-cudart", "static", *objects, *BUILD.nvcc_gencode_flags()])
    assert out.stat().st_size > 0
