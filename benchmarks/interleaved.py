"""Reference and nio_fast iterations against a training step, interleaved in one process.

    python benchmarks/interleaved.py MODEL D [--rounds R] [--batch N] [--width W]

Each round times one training step, one reference iteration, one nio_fast iteration and the
double-backward floor (test_iteration.double_backward_floor), in that order, on the same model
and batch; the speed-up, the step ratios and reference / floor (the speed-up of an iteration at
the floor) are taken per round and their medians and ranges printed (one JSON line). On shared cores the machine's speed
drifts by +-30% over minutes, so ratios of cases timed minutes apart (as pytest-benchmark's
groups are) move with it; within a round the three calls see the same machine. This is the
command behind the README's interleaved figures (7 rounds at D = 4).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402,F401  (puts tests/ on the path for the reference)
from networks import MODELS, images, make  # noqa: E402
from test_iteration import double_backward_floor, nio_fast_iteration, reference_iteration, training_step  # noqa: E402


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_rounds(model_name: str, sub_batches: int, rounds: int, batch_size: int = 64,
                       **options) -> dict:
    """Medians and ranges over ``rounds`` of reference / nio_fast, nio_fast / step, reference / step,
    floor / step and reference / floor."""
    model, batch = make(model_name, **options), images(batch_size)
    calls = {"step": lambda: training_step(model, batch),
             "reference": lambda: reference_iteration(model, batch, sub_batches),
             "nio_fast": lambda: nio_fast_iteration(model, batch, sub_batches),
             "floor": lambda: double_backward_floor(model, batch)}
    for call in calls.values():  # warm-up: lazy imports, the first call's mode choices
        call()
    times = [{name: seconds(call) for name, call in calls.items()} for _ in range(rounds)]

    def summary(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {"model": model_name, "D": sub_batches, "batch": batch_size, "rounds": rounds,
            "speed_up": summary([t["reference"] / t["nio_fast"] for t in times]),
            "nio_fast_steps": summary([t["nio_fast"] / t["step"] for t in times]),
            "reference_steps": summary([t["reference"] / t["step"] for t in times]),
            "floor_steps": summary([t["floor"] / t["step"] for t in times]),
            "reference_over_floor": summary([t["reference"] / t["floor"] for t in times])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("sub_batches", type=int, help="D")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, help="a ResNet's base width (quick runs shrink it)")
    args = parser.parse_args()
    options = {} if args.width is None else {"width": args.width}
    result = interleaved_rounds(args.model, args.sub_batches, args.rounds, args.batch, **options)
    print(json.dumps({**result, "machine": harness.machine()}))
    speed, steps = result["speed_up"], result["nio_fast_steps"]
    print(f"{args.model} D = {args.sub_batches}: {speed['median']:.2f}x the reference "
          f"(range {speed['min']:.2f}-{speed['max']:.2f}), {steps['median']:.2f} training steps, "
          f"reference {result['reference_steps']['median']:.2f} ({args.rounds} rounds)", file=sys.stderr)


if __name__ == "__main__":
    main()
