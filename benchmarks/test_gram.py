"""Seconds and extra memory of ``nio_fast.ops.gram`` on ResNet-50- and ViT-B/16-shaped gradients.

Timed: the forward (``G = gram(grads)``) and forward + backward (``autograd.grad`` of
``(G * W).sum()`` with respect to every gradient tensor, W random), at D = 2, 4, 8, for the
``"torch"`` reference (flatten, concatenate, matmul) and every fused backend this device runs:
"cpp" on CPU; "triton", and "cpp" when built with CUDA, on CUDA. Triton on CPU runs only
through its interpreter, a test vehicle, so it is never timed. Rows go to table "gram";
benchmarks/report.py adds the ratio torch / backend.

Memory: the extra bytes the op allocates beyond its inputs and its own results (G; for the
backward, the D x m input gradients it returns), as a fraction of the D x m gradient bytes. On
CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. On CPU, in a
fresh process per model and D (``python benchmarks/test_gram.py --measure-memory MODEL D cpp,torch``),
two ways: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), which sees
every allocation, the extension's ``std::vector`` scratch too; and the peak of the running sum
of the allocator's events in the PyTorch profiler, which sees tensors only. Rows go to table
"gram_memory".

``NIO_FAST_GRAM_BENCH_SIZE=tiny`` swaps in tiny gradients (benchmarks/gpu_check.py --dry-run).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
for _path in (str(ROOT), str(BENCHMARKS)):  # also when run as a script, for --measure-memory
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pytest  # noqa: E402
import torch  # noqa: E402

from gradient_shapes import gradient_lists, num_values  # noqa: E402
from nio_fast import availability, ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32
TINY = os.environ.get("NIO_FAST_GRAM_BENCH_SIZE", "full") == "tiny"
MODELS = ("tiny",) if TINY else ("resnet50", "vit_b_16")
D_SWEEP = (2, 4, 8)
DIRECTIONS = ("forward", "forward+backward")
# On CPU one call of the reference on a gigabyte of gradients takes seconds to a minute (it
# writes two D x m copies, page by fresh page), so above this size it gets a single round, and
# the fused backends (whose backward writes D x m fresh outputs) three.
CPU_SINGLE_ROUND_BYTES = 2**29
# Past 1 GiB the reference's CPU memory is not measured: a measurement costs a minute there,
# and its fraction of D x m does not depend on the size (the rows below 1 GiB show it).
CPU_REFERENCE_MEMORY_MAX_BYTES = 2**30


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends worth timing on ``device``."""
    names = []
    if device.type == "cuda" and availability.triton_usable(device):
        names.append("triton")
    if availability.cpp_usable(device):
        names.append("cpp")
    return names


BACKENDS = ["torch"] + fused_backends(DEVICE)


