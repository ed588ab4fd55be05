"""Build of nio_fast and its extension nio_fast._C.

Install with ``pip install -e . --no-build-isolation`` (or ``python setup.py build_ext --inplace``):
the extension compiles against the torch already installed, so there is deliberately no
pyproject.toml with build requirements (build isolation would fetch a multi-GB CUDA torch).

The C++ kernels are always built. The CUDA kernels are added when a CUDA toolkit is found and
torch is a CUDA build. Environment switches:

* ``NIO_FAST_SKIP_CUDA_BUILD=1``: never build the CUDA kernels;
* ``NIO_FAST_FORCE_CUDA_BUILD=1``: build them or fail with the reason;
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;9.0+PTX``: Ampere, Hopper, and PTX
  that newer GPUs can JIT-compile);
* ``MAX_JOBS``: parallel compile jobs (default: the number of CPU cores).
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

CSRC = "csrc"
# Torch-facing CUDA code (uses ATen's CUDA headers): compiled only in CUDA builds.
CUDA_ONLY_CPP_SOURCES = {
    os.path.join(CSRC, "chunk_reduce_cuda_binding.cpp"),
    os.path.join(CSRC, "gram_cuda_binding.cpp"),
}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc():
    if cpp_extension.CUDA_HOME is not None:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def want_cuda_build() -> bool:
    skip = env_flag("NIO_FAST_SKIP_CUDA_BUILD")
    force = env_flag("NIO_FAST_FORCE_CUDA_BUILD")
    if skip and force:
        raise RuntimeError("NIO_FAST_SKIP_CUDA_BUILD and NIO_FAST_FORCE_CUDA_BUILD are both set; pick one")
    if skip:
        print("nio_fast: NIO_FAST_SKIP_CUDA_BUILD set, building the C++ kernels only")
        return False

    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    elif find_nvcc() is None or cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    if not reasons:
        return True

    message = "nio_fast: not building the CUDA kernels: " + "; ".join(reasons)
    if force:
        raise RuntimeError(message + " (NIO_FAST_FORCE_CUDA_BUILD=1 asks for them)")
    if torch.version.cuda is not None:
        # A CUDA torch without nvcc: the package works (Triton or CPU), but say so.
        warnings.warn(message + ". CUDA tensors will need the Triton kernels.")
    else:
        print(message)
    return False


def openmp_flags():
    """The flags that make at::parallel_for (inline OpenMP in ATen's headers) actually parallel."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp; at::parallel_for then runs on one thread.
        warnings.warn("nio_fast: building without OpenMP on macOS; CPU kernels run single-threaded")
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def make_extension():
    build_cuda = want_cuda_build()
    cpp_sources = sorted(
        path
        for path in glob.glob(os.path.join(CSRC, "*.cpp"))
        if build_cuda or path not in CUDA_ONLY_CPP_SOURCES
    )
    omp_compile, omp_link = openmp_flags()
    # No -std flag: torch's build adds the standard its headers need (C++17 for
    # older torch, C++20 for recent); the sources here are C++17.
    cxx_flags = (["/O2"] if sys.platform == "win32" else ["-O3"]) + omp_compile
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []

    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("NIO_FAST_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
        sources = cpp_sources + sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        print(f"nio_fast: building C++ and CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        return cpp_extension.CUDAExtension(
            name="nio_fast._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=omp_link,
        )
    return cpp_extension.CppExtension(
        name="nio_fast._C",
        sources=cpp_sources,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=omp_link,
    )


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    name="nio_fast",
    version="0.1.0",
    description="Neural initialization optimization (NIO) with memory-speed gradient Gram matrices",
    python_requires=">=3.9",
    packages=find_packages(include=["nio_fast", "nio_fast.*"]),
    install_requires=["torch>=2.1", "numpy", "tqdm"],
    extras_require={
        "gpu": ["triton"],
        "demo": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "triton"],
    },
    entry_points={"console_scripts": ["nio-fast = nio_fast.cli:main"]},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
