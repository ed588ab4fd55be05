"""Seconds of the chunk reductions ``ops.chunk_gram`` (W^T G W) and ``ops.chunk_sums`` (W^T V):
the dense-matmul twin ("torch") against the sparse kernels ("cpp" on CPU; "triton", and "cpp"
when built with CUDA, on CUDA), forward and forward + backward, in one run side by side.

Sizes are what sub-batch NIO on the factor engine reduces: per-sample Grams of N = 64 to 1024
samples into D = 4 to 64 chunks, and per-sample gradients of K = 10^5 to 10^6 values (a layer's
biases and norm affines are far smaller; the ``chunks`` route takes the big weights). Overlap
0.5 doubles the nonzeros of W. Rows go to table "chunk_reduce"; benchmarks/report.py adds the
ratio torch / backend. ``NIO_FAST_BENCH_QUICK=1`` keeps the smallest sizes.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import synchronize
from nio_fast import availability, ops
from nio_fast.algorithms.batching import chunk_bounds

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("NIO_FAST_BENCH_QUICK") == "1"
BACKENDS = ["torch"] + [name for name, usable in (
    ("triton", DEVICE.type == "cuda" and availability.triton_usable(DEVICE)),
    ("cpp", availability.cpp_usable(DEVICE))) if usable]
GRAM_CASES = [(64, 4, 0.0), (256, 16, 0.0), (256, 16, 0.5), (1024, 64, 0.0)]
SUMS_CASES = [(64, 4, 100_000, 0.0), (64, 16, 1_000_000, 0.0), (256, 16, 1_000_000, 0.5)]
if QUICK:
    GRAM_CASES, SUMS_CASES = GRAM_CASES[:1], [(64, 4, 10_000, 0.0)]


DIRECTIONS = ("forward", "forward+backward")


def _time(benchmark, run, data, direction: str) -> float:
    """Median seconds of ``run(data)`` (and, for forward+backward, its gradient w.r.t. ``data``)."""
    def call():
        out = run(data)
        if direction == "forward+backward":
            torch.autograd.grad(out, data, torch.ones_like(out))
        synchronize()
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num,chunks,overlap", GRAM_CASES)
def test_chunk_gram(benchmark, record, num, chunks, overlap, backend, direction):
    generator = torch.Generator().manual_seed(num)
    per_sample = torch.randn(num, 64, generator=generator).to(DEVICE)
    gram = (per_sample @ per_sample.T).requires_grad_()
    weighting = ops.ChunkWeighting.from_bounds(chunk_bounds(num, chunks, overlap), num, torch.float32, DEVICE)
    benchmark.group = f"chunk_gram N={num} D={chunks} overlap={overlap} {direction}"
    seconds = _time(benchmark, lambda g: ops.chunk_gram(g, weighting, backend), gram, direction)
    record("chunk_reduce", op="chunk_gram", N=num, D=chunks, K=None, overlap=overlap, backend=backend,
           direction=direction, device=DEVICE.type, seconds=seconds)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num,chunks,width,overlap", SUMS_CASES)
def test_chunk_sums(benchmark, record, num, chunks, width, overlap, backend, direction):
    generator = torch.Generator().manual_seed(width)
    values = torch.randn(num, width, generator=generator).to(DEVICE).requires_grad_()
    weighting = ops.ChunkWeighting.from_bounds(chunk_bounds(num, chunks, overlap), num, torch.float32, DEVICE)
    benchmark.group = f"chunk_sums N={num} D={chunks} K={width} overlap={overlap} {direction}"
    seconds = _time(benchmark, lambda v: ops.chunk_sums(v, weighting, backend), values, direction)
    record("chunk_reduce", op="chunk_sums", N=num, D=chunks, K=width, overlap=overlap, backend=backend,
           direction=direction, device=DEVICE.type, seconds=seconds)
