"""Seconds of GroupNorm, BatchNorm, LayerNorm and attention through NIO's second-order pass:
PyTorch's ("native": ``F.group_norm`` / ``F.batch_norm`` with batch statistics / ``F.layer_norm``
/ ``F.scaled_dot_product_attention`` on its math path, autograd over their backward for the double
backward) against ``ops.group_norm`` / ``ops.batch_norm`` / ``ops.layer_norm`` / ``ops.attention``
with their plain twins ("torch") and with their fused kernels ("cpp": the extension's, on the CPU;
"triton": GroupNorm's and attention's on CUDA), in one run side by side.

"second order" is what an NIO iteration does with every normalisation layer: forward, backward
with a graph, and the backward of a function of that gradient; "first order" is a training
step's forward and backward. Shapes are the ResNet-20's three stages at batch 64 (GroupNorm: 8
groups) and, for LayerNorm and attention, the small ViT's tokens at batch 64 (4 heads of 16) and a
ViT-B/16's at batch 8 (12 heads of 64). Rows go to tables "group_norm", "batch_norm",
"layer_norm" and "attention"; benchmarks/report.py adds native / backend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness import synchronize
from nio_fast import availability, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPP = DEVICE.type == "cpu" and availability.cpp_usable(DEVICE)
GROUP_NORM_BACKENDS = ATTENTION_BACKENDS = ["native", "torch"] + [name for name, usable in (
    ("cpp", CPP), ("triton", DEVICE.type == "cuda" and availability.triton_usable(DEVICE))) if usable]
BATCH_NORM_BACKENDS = LAYER_NORM_BACKENDS = ["native", "torch"] + (["cpp"] if CPP else [])
SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]
TOKEN_SHAPES = [(64, 64, 64), (8, 197, 768)]  # [batch, tokens, features], normalised over features
HEAD_SHAPES = [(64, 4, 64, 16), (8, 12, 197, 64)]  # the same tokens as [batch, heads, tokens, head width]
ORDERS = ("first order", "second order")
SHAPE_IDS = {"ids": lambda shape: "x".join(map(str, shape))}


def _group_norm(backend: str):
    if backend == "native":
        return lambda x, weight, bias: F.group_norm(x, 8, weight, bias)
    return lambda x, weight, bias: ops.group_norm(x, 8, weight, bias, backend=backend)


def _batch_norm(backend: str):
    if backend == "native":
        return lambda x, weight, bias: F.batch_norm(x, None, None, weight, bias, training=True)
    return lambda x, weight, bias: ops.batch_norm(x, None, None, weight, bias, training=True, backend=backend)


def _layer_norm(backend: str):
    if backend == "native":
        return lambda x, weight, bias: F.layer_norm(x, weight.shape, weight, bias)
    return lambda x, weight, bias: ops.layer_norm(x, weight.shape, weight, bias, backend=backend)


def _attention(backend: str):
    if backend == "native":
        def math_path(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):  # the one twice-differentiable PyTorch attention
                return F.scaled_dot_product_attention(q, k, v)
        return math_path
    return lambda q, k, v: ops.attention(q, k, v, backend=backend)


def _time(benchmark, record, table, norm, shape, backend, order, affine_size=None):
    generator = torch.Generator().manual_seed(shape[1])
    x, cotangent = (torch.randn(shape, generator=generator).to(DEVICE) for _ in range(2))
    weight, bias = (torch.randn(affine_size or shape[1], generator=generator).to(DEVICE) for _ in range(2))
    _time_call(benchmark, record, table, norm, (x, weight, bias), cotangent, shape, backend, order)


def _time_call(benchmark, record, table, layer, inputs, cotangent, shape, backend, order):
    leaves = [t.requires_grad_() for t in inputs]

    def call():
        grads = torch.autograd.grad(layer(*leaves), leaves, cotangent, create_graph=order == "second order")
        if order == "second order":
            torch.autograd.grad(sum((g * g).sum() for g in grads), leaves, allow_unused=True)
        synchronize()

    benchmark.group = f"{table} {list(shape)} {order}"
    benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=1)
    record(table, shape="x".join(map(str, shape)), order=order, backend=backend, device=DEVICE.type,
           seconds=benchmark.stats.stats.median)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", GROUP_NORM_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, **SHAPE_IDS)
def test_group_norm(benchmark, record, shape, backend, order):
    _time(benchmark, record, "group_norm", _group_norm(backend), shape, backend, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BATCH_NORM_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, **SHAPE_IDS)
def test_batch_norm(benchmark, record, shape, backend, order):
    _time(benchmark, record, "batch_norm", _batch_norm(backend), shape, backend, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", LAYER_NORM_BACKENDS)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, **SHAPE_IDS)
def test_layer_norm(benchmark, record, shape, backend, order):
    _time(benchmark, record, "layer_norm", _layer_norm(backend), shape, backend, order, affine_size=shape[-1])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("shape", HEAD_SHAPES, **SHAPE_IDS)
def test_attention(benchmark, record, shape, backend, order):
    generator = torch.Generator().manual_seed(shape[1])
    q, k, v, cotangent = (torch.randn(shape, generator=generator).to(DEVICE) for _ in range(4))
    _time_call(benchmark, record, "attention", _attention(backend), (q, k, v), cotangent, shape, backend, order)
