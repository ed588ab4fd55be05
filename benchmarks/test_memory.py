"""Peak memory of one iteration, each in a fresh process (see peak_memory.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "peak_memory.py"
CASES = [(model, d) for model in ("resnet20_gn", "resnet20_bn", "vit_small") for d in (2, 8)]


@pytest.mark.parametrize("model_name,sub_batches,implementation",
                         [(*case, implementation) for case in CASES for implementation in ("step", "reference", "nio_fast")]
                         + [("resnet20_bn", d, "nio_fast_recompute") for d in (2, 8)])
def test_peak_memory(record, model_name, sub_batches, implementation):
    if implementation == "step" and sub_batches != CASES[0][1]:
        pytest.skip("a training step does not depend on D")
    result = subprocess.run([sys.executable, str(SCRIPT), model_name, implementation, str(sub_batches)],
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    record("memory", model=model_name, D=None if implementation == "step" else sub_batches,
           implementation=implementation, **measured)