def gradient_bytes(model: str, D: int, dtype: torch.dtype = DTYPE) -> int:
    return D * num_values(model) * torch.empty((), dtype=dtype).element_size()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(model: str, D: int, device: torch.device, seed: int = 0):
    """(grads[d][p] requiring grad, the same flattened d-major, W)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    table = gradient_lists(model, D, DTYPE, device, generator, requires_grad=True)
    weights = torch.randn(D, D, device=device, generator=generator)
    return table, [t for row in table for t in row], weights


def gram_call(table, flat, weights, backend: str, direction: str) -> Callable[[], None]:
    """One call of the op in ``direction``; returns nothing so that no result outlives a round."""
    device = flat[0].device

    def forward():
        ops.gram(table, backend=backend)
        synchronize(device)

    def forward_backward():
        torch.autograd.grad((ops.gram(table, backend=backend) * weights).sum(), flat)
        synchronize(device)

    return forward if direction == "forward" else forward_backward


# ---------------------------------------------------------------------------------------------
# Timing.

_cached: dict = {}  # one (model, D) set of gradients at a time: ViT-B at D = 8 is 2.8 GB
_warmed_up: set = set()


def cached_inputs(model: str, D: int):
    if _cached.get("key") != (model, D):
        drop_cached_inputs()
        _cached["inputs"] = make_inputs(model, D, DEVICE)
        _cached["key"] = (model, D)
    return _cached["inputs"]


def drop_cached_inputs() -> None:
    _cached.clear()
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(backend: str, D: int) -> None:
    """Lazy initialisation (thread pools, kernel compilation for this D) outside the timings."""
    if (backend, D) not in _warmed_up:
        table, flat, weights = make_inputs("tiny", D, DEVICE)
        gram_call(table, flat, weights, backend, "forward+backward")()
        _warmed_up.add((backend, D))


def rounds_for(backend: str, size: int) -> tuple[int, int]:
    """(rounds, warm-up rounds)."""
    if DEVICE.type == "cuda":
        return 20, 3  # the warm-up rounds also compile the Triton kernels for these shapes
    if size > CPU_SINGLE_ROUND_BYTES:  # every call pays its page faults anyway: nothing to warm up
        return (1, 0) if backend == "torch" else (3, 0)
    return (5, 1) if backend != "torch" else (3, 1)


TIMING_CASES = [(model, D, direction, backend)
                for model in MODELS for D in D_SWEEP for direction in DIRECTIONS for backend in BACKENDS]


@pytest.mark.parametrize("model,D,direction,backend", TIMING_CASES)
def test_gram_time(benchmark, record, model, D, direction, backend):
    table, flat, weights = cached_inputs(model, D)
    warm_up(backend, D)
    size = gradient_bytes(model, D)
    rounds, warmup_rounds = rounds_for(backend, size)
    benchmark.group = f"gram {model} D={D} {direction} ({DEVICE.type})"
    benchmark.pedantic(gram_call(table, flat, weights, backend, direction), rounds=rounds,
                       warmup_rounds=warmup_rounds, iterations=1)
    record("gram", model=model, D=D, device=DEVICE.type, dtype=str(DTYPE).replace("torch.", ""),
           direction=direction, backend=backend, rounds=rounds, gradient_bytes=size,
           seconds=benchmark.stats.stats.median)


# ---------------------------------------------------------------------------------------------
# Extra memory.

def unique_storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_row(model, D, backend, device, method, forward_peak, backward_peak, gram_bytes, outputs_bytes):
    """Peaks are bytes above the allocation before the call (the inputs already made)."""
    size = gradient_bytes(model, D)
    forward_extra = forward_peak - gram_bytes
    both_extra = max(forward_peak, backward_peak) - gram_bytes - outputs_bytes
    return {"model": model, "D": D, "device": device.type, "backend": backend, "method": method,
            "gradient_bytes": size, "forward_extra_bytes": forward_extra,
            "forward_backward_extra_bytes": both_extra}


def measure_cuda(model: str, D: int, backend: str) -> list[dict]:
    device = DEVICE
    table, flat, weights = make_inputs(model, D, device)
    gram_call(table, flat, weights, backend, "forward+backward")()  # compile, cuBLAS workspaces
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    gram = ops.gram(table, backend=backend)
    synchronize(device)
    forward_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    outputs = torch.autograd.grad((gram * weights).sum(), flat)
    synchronize(device)
    backward_peak = torch.cuda.max_memory_allocated(device) - before
    row = memory_row(model, D, backend, device, "CUDA allocator peak", forward_peak, backward_peak,
                     unique_storage_bytes([gram]), unique_storage_bytes(outputs))
    del gram, outputs, table, flat, weights
    gc.collect()
    torch.cuda.empty_cache()
    return [row]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Set the high-water mark to the current resident set (Linux 4.0+); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def measure_cpu_in_this_process(model: str, D: int, backends: list[str]) -> list[dict]:
    """Both CPU measurements of each backend in turn; meant for a fresh process (--measure-memory).

    The fused backends go first: nothing the reference leaves behind can then flatter them.
    """
    device = torch.device("cpu")
    for backend in backends:  # thread pools, first-call buffers
        gram_call(*make_inputs("tiny", D, device), backend, "forward+backward")()
    table, flat, weights = make_inputs(model, D, device)
    rows = []
    for backend in sorted(backends, key=lambda name: name == "torch"):
        rows += _measure_rss(model, D, backend, table, flat, weights)
        rows += _measure_allocator_events(model, D, backend, table, flat, weights)
    return rows


def _measure_rss(model, D, backend, table, flat, weights) -> list[dict]:
    """Peak resident set above the resident set before the call. The high-water mark is reset
    before each phase; where that is refused, the peak since start is used: an upper bound."""
    gc.collect()
    before = _rss_bytes()
    resettable = _reset_peak_rss()
    gram = ops.gram(table, backend=backend)
    forward_peak = _peak_rss_bytes() - before
    _reset_peak_rss()
    outputs = torch.autograd.grad((gram * weights).sum(), flat)
    backward_peak = _peak_rss_bytes() - before
    method = "peak RSS, fresh process" + ("" if resettable else " (peak not reset: an upper bound)")
    return [memory_row(model, D, backend, torch.device("cpu"), method, forward_peak, backward_peak,
                       unique_storage_bytes([gram]), unique_storage_bytes(outputs))]


def _measure_allocator_events(model, D, backend, table, flat, weights) -> list[dict]:
    """The CPU allocator's events as the profiler records them, summed in time order."""
    from torch.profiler import ProfilerActivity, profile, record_function
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with record_function("gram_benchmark_forward"):
            gram = ops.gram(table, backend=backend)
        with record_function("gram_benchmark_backward"):
            outputs = torch.autograd.grad((gram * weights).sum(), flat)
    events = profiler.profiler.kineto_results.events()
    phases = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("gram_benchmark_")}
    peaks = {name: 0 for name in phases}
    running = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        running += event.nbytes()
        for name, (start, end) in phases.items():
            if start <= event.start_ns() <= end:
                peaks[name] = max(peaks[name], running)
    return [memory_row(model, D, backend, torch.device("cpu"), "allocator events (profiler)",
                       peaks["gram_benchmark_forward"], peaks["gram_benchmark_backward"],
                       unique_storage_bytes([gram]), unique_storage_bytes(outputs))]


