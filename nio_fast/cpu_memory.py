"""CPU tensor memory kept and reused for the span of a nio_fast run.

Every NIO iteration allocates and frees the same tensor sizes, many of them megabytes. glibc's
malloc gives large blocks back to the kernel, so each iteration touches fresh pages again: on the
small ViT at D = 4 (2-core CPU) 11k-15k page faults and ~10% of the iteration's time in the
kernel, where a training step faults none. Inside :func:`cached_cpu_memory`, the extension's
allocator (``csrc/cpu_allocation_cache.cpp``) keeps freed blocks of 16 KB or more by size and
hands them out again; leaving the span frees them. It keeps at most twice the bytes the span
ever had in use at once, so the process's tensor memory stays under three times its peak; in
practice the resident peak went down, not up (kept blocks are reused size for size where
malloc's free lists fragment): 244 against 388 MB on the small ViT at D = 4 and 1039 against
1432 MB on the sample-wise ResNet-18 at N = 64 (benchmarks/networks.py, two or three iterations).

The plain twin is PyTorch's own CPU allocator: ``NIO_FAST_CPU_CACHE=0`` in the environment
turns the span into a no-op, and the tests hold runs with and without it bit for bit equal.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from . import availability

DISABLE_VARIABLE = "NIO_FAST_CPU_CACHE"


def _allocator_module():
    """The extension, unless ``NIO_FAST_CPU_CACHE`` is "0" or it is not built."""
    return availability.extension() if os.environ.get(DISABLE_VARIABLE, "1").strip() != "0" else None


@contextlib.contextmanager
def cached_cpu_memory() -> Iterator[bool]:
    """A span in which freed CPU tensor blocks are kept and reused; yields whether it is on.

    Spans nest (the outermost frees the kept blocks on leaving) and are shared by threads. Off
    with ``NIO_FAST_CPU_CACHE=0``, without the extension, or when another CPU allocator than
    PyTorch's default is installed (the extension never replaces one). Values are unchanged either way: only where
    the bytes come from differs.
    """
    module = _allocator_module()
    on = module is not None and module.cpu_cache_enter()
    try:
        yield on
    finally:
        if on:
            module.cpu_cache_exit()


def cache_stats() -> dict[str, int]:
    """The allocator's counters (sizes page-rounded): spans open, bytes kept, bytes handed out now
    and at most at once in this span, reuses and fresh allocations of this span. Zeros without
    the extension."""
    module = availability.extension()
    values = module.cpu_cache_stats() if module is not None else [0] * 6
    return dict(zip(("depth", "kept_bytes", "in_use_bytes", "peak_in_use_bytes", "reuses", "fresh"), values))
