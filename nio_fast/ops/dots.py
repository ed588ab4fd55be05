"""Per-tensor inner products <a_p, b_p>: the scale optimizer's reduction.

NIO's scale gradient is s_p = <dJ/dtheta_p, theta0_p> for every parameter tensor p. Done one
tensor at a time with ``.item()`` that is P host synchronisations per iteration (the published
code's pattern); here it is one call that returns a [P] tensor on the tensors' device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import availability


def tensor_dots_reference(a: Sequence[Optional[torch.Tensor]], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain twin: one fp64 dot product per pair; a missing ``a[p]`` counts as zero."""
    device = b[0].device if b else torch.device("cpu")
    dots = [torch.zeros((), dtype=torch.float64, device=device) if x is None
            else torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)]
    return torch.stack(dots) if dots else torch.zeros(0, dtype=torch.float64, device=device)


def tensor_dots(a: Sequence[Optional[torch.Tensor]], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[<a[p], b[p]> for p]`` as one fp64 tensor on the device of ``b``; ``a[p]=None`` gives 0.

    CPU tensors go through the extension's multi-threaded kernel; other devices and a missing
    extension use the plain twin (whose ops queue on the device without a host sync).
    """
    if len(a) != len(b):
        raise ValueError(f"a, b: expected the same number of tensors, got {len(a)} and {len(b)}")
    device = b[0].device if b else torch.device("cpu")
    if device.type != "cpu" or not availability.cpp_usable(device):
        return tensor_dots_reference(a, b)
    present = [p for p, x in enumerate(a) if x is not None]
    result = torch.zeros(len(b), dtype=torch.float64)
    if present:
        result[present] = availability.extension().tensor_dots([a[p] for p in present], [b[p] for p in present])
    return result
