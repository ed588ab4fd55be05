"""Each multi-seed quality experiment of benchmarks/quality end to end in --quick mode."""
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

EXPERIMENTS = ["deep_mlp", "transformer_no_warmup", "bn_resnet"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_run_writes_json_markdown_and_png(name, tmp_path, capsys):
    module = importlib.import_module(f"benchmarks.quality.{name}")
    assert module.run(["--quick", "--quiet", "--out", str(tmp_path)]) == 0
    experiment = module.build(quick=True)

    record = json.loads((tmp_path / f"quality_{name}.json").read_text())
    assert {"date", "cpu", "torch", "python", "commit"} <= set(record["machine"])
    runs = record["runs"]
    assert len(runs) == experiment.seeds * len(experiment.methods) * len(experiment.learning_rates)
    assert {run["seed"] for run in runs} == set(range(experiment.seeds))
    for run in runs:
        assert len(run["step_losses"]) == experiment.steps
        learned = next(method for method in experiment.methods if method.key == run["method"]).learned
        assert (run["report"] is not None) == (learned is not None)
        if learned:
            assert len(run["report"]["history"]) == run["report"]["settings"]["iters"]
    for row in record["summary"]:  # mean and standard deviation over the seeds
        assert set(row["test_accuracy"]) == {"mean", "std"} and row["runs"] == experiment.seeds

    markdown = (tmp_path / f"quality_{name}.md").read_text()
    assert "| method |" in markdown and "GradCosine@init" in markdown and "test acc %" in markdown
    for method in experiment.methods:
        assert f"| {method.label} |" in markdown
    assert markdown in capsys.readouterr().out  # the table is printed too
    assert (tmp_path / f"quality_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --render rewrites the page from the JSON alone, to the same text
    (tmp_path / f"quality_{name}.md").unlink()
    assert module.run(["--quick", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"quality_{name}.md").read_text() == markdown


def test_failure_criterion():
    from benchmarks.quality.common import training_failed

    assert not training_failed([2.3, 1.0], loss_start=2.3, loss_final=0.5, test_accuracy=0.9)
    assert training_failed([2.3, float("nan")], loss_start=2.3, loss_final=0.5, test_accuracy=0.9)
    assert training_failed([2.3, 2.4], loss_start=2.3, loss_final=2.4, test_accuracy=0.5)
    assert training_failed([2.3, 1.0], loss_start=2.3, loss_final=1.0, test_accuracy=0.2)