def measure_cpu_in_fresh_process(model: str, D: int, backends: list[str]) -> list[dict]:
    env = dict(os.environ)
    # A fixed mmap threshold: every block of 64 KiB or more is mapped on allocation and unmapped
    # on free, so reusing a freed block cannot hide an allocation from the resident set.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-memory", model, str(D),
                             ",".join(backends), "--threads", str(torch.get_num_threads())],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_memory(model: str, D: int, backends: list[str]) -> list[dict]:
    if DEVICE.type == "cuda":
        return [row for backend in backends for row in measure_cuda(model, D, backend)]
    return measure_cpu_in_fresh_process(model, D, backends)


def memory_backends(model: str, D: int) -> list[str]:
    return [backend for backend in BACKENDS if backend != "torch" or DEVICE.type == "cuda"
            or gradient_bytes(model, D) <= CPU_REFERENCE_MEMORY_MAX_BYTES]


MEMORY_CASES = [(model, D) for model in MODELS for D in (D_SWEEP[:1] if TINY else D_SWEEP)]


@pytest.mark.parametrize("model,D", MEMORY_CASES)
def test_gram_memory(benchmark, record, model, D):
    drop_cached_inputs()  # the timing tests' gradients would crowd the measurements
    # pytest-benchmark's --benchmark-only runs only tests that use its fixture: the time of one
    # measurement goes to it, labelled as such; the result is the bytes recorded below.
    benchmark.group = "gram memory: seconds of one measurement (not a result)"
    rows = benchmark.pedantic(measure_memory, args=(model, D, memory_backends(model, D)), rounds=1, iterations=1)
    for row in rows:
        record("gram_memory", **row)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Print one JSON line: the CPU extra-memory rows of one case.")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "D", "BACKENDS"), required=True,
                        help="BACKENDS: comma-separated, e.g. cpp,torch")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, D, backends = args.measure_memory
    print(json.dumps(measure_cpu_in_this_process(model, int(D), backends.split(","))))


if __name__ == "__main__":
    main()
