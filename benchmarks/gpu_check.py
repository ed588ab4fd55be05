"""The one command to run on a CUDA machine (``make gpu-check``): correctness, bandwidth, benchmarks.

    python benchmarks/gpu_check.py [--out DIR] [--dry-run] [--skip STEP,...] [--budget-s S]

Steps, in order, each recorded whatever the others do:

1. build: compile nio_fast._C in place (``setup.py build_ext --inplace --force``) when it does not
   import, or lacks CUDA kernels although nvcc and CUDA sources are there (``--build`` to choose);
2. tests: ``pytest`` of CORRECTNESS_TEST_FILES (the Gram, ghost-Gram and chunk-reduction kernels, GroupNorm,
   the extension, the ops, their derivatives' limits) with TRITON_INTERPRET unset, so that their CUDA classes and
   parameters run; pass/fail counts;
3. bandwidth: the device's copy bandwidth (a large device-to-device copy, bytes read plus
   written per second) and each backend's on ViT-B/16-shaped gradients: forward, the gradients'
   bytes read once (D x m x element size) per second; backward, those bytes read and as many
   written. As a fraction of the copy bandwidth (target: 0.8). The same inputs are checked
   against an fp64 reference first: a kernel that is fast and wrong fails here;
4. gram: ``pytest benchmarks/test_gram.py --benchmark-only`` (tables gram, gram_memory), then
   chunk_reduce: ``pytest benchmarks/test_chunk_reduce.py`` (the sparse chunk reductions against
   their dense twin, table chunk_reduce), then group_norm: ``pytest benchmarks/test_normalization.py -k
   "group_norm or attention"`` (the second-order passes of GroupNorm and attention, F.group_norm and
   F.scaled_dot_product_attention against ops.group_norm and ops.attention, tables group_norm, attention);
5. torchvision: a NIO iteration on torchvision ResNet-18/50 on the GPU (GPU-only cases; noted
   and skipped where torchvision is missing);
6. iteration: ``pytest benchmarks/test_iteration.py --benchmark-only`` (its models run on CPU);
7. samplewise: ``pytest benchmarks/test_samplewise.py`` with its models on the GPU
   (NIO_FAST_BENCH_DEVICE): sample-wise GradCosine against vmap and a training step.

Writes DIR/gpu_check.md and DIR/gpu_check.json (machine, versions, date, every number) after
every step, DIR/gpu_check.log (all output), and the benchmark tables and the JUnit file under
DIR/gpu_check/. DIR defaults to benchmarks/results.

``--dry-run`` (alias ``--cpu``): every step on tiny sizes and a small test selection, on the
CPU when there is no GPU; tests/test_benchmark_plumbing.py runs it so that the plumbing is
tested without a GPU.

Exit status: 0 when every check passed; 1 when a correctness check failed (a test, a result
against the fp64 reference); 2 when none failed but a step could not run (no CUDA device
without --dry-run, a crash, the time budget).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Optional

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
for _path in (str(ROOT), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402  (nio_fast is imported after the build step, which may create _C)

STEPS = ("build", "tests", "bandwidth", "gram", "chunk_reduce", "group_norm", "torchvision", "iteration",
         "samplewise")
CORRECTNESS_TEST_FILES = ("tests/test_triton_gram.py", "tests/test_extension.py", "tests/test_ops.py",
                          "tests/test_triton_ghost_gram.py", "tests/test_triton_chunk_reduce.py",
                          "tests/test_chunk_reduce.py", "tests/test_group_norm.py", "tests/test_batch_norm.py",
                          "tests/test_layer_norm.py", "tests/test_triton_group_norm.py", "tests/test_samplewise.py",
                          "tests/test_samplewise_segments.py", "tests/test_attention.py",
                          "tests/test_triton_attention.py",
                          "tests/test_first_order.py", "tests/test_scale_probes.py", "tests/test_pixel_gram.py",
                          "tests/test_conv_factors.py")
DRY_RUN_TESTS = ["tests/test_ops.py", "-k", "gram and not nio"]
DRY_RUN_ITERATION_SELECTION = "resnet20_gn-16"  # one iteration pair (each timing its own steps), D = 16
DRY_RUN_SAMPLEWISE_SELECTION = "seconds and vit_small and 4"  # the quick sizes' ViT timings only
BANDWIDTH_TARGET = 0.8
# Gram entries are compared as |G - G_ref| / sqrt(G_ii G_jj) (the Cauchy-Schwarz bound of G_ij),
# backward outputs as |out - ref| / (|S| @ |X|) (the bound of each output element). With half of
# every gradient shared, off-diagonal entries are about m / 2, so a wrong one is far outside.
GRAM_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
BACKWARD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GPU_SKIP_REASON = re.compile(r"needs a (CUDA )?GPU", re.IGNORECASE)


class Deadline:
    """The wall-clock budget of the whole run: later steps get what the earlier ones left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"time budget spent before {what}")


