"""Seconds of GroupNorm through NIO's second-order pass: ``F.group_norm`` ("native": PyTorch's
differentiable composite backward, autograd over it for the double backward) against
``ops.group_norm`` with its plain twins ("torch") and with its fused kernels ("cpp": the extension's,
on the CPU; "triton": on CUDA), in one run side by side.

"second order" is what an NIO iteration does with every GroupNorm: forward, backward with a
graph, and the backward of a function of that gradient; "first order" is a training step's
forward and backward. Shapes are the GroupNorm ResNet-20's three stages at batch 64 (8 groups).
Rows go to table "group_norm"; benchmarks/report.py adds native / backend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import synchronize
from nio_fast import availability, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["native", "torch"] + [name for name, usable in (
    ("cpp", DEVICE.type == "cpu" and availability.cpp_usable(DEVICE)),
    ("triton", DEVICE.type == "cuda" and availability.triton_usable(DEVICE))) if usable]
SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]
ORDERS = ("first order", "second order")


def _group_norm(backend: str):
    if backend == "native":
        return F.group_norm
    return lambda x, groups, weight, bias: ops.group_norm(x, groups, weight, bias, backend=backend)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_group_norm(benchmark, record, shape, backend, order):
    generator = torch.Generator().manual_seed(shape[1])
    x, cotangent = (torch.randn(shape, generator=generator).to(DEVICE) for _ in range(2))
    weight, bias = (torch.randn(shape[1], generator=generator).to(DEVICE) for _ in range(2))
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    group_norm = _group_norm(backend)

    def call():
        out = group_norm(leaves[0], 8, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, cotangent, create_graph=order == "second order")
        if order == "second order":
            torch.autograd.grad(sum((g * g).sum() for g in grads), leaves, allow_unused=True)
        synchronize()

    benchmark.group = f"group_norm {list(shape)} {order}"
    benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=1)
    record("group_norm", shape="x".join(map(str, shape)), order=order, backend=backend, device=DEVICE.type,
           seconds=benchmark.stats.stats.median)
