"""The benchmark plumbing without a GPU: benchmarks/gpu_check.py end to end in its dry run, and
the pieces it and benchmarks/test_gram.py rest on (shapes, JUnit counts, ratios, exit status)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402
import report  # noqa: E402
from gradient_shapes import MODEL_SHAPES, gradient_lists, num_values  # noqa: E402


def test_gradient_shapes_match_torchvision_parameter_counts():
    assert (len(MODEL_SHAPES["resnet50"]), num_values("resnet50")) == (161, 25_557_032)
    assert (len(MODEL_SHAPES["vit_b_16"]), num_values("vit_b_16")) == (152, 86_567_656)
    assert MODEL_SHAPES["vit_b_16"][2 + 2] == (768,)  # ln_1 weight of the first encoder layer
    assert MODEL_SHAPES["resnet50"][-2:] == [(1000, 2048), (1000,)]


def test_gradient_lists_layout_and_shared_component():
    generator = torch.Generator().manual_seed(0)
    grads = gradient_lists("tiny", 3, torch.float64, "cpu", generator, shared=0.5, requires_grad=True)
    assert len(grads) == 3 and all(len(row) == len(MODEL_SHAPES["tiny"]) for row in grads)
    assert all(t.shape == shape and t.dtype == torch.float64 and t.requires_grad and t.is_leaf
               for row in grads for t, shape in zip(row, MODEL_SHAPES["tiny"]))
    assert len({t.data_ptr() for row in grads for t in row}) == 3 * len(MODEL_SHAPES["tiny"])  # own allocations
    flat = torch.stack([torch.cat([t.detach().reshape(-1) for t in row]) for row in grads])
    gram = flat @ flat.T
    cosine = gram[0, 1] / math.sqrt(gram[0, 0] * gram[1, 1])
    assert 0.3 < cosine < 0.7  # about the shared half


def test_junit_summary_counts_failures_errors_and_skip_reasons(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" tests="5">
          <testcase classname="tests.test_a" name="test_ok"/>
          <testcase classname="tests.test_a.TestCUDA" name="test_fails"><failure message="assert 1 == 2">x</failure></testcase>
          <testcase classname="tests.test_a" name="test_breaks"><error message="fixture broke">y</error></testcase>
          <testcase classname="tests.test_a" name="test_gpu"><skipped message="needs a CUDA GPU (and TRITON_INTERPRET unset)"/></testcase>
          <testcase classname="tests.test_a" name="test_gpu2"><skipped message="needs a CUDA GPU (and TRITON_INTERPRET unset)"/></testcase>
        </testsuite></testsuites>
        """))
    summary = gpu_check.summarize_junit(junit)
    assert {k: summary[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert summary["skip_reasons"] == {"needs a CUDA GPU (and TRITON_INTERPRET unset)": 2}
    assert [f["test"] for f in summary["failing"]] == ["tests.test_a.TestCUDA::test_fails", "tests.test_a::test_breaks"]


def test_exit_status_puts_correctness_before_incomplete_steps():
    base = {"steps": {"tests": {"status": "ok"}, "gram": {"status": "skipped"}}, "correctness_failures": []}
    assert gpu_check.exit_status(base) == 0
    assert gpu_check.exit_status({**base, "steps": {"gram": {"status": "out of time"}}}) == 2
    assert gpu_check.exit_status({**base, "fatal": "no CUDA device"}) == 2
    assert gpu_check.exit_status({**base, "correctness_failures": ["x"], "steps": {"gram": {"status": "error"}}}) == 1


def test_gram_rows_put_the_reference_beside_each_backend():
    common = {"model": "resnet50", "D": 2, "device": "cpu", "dtype": "float32", "rounds": 3, "gradient_bytes": 10**9}
    rows = [{**common, "direction": "forward", "backend": "cpp", "seconds": 0.5},
            {**common, "direction": "forward", "backend": "torch", "seconds": 2.0},
            {**common, "direction": "forward+backward", "backend": "cpp", "seconds": 1.0}]
    table = report._gram_rows(rows)
    assert [(r["direction"], r["backend"]) for r in table] == [
        ("forward", "torch"), ("forward", "cpp"), ("forward+backward", "cpp")]
    assert table[0]["torch / backend"] == 1.0 and table[1]["torch / backend"] == 4.0
    assert table[2]["torch / backend"] is None  # no reference timed for that direction
    assert table[1]["D·m GB/s"] == 2.0


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    """The whole script on tiny sizes: every step runs and the files hold every number."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output

    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["mode"] == "dry-run" and written["exit_status"] == 0
    assert {"date", "torch", "python", "cpu", "commit"} <= set(written["machine"])
    assert all(step["status"] == "ok" for step in written["steps"].values()), written["steps"]
    assert list(written["steps"]) == list(gpu_check.STEPS)

    tests = written["tests"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0

    bandwidth = written["bandwidth"]
    assert bandwidth["copy"]["bytes_per_second"] > 0
    rows = bandwidth["rows"]
    assert {r["backend"] for r in rows} >= {"torch", "cpp"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(r["correct"] and r["forward_fraction"] > 0 and r["backward_fraction"] > 0 for r in rows)
    assert all("kernel_forward_fraction" in r for r in rows if r["backend"] != "torch")

    assert {(r["backend"], r["direction"]) for r in written["gram"]} >= {
        (backend, direction) for backend in ("torch", "cpp") for direction in ("forward", "forward+backward")}
    assert all(r["median s"] > 0 for r in written["gram"])
    assert {r["backend"] for r in written["gram_memory"]} >= {"torch", "cpp"}
    assert {(r["op"], r["backend"]) for r in written["chunk_reduce"]} >= {
        (op, backend) for op in ("chunk_gram", "chunk_sums") for backend in ("torch", "cpp")}
    assert all(r["median s"] > 0 and r["torch / backend"] > 0 for r in written["chunk_reduce"])
    assert {r["backend"] for r in written["group_norm"]} >= {"native", "torch", "cpp"}
    assert all(r["median s"] > 0 and r["native / backend"] > 0 for r in written["group_norm"])
    assert written["torchvision"]["rows"] and written["torchvision"]["rows"][0]["nio_fast s"] > 0
    assert written["torchvision"]["rows"][0]["floor s"] > 0 and written["torchvision"]["rows"][0]["reference / floor"] > 0
    assert written["iteration"] and written["iteration"][0]["step s"] > 0
    samplewise = {r["N"]: r for r in written["samplewise"] if r["model"] == "vit_small"}
    assert samplewise[4]["sample-wise s"] > 0 and samplewise[4]["step s"] > 0 and samplewise[4]["floor s"] > 0

    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("**Result: PASS**", "## Correctness tests", "## Bandwidth", "## Gram benchmarks",
                    "## Gram extra memory", "## NIO iteration on torchvision", "## Iteration benchmarks",
                    "## Sample-wise GradCosine", "## GroupNorm's second-order pass"):
        assert heading in markdown
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
    for table in ("gram", "gram_memory", "group_norm", "iteration", "samplewise"):  # redirected: benchmarks/results untouched
        assert (tmp_path / "gpu_check" / f"{table}.md").exists()


def test_gpu_check_without_a_gpu_refuses_a_full_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "no CUDA device" in written["fatal"] and "INCOMPLETE" in (tmp_path / "gpu_check.md").read_text()


def _samplewise_raw_rows():
    """Synthetic rows of benchmarks/test_samplewise.py: one model meeting every target, one missing them."""
    timing, memory = [], []
    for model, samplewise in (("fast", {16: 2.0, 64: 3.0, 256: 3.5}), ("slow", {16: 2.0, 64: 12.0, 256: 40.0})):
        for n in (16, 64, 256):
            timing.append({"model": model, "N": n, "implementation": "step", "seconds": 1.0})
            timing.append({"model": model, "N": n, "implementation": "samplewise", "seconds": samplewise[n],
                           "routes": "ghost 1, vectors 2"})
            memory.append({"model": model, "N": n, "implementation": "step", "threads": 2, "extra_mb": 100.0,
                           "allocated_mb": 80.0})
            memory.append({"model": model, "N": n, "implementation": "samplewise", "threads": 2,
                           "extra_mb": 150.0 if model == "fast" else 300.0,
                           "allocated_mb": 120.0 if model == "fast" else 200.0})
        timing.append({"model": model, "N": 16, "implementation": "vmap_samples", "seconds": 8.0})
        for n in (64, 256):  # the vmap cases that would not fit: a reason, no number
            reason = f"vmap skipped: per-sample gradients need ~{n / 8:.1f} GB"
            timing.append({"model": model, "N": n, "implementation": "vmap_samples", "seconds": None,
                           "skipped": reason})
            memory.append({"model": model, "N": n, "implementation": "vmap_samples", "threads": 2,
                           "extra_mb": None, "skipped": reason})
    return timing, memory


def _with_cases(timing, memory, cases):
    """The report's rows with ``cases`` ((implementation, seconds, extra_mb, allocated_mb)) also
    measured for ("fast", N = 64), that row and the fast model's note."""
    timing, memory = list(timing), list(memory)
    for implementation, seconds, extra_mb, allocated_mb in cases:
        case = {"model": "fast", "N": 64, "implementation": implementation}
        timing.append({**case, "seconds": seconds})
        memory.append({**case, "threads": 2, "extra_mb": extra_mb, "allocated_mb": allocated_mb})
    table = report._samplewise_rows(timing, memory)
    row = next(r for r in table if (r["model"], r["N"]) == ("fast", 64))
    return table, row, report._samplewise_notes(table).splitlines()[0]


def test_samplewise_report_ratios_growth_and_target_verdicts(tmp_path, monkeypatch):
    timing, memory = _samplewise_raw_rows()
    table = report._samplewise_rows(timing, memory)
    assert [(r["model"], r["N"]) for r in table] == [(m, n) for m in ("fast", "slow") for n in (16, 64, 256)]
    first = table[0]
    assert (first["step s"], first["sample-wise s"], first["vmap s"]) == (1.0, 2.0, 8.0)
    assert first["sample-wise / step"] == 2.0 and first["vmap / sample-wise"] == 4.0
    assert first["sample-wise MB / step MB"] == 1.5 and first["vmap MB"] is None
    assert (first["step alloc MB"], first["sample-wise alloc MB"]) == (80.0, 120.0)
    assert first["sample-wise alloc / step alloc"] == 1.5 and first["vmap alloc MB"] is None
    assert first["routes (sample-wise)"] == "ghost 1, vectors 2" and first["skipped"] is None
    skipped = table[1]
    assert skipped["vmap s"] is None and skipped["vmap / sample-wise"] is None
    assert skipped["skipped"] == "vmap skipped: per-sample gradients need ~8.0 GB (seconds, memory)"

    # Steps timed between a case's own rounds, where recorded, are its '/ step' unit.
    side_by_side = [{**r, "step_seconds": 0.5}
                    if (r["model"], r["N"], r["implementation"]) == ("fast", 16, "samplewise") else r for r in timing]
    first_side_by_side = report._samplewise_rows(side_by_side, memory)[0]
    assert first_side_by_side["sample-wise / step"] == 4.0 and first_side_by_side["step s"] == 1.0

    notes = report._samplewise_notes(table).splitlines()
    assert len(notes) == 2
    fast, slow = notes
    assert "in training steps grows x1.75 from N = 16 to N = 256 (target < 2: met; seconds x1.75)" in fast
    assert "x1.50" not in fast  # the growth is N = 256 over N = 16, not 64 over 16
    assert "3.00 training steps (target <= 5: met)" in fast
    assert "1.50x a step's peak of allocated tensor memory (target <= 2: met)" in fast
    assert "1.50x its peak resident memory (target <= 2: met)" in fast
    assert "x20.00 from N = 16 to N = 256 (target < 2: MISSED;" in slow
    assert "12.00 training steps (target <= 5: MISSED)" in slow
    assert "2.50x a step's peak of allocated tensor memory (target <= 2: MISSED)" in slow
    assert "3.00x its peak resident memory (target <= 2: MISSED)" in slow
    assert "floor" not in fast  # not measured: no sentence about it

    # The floor, where measured, is set beside the targets.
    cases = [("floor", 2.5, 190.0, 176.0)]
    with_floor, fast_64, floor_note = _with_cases(timing, memory, cases)
    assert (fast_64["floor s"], fast_64["floor / step"], fast_64["floor MB"]) == (2.5, 2.5, 190.0)
    assert (fast_64["floor alloc MB"], fast_64["floor alloc / step alloc"]) == (176.0, 2.2)
    assert with_floor[0]["floor s"] is None and with_floor[0]["floor / step"] is None
    assert "floor (one backward with graph and one double backward over the whole batch, no per-sample Gram) " \
           "takes 2.50 training steps and 2.20x a step's allocated memory" in floor_note
    assert "recompute" not in floor_note.lower()  # not measured: no sentence about it

    # Recomputed segments, where measured, get their columns and their verdicts.
    cases.append(("samplewise_recompute", 6.0, 110.0, 96.0))
    with_recompute, fast_64, recompute_note = _with_cases(timing, memory, cases)
    assert (fast_64["recompute s"], fast_64["recompute / step"], fast_64["recompute MB"]) == (6.0, 6.0, 110.0)
    assert (fast_64["recompute alloc MB"], fast_64["recompute alloc / step alloc"]) == (96.0, 1.2)
    assert fast_64["recompute MB / step MB"] == 1.1 and with_recompute[0]["recompute s"] is None
    assert "Recomputing every residual block / encoder layer (recompute=) instead: 6.00 training steps " \
           "(target: MISSED), 1.20x a step's allocated memory (target: met) and 1.10x its resident memory" \
           in recompute_note
    assert "first half" not in recompute_note  # not measured: no sentence about it
    cases.append(("samplewise_recompute_half", 4.5, 150.0, 144.0))
    _, fast_64, half_note = _with_cases(timing, memory, cases)
    assert (fast_64["half recompute / step"], fast_64["half recompute alloc / step alloc"]) == (4.5, 1.8)
    assert fast_64["recompute / step"] == 6.0  # the other variant's columns stay its own
    assert "Recomputing the first half of the residual blocks / encoder layers (recompute=) instead: 4.50 " \
           "training steps (target: met), 1.80x a step's allocated memory (target: met) and 1.50x its resident " \
           "memory" in half_note
    assert "NIO's own" not in half_note  # not measured: no sentence about it

    # NIO's own iteration, kept and with half of the segments recomputed.
    cases.append(("nio_samples", 5.5, 300.0, 168.0))
    _, fast_64, nio_note = _with_cases(timing, memory, cases)
    assert (fast_64["NIO iteration / step"], fast_64["NIO iteration alloc / step alloc"]) == (5.5, 2.1)
    assert fast_64["sample-wise / step"] == 3.0  # the evaluation's columns stay its own
    assert "NIO's own sample-wise iteration (scale gradients only, linear and convolution weights' from probes, " \
           "and the scale update): 5.50 training steps (target: MISSED), 2.10x a step's allocated memory " \
           "(target: MISSED) and 3.00x its resident memory" in nio_note
    assert "NIO's iteration with" not in nio_note
    cases.append(("nio_samples_recompute_half", 4.8, 200.0, 152.0))
    _, fast_64, nio_half_note = _with_cases(timing, memory, cases)
    assert (fast_64["NIO iteration, half recompute / step"],
            fast_64["NIO iteration, half recompute alloc / step alloc"]) == (4.8, 1.9)
    assert fast_64["NIO iteration / step"] == 5.5 and fast_64["half recompute / step"] == 4.5
    assert "NIO's iteration with the first half of the residual blocks / encoder layers recomputed: 4.80 " \
           "training steps (target: met), 1.90x a step's allocated memory (target: met) and 2.00x its resident " \
           "memory" in nio_half_note
    assert "NIO's iteration with every" not in nio_half_note

    # Without N = 64 or N = 16..256 (a quick run) nothing is judged.
    quick = report._samplewise_rows([r for r in timing if r["N"] == 16] + [
        {**r, "N": 4} for r in timing if r["N"] == 16 and r["model"] == "fast"], [])
    quick_note = report._samplewise_notes([r for r in quick if r["model"] == "fast"])
    assert "from N = 4 to N = 16 (target < 2 from N = 16 to 256: not measured)" in quick_note
    assert quick_note.count("not measured") == 4

    # The tables land where NIO_FAST_BENCH_RESULTS says (benchmarks/results is left alone).
    monkeypatch.setenv("NIO_FAST_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(report.harness, "RESULTS", report.harness.RESULTS)  # restored after the test
    report.write_tables({"samplewise": timing, "samplewise_memory": memory}, {})
    written = json.loads((tmp_path / "samplewise.json").read_text())
    assert written["rows"] == json.loads(json.dumps(table))
    markdown = (tmp_path / "samplewise.md").read_text()
    assert "(CPU, 2 thread(s))" in markdown and "target <= 5: MISSED" in markdown
    assert "| fast | 64 | 1 | 3 |" in markdown
    assert (tmp_path / "samplewise.png").stat().st_size > 0


def test_allocated_peak_counts_the_tensors_live_at_once():
    import harness

    def two_then_one():
        first = torch.randn(2**20)  # 4 MiB
        second = first * 2  # 8 MiB live
        del first
        third = second + 1  # 8 MiB live again, never 12
        return third.sum()
    assert abs(harness.allocated_peak_mb(two_then_one) - 8.0) < 0.1


def test_peak_owners_list_what_is_live_at_the_peak_by_the_op_that_made_it():
    import peak_owners

    def four_owners():
        noise = torch.randn(2**20)  # 4 MiB (aten::randn), live at the peak
        doubled = noise * 2  # 4 MiB (aten::mul), live at the peak
        shifted = torch.ones(2**19) + 1  # 2 MiB (aten::add); its aten::ones input is freed before the peak
        joined = torch.cat([doubled, shifted])  # the peak: 6 MiB more, 16 in all
        return joined.sum()
    peak_mb, rows = peak_owners.peak_owners(four_owners, depth=2)
    assert abs(peak_mb - 16.0) < 0.1  # (the peak is the sum's 4 bytes on top)
    assert {owner: round(mb, 1) for owner, mb, _ in rows if mb > 0.1} == \
        {"aten::empty < aten::randn": 4.0, "aten::mul": 4.0, "aten::add": 2.0, "aten::cat": 6.0}
    assert rows[0][0] == "aten::cat" and all(count == 1 for _, _, count in rows)


def test_memory_rows_take_medians_their_spread_and_allocator_ratios():
    rows = [{"model": "m", "D": None, "implementation": "step", "extra_mb": 50.0},
            {"model": "m", "D": 8, "implementation": "reference", "extra_mb": 200.0,
             "extra_mb_runs": [210.0, 200.0, 190.0], "allocated_mb": 180.0},
            {"model": "m", "D": 8, "implementation": "nio_fast", "extra_mb": 120.0,
             "extra_mb_runs": [120.0, 150.0, 100.0], "allocated_mb": 90.0}]
    (row,) = report._memory_rows(rows)
    assert (row["step MB"], row["reference MB"], row["nio_fast MB"]) == (50.0, 200.0, 120.0)
    assert row["nio_fast / reference"] == 0.6 and row["nio_fast alloc / reference alloc"] == 0.5
    assert (row["nio_fast MB runs"], row["reference MB runs"]) == ("100-150", "190-210")
    assert row["exact_recompute MB"] is None and row["exact_recompute / reference"] is None


def test_interleaved_rounds_report_medians_and_ranges():
    import interleaved
    result = interleaved.interleaved_rounds("resnet20_gn", 2, rounds=2, batch_size=8, width=4)
    assert (result["model"], result["D"], result["rounds"]) == ("resnet20_gn", 2, 2)
    for key in ("speed_up", "nio_fast_steps", "reference_steps", "floor_steps", "reference_over_floor"):
        summary = result[key]
        assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    assert "samplewise_steps" not in result and "mode_speed_up" not in result

    with_mode = interleaved.interleaved_rounds("resnet20_gn", 2, rounds=2, batch_size=8, mode="factors", width=4)
    for key in ("mode_speed_up", "mode_over_nio_fast"):
        assert 0 < with_mode[key]["min"] <= with_mode[key]["median"] <= with_mode[key]["max"]

    per_iteration = interleaved.interleaved_rounds("resnet20_gn", 2, rounds=2, batch_size=8, iters=2,
                                                   compare_cache=True, width=4)
    assert per_iteration["iters"] == 2 and "cache_on_over_off" in per_iteration
    assert 0 < per_iteration["cache_on_over_off"]["min"] <= per_iteration["cache_on_over_off"]["max"]
    assert os.environ.get("NIO_FAST_CPU_CACHE") is None  # the cache-off call put the switch back

    samples = interleaved.interleaved_rounds("resnet20_gn", "samples", rounds=2, batch_size=4, width=4)
    assert set(samples) == {"model", "D", "batch", "rounds", "iters", "floor_steps", "samplewise_steps",
                            "samplewise_over_floor", "recompute_steps", "recompute_over_samplewise",
                            "recompute_half_steps", "recompute_half_over_samplewise", "nio_samples_steps",
                            "nio_samples_over_samplewise", "nio_recompute_steps", "nio_recompute_over_nio",
                            "nio_recompute_half_steps", "nio_recompute_half_over_nio"}
    assert 0 < samples["samplewise_over_floor"]["min"] <= samples["samplewise_over_floor"]["max"]

    first = interleaved.interleaved_rounds("resnet20_gn", "samples", rounds=1, batch_size=4, width=4,
                                           recompute_first=2)
    assert first["recompute_first"] == 2 and first["nio_recompute_first_steps"]["median"] > 0
    assert set(first["alloc_over_step"]) == {"nio_samples", "nio_samples_recompute_first"}
    assert all(ratio > 0 for ratio in first["alloc_over_step"].values())

    growth = interleaved.interleaved_rounds("resnet20_gn", (2, 4), rounds=2, batch_size=8, width=4)
    assert set(growth) == {"model", "D", "batch", "rounds", "iters", "nio_fast_growth", "reference_growth"}
    assert 0 < growth["nio_fast_growth"]["min"] <= growth["nio_fast_growth"]["max"]


def test_cpu_cache_rounds_alternate_the_cache_and_restore_the_switch():
    import cpu_cache
    result = cpu_cache.alternating_rounds("resnet20_gn", 2, rounds=2, iters=2, batch_size=8, width=4)
    assert (result["model"], result["D"], result["rounds"], result["iters"]) == ("resnet20_gn", 2, 2, 2)
    assert 0 < result["on_over_off"]["min"] <= result["on_over_off"]["median"] <= result["on_over_off"]["max"]
    assert result["faults_on"] >= 0 and result["faults_off"] >= 0
    assert os.environ.get("NIO_FAST_CPU_CACHE") is None


def test_iteration_rows_set_the_floor_beside_every_d_of_its_model():
    rows = [{"model": "m", "batch": 64, "D": d, "implementation": impl, "seconds": seconds, "step_seconds": 0.5}
            for d, impl, seconds in ((2, "reference", 4.0), (2, "nio_fast", 2.0), (4, "reference", 8.0),
                                     (4, "nio_fast", 2.5))]
    rows.append({"model": "m", "batch": 64, "D": None, "implementation": "floor", "seconds": 2.0,
                 "step_seconds": 1.0})
    rows.append({"model": "m", "batch": 16, "D": 16, "implementation": "nio_fast", "seconds": 1.0,
                 "step_seconds": 0.5})  # no floor at this batch: its cells stay empty
    table = report._iteration_rows(rows)
    assert [(r["N"], r["D"]) for r in table] == [(16, 16), (64, 2), (64, 4)]
    assert table[0]["floor / step"] is None and table[0]["nio_fast / floor"] is None
    at_4 = table[2]
    assert (at_4["reference / step"], at_4["nio_fast / step"], at_4["floor / step"]) == (16.0, 5.0, 2.0)
    assert (at_4["nio_fast / floor"], at_4["reference / floor"], at_4["speed-up"]) == (2.5, 8.0, 3.2)
    note = report._growth_notes(table)
    assert "growth" not in note and "grows" not in note  # no D = 2 and 16 here
    rows += [{"model": "m", "batch": 64, "D": 16, "implementation": impl, "seconds": seconds, "step_seconds": 1.0}
             for impl, seconds in (("reference", 32.0), ("nio_fast", 6.0))]
    grown = report._growth_notes(report._iteration_rows(rows))
    assert ("m: time grows x3.00 (nio_fast) and x8.00 (reference) from D = 2 to D = 16; in training steps "
            "x1.50 and x4.00.") in grown
    assert ("m: the floor takes 2.00 training steps; at D = 4 nio_fast is 2.50x the floor, and an iteration AT "
            "the floor would be 8.00x faster than the reference (nio_fast: 3.20x)") in note
