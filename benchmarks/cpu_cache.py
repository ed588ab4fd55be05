"""The CPU allocation cache's share of an ``initialize`` call: calls with it on and off
(``NIO_FAST_CPU_CACHE``), alternating which goes first, in one process.

    python benchmarks/cpu_cache.py MODEL D|samples [--rounds R] [--iters K] [--batch N] [--width W]

Each round times one call of K iterations with the cache and one without (the order swapped every
round, so neither always starts on the heap the other just freed) and counts each call's minor
page faults. Prints one JSON line: the median and range of on / off, the median faults of each.
This is the command behind the README's "alternating calls" figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from networks import MODELS, images, make  # noqa: E402
from test_iteration import nio_fast_iteration  # noqa: E402


def timed_call(call, cache_on: bool) -> tuple[float, int]:
    """(seconds, minor page faults) of ``call()`` with the cache on or off."""
    with harness.cpu_cache_switched(cache_on):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def alternating_rounds(model_name: str, sub_batches, rounds: int, iters: int = 3, batch_size: int = 64,
                       **options) -> dict:
    """Median and range over ``rounds`` of (seconds with the cache) / (seconds without), and each
    arm's median page faults, for ``initialize`` calls of ``iters`` iterations."""
    model, batch = make(model_name, **options), images(batch_size)
    call = functools.partial(nio_fast_iteration, model, batch, sub_batches, iters=iters)
    for cache_on in (False, True):  # warm-up: lazy imports, the first call's mode choices
        timed_call(call, cache_on)
    ratios, faults = [], {True: [], False: []}
    for index in range(rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        results = {cache_on: timed_call(call, cache_on) for cache_on in order}
        ratios.append(results[True][0] / results[False][0])
        for cache_on in order:
            faults[cache_on].append(results[cache_on][1])
    return {"model": model_name, "D": sub_batches, "batch": batch_size, "rounds": rounds, "iters": iters,
            "on_over_off": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "faults_on": statistics.median(faults[True]), "faults_off": statistics.median(faults[False])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("sub_batches", help="D, or 'samples' for sample-wise NIO")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, help="a ResNet's base width (quick runs shrink it)")
    args = parser.parse_args()
    if args.sub_batches != "samples" and not args.sub_batches.isdigit():
        parser.error(f"sub_batches: expected a number of chunks or 'samples', got {args.sub_batches!r}")
    if args.iters < 1 or args.rounds < 1:
        parser.error("--iters and --rounds: positive")
    sub_batches = args.sub_batches if args.sub_batches == "samples" else int(args.sub_batches)
    options = {} if args.width is None else {"width": args.width}
    result = alternating_rounds(args.model, sub_batches, args.rounds, args.iters, args.batch, **options)
    print(json.dumps({**result, "machine": harness.machine()}))
    ratio = result["on_over_off"]
    print(f"{args.model} {sub_batches}, {args.rounds} rounds of {args.iters} iterations: cache on / off "
          f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}), page faults per call "
          f"{result['faults_on']:.0f} on, {result['faults_off']:.0f} off", file=sys.stderr)


if __name__ == "__main__":
    main()
