"""What holds the tensor memory at an NIO iteration's allocator peak: the tensors live at that
moment, grouped by the chain of ops that allocated them (torch.profiler's memory events, as
``harness.allocated_peak_mb`` counts them), beside a training step's peak.

    python benchmarks/peak_owners.py MODEL D|samples [--batch N] [--width W] [--recompute-first K]
                                     [--depth K] [--top K]

With D, one ``initialize`` iteration over D sub-batches; with ``samples``, one sample-wise
iteration (``--recompute-first K``: its first K residual blocks / encoder layers recomputed).
Each row: MB, how many tensors, and the innermost ``--depth`` ops of their allocation (the
allocating op first). One warm-up call runs first, unprofiled.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (also puts tests/ on the path for the reference)
from networks import MODELS, images, make  # noqa: E402
from test_iteration import nio_fast_iteration  # noqa: E402
from workloads import first_segments, samplewise_nio_iteration, training_step  # noqa: E402

_NOISE = ("__torch_function__", "built-in method", "overrides.py", "_contextlib", "torch/_ops.py")


def _owner(event, depth: int) -> str:
    """The innermost ``depth`` ops above an allocation, Python frames of dispatch plumbing left out."""
    names, parent = [], event.parent
    while parent is not None and len(names) < depth:
        if not any(noise in parent.name for noise in _NOISE):
            names.append(parent.name.replace(str(harness.ROOT) + "/", ""))
        parent = parent.parent
    return " < ".join(names)


def peak_owners(fn: Callable[[], object], depth: int = 4) -> tuple[float, list[tuple[str, float, int]]]:
    """(peak MB above the start, [(owner, MB, tensors)] of what is live at the peak, largest first)."""
    events, baseline = harness.allocation_events(fn)
    if not events:
        return 0.0, []
    peak = max(events, key=lambda event: event.extra_fields.total_allocated)
    live = {}
    for event in events:
        if event.start_time_ns > peak.start_time_ns:
            break
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = event
        else:
            live.pop(fields.ptr, None)
    sizes, counts = collections.Counter(), collections.Counter()
    for event in live.values():
        owner = _owner(event, depth)
        sizes[owner] += event.extra_fields.alloc_size
        counts[owner] += 1
    rows = [(owner, size / 2**20, counts[owner]) for owner, size in sizes.most_common()]
    return (peak.extra_fields.total_allocated - baseline) / 2**20, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("sub_batches", help="D, or 'samples' for a sample-wise iteration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, help="a ResNet's base width (quick runs shrink it)")
    parser.add_argument("--recompute-first", type=int, default=0, metavar="K")
    parser.add_argument("--depth", type=int, default=4, help="ops per owner chain")
    parser.add_argument("--top", type=int, default=20, help="rows to print")
    args = parser.parse_args()
    model = make(args.model, **({"width": args.width} if args.width else {}))
    batch = images(args.batch)
    if args.sub_batches == "samples":
        segments = first_segments(model, args.recompute_first) or None
        iteration = lambda: samplewise_nio_iteration(model, batch, segments)  # noqa: E731
    else:
        iteration = lambda: nio_fast_iteration(model, batch, int(args.sub_batches))  # noqa: E731
    iteration()
    step_mb = harness.allocated_peak_mb(lambda: training_step(model, batch))
    peak_mb, rows = peak_owners(iteration, args.depth)
    print(f"{args.model} {args.sub_batches}, N = {args.batch}: allocator peak {peak_mb:.0f} MB, "
          f"{peak_mb / step_mb:.2f}x a training step's {step_mb:.0f} MB; live at the peak:")
    for owner, mb, count in rows[:args.top]:
        print(f"{mb:8.1f} MB {count:4d}  {owner}")


if __name__ == "__main__":
    main()