class Log:
    """Everything printed, also kept in DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)
            self.file.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")


def run_logged(command: list[str], log: Log, timeout: float, env: Optional[dict] = None) -> Optional[int]:
    """Run ``command`` in the repository root, streaming its output; None when it ran out of time."""
    log.line(f"$ {' '.join(command)}")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=lambda: [log.write(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the children it started go too
        process.wait()
        code = None
    reader.join(timeout=10)
    return code


DRY_RUN_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NIO_FAST_BENCH_THREADS": "1"}


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CUDA classes run only without the interpreter
    if DRY_RUN:
        env.update(DRY_RUN_THREADS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# Step 1: the extension.

def extension_state() -> dict:
    code = ("import json, nio_fast._C as C; "
            "print(json.dumps({'importable': True, 'cuda_compiled': bool(C.cuda_compiled())}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if result.returncode == 0:
        return json.loads(result.stdout.strip().splitlines()[-1])
    return {"importable": False, "cuda_compiled": False, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}


def nvcc_path() -> Optional[str]:
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def step_build(report: dict, args, log: Log, deadline: Deadline) -> str:
    before = extension_state()
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    could_have_cuda = bool(torch.version.cuda and torch.cuda.is_available() and nvcc_path() and cuda_sources)
    wanted = args.build == "always" or (args.build == "auto" and (
        not before["importable"] or (could_have_cuda and not before["cuda_compiled"])))
    result = {"before": before, "cuda_sources": cuda_sources, "nvcc": nvcc_path(), "built": False}
    report["build"] = result
    if wanted:
        code = run_logged([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], log, deadline.left(),
                          child_env())
        result["built"] = True
        result["build_exit"] = code
    result["after"] = extension_state() if wanted else before
    if not result["after"]["importable"]:
        raise RuntimeError(f"nio_fast._C does not import: {result['after'].get('error')}")
    if could_have_cuda and not result["after"]["cuda_compiled"]:
        report["problems"].append("the extension has no CUDA kernels although nvcc and CUDA sources are here: "
                                  "backend 'cpp' is not checked on CUDA")
    return f"extension imports, CUDA kernels: {result['after']['cuda_compiled']}" + (" (built now)" if wanted else "")


# ---------------------------------------------------------------------------------------------
# Step 2: correctness tests.

def summarize_junit(path: Path) -> dict:
    """Counts, failing tests and skip reasons from a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skip_reasons = [], collections.Counter()
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed.append({"test": name, "kind": problem.tag,
                           "message": (problem.get("message") or "").strip().splitlines()[:1]})
        skipped = case.find("skipped")
        if skipped is not None:
            skip_reasons[(skipped.get("message") or "").strip()] += 1
    counts = {
        "tests": len(cases),
        "failed": sum(1 for f in failed if f["kind"] == "failure"),
        "errors": sum(1 for f in failed if f["kind"] == "error"),
        "skipped": sum(skip_reasons.values()),
    }
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failed, "skip_reasons": dict(skip_reasons.most_common())}


