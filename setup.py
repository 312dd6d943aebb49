"""Build hessmlp's C++ (and, where a CUDA toolkit is present, CUDA) extension.

CUDA is built when torch is a CUDA build and a CUDA toolkit is found, never
because a GPU happens to be visible. Overrides: FORCE_CUDA=1, FORCE_ONLY_CPU=1.
DEBUG=1 builds with -O0 -g, LINE_INFO=1 adds -lineinfo to nvcc. ccache is used when installed
(NO_CCACHE=1: not).

HESSMLP_EMULATED_CUDA=1 builds, instead, the test-only extension hessmlp._C_emulated: the
CUDA kernels of csrc/cuda compiled as host C++ and run on the CPU by csrc/emulated's
stand-in for the CUDA execution model, as the ops of the library hessmlp_emulated (CPU
tensors). Tests use it; users never get it. .ci/cuda_emulated builds it with
    HESSMLP_EMULATED_CUDA=1 python setup.py build_ext --inplace --force --build-temp build/emulated
(HESSMLP_EMULATED_ASAN=1: with AddressSanitizer).
"""
import glob
import os
import shutil
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def use_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def use_ccache():
    """Compile through ccache when it is installed (its compiler links, as Debian and most
    distributions put them): a rebuild of unchanged files then takes seconds."""
    if _flag("NO_CCACHE") or not shutil.which("ccache"):
        return
    for links in ("/usr/lib/ccache", "/usr/lib64/ccache", "/usr/local/opt/ccache/libexec"):
        if os.path.isdir(links) and links not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = links + os.pathsep + os.environ.get("PATH", "")
            return


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cxx_flags():
    debug = _flag("DEBUG")
    # -g0: no debug info in release builds (Python's CFLAGS add -g; it made the largest
    # translation unit compile a third slower).
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link = []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        # at::parallel_for is inlined from ATen's headers: without OpenMP here it would run
        # every loop on one thread. The GOMP symbols resolve to the libgomp torch loads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    return cxx, link


def extension():
    debug = _flag("DEBUG")
    cxx, link = _cxx_flags()
    # The C++ standard and -DPy_LIMITED_API (py_limited_api=True) are the ones torch sets.
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cuda_sources = _rel("csrc/cuda/*.cu")
    if use_cuda() and cuda_sources:
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
        nvcc += ["--expt-relaxed-constexpr"]
        if _flag("LINE_INFO"):
            nvcc.append("-lineinfo")
        return CUDAExtension(
            "hessmlp._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DHESSMLP_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
    return CppExtension(
        "hessmlp._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        py_limited_api=True,
    )


def emulated_extension():
    """hessmlp._C_emulated (see the top): the driver, the schemas and csrc/cuda's kernels
    through csrc/emulated. Its symbols are hidden, so that it and hessmlp._C, which share
    the driver's code, can be loaded into one process. HESSMLP_EMULATED_ASAN=1 adds
    AddressSanitizer: a kernel's read or write outside a tensor then stops the tests (run
    python with libasan and libstdc++ in LD_PRELOAD, as .ci/cuda_emulated does)."""
    cxx, link = _cxx_flags()
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if _flag("HESSMLP_EMULATED_ASAN") else []
    sources = _rel("csrc/*.cpp") + _rel("csrc/emulated/*.cpp")
    return CppExtension(
        "hessmlp._C_emulated",
        sources,
        depends=_rel("csrc/*.h") + _rel("csrc/cuda/*") + _rel("csrc/emulated/*.h"),
        extra_compile_args={"cxx": cxx + ["-DHESSMLP_EMULATE_CUDA", "-fvisibility=hidden",
                                          "-fvisibility-inlines-hidden"] + asan},
        extra_link_args=link + asan,
        py_limited_api=True,
    )


use_ccache()
setup(
    ext_modules=[emulated_extension() if _flag("HESSMLP_EMULATED_CUDA") else extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
