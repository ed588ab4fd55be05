"""Peak resident memory of one NIO iteration, measured in a fresh process.

    python benchmarks/peak_memory.py MODEL IMPLEMENTATION [D] [--batch N] [--threads T] [--width W] [--allocated]

prints one JSON line: the resident set after building the model and the batch, the peak
after one iteration (reference, nio_fast, nio_fast_recompute: mode="exact_recompute"), training step (step),
the double-backward floor (floor: workloads.double_backward_floor), or sample-wise GradCosine
with its backward (samplewise: from layer factors; vmap_samples: from per-sample gradients by
vmap; both take D = N, see test_samplewise.py), one sample-wise NIO iteration (nio_samples; with
recomputed segments: nio_samples_recompute, nio_samples_recompute_half), and their difference. A
fresh process per measurement: the high-water mark only ever grows, so nothing else may have
run before. The peak is VmHWM of /proc/self/status, which exec resets; ru_maxrss does not
(a process started from a big parent, e.g. pytest after the timing suite, inherits its peak).
With --allocated, also ``allocated_mb``: the tensor allocator's peak of a second, identical call
(harness.allocated_peak_mb), which does not depend on what malloc keeps back.
"""
from __future__ import annotations

import argparse
import json
import resource
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402,F401  (puts tests/ on the path for the reference)
import torch  # noqa: E402

from networks import images, make  # noqa: E402
from test_iteration import IMPLEMENTATIONS  # noqa: E402
from test_samplewise import vmap_samples_evaluation  # noqa: E402
from workloads import SAMPLEWISE_CALLS, training_step  # noqa: E402

SAMPLEWISE = {**SAMPLEWISE_CALLS, "vmap_samples": vmap_samples_evaluation}


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_resident_mb() -> float:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("implementation", choices=("step", *IMPLEMENTATIONS, *SAMPLEWISE))
    parser.add_argument("sub_batches", type=int, nargs="?", default=2,
                        help="D for reference and nio_fast (ignored by the others)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: thread-pool buffers would otherwise blur small differences)")
    parser.add_argument("--width", type=int, help="a ResNet's base width (quick runs shrink it)")
    parser.add_argument("--warmup", action="store_true",
                        help="one call on 2 samples before the baseline: the first call of sample-wise GradCosine "
                             "or vmap imports ~900 modules (sympy, torch._dynamo: ~190 MB), a one-time cost")
    parser.add_argument("--allocated", action="store_true",
                        help="also the tensor allocator's peak of a second call (harness.allocated_peak_mb)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {} if args.width is None else {"width": args.width}
    model, batch = make(args.model, **options), images(args.batch)
    import nio_fast  # noqa: F401  (import cost and the extension are part of the baseline)
    if args.warmup and args.implementation in ("step", "floor", *SAMPLEWISE):
        warm_up = SAMPLEWISE.get(args.implementation) or IMPLEMENTATIONS.get(args.implementation) or training_step
        warm_up(model, images(2, seed=1))
    def run() -> None:
        if args.implementation == "step":
            training_step(model, batch)
        elif args.implementation in SAMPLEWISE:
            SAMPLEWISE[args.implementation](model, batch)
        else:
            IMPLEMENTATIONS[args.implementation](model, batch, args.sub_batches)

    baseline = resident_mb()
    run()
    peak = peak_resident_mb()
    result = {"baseline_mb": baseline, "peak_mb": peak, "extra_mb": peak - baseline}
    if args.allocated:
        result["allocated_mb"] = harness.allocated_peak_mb(run)  # a second call, after the resident peak
    print(json.dumps(result))


if __name__ == "__main__":
    main()
