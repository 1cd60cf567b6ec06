"""Build fisherfast._C (C++17 + OpenMP, pybind11) and, when nvcc is present,
fisherfast._C_cuda (nvcc + pybind11, static cudart, sm_80/sm_90 + PTX).

Neither extension includes torch headers: tensors cross the boundary as DLPack
capsules read into a typed view (csrc/include/fisherfast/view.h; the
softmax-Fisher and FisherSketch entry points) or as data pointers (fwht, srht),
so the build needs no torch and never triggers a CUDA torch download.

Environment switches:
  FISHERFAST_NATIVE=1   compile the CPU kernels with -march=native
                        (default: portable flags; hot loops carry target_clones)
  FISHERFAST_CUDA=0|1   skip / require the CUDA extension (default: build it
                        when nvcc is found, warn and go on if that build fails)
  FISHERFAST_NVCC       path to nvcc (default: $CUDA_HOME/bin/nvcc or PATH)
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pybind11
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join("csrc", "include")
CUDA_ARCHS = ("80", "90")
HEADERS = sorted(glob.glob(os.path.join(INCLUDE, "fisherfast", "*.h")))


def cpu_extension():
    compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("FISHERFAST_NATIVE") == "1":
        compile_args.append("-march=native")
    return Pybind11Extension(
        "fisherfast._C",
        sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        include_dirs=[INCLUDE],
        depends=HEADERS,
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )


def find_nvcc():
    explicit = os.environ.get("FISHERFAST_NVCC")
    if explicit:
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_compile_flags():
    """Flags for compiling one csrc/cuda source to an object (shared with tests/test_cuda_build.py)."""
    includes = ["-I" + os.path.join(ROOT, INCLUDE), "-I" + pybind11.get_include(),
                "-I" + sysconfig.get_paths()["include"]]
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr"]
    return common + includes + nvcc_gencode_flags()


def nvcc_gencode_flags():
    flags = []
    for arch in CUDA_ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    last = CUDA_ARCHS[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
    return flags


class BuildExt(build_ext):
    """build_ext that also builds the CUDA extension with nvcc directly.

    torch.utils.cpp_extension.CUDAExtension cannot build against a CPU torch,
    so the CUDA module is compiled and linked by nvcc itself."""

    def build_extension(self, ext):
        if ext.name == "fisherfast._C_cuda":
            self.build_cuda(ext)
        else:
            super().build_extension(ext)

    def build_cuda(self, ext):
        mode = os.environ.get("FISHERFAST_CUDA", "auto")
        nvcc = find_nvcc()
        try:
            if nvcc is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME or FISHERFAST_NVCC)")
            self.nvcc_link(ext, nvcc)
        except Exception as err:  # an optional build must not sink the install
            if mode == "1":
                raise
            print(f"warning: fisherfast._C_cuda not built: {err}", file=sys.stderr)

    def nvcc_link(self, ext, nvcc):
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        objects = []
        for src in ext.sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj] + nvcc_compile_flags()
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        link = [nvcc, "-shared", "-o", out, "-cudart", "static"] + objects + nvcc_gencode_flags()
        print(" ".join(link))
        subprocess.check_call(link)


def extensions():
    exts = [cpu_extension()]
    if os.environ.get("FISHERFAST_CUDA", "auto") != "0":
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        exts.append(Extension("fisherfast._C_cuda", sources))
    return exts


if __name__ == "__main__":  # pip's build backend and `python setup.py` both run it as __main__
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
