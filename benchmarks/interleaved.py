"""NIO iterations or sample-wise evaluations against a training step and the double-backward
floor, interleaved in one process.

    python benchmarks/interleaved.py MODEL D [--rounds R] [--batch N] [--width W] [--mode MODE] [--iters K]
                                     [--cpu-cache-off]
    python benchmarks/interleaved.py MODEL samples [--rounds R] [--batch N] [--width W] [--recompute-first K]
    python benchmarks/interleaved.py MODEL LOW:HIGH [--rounds R] [--batch N] [--width W]

With D, each round times one training step, one reference iteration, one nio_fast iteration and
the double-backward floor (workloads.double_backward_floor), in that order, on the same
model and batch (with --mode, also one nio_fast iteration in that mode, after "auto"'s; with
--iters K, the reference and nio_fast run K iterations per call, each call's seconds divided by
K: a run's cost per iteration, setup and the first iteration's allocations amortised; with
--cpu-cache-off, also nio_fast with NIO_FAST_CPU_CACHE=0, the CPU allocation cache's share); with
``samples``, a training step, one sample-wise GradCosine evaluation with its backward
(workloads.samplewise_evaluation), the same with every block recomputed
(workloads.samplewise_recomputed_evaluation), with the first half of them recomputed
(workloads.samplewise_half_recomputed_evaluation), one sample-wise NIO iteration, the same with
every segment and with the first half recomputed, and the floor (with --recompute-first K, also
NIO's iteration with the first K segments recomputed, and the allocator peaks of it, of NIO's
iteration without recompute and of a training step, each measured once after the rounds);
with LOW:HIGH, the reference and
nio_fast iterations at D = LOW and D = HIGH, for how each grows with D. Every ratio (the speed-up,
each call in training steps, reference / floor: the speed-up of an iteration at the floor,
sample-wise / floor) is taken per round and its median and range printed (one JSON line). On
shared cores the machine's speed drifts by +-30% over minutes, so ratios of cases timed minutes
apart (as pytest-benchmark's groups are) move with it; within a round the calls see the same
machine. This is the command behind the README's interleaved figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (also puts tests/ on the path for the reference)
from networks import MODELS, images, make  # noqa: E402
from nio_fast.algorithms.gradcosine import MODES  # noqa: E402
from test_iteration import nio_fast_iteration, reference_iteration  # noqa: E402
from workloads import (SAMPLEWISE_CALLS, double_backward_floor, first_segments, samplewise_nio_iteration,  # noqa: E402
                       training_step)

RATIOS = {  # name: (numerator, denominator), per round
    "speed_up": ("reference", "nio_fast"), "nio_fast_steps": ("nio_fast", "step"),
    "reference_steps": ("reference", "step"), "floor_steps": ("floor", "step"),
    "reference_over_floor": ("reference", "floor"),
    "samplewise_steps": ("samplewise", "step"), "samplewise_over_floor": ("samplewise", "floor"),
    "recompute_steps": ("samplewise_recompute", "step"),
    "recompute_over_samplewise": ("samplewise_recompute", "samplewise"),
    "recompute_half_steps": ("samplewise_recompute_half", "step"),
    "recompute_half_over_samplewise": ("samplewise_recompute_half", "samplewise"),
    "nio_samples_steps": ("nio_samples", "step"), "nio_samples_over_samplewise": ("nio_samples", "samplewise"),
    "nio_recompute_steps": ("nio_samples_recompute", "step"),
    "nio_recompute_over_nio": ("nio_samples_recompute", "nio_samples"),
    "nio_recompute_half_steps": ("nio_samples_recompute_half", "step"),
    "nio_recompute_half_over_nio": ("nio_samples_recompute_half", "nio_samples"),
    "nio_recompute_first_steps": ("nio_samples_recompute_first", "step"),
    "nio_fast_growth": ("nio_fast_high", "nio_fast_low"), "reference_growth": ("reference_high", "reference_low"),
    "mode_speed_up": ("reference", "nio_fast_mode"), "mode_over_nio_fast": ("nio_fast_mode", "nio_fast"),
    "cache_on_over_off": ("nio_fast", "nio_fast_cache_off"),
}
PER_ITERATION = ("reference", "nio_fast", "nio_fast_mode", "nio_fast_cache_off")
"""The calls whose seconds are divided by --iters."""


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def cache_off(call):
    """``call`` with the CPU allocation cache turned off (nio_fast.cpu_memory)."""
    def without_cache():
        with harness.cpu_cache_switched(False):
            call()
    return without_cache


def interleaved_rounds(model_name: str, sub_batches: Union[int, str, tuple[int, int]], rounds: int,
                       batch_size: int = 64, mode: Optional[str] = None, recompute_first: Optional[int] = None,
                       iters: int = 1, compare_cache: bool = False, **options) -> dict:
    """Medians and ranges over ``rounds`` of the RATIOS whose calls ran: reference / nio_fast,
    nio_fast, reference and floor in training steps and reference / floor for a D (with ``mode``,
    also nio_fast with that mode beside "auto": reference / it and it / auto; with ``iters``, the
    reference and nio_fast per iteration of calls of that many; with ``compare_cache``, nio_fast
    with the CPU allocation cache on / off); sample-wise and
    floor in training steps and sample-wise / floor for ``"samples"`` (with ``recompute_first``,
    also NIO's iteration with that many first segments recomputed, and "alloc_over_step": its
    allocator peak and that of NIO's iteration without recompute over a training step's)."""
    model, batch = make(model_name, **options), images(batch_size)
    calls = {} if isinstance(sub_batches, tuple) else {"step": lambda: training_step(model, batch)}
    if sub_batches == "samples":
        for name, call in SAMPLEWISE_CALLS.items():
            calls[name] = functools.partial(call, model, batch)
        if recompute_first is not None:
            calls["nio_samples_recompute_first"] = functools.partial(
                samplewise_nio_iteration, model, batch, recompute=first_segments(model, recompute_first))
    elif isinstance(sub_batches, tuple):  # growth with D: the floor does not depend on it
        for level, chunks in zip(("low", "high"), sub_batches):
            calls[f"reference_{level}"] = functools.partial(reference_iteration, model, batch, chunks)
            calls[f"nio_fast_{level}"] = functools.partial(nio_fast_iteration, model, batch, chunks)
    else:
        calls["reference"] = lambda: reference_iteration(model, batch, sub_batches, iters=iters)
        calls["nio_fast"] = lambda: nio_fast_iteration(model, batch, sub_batches, iters=iters)
        if mode is not None:
            calls["nio_fast_mode"] = lambda: nio_fast_iteration(model, batch, sub_batches, mode=mode, iters=iters)
        if compare_cache:
            calls["nio_fast_cache_off"] = cache_off(calls["nio_fast"])
    if not isinstance(sub_batches, tuple):
        calls["floor"] = lambda: double_backward_floor(model, batch)
    for call in calls.values():  # warm-up: lazy imports, the first call's mode choices
        call()
    times = [{name: seconds(call) / (iters if name in PER_ITERATION else 1) for name, call in calls.items()}
             for _ in range(rounds)]

    def summary(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}
    result = {"model": model_name, "D": sub_batches, "batch": batch_size, "rounds": rounds, "iters": iters,
              **{name: summary([t[top] / t[bottom] for t in times])
                 for name, (top, bottom) in RATIOS.items() if top in calls and bottom in calls}}
    if recompute_first is not None:
        peaks = {name: harness.allocated_peak_mb(calls[name])
                 for name in ("step", "nio_samples", "nio_samples_recompute_first")}
        result["recompute_first"] = recompute_first
        result["alloc_over_step"] = {name: peaks[name] / peaks["step"] for name in peaks if name != "step"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("sub_batches", help="D, 'samples' for the sample-wise evaluation, or LOW:HIGH for the "
                                            "growth of the iterations' time from D = LOW to D = HIGH")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, help="a ResNet's base width (quick runs shrink it)")
    parser.add_argument("--mode", choices=MODES, help="with D: also time nio_fast with this mode beside 'auto'")
    parser.add_argument("--recompute-first", type=int, metavar="K",
                        help="with 'samples': also NIO's iteration with the first K residual blocks / encoder "
                             "layers recomputed, and allocator peaks against a training step's")
    parser.add_argument("--iters", type=int, default=1, metavar="K",
                        help="with D: K iterations per reference and nio_fast call, their seconds per iteration")
    parser.add_argument("--cpu-cache-off", action="store_true",
                        help="with D: also nio_fast with the CPU allocation cache off (NIO_FAST_CPU_CACHE=0)")
    args = parser.parse_args()
    levels = args.sub_batches.split(":")
    if args.sub_batches != "samples" and not (len(levels) in (1, 2) and all(level.isdigit() for level in levels)):
        parser.error(f"sub_batches: expected a number of chunks, 'samples' or LOW:HIGH, got {args.sub_batches!r}")
    sub_batches = args.sub_batches if args.sub_batches == "samples" else \
        int(levels[0]) if len(levels) == 1 else (int(levels[0]), int(levels[1]))
    options = {} if args.width is None else {"width": args.width}
    if args.mode is not None and not isinstance(sub_batches, int):
        parser.error("--mode: only with a number of chunks D")
    if args.recompute_first is not None and (sub_batches != "samples" or args.recompute_first < 1):
        parser.error("--recompute-first: a positive K, only with 'samples'")
    if args.iters < 1 or (args.iters != 1 and not isinstance(sub_batches, int)):
        parser.error("--iters: a positive K, only with a number of chunks D")
    if args.cpu_cache_off and not isinstance(sub_batches, int):
        parser.error("--cpu-cache-off: only with a number of chunks D")
    result = interleaved_rounds(args.model, sub_batches, args.rounds, args.batch, mode=args.mode,
                                recompute_first=args.recompute_first, iters=args.iters,
                                compare_cache=args.cpu_cache_off, **options)
    print(json.dumps({**result, "machine": harness.machine()}))
    medians = ", ".join(f"{name} {result[name]['median']:.2f} ({result[name]['min']:.2f}-{result[name]['max']:.2f})"
                        for name in RATIOS if name in result)
    peaks = "".join(f", {name} alloc / step {ratio:.2f}" for name, ratio in result.get("alloc_over_step", {}).items())
    print(f"{args.model} {sub_batches}, {args.rounds} rounds: {medians}{peaks}", file=sys.stderr)


if __name__ == "__main__":
    main()