def step_tests(report: dict, args, log: Log, deadline: Deadline) -> str:
    junit = args.files / "junit.xml"
    if args.dry_run:
        selection, missing = list(DRY_RUN_TESTS), []
    else:
        selection = [f for f in CORRECTNESS_TEST_FILES if (ROOT / f).exists()]
        missing = [f for f in CORRECTNESS_TEST_FILES if not (ROOT / f).exists()]
    if missing:
        report["problems"].append(f"test files missing: {', '.join(missing)}")
    junit.unlink(missing_ok=True)
    code = run_logged([sys.executable, "-m", "pytest", *selection, "-q", "-rs", "-p", "no:cacheprovider",
                       f"--junitxml={junit}"], log, deadline.left(), child_env())
    result = {"selection": selection, "missing_files": missing, "pytest_exit": code}
    report["tests"] = result
    if code is None:
        report["correctness_failures"].append("the tests ran out of time")
        raise TimeoutError("pytest ran out of the time budget")
    if not junit.exists():
        report["correctness_failures"].append(f"pytest exited {code} without a JUnit report")
        return f"pytest exited {code}"
    result.update(summarize_junit(junit))
    if code != 0 or result["failed"] or result["errors"]:
        report["correctness_failures"].append(
            f"tests: {result['failed']} failed, {result['errors']} errors (pytest exit {code})")
    if result["passed"] == 0:
        report["correctness_failures"].append("tests: none passed")
    gpu_skips = {reason: n for reason, n in result["skip_reasons"].items() if GPU_SKIP_REASON.search(reason)}
    if torch.cuda.is_available() and gpu_skips:
        report["problems"].append(f"{sum(gpu_skips.values())} tests skipped for want of a GPU on a GPU machine: "
                                  + "; ".join(gpu_skips))
    return f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, {result['skipped']} skipped"


# ---------------------------------------------------------------------------------------------
# Step 3: bandwidth, and results at full size against an fp64 reference.

def device_seconds(fn: Callable[[], object], device: torch.device, rounds: int, warmup: int) -> float:
    """Median seconds of ``fn``: CUDA events on a GPU (no host clock in the way), else a host clock."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, rounds: int) -> dict:
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    seconds = device_seconds(lambda: target.copy_(source), device, rounds, warmup=3)
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_second": 2 * nbytes / seconds}


def fp64_references(table, weights):
    """G and the backward outputs in fp64, one tensor at a time (no D x m copy in fp64)."""
    D = len(table)
    gram = torch.zeros(D, D, dtype=torch.float64, device=table[0][0].device)
    S = (weights + weights.T).double()
    outputs, bounds = [], []
    for p in range(len(table[0])):
        X = torch.stack([row[p].detach().reshape(-1) for row in table]).double()
        gram += X @ X.T
        outputs.append(S @ X)
        bounds.append(S.abs() @ X.abs())
    return gram, outputs, bounds


def gram_error(gram: torch.Tensor, reference: torch.Tensor) -> float:
    diagonal = reference.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return float(((gram.double() - reference).abs() / (diagonal[:, None] * diagonal[None, :])).max())


def backward_error(outputs, references, bounds, D: int) -> float:
    worst = 0.0
    for p, (reference, bound) in enumerate(zip(references, bounds)):
        ours = torch.stack([outputs[d * len(references) + p].reshape(-1) for d in range(D)]).double()
        worst = max(worst, float(((ours - reference).abs() / bound.clamp_min(1e-300)).max()))
    return worst


def kernel_forward(backend: str):
    """The backend's forward without the op layer (argument checks, autograd), or None."""
    from nio_fast import availability
    if backend == "triton":
        return availability.triton_kernels().gram_forward
    if backend == "cpp":
        return availability.extension().gram_forward
    return None


