"""Compiling Triton kernels for sm_90 on a machine without a GPU: the interpreter checks none of
the GPU rules (layouts, register pressure, spills), compilation does.

A kernel test file builds its kernels' ``ASTSource`` objects in a script that ``run_script``
runs in a fresh process (without ``TRITON_INTERPRET``, which would swap the compiler out), and
calls ``compile_and_report`` there for each.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NO_NVIDIA_BACKEND = 77
"""The script's exit status when this Triton build cannot target NVIDIA GPUs."""

TESTS = Path(__file__).resolve().parent


def compile_and_report(label: str, source, num_warps: int) -> None:
    """Compile ``source`` for sm_90 and print ``label: REG:.. STACK:.. LOCAL:..`` (cuobjdump's
    resource usage, when the Triton wheel ships cuobjdump)."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    usage = ""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                  text=True).stdout
        usage = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", dump))
    print(f"{label}: {usage}")


def run_script(script: str, **defaults: str) -> str:
    """Run a compile script in a fresh process (``defaults``: environment variables it gets unless
    already set); skip where Triton has no NVIDIA backend."""
    environment = {**defaults, **{key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), str(TESTS),
                                                              environment.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=300)
    if result.returncode == NO_NVIDIA_BACKEND:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
