"""Shared benchmark plumbing: machine description, timing of a callable, results files.

Timings on these machines are noisy, so every comparison is a ratio of medians measured side by
side in one process, and every results file names the machine, the versions and the date.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.append(str(ROOT / "tests"))  # the reference implementation lives with the tests


def machine() -> dict:
    """Where and with what a result was measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None,
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], rounds: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_cache_switched(on: bool):
    """A context in which nio_fast's CPU allocation cache is on or off (``NIO_FAST_CPU_CACHE``,
    nio_fast.cpu_memory), the environment restored after."""
    from nio_fast import cpu_memory
    return mock.patch.dict(os.environ, {cpu_memory.DISABLE_VARIABLE: "1" if on else "0"})


def allocation_events(fn: Callable[[], object]) -> tuple[list, int]:
    """torch.profiler's memory events of one ``fn()`` call in time order (each an allocation of
    ``extra_fields.alloc_size`` bytes, or a free of minus that, its parents the ops that made
    it), and the allocator's total just before the first of them."""
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    pending, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append(event)
    events.sort(key=lambda event: event.start_time_ns)
    if not events:
        return [], 0
    # total_allocated counts from the first profile of the process: tensors an earlier profiled
    # call allocated and that were freed outside any profile stay in it, so the peak is taken
    # above the count just before this call's first event.
    first = events[0].extra_fields
    return events, first.total_allocated - first.alloc_size


def allocated_peak_mb(fn: Callable[[], object]) -> float:
    """The most tensor memory live at once during ``fn()``, above what was live before it: the CPU
    allocator's peak, as torch.profiler's memory events count it (the CPU twin of
    torch.cuda.max_memory_allocated). Unlike the peak resident set it does not depend on what
    glibc's malloc keeps back after frees: on the sample-wise ResNet-18 at N = 64, the resident
    peak with the default malloc was 1.7x the one with a fixed mmap threshold
    (MALLOC_MMAP_THRESHOLD_=131072), which this figure matched within 2%."""
    events, baseline = allocation_events(fn)
    if not events:
        return 0.0
    return (max(event.extra_fields.total_allocated for event in events) - baseline) / 2**20


def write_results(name: str, rows: list[dict], columns: list[str], title: str, notes: str = "") -> Path:
    """Write ``results/<name>.json`` (machine + rows) and ``results/<name>.md`` (a table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    lines = [f"# {title}", "", f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores"
             + (f", {info['gpu']}" if info["gpu"] else "") + f"), torch {info['torch']}, triton {info['triton']}, "
             f"Python {info['python']}, commit {info['commit']}.", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)
