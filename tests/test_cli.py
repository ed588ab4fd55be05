"""The nio-fast command line end to end (subprocesses), and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nio_fast.cli import main
from nio_fast.models import digits_mlp

REPO = Path(__file__).resolve().parents[1]
TINY_MLP = ["nio_fast.models:digits_mlp", "--model-kwargs", '{"depth": 4, "width": 16}']


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nio_fast", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("nio-fast")]


def test_demo_quick_prints_the_table_and_writes_png_and_json(tmp_path):
    out = tmp_path / "demo"
    done = run_cli("demo", "--quick", "--out", out)
    assert done.returncode == 0, done.stderr
    for label in ["PyTorch default", "fractional moment", "GradInit", "NIO", "GradCosine@init", "test acc %"]:
        assert label in done.stdout
    assert "NIO, mean over seeds: GradCosine" in done.stdout
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "demo.json").read_text())
    assert set(record["summary"]) == {"default", "fmp", "gradinit", "nio"}
    assert len(record["runs"]) == 4 * record["config"]["seeds"]
    nio_runs = [run for run in record["runs"] if run["method"] == "nio"]
    assert all(len(run["report"]["history"]) == record["config"]["nio"]["iters"] for run in nio_runs)


def test_init_saves_a_rescaled_state_dict_and_the_report(tmp_path):
    out = tmp_path / "sub" / "mlp.pt"
    done = run_cli("init", *TINY_MLP, "--data", "digits", "--out", out, "--iters", 3,
                   "--batch-size", 32, "--seed", 0, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "saved the state_dict" in done.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "nio" and len(report["history"]) == 3
    state = torch.load(out)
    torch.manual_seed(0)  # the CLI builds the model right after seeding with --seed
    fresh = digits_mlp(depth=4, width=16).state_dict()
    assert state.keys() == fresh.keys() == report["scales"].keys()
    for name, tensor in state.items():  # each tensor changed by its reported positive factor
        torch.testing.assert_close(tensor, fresh[name] * report["scales"][name], rtol=1e-4, atol=1e-6)


def test_init_exact_recompute_takes_the_steps_of_exact(tmp_path):
    scales = {}
    for mode in ("exact", "exact_recompute"):
        out = tmp_path / f"{mode}.pt"
        assert main(["init", *TINY_MLP, "--data", "digits", "--out", str(out), "--iters", "2", "--batch-size", "24",
                     "--mode", mode, "--seed", "0", "--no-progress"]) == 0
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["settings"]["mode"] == mode
        scales[mode] = report["scales"]
    for name, value in scales["exact"].items():
        assert abs(scales["exact_recompute"][name] - value) <= 1e-5 * max(1.0, abs(value)), name


def test_init_gradinit(tmp_path):
    out = tmp_path / "g.pt"
    done = run_cli("init", *TINY_MLP, "--data", "digits", "--out", out, "--method", "gradinit",
                   "--iters", 2, "--eta", 0.05, "--seed", 1, "--no-progress")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "gradinit" and report["settings"]["eta"] == 0.05


def test_gradcosine_prints_value_norms_and_gram():
    done = run_cli("gradcosine", *TINY_MLP, "--data", "digits", "--sub-batches", 3,
                   "--batch-size", 48, "--seed", 0, "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert -1 <= numbers["gradcosine"] <= 1
    gram = torch.tensor(numbers["gram"])
    assert gram.shape == (3, 3)
    torch.testing.assert_close(torch.tensor(numbers["norms"]) ** 2, gram.diagonal(), rtol=1e-4, atol=1e-7)


def test_gradcosine_sample_wise():
    done = run_cli("gradcosine", *TINY_MLP, "--data", "digits", "--sub-batches", "samples",
                   "--batch-size", 6, "--seed", 0, "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert torch.tensor(numbers["gram"]).shape == (6, 6) and numbers["sub_batches"] == "samples"


def test_gradcosine_sample_wise_with_recomputed_layers(capsys):
    """--recompute names module classes of MODEL: the same numbers, segments recomputed."""
    common = ["gradcosine", "nio_fast.models:digits_transformer", "--data", "digits", "--sub-batches", "samples",
              "--batch-size", "6", "--seed", "0", "--json"]
    numbers = []
    for extra in ([], ["--recompute", "TransformerEncoderLayer"]):
        assert main(common + extra) == 0
        numbers.append(json.loads(capsys.readouterr().out))
    kept, recomputed = numbers
    torch.testing.assert_close(torch.tensor(recomputed["gram"]), torch.tensor(kept["gram"]), rtol=1e-5, atol=1e-9)
    assert abs(recomputed["gradcosine"] - kept["gradcosine"]) < 1e-6


def test_a_bad_path_is_one_line_and_exit_code_2(tmp_path):
    done = run_cli("init", *TINY_MLP, "--data", tmp_path / "missing", "--out", tmp_path / "m.pt")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert error_lines(done.stderr) == [f"nio-fast init: error: data folder '{tmp_path / 'missing'}' does not exist"]


def test_gradcosine_text_output(capsys):
    assert main(["gradcosine", *TINY_MLP, "--data", "digits", "--batch-size", "16", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("GradCosine: ") and "norms: " in printed and "Gram:" in printed


def test_help_for_the_program_and_each_subcommand(capsys):
    for argv in (["--help"], ["demo", "--help"], ["init", "--help"], ["gradcosine", "--help"]):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "--min-scale" in printed and "--sub-batches" in printed and "--quick" in printed


def _empty_folder(tmp_path):
    return tmp_path


def _folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["init", "nio_fast.models", "--data", "digits"], "MODEL must look like 'module:callable'"),
        (["init", "no_such_module_xyz:net", "--data", "digits"], "cannot import module 'no_such_module_xyz'"),
        (["init", "nio_fast.models:no_such_net", "--data", "digits"], "has no attribute 'no_such_net'"),
        (["init", "nio_fast.models:digits_mlp", "--model-kwargs", "{depth: 3}", "--data", "digits"],
         "--model-kwargs is not valid JSON"),
        (["init", "nio_fast.models:digits_mlp", "--model-kwargs", '{"colour": 3}', "--data", "digits"],
         "unexpected keyword argument 'colour'"),
        ([*TINY_MLP, "--data", "digits", "--iters", "0"], "iters: expected an integer >= 1"),
        ([*TINY_MLP, "--data", "digits", "--overlap", "1.5"], "overlap: must lie in [0, 1)"),
        ([*TINY_MLP, "--data", "digits", "--method", "magic"], "method: expected one of"),
        ([*TINY_MLP, "--data", "digits", "--gamma", "-1"], "gamma: must be > 0"),
        ([*TINY_MLP, "--data", "digits", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["gradcosine", *TINY_MLP, "--data", "digits", "--sub-batches", "1"], "sub_batches: expected an integer >= 2"),
        (["gradcosine", *TINY_MLP, "--data", "digits", "--sub-batches", "some"], "expected an integer >= 2 or 'samples'"),
        (["gradcosine", *TINY_MLP, "--data", _empty_folder], "no class subfolders"),
        (["gradcosine", *TINY_MLP, "--data", _folder_without_images], "contains no images"),
        (["gradcosine", *TINY_MLP, "--data", "digits", "--sub-batches", "samples", "--recompute", "Block"],
         "--recompute: MODEL has no module of class 'Block'"),
        ([*TINY_MLP, "--data", "digits", "--recompute", "Linear"], "recompute: segments are recomputed by the "
                                                                   "factors mode only"),
        (["demo", "--seeds", "0"], "seeds must be an integer >= 1"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message, tmp_path, capsys):
    argv = [str(arg(tmp_path)) if callable(arg) else arg for arg in argv]
    if argv[0] not in ("init", "gradcosine", "demo"):
        argv = ["init", *argv]
    if argv[0] == "init":
        argv += ["--out", str(tmp_path / "model.pt")]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo")]
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "model.pt").exists()


def test_out_must_not_be_the_report_name(tmp_path, capsys):
    assert main(["init", *TINY_MLP, "--data", "digits", "--out", str(tmp_path / "m.json")]) == 2
    assert "must not end in .json" in capsys.readouterr().err
