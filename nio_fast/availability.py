"""Which fast paths this installation has, decided once, in one place.

Three backends compute the Gram matrix of chunk gradients (see ``nio_fast.ops.gram``):

- ``"triton"``: fused Triton kernels, for CUDA tensors (and CPU tensors under
  ``TRITON_INTERPRET=1``, which is how CI tests them);
- ``"cpp"``: the compiled extension ``nio_fast._C`` (multi-threaded CPU kernels, and CUDA
  kernels when it was built with CUDA);
- ``"torch"``: plain PyTorch, always there; the reference the others are tested against.

A missing or broken extension is not an error: the package falls back to plain PyTorch and
warns once, naming the reason.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch

BACKEND_NAMES = ("triton", "cpp", "torch")


@functools.lru_cache(maxsize=None)
def optional_module(name: str, present: str = "importable") -> tuple[Optional[ModuleType], str]:
    """``(module, present)``, or ``(None, why)`` when importing ``name`` fails; tried once.

    For the fast paths a package runs without: the extension, and each Triton kernel module
    (no triton, a triton too old for the kernels, an extension built against another ABI).
    """
    try:
        return importlib.import_module(name), present
    except Exception as error:  # ImportError, or an undefined symbol from an ABI mismatch
        return None, f"{type(error).__name__}: {error}"


def _load_extension() -> tuple[Optional[ModuleType], str]:
    return optional_module("nio_fast._C", "built")


_warned_missing_extension = False


def extension() -> Optional[ModuleType]:
    """The compiled extension ``nio_fast._C``, or None (with one warning) when unavailable."""
    global _warned_missing_extension
    module, reason = _load_extension()
    if module is None and not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            f"nio_fast: the C++ extension nio_fast._C is unavailable ({reason}); "
            "falling back to plain PyTorch. Reinstall with `pip install -e . --no-build-isolation` "
            "to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return module


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_triton_kernels() -> tuple[Optional[ModuleType], str]:
    return optional_module("nio_fast.kernels.gram")


def triton_kernels() -> Optional[ModuleType]:
    """The Triton kernel module, or None when Triton cannot be imported."""
    return _load_triton_kernels()[0]


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if triton_kernels() is None:
        return False
    # The interpreter runs kernels through numpy on host memory: CPU tensors only, then.
    if triton_interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


def cpp_usable(device: torch.device) -> bool:
    """Whether the extension has kernels for tensors of ``device``."""
    module, _ = _load_extension()
    if module is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(module.cuda_compiled())


_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)  # (the Triton kernels' too)


def cpu_kernels_for(x: torch.Tensor, backend: str, op: str) -> Optional[ModuleType]:
    """The extension where its float32/float64 CPU kernels of ``op`` run on ``x`` (backend "auto"
    or "cpp"), else None (the caller's plain twin or PyTorch's op); "cpp" that cannot run raises."""
    if backend == "torch":
        return None
    usable = x.dtype in _CPU_KERNEL_DTYPES and x.device.type == "cpu" and cpp_usable(x.device)
    if backend == "cpp" and not usable:
        raise ValueError(f"backend: 'cpp' {op} kernels need CPU float32/float64 tensors and the built extension; "
                         f"got {x.dtype} on {x.device}")
    return extension() if usable else None


def fused_kernels_for(x: torch.Tensor, backend: str, op: str, triton_module: str) -> Optional[ModuleType]:
    """The module whose fused kernels of ``op`` run on ``x``: the extension (CPU), the Triton
    module ``triton_module`` (CUDA; CPU tensors under TRITON_INTERPRET=1), or None for the plain
    twins. "auto" takes cpp on the CPU and triton on CUDA, for float32 / float64; a named backend
    ("cpp", "triton") that cannot run raises; "torch" is None."""
    if backend == "torch":
        return None
    if backend != "triton":  # "cpp", or "auto" on the CPU
        cpp = cpu_kernels_for(x, backend, op)
        if cpp is not None or x.device.type != "cuda":
            return cpp
    # "triton", or "auto" on CUDA: only here is the Triton module imported
    if x.dtype in _CPU_KERNEL_DTYPES and triton_usable(x.device):
        module, _ = optional_module(triton_module)
        if module is not None:
            return module
    if backend == "triton":
        raise ValueError(f"backend: 'triton' {op} kernels need float32/float64 CUDA tensors (CPU ones under "
                         f"TRITON_INTERPRET=1) and triton; got {x.dtype} on {x.device}")
    return None


def default_backend(device: torch.device) -> str:
    """The backend ``backend="auto"`` picks for tensors on ``device``.

    CUDA: Triton, else the extension's CUDA kernels, else torch. CPU: the extension (the
    Triton interpreter is a test vehicle, far too slow for real work), else torch.
    """
    if device.type == "cuda" and triton_usable(device):
        return "triton"
    if cpp_usable(device):
        return "cpp"
    extension()  # warns once when the extension is missing
    return "torch"


def backends() -> dict[str, dict[str, object]]:
    """What this installation can run, and why not where it cannot.

    Returns ``{name: {"available": bool, "devices": [...], "reason": str}}`` for
    ``"triton"``, ``"cpp"`` and ``"torch"``.
    """
    ext, ext_reason = _load_extension()
    kernels, triton_reason = _load_triton_kernels()
    cuda = torch.cuda.is_available()

    triton_devices = []
    if kernels is not None:
        if triton_interpreting():
            triton_devices.append("cpu (interpreter)")
        elif cuda:
            triton_devices.append("cuda")
    if kernels is None:
        triton_why = triton_reason
    elif not triton_devices:
        triton_why = "Triton imports, but there is no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    else:
        triton_why = "ok"

    cpp_devices = []
    if ext is not None:
        cpp_devices.append("cpu")
        if ext.cuda_compiled():
            cpp_devices.append("cuda")
    cpp_why = ext_reason if ext is None else (
        "ok" if "cuda" in cpp_devices else "ok (built without CUDA kernels)")

    return {
        "triton": {"available": bool(triton_devices), "devices": triton_devices, "reason": triton_why},
        "cpp": {"available": ext is not None, "devices": cpp_devices, "reason": cpp_why},
        "torch": {"available": True, "devices": ["cpu"] + (["cuda"] if cuda else []), "reason": "ok"},
    }
