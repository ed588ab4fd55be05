"""Seconds per NIO iteration: the spec's reference against nio_fast, one training step, and the
double-backward floor.

`make bench` runs these; `benchmarks/report.py` turns the medians into ratios (reference /
nio_fast, nio_fast / training step, both against the floor) in
benchmarks/results/iteration.{json,md,png}.
"""
from __future__ import annotations

import statistics

import pytest
import torch.nn.functional as F

import nio_fast
from networks import images, make
from reference import reference_nio
from workloads import double_backward_floor, step_timer

BATCH = 64
D_SWEEP = (2, 4, 8, 16)
CASES = [(model, BATCH, d) for model in ("resnet20_gn", "resnet20_bn", "vit_small") for d in D_SWEEP]
CASES += [("resnet20_gn", 16, 16), ("resnet20_gn", 128, 4)]  # per-sample (D = N), and a larger batch
RECOMPUTE_CASES = [("resnet20_bn", BATCH, d) for d in (2, 8)]  # the memory-lean exact mode
FLOOR_CASES = sorted({(model, batch) for model, batch, _ in CASES})
ROUNDS = 3  # + 1 warm-up: the iteration suite then takes about 6 minutes on 2 cores (5-6 measured)


def reference_iteration(model, batch, sub_batches, iters=1):
    """``iters`` iterations of the reference on ``batch`` (one by default: what the suite times)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference_nio(model, [batch], F.cross_entropy, [n for n, _ in named], [p for _, p in named], iters=iters,
                  sub_batches=sub_batches)


def nio_fast_iteration(model, batch, sub_batches, mode="auto", iters=1):
    """One ``initialize`` call of ``iters`` iterations on ``batch`` (one by default: what the suite
    times, each call a span of the CPU allocation cache of its own, so the one iteration starts
    with nothing kept; interleaved.py --iters times the iterations after the first too)."""
    nio_fast.initialize(model, [batch] * iters, iters=iters, sub_batches=sub_batches, progress=False, mode=mode)


def recompute_iteration(model, batch, sub_batches):
    """mode="exact_recompute": exact semantics, one chunk graph in memory at a time."""
    nio_fast_iteration(model, batch, sub_batches, mode="exact_recompute")


IMPLEMENTATIONS = {"reference": reference_iteration, "nio_fast": nio_fast_iteration,
                   "nio_fast_recompute": recompute_iteration, "floor": double_backward_floor}


@pytest.mark.parametrize("model_name,batch_size,sub_batches,implementation",
                         [(*case, implementation) for case in CASES for implementation in ("reference", "nio_fast")]
                         + [(*case, "nio_fast_recompute") for case in RECOMPUTE_CASES])
def test_iteration(benchmark, record, model_name, batch_size, sub_batches, implementation):
    time_against_steps(benchmark, record, model_name, batch_size, sub_batches, implementation)


@pytest.mark.parametrize("model_name,batch_size", FLOOR_CASES)
def test_double_backward_floor(benchmark, record, model_name, batch_size):
    """The floor of every case of this model and batch: it does not depend on D."""
    time_against_steps(benchmark, record, model_name, batch_size, None, "floor")


def time_against_steps(benchmark, record, model_name, batch_size, sub_batches, implementation):
    """One call per round; before each (untimed by pytest-benchmark) one training step, timed
    here: '/ step' ratios divide medians taken side by side, not minutes apart (a step's time on
    these shared cores drifts by 30% between minutes)."""
    batch, model = images(batch_size), make(model_name)
    iteration = IMPLEMENTATIONS[implementation]
    run = lambda: iteration(model, batch, sub_batches)  # noqa: E731
    steps = []
    benchmark.group = f"{model_name} N={batch_size} " + ("floor" if sub_batches is None else f"D={sub_batches}")
    benchmark.pedantic(run, setup=step_timer(model, batch, steps), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record("iteration", model=model_name, batch=batch_size, D=sub_batches, implementation=implementation,
           seconds=benchmark.stats.stats.median, step_seconds=statistics.median(steps[1:]))
