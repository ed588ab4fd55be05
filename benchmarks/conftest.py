"""Collects the medians of one benchmark run and writes the results tables at the end of it."""
from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine  # noqa: E402

_TABLES: dict[str, list[dict]] = collections.defaultdict(list)


def pytest_configure(config):
    # Benchmarks use every core the machine has; the numbers in results/ name the count.
    torch.set_num_threads(int(os.environ.get("NIO_FAST_BENCH_THREADS", os.cpu_count() or 1)))


@pytest.fixture
def record():
    """``record(table, **row)``: keep one result row for the table written at session end."""
    def add(table: str, **row):
        _TABLES[table].append(row)
        _write()  # after every row: an interrupted run still leaves what it measured
    return add


def _write():
    from report import write_tables
    write_tables(dict(_TABLES), machine())


def pytest_sessionfinish(session, exitstatus):
    if _TABLES:
        _write()
