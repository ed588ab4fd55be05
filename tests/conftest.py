"""Test-wide set-up. Without a GPU, Triton kernels run through its interpreter on CPU tensors;
the switch must be set before Triton (or nio_fast) is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: failures reproduce."""
    torch.manual_seed(1234)
    yield
