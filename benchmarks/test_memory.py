"""Peak memory of one iteration, each in fresh processes (see peak_memory.py).

The peak resident set of one case moved by up to ~130 MB between fresh processes of the same
code (BatchNorm ResNet-20 at D = 8: 716, 792, 718 MB), more than some differences it is meant
to show: each case is the median of PROCESSES processes, their spread kept in the row. The
first process also reads the tensor allocator's peak of a second call (``allocated_mb``), which
does not move between runs.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "peak_memory.py"
PROCESSES = 3
CASES = [(model, d) for model in ("resnet20_gn", "resnet20_bn", "vit_small") for d in (2, 8)]


@pytest.mark.parametrize("model_name,sub_batches,implementation",
                         [(*case, implementation) for case in CASES for implementation in ("step", "reference", "nio_fast")]
                         + [("resnet20_bn", d, "nio_fast_recompute") for d in (2, 8)])
def test_peak_memory(record, model_name, sub_batches, implementation):
    if implementation == "step" and sub_batches != CASES[0][1]:
        pytest.skip("a training step does not depend on D")
    runs = []
    for process in range(PROCESSES):
        command = [sys.executable, str(SCRIPT), model_name, implementation, str(sub_batches)]
        result = subprocess.run(command + (["--allocated"] if process == 0 else []), capture_output=True,
                                text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    extra = [run["extra_mb"] for run in runs]
    record("memory", model=model_name, D=None if implementation == "step" else sub_batches,
           implementation=implementation, baseline_mb=runs[0]["baseline_mb"], extra_mb=statistics.median(extra),
           extra_mb_runs=extra, allocated_mb=runs[0]["allocated_mb"])
