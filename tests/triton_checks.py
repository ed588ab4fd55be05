"""What the Triton kernel tests share: their device (CUDA, or CPU tensors under the interpreter
that tests/conftest.py switches on where there is no GPU), their skip mark, and comparisons at
the fp64 / fp32 bars of norm_checks on that device."""
import os

import pytest
import torch

import norm_checks

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETING else "cuda"
NEEDS_A_DEVICE = pytest.mark.skipif(not (INTERPRETING or CUDA), reason="needs a CUDA GPU or TRITON_INTERPRET=1")


def assert_near(ours, theirs, dtype):
    norm_checks.assert_near(ours.cpu(), theirs.cpu(), dtype)


def random(shape, dtype, gen):
    """Fresh normal values on the kernels' device (drawn in float64, as norm_checks.random)."""
    return norm_checks.random(shape, dtype, gen).to(DEVICE)
