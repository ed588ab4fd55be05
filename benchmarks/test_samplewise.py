"""Sample-wise GradCosine with its backward, against vmap over per-sample gradients and one training step.

For a GroupNorm ResNet-18 (no layer couples samples) and a small ViT on 32x32 inputs, N in
(16, 64, 256), these are timed on the same batch and measured for peak memory:

- ``step``: one training step, forward + backward (workloads.training_step);
- ``samplewise``: ``nio_fast.gradcosine(..., sub_batches="samples", mode="factors",
  create_graph=True)`` and ``autograd.grad(value, params)``: one NIO-like evaluation;
- ``vmap_samples``: the per-sample gradients by ``vmap(grad(loss))`` with graph, their Gram,
  GradCosine and the same backward, under the modes nio_fast runs in (math attention);
- ``samplewise_recompute``: the same with every residual block / encoder layer recomputed
  instead of kept (``recompute=``, nio_fast.samplewise.segments): memory against time;
  ``samplewise_recompute_half``: the first half of them recomputed, the rest kept;
- ``nio_samples``: one sample-wise NIO iteration (``nio_fast.initialize(sub_batches="samples",
  iters=1)``): the same Gram, with the scale gradients NIO needs (linear and convolution
  weights' from probes) where ``samplewise`` forms every parameter's gradient;
  ``nio_samples_recompute`` and ``nio_samples_recompute_half``: the same with the segments of
  the two recompute cases recomputed (their weights' scale gradients from probes too);
- ``floor``: one backward with graph and one double backward of ||g||^2 over the whole batch
  (workloads.double_backward_floor), what differentiating through a backward costs before
  any per-sample Gram: the floor of time and memory the sample-wise figures stand against.

`report.py` turns the rows into benchmarks/results/samplewise.{json,md,png}: ratios to a
training step, vmap / sample-wise, the floor's ratios, the growth of the sample-wise time from N = 16 to 256 and
whether the targets hold (at N = 64 at most 5 training steps of time and 2x a step's peak
memory; less than 2x more time from N = 16 to 256).

    python -m pytest benchmarks/test_samplewise.py -q -p no:cacheprovider   # about 10 min, 2 cores

Environment:
    NIO_FAST_BENCH_SAMPLEWISE_QUICK=1  plumbing check in about a minute: N in (4, 8) (memory at N = 4
        only), ResNet-18 at width 8, one timed call after one warm-up. Send its tables elsewhere with
        NIO_FAST_BENCH_RESULTS=DIR so that benchmarks/results/ keeps only real numbers.
    NIO_FAST_BENCH_SAMPLEWISE_LONG=1   also measure the peak memory of resnet18_gn's sample-wise
        evaluation at N = 256 (one call of minutes on a 2-core CPU; skipped otherwise).
    NIO_FAST_BENCH_DEVICE=cuda         run the models on the GPU (benchmarks/gpu_check.py does):
        timings synchronise the device, peak memory is the CUDA allocator's peak above the model and
        batch, measured in-process, and vmap's limit is half the device's memory.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nio_fast
from nio_fast.algorithms.gradcosine import vmapped_chunk_gradients
from nio_fast.algorithms.model_state import nio_modes
from harness import synchronize
from networks import images, make
from workloads import SAMPLEWISE_CALLS, double_backward_floor, step_timer, trainable, training_step

QUICK = os.environ.get("NIO_FAST_BENCH_SAMPLEWISE_QUICK") == "1"
LONG = os.environ.get("NIO_FAST_BENCH_SAMPLEWISE_LONG") == "1"
MODELS = ("resnet18_gn", "vit_small")
SIZES = (4, 8) if QUICK else (16, 64, 256)
MEMORY_SIZES = SIZES[:1] if QUICK else SIZES  # a fresh process each: ~5 s of start-up even when tiny
OPTIONS = {"resnet18_gn": {"width": 8}} if QUICK else {}  # constructor options per model
IMPLEMENTATIONS = ("step", "samplewise", "samplewise_recompute", "samplewise_recompute_half", "nio_samples",
                   "nio_samples_recompute", "nio_samples_recompute_half", "vmap_samples", "floor")
DEVICE = torch.device(os.environ.get("NIO_FAST_BENCH_DEVICE", "cpu"))
# per-sample gradients with graph: N x parameters x 4 B x 3 (gradients + backward)
VMAP_LIMIT_BYTES = 0.5 * torch.cuda.get_device_properties(DEVICE).total_memory if DEVICE.type == "cuda" else 6e9
SCRIPT = Path(__file__).resolve().parent / "peak_memory.py"


def build(model_name: str):
    return make(model_name, **OPTIONS.get(model_name, {})).to(DEVICE)


def batch_of(n: int):
    return tuple(t.to(DEVICE) for t in images(n))


def vmap_samples_evaluation(model, batch):
    """The same value and gradient from per-sample gradients formed by vmap (the slow baseline)."""
    inputs, targets = batch
    params = trainable(model)
    with nio_modes(model):
        grads = vmapped_chunk_gradients(model, inputs, targets, F.cross_entropy, params, num_chunks=len(inputs),
                                        create_graph=True)
        value = nio_fast.ops.gradcosine_from_gram(nio_fast.ops.gram(grads)).value
        torch.autograd.grad(value, params, allow_unused=True)


EVALUATIONS = {"step": training_step, **SAMPLEWISE_CALLS, "vmap_samples": vmap_samples_evaluation,
               "floor": double_backward_floor}


@functools.cache
def parameter_count(model_name: str) -> int:
    return sum(p.numel() for p in trainable(build(model_name)))


def vmap_skip_reason(model_name: str, n: int) -> str | None:
    """Why vmap is not run at this size (its per-sample gradients would not fit), or None."""
    count = parameter_count(model_name)
    needed = n * count * 4 * 3
    if needed <= VMAP_LIMIT_BYTES:
        return None
    return (f"vmap skipped: per-sample gradients need ~{needed / 1e9:.1f} GB (N x {count / 1e6:.1f}M parameters "
            f"x 4 B x 3) > {VMAP_LIMIT_BYTES / 1e9:.0f} GB")


def schedule(model_name: str, n: int, implementation: str) -> tuple[int, int]:
    """(timed calls, warm-up calls) of one case: the whole file stays near 10 minutes on 2 cores.

    ResNet-18's evaluations take 2 s to a minute a call: three timed calls after a warm-up up to
    N = 64 (a single call measured 5.9 and 8.0 training steps in two runs), one without warm-up at
    N = 256 (the one-time costs a warm-up would absorb, the first call's lazy imports, ~2 s, are
    paid by N = 16 before it in the same process, and would be lost in a minute-long call anyway).
    """
    if QUICK:
        return 1, 1
    if model_name == "resnet18_gn" and implementation != "step":
        return (1, 0) if n >= 256 else (3, 1)
    if n >= 256:
        return 1, 1
    return 2, 1


def route_summary(routes: dict[str, str] | None) -> str | None:
    """'ghost 6, materialize 15, vectors 41': how many parameter tensors took each route."""
    if not routes:
        return None
    return ", ".join(f"{route} {count}" for route, count in sorted(collections.Counter(routes.values()).items()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("model_name", MODELS)
def test_samplewise_seconds(benchmark, record, model_name, n, implementation):
    common = dict(model=model_name, N=n, implementation=implementation, params=parameter_count(model_name))
    reason = vmap_skip_reason(model_name, n) if implementation == "vmap_samples" else \
        long_call_skip_reason(model_name, n, implementation)
    if reason:
        record("samplewise", **common, seconds=None, skipped=reason)
        pytest.skip(reason)
    model, batch = build(model_name), batch_of(n)
    evaluate, last, steps = EVALUATIONS[implementation], {}, []

    def run():
        last["result"] = evaluate(model, batch)
        synchronize()

    rounds, warmup = schedule(model_name, n, implementation)
    benchmark.group = f"{model_name} N={n}"
    # the step case of the same group runs minutes apart: each case times steps of its own
    time_a_step = None if implementation == "step" else step_timer(model, batch, steps)
    benchmark.pedantic(run, setup=time_a_step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    routes = route_summary(last["result"].routes) if implementation.startswith("samplewise") else None
    record("samplewise", **common, seconds=benchmark.stats.stats.median, rounds=rounds, warmup=warmup,
           routes=routes, step_seconds=statistics.median(steps[warmup:]) if steps else None)


def long_call_skip_reason(model_name: str, n: int, implementation: str) -> str | None:
    """ResNet-18's recomputing evaluations at N = 256: one call of minutes on a 2-core CPU."""
    if "_recompute" in implementation and model_name == "resnet18_gn" and n >= 256 and not LONG \
            and DEVICE.type == "cpu":
        return "recompute skipped: one call takes minutes on CPU (NIO_FAST_BENCH_SAMPLEWISE_LONG=1 measures it)"
    return None