def bandwidth_case(model: str, D: int, dtype: torch.dtype, backend: str, device: torch.device,
                   copy_bytes_per_second: float, rounds: int) -> dict:
    from gradient_shapes import gradient_lists, num_values
    from nio_fast import ops
    generator = torch.Generator(device=device).manual_seed(D)
    table = gradient_lists(model, D, dtype, device, generator, shared=0.5, requires_grad=True)
    flat = [t for row in table for t in row]
    weights = torch.randn(D, D, device=device, generator=generator)
    nbytes = D * num_values(model) * table[0][0].element_size()
    row = {"model": model, "D": D, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
           "gradient_bytes": nbytes}

    gram_ref, outputs_ref, bounds = fp64_references(table, weights)
    gram = ops.gram(table, backend=backend)
    outputs = torch.autograd.grad(gram, flat, grad_outputs=weights, retain_graph=True)
    row["gram_error"] = gram_error(gram.detach(), gram_ref)
    row["backward_error"] = backward_error(outputs, outputs_ref, bounds, D)
    row["correct"] = row["gram_error"] <= GRAM_TOLERANCE[dtype] and row["backward_error"] <= BACKWARD_TOLERANCE[dtype]
    del gram_ref, outputs_ref, bounds, outputs

    forward = device_seconds(lambda: ops.gram(table, backend=backend), device, rounds, warmup=3)
    backward = device_seconds(lambda: torch.autograd.grad(gram, flat, grad_outputs=weights, retain_graph=True),
                              device, rounds, warmup=3)
    row.update(forward_s=forward, forward_bytes_per_second=nbytes / forward,
               forward_fraction=nbytes / forward / copy_bytes_per_second,
               backward_s=backward, backward_bytes_per_second=2 * nbytes / backward,
               backward_fraction=2 * nbytes / backward / copy_bytes_per_second)
    kernel = kernel_forward(backend)
    if kernel is not None:
        detached = [[t.detach() for t in row_] for row_ in table]
        kernel_s = device_seconds(lambda: kernel(detached), device, rounds, warmup=3)
        row.update(kernel_forward_s=kernel_s, kernel_forward_fraction=nbytes / kernel_s / copy_bytes_per_second)
    del gram, table, flat
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def step_bandwidth(report: dict, args, log: Log, deadline: Deadline) -> str:
    from test_gram import fused_backends
    device = args.device
    copy_bytes, rounds = (64 * 2**20, 3) if args.dry_run else (2 * 2**30, 20)
    copy = copy_bandwidth(device, copy_bytes, rounds)
    result = {"copy": copy, "rows": [], "target_fraction": BANDWIDTH_TARGET}
    report["bandwidth"] = result
    log.line(f"copy bandwidth: {copy['bytes_per_second'] / 1e9:.1f} GB/s (bytes read + written)")
    model, sweep = ("tiny", (2, 8)) if args.dry_run else ("vit_b_16", (2, 4, 8))
    dtypes = (torch.float32, torch.bfloat16)
    for D in sweep:
        for dtype in dtypes:
            for backend in fused_backends(device) + ["torch"]:
                deadline.check(f"bandwidth {model} D={D} {dtype} {backend}")
                try:
                    row = bandwidth_case(model, D, dtype, backend, device, copy["bytes_per_second"], rounds)
                except Exception as error:  # one case's failure must not hide the others
                    what = f"{backend} {model} D={D} {dtype}: {type(error).__name__}: {str(error)[:300]}"
                    log.write(traceback.format_exc())
                    out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
                    (report["problems"] if out_of_memory else report["correctness_failures"]).append(
                        f"bandwidth inputs: {what}")
                    gc.collect()
                    continue
                result["rows"].append(row)
                log.line(f"  {model} D={D} {row['dtype']} {backend}: forward {row['forward_fraction']:.2f} "
                         f"backward {row['backward_fraction']:.2f} of copy; errors {row['gram_error']:.1e} "
                         f"{row['backward_error']:.1e}")
                if not row["correct"]:
                    report["correctness_failures"].append(
                        f"bandwidth inputs: {backend} {model} D={D} {row['dtype']} differs from fp64: Gram "
                        f"{row['gram_error']:.2e} (tolerance {GRAM_TOLERANCE[dtype]:.0e}), backward "
                        f"{row['backward_error']:.2e} (tolerance {BACKWARD_TOLERANCE[dtype]:.0e})")
    if not result["rows"]:
        raise RuntimeError("no bandwidth case ran")
    below = [r for r in result["rows"] if r["backend"] != "torch" and r["forward_fraction"] < BANDWIDTH_TARGET]
    if below and device.type == "cuda":
        report["problems"].append(f"{len(below)} fused forward cases below {BANDWIDTH_TARGET:.0%} of the copy "
                                  "bandwidth (see the bandwidth table)")
    return f"copy {copy['bytes_per_second'] / 1e9:.1f} GB/s; {len(result['rows'])} cases"


# ---------------------------------------------------------------------------------------------
# Steps 4 and 6: the benchmark files.

def run_benchmark_file(report: dict, args, log: Log, deadline: Deadline, path: str, extra: list[str],
                       tables: tuple[str, ...], benchmark_only: bool = True, **environment: str) -> str:
    env = child_env(NIO_FAST_BENCH_RESULTS=str(args.files), **environment)
    if args.dry_run:
        env["NIO_FAST_GRAM_BENCH_SIZE"] = "tiny"
    for table in tables:  # a table left from an earlier run must not pass for this run's
        for suffix in (".json", ".md"):
            (args.files / f"{table}{suffix}").unlink(missing_ok=True)
    code = run_logged([sys.executable, "-m", "pytest", path, *extra, "-q", "-p", "no:cacheprovider",
                       *(["--benchmark-only"] if benchmark_only else [])], log, deadline.left(), env)
    for table in tables:
        written = args.files / f"{table}.json"
        report[table] = json.loads(written.read_text())["rows"] if written.exists() else []
    if code is None:
        raise TimeoutError(f"{path} ran out of the time budget")
    if code != 0:
        raise RuntimeError(f"pytest {path} exited {code}")
    return ", ".join(f"{len(report[t])} {t} rows" for t in tables)


def step_gram(report, args, log, deadline) -> str:
    return run_benchmark_file(report, args, log, deadline, "benchmarks/test_gram.py", [], ("gram", "gram_memory"))


def step_chunk_reduce(report, args, log, deadline) -> str:
    quick = {"NIO_FAST_BENCH_QUICK": "1"} if args.dry_run else {}
    return run_benchmark_file(report, args, log, deadline, "benchmarks/test_chunk_reduce.py", [], ("chunk_reduce",),
                              **quick)


def step_group_norm(report, args, log, deadline) -> str:
    selection = "group_norm and 64x64x8x8" if args.dry_run else "group_norm or attention"
    return run_benchmark_file(report, args, log, deadline, "benchmarks/test_normalization.py", ["-k", selection],
                              ("group_norm", "attention"))


def step_iteration(report, args, log, deadline) -> str:
    extra = ["-k", DRY_RUN_ITERATION_SELECTION] if args.dry_run else []
    return run_benchmark_file(report, args, log, deadline, "benchmarks/test_iteration.py", extra, ("iteration",))


def step_samplewise(report, args, log, deadline) -> str:
    extra = ["-k", DRY_RUN_SAMPLEWISE_SELECTION] if args.dry_run else []
    quick = {"NIO_FAST_BENCH_SAMPLEWISE_QUICK": "1"} if args.dry_run else {}
    # not --benchmark-only: the peak-memory cases (no benchmark fixture) belong to the table too
    return run_benchmark_file(report, args, log, deadline, "benchmarks/test_samplewise.py", extra, ("samplewise",),
                              benchmark_only=False, NIO_FAST_BENCH_DEVICE=args.device.type, **quick)


# ---------------------------------------------------------------------------------------------
# Step 5: NIO iterations on torchvision ResNets, on the GPU.