def memory_skip_reason(model_name: str, n: int, implementation: str) -> str | None:
    if implementation == "vmap_samples":
        return vmap_skip_reason(model_name, n)
    if implementation in ("samplewise", "nio_samples") and model_name == "resnet18_gn" and n >= 256 and not LONG:
        return "sample-wise skipped: one call takes minutes on CPU (NIO_FAST_BENCH_SAMPLEWISE_LONG=1 measures it)"
    return long_call_skip_reason(model_name, n, implementation)


def cuda_peak_memory(model_name: str, n: int, implementation: str) -> dict:
    """The CUDA allocator's peak during one call, above the model and batch (after a warm-up call)."""
    model, batch = build(model_name), batch_of(n)
    evaluate = EVALUATIONS[implementation]
    evaluate(model, tuple(t[:2] for t in batch))  # one-time costs (lazy imports, autotuning) off the books
    synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    evaluate(model, batch)
    synchronize()
    peak = torch.cuda.max_memory_allocated(DEVICE)
    extra = (peak - baseline) / 2**20
    return {"baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20, "extra_mb": extra, "allocated_mb": extra}


def peak_memory_command(model_name: str, n: int, implementation: str) -> list[str]:
    command = [sys.executable, str(SCRIPT), model_name, implementation, "--batch", str(n),
               "--threads", str(torch.get_num_threads()), "--warmup", "--allocated"]
    if "width" in OPTIONS.get(model_name, {}):
        command += ["--width", str(OPTIONS[model_name]["width"])]
    return command


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n", MEMORY_SIZES)
@pytest.mark.parametrize("model_name", MODELS)
def test_samplewise_peak_memory(record, model_name, n, implementation):
    """Peak resident memory of one call, each in a fresh process, and the tensor allocator's peak
    of a second call there (peak_memory.py --allocated)."""
    common = dict(model=model_name, N=n, implementation=implementation, threads=torch.get_num_threads(),
                  device=DEVICE.type)
    if reason := memory_skip_reason(model_name, n, implementation):
        record("samplewise_memory", **common, extra_mb=None, skipped=reason)
        pytest.skip(reason)
    if DEVICE.type == "cuda":
        record("samplewise_memory", **common, **cuda_peak_memory(model_name, n, implementation))
        return
    result = subprocess.run(peak_memory_command(model_name, n, implementation), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    record("samplewise_memory", **common, **measured)