TORCHVISION_MODELS = ("resnet18", "resnet50")
TORCHVISION_D = (2, 8)
TORCHVISION_BATCH, TORCHVISION_IMAGE = 64, 224


def torchvision_cases(args) -> tuple[list[tuple[str, Callable, int, int, int]], Optional[str]]:
    """(name, model factory, batch, image size, D) cases, and a note when they are replaced."""
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and not args.dry_run:
        return [(name, getattr(torchvision.models, name), TORCHVISION_BATCH, TORCHVISION_IMAGE, D)
                for name in TORCHVISION_MODELS for D in TORCHVISION_D], None
    if not args.dry_run:
        return [], "torchvision is not installed: the torchvision ResNet cases were skipped"
    # A dry run times a CIFAR ResNet-20 at a small batch through the same code.
    from networks import ResNet20
    note = None if torchvision is not None else "torchvision is not installed: a ResNet-20 stood in (dry run)"
    if torchvision is not None:
        return [("resnet18", torchvision.models.resnet18, 4, 32, 2)], note
    return [("resnet20_gn (stand-in)", lambda: ResNet20("group"), 8, 32, 2)], note


def step_torchvision(report: dict, args, log: Log, deadline: Deadline) -> str:
    from test_iteration import nio_fast_iteration, reference_iteration
    from workloads import double_backward_floor, training_step
    device = args.device
    cases, note = torchvision_cases(args)
    result = {"rows": [], "note": note}
    report["torchvision"] = result
    if note:
        log.line(note)
    rounds, warmup = (1, 0) if args.dry_run else (3, 1)
    for name, factory, batch_size, image, D in cases:
        deadline.check(f"torchvision {name} D={D}")
        torch.manual_seed(0)
        model = factory().to(device)
        batch = (torch.randn(batch_size, 3, image, image, device=device),
                 torch.randint(0, 10, (batch_size,), device=device))
        row = {"model": name, "batch": batch_size, "image": image, "D": D, "device": device.type}
        for label, run in (("step", lambda: training_step(model, batch)),
                           ("reference", lambda: reference_iteration(model, batch, D)),
                           ("nio_fast", lambda: nio_fast_iteration(model, batch, D)),
                           ("floor", lambda: double_backward_floor(model, batch))):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            try:
                row[f"{label} s"] = device_seconds(run, device, rounds, warmup)
            except torch.cuda.OutOfMemoryError as error:  # a size problem, not a wrong result
                row[f"{label} s"] = None
                report["problems"].append(f"torchvision {name} D={D} {label}: out of memory: {str(error)[:200]}")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            if device.type == "cuda":
                row[f"{label} peak MB"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["speed-up"] = (row["reference s"] / row["nio_fast s"]) if row["reference s"] and row["nio_fast s"] else None
        # the speed-up of an iteration at the floor (workloads.double_backward_floor)
        row["reference / floor"] = (row["reference s"] / row["floor s"]) if row["reference s"] and row["floor s"] else None
        result["rows"].append(row)
        log.line(f"  {name} D={D}: " + ", ".join(f"{label} {row[f'{label} s']} s"
                                                 for label in ("step", "reference", "nio_fast", "floor")))
        del model, batch
        gc.collect()
    if note:
        return note
    return f"{len(result['rows'])} cases"


# ---------------------------------------------------------------------------------------------
# The report.

def machine_info(device: torch.device) -> dict:
    import harness
    info = harness.machine()
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count,
                    capability=f"{properties.major}.{properties.minor}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            info["driver"] = smi.stdout.strip() or None
    return info


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> list[str]:
    if not rows:
        return ["(none)"]
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def exit_status(report: dict) -> int:
    if report["correctness_failures"]:
        return 1
    if any(step["status"] not in ("ok", "skipped") for step in report["steps"].values()) or report.get("fatal"):
        return 2
    return 0


def render_markdown(report: dict) -> str:
    info = report["machine"]
    status = exit_status(report)
    lines = ["# GPU check" + (" (dry run: tiny sizes)" if report["mode"] == "dry-run" else ""), "",
             f"Measured {info['date']} on {info.get('gpu') or 'no GPU'} ({info['cpu']}, {info['cores']} cores), "
             f"torch {info['torch']} (CUDA {info.get('cuda')}), triton {info['triton']}, Python {info['python']}, "
             f"commit {info['commit']}" + (f", driver {info['driver']}" if info.get("driver") else "")
             + (f", {info['multiprocessors']} SMs, {info['gpu_memory_gib']} GiB" if info.get("multiprocessors") else "")
             + ".", "",
             f"**Result: {'PASS' if status == 0 else 'FAIL' if status == 1 else 'INCOMPLETE'}** (exit status {status})."]
    for failure in report["correctness_failures"]:
        lines.append(f"- correctness: {failure}")
    for problem in report["problems"]:
        lines.append(f"- note: {problem}")
    if report.get("fatal"):
        lines.append(f"- fatal: {report['fatal']}")
    lines += ["", "## Steps", ""]
    lines += markdown_table([{"step": name, **step} for name, step in report["steps"].items()],
                            ["step", "status", "seconds", "summary"])
    if report.get("backends"):
        lines += ["", "## Backends", ""]
        lines += markdown_table([{"backend": name, **entry, "devices": ", ".join(entry["devices"])}
                                 for name, entry in report["backends"].items()])
    tests = report.get("tests")
    if tests:
        lines += ["", "## Correctness tests", "", f"`pytest {' '.join(tests['selection'])}` (exit {tests['pytest_exit']})", ""]
        lines += markdown_table([{k: tests.get(k) for k in ("tests", "passed", "failed", "errors", "skipped")}])
        for failing in tests.get("failing", [])[:40]:
            lines.append(f"- {failing['kind']}: `{failing['test']}` {' '.join(failing['message'])}")
        if tests.get("skip_reasons"):
            lines += ["", "Skip reasons:", ""] + [f"- {n} x {reason}" for reason, n in tests["skip_reasons"].items()]
    bandwidth = report.get("bandwidth")
    if bandwidth:
        copy = bandwidth["copy"]
        lines += ["", "## Bandwidth", "",
                  f"Copy bandwidth: {copy['bytes_per_second'] / 1e9:.1f} GB/s (a {copy['bytes'] / 2**30:.2f} GiB "
                  "device-to-device copy, bytes read plus written per second). Forward: D x m x element size read "
                  "once per second of `ops.gram`; kernel: the same through the backend's own forward, without "
                  "the op layer; backward: those bytes read and as many written, per second of the backward "
                  f"alone. Fractions of the copy bandwidth; target {BANDWIDTH_TARGET:.0%}. Errors against fp64: "
                  "Gram entries over sqrt(G_ii G_jj), backward elements over |S| @ |X|.", ""]
        lines += markdown_table([{
            "model": r["model"], "D": r["D"], "dtype": r["dtype"], "backend": r["backend"],
            "GB": r["gradient_bytes"] / 1e9, "forward ms": r["forward_s"] * 1e3,
            "forward / copy": r["forward_fraction"], "kernel ms": r.get("kernel_forward_s", 0) * 1e3 or None,
            "kernel / copy": r.get("kernel_forward_fraction"), "backward ms": r["backward_s"] * 1e3,
            "backward / copy": r["backward_fraction"], "Gram error": r["gram_error"],
            "backward error": r["backward_error"], "correct": r["correct"]} for r in bandwidth["rows"]])
    for table, title in (("gram", "Gram benchmarks (benchmarks/test_gram.py)"),
                         ("gram_memory", "Gram extra memory (benchmarks/test_gram.py)"),
                         ("chunk_reduce", "Chunk reductions (benchmarks/test_chunk_reduce.py)"),
                         ("group_norm", "GroupNorm's second-order pass (benchmarks/test_normalization.py)"),
                         ("attention", "Attention's second-order pass (benchmarks/test_normalization.py)")):
        if table in report:
            lines += ["", f"## {title}", ""] + markdown_table(report[table])
    torchvision = report.get("torchvision")
    if torchvision:
        lines += ["", "## NIO iteration on torchvision ResNets (GPU-only cases)", ""]
        if torchvision.get("note"):
            lines += [torchvision["note"], ""]
        lines += markdown_table(torchvision["rows"])
    if "iteration" in report:
        lines += ["", "## Iteration benchmarks (benchmarks/test_iteration.py; CPU models)", ""]
        lines += markdown_table(report["iteration"])
    if "samplewise" in report:
        lines += ["", "## Sample-wise GradCosine (benchmarks/test_samplewise.py; models on the device)", ""]
        lines += markdown_table(report["samplewise"])
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    report["exit_status"] = exit_status(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(report))


def parse_args(argv: Optional[list[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                        help="tiny sizes and a small test selection; runs without a GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where gpu_check.md/.json/.log and the gpu_check/ folder go (default benchmarks/results)")
    parser.add_argument("--build", choices=("auto", "always", "never"), default="auto",
                        help="compile nio_fast._C in place: when needed (auto), always, or never")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to skip, of: {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget of the whole run; steps past it are recorded as not run")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(STEPS)
    if unknown:
        parser.error(f"--skip: unknown steps {sorted(unknown)}; steps are {', '.join(STEPS)}")
    return args


DRY_RUN = False  # set by main: a dry run uses one thread everywhere


def main(argv: Optional[list[str]] = None) -> int:
    global DRY_RUN
    args = parse_args(argv)
    if args.dry_run:
        # Numbers of a dry run mean nothing; on a shared machine several threads per process
        # can spin against each other for seconds, so everything runs on one.
        DRY_RUN = True
        torch.set_num_threads(1)
    deadline = Deadline(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    args.files = args.out / "gpu_check"
    args.files.mkdir(exist_ok=True)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = Log(args.out / "gpu_check.log")
    report = {"mode": "dry-run" if args.dry_run else "full", "device": args.device.type,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(args.device), "steps": {}, "correctness_failures": [], "problems": []}
    if args.device.type != "cuda" and not args.dry_run:
        report["fatal"] = "no CUDA device: run with --dry-run to check the plumbing on CPU"
        log.line(report["fatal"])
        write_report(report, args.out)
        return exit_status(report)

    steps = {"build": step_build, "tests": step_tests, "bandwidth": step_bandwidth, "gram": step_gram,
             "chunk_reduce": step_chunk_reduce, "group_norm": step_group_norm, "torchvision": step_torchvision,
             "iteration": step_iteration,
             "samplewise": step_samplewise}
    for name in STEPS:
        if name != "build" and "backends" not in report:  # after the build, which may create _C
            try:
                from nio_fast import availability
                report["backends"] = availability.backends()
            except Exception as error:
                report["backends"] = {}
                report["problems"].append(f"nio_fast does not import: {error}")
        if name in args.skip:
            report["steps"][name] = {"status": "skipped", "seconds": 0.0, "summary": "--skip"}
            continue
        log.line(f"\n=== {name} ===")
        start = time.monotonic()
        try:
            if deadline.left() <= 0:
                raise TimeoutError("time budget spent before it started")
            summary, status = steps[name](report, args, log, deadline), "ok"
        except TimeoutError as error:
            summary, status = str(error), "out of time"
        except Exception as error:  # one broken step must not hide the others' results
            summary, status = f"{type(error).__name__}: {error}", "error"
            log.write(traceback.format_exc())
        report["steps"][name] = {"status": status, "seconds": round(time.monotonic() - start, 1), "summary": summary}
        log.line(f"--- {name}: {status}: {summary}")
        write_report(report, args.out)  # a run cut short still leaves what it measured
    write_report(report, args.out)
    status = exit_status(report)
    log.line(f"\ngpu_check: exit status {status}; report in {args.out / 'gpu_check.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
