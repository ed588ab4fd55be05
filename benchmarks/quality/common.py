"""The multi-seed quality runner shared by the three experiments of benchmarks/quality.

One experiment = one model on one digits layout, a list of initialization methods and a
training recipe. For every seed, each method starts from the same PyTorch default draw
(``torch.manual_seed(seed)`` before building), optionally redraws it (Kaiming, FMP), then
optionally rescales it with ``nio_fast.initialize`` (GradInit, NIO). The initialized model is
then trained once per learning rate, on batches in the same order for every method. The
training loop, the loss/accuracy helpers and the statistics come from nio_fast.demo.

Outputs (in ``--out``, default benchmarks/results): ``quality_<name>.json`` (machine,
versions, date, configuration, every run), ``quality_<name>.md`` (the table) and
``quality_<name>.png`` (training curves and the learned methods' histories).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import nio_fast
from nio_fast.data import digits_loader, digits_tensors
from nio_fast.demo import accuracy, json_safe, mean_and_spread, mean_loss, moving_average, train_for_steps

from benchmarks.harness import RESULTS, machine

# Seeds of the fixed batches, apart from the training seeds (as in nio_fast.demo), so that no
# run sees its GradCosine batch or its initialization batches first.
GRADCOSINE_BATCH_SEED = 10_000
INIT_DATA_SEED_OFFSET = 5_000
# The models are tiny: a second thread buys little and the machine is shared (see demo.py).
THREADS = 1
# A run "failed" when it never left chance level or blew up; see `training_failed`.
CHANCE_ACCURACY_MARGIN = 0.2

Optimizers = Callable[[Sequence[nn.Parameter], float], torch.optim.Optimizer]
Schedulers = Callable[[torch.optim.Optimizer, int], Optional[torch.optim.lr_scheduler.LRScheduler]]


@dataclass(frozen=True)
class Method:
    """One way to initialize: an optional redraw, then an optional learned rescaling.

    ``redraw(model, generator)`` changes the PyTorch default draw in place (None keeps it);
    ``learned`` is ``"nio"``, ``"gradinit"`` or None; ``settings`` are the keyword arguments of
    ``nio_fast.initialize`` besides model, data, method, progress and seed.
    """

    key: str
    label: str
    redraw: Optional[Callable[[nn.Module, torch.Generator], None]] = None
    learned: Optional[str] = None
    settings: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (the redraw by its function name)."""
        return {"key": self.key, "label": self.label,
                "redraw": getattr(self.redraw, "__name__", None) if self.redraw else None,
                "learned": self.learned, "settings": dict(self.settings)}


@dataclass
class Experiment:
    """Everything one experiment's numbers depend on."""

    name: str
    title: str
    build_model: Callable[[], nn.Module]
    layout: str
    methods: list[Method]
    make_optimizer: Optimizers
    optimizer_description: str
    learning_rates: list[float]
    seeds: int
    steps: int
    batch_size: int
    init_batch_size: int
    early_step: int
    gradcosine_batch_size: int
    make_scheduler: Optional[Schedulers] = None
    failure_column: str = "failed runs"
    # Drop each epoch's short last batch (with BatchNorm, a 3-sample batch would feed the
    # running statistics a poor estimate).
    drop_last: bool = False
    # Quick runs only: measure losses and accuracy on the first this-many samples of each split
    # (a full-split forward of the 32x32 ResNet takes about a second).
    eval_samples: Optional[int] = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The configuration as written into the JSON."""
        return {
            "name": self.name, "title": self.title, "layout": self.layout,
            "methods": [method.describe() for method in self.methods],
            "optimizer": self.optimizer_description, "learning_rates": self.learning_rates,
            "seeds": self.seeds, "steps": self.steps, "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "init_batch_size": self.init_batch_size, "early_step": self.early_step,
            "gradcosine_batch_size": self.gradcosine_batch_size, "eval_samples": self.eval_samples,
        }


@dataclass
class RunResult:
    """One (seed, method, learning rate) run."""

    seed: int
    method: str
    lr: float
    gradcosine_start: float
    gradnorm_start: float
    init_seconds: float
    loss_start: float
    loss_early: float
    loss_final: float
    test_accuracy: float
    failed: bool
    step_losses: list[float]
    gradcosine_before_init: Optional[float] = None
    report: Optional[dict[str, Any]] = None


def training_failed(step_losses: Sequence[float], loss_start: float, loss_final: float,
                    test_accuracy: float) -> bool:
    """The run diverged or never trained: a non-finite training loss at any step, a final
    training-set loss no lower than at the start, or test accuracy within 10 points of chance
    (<= 20% on 10 classes)."""
    return (not all(math.isfinite(loss) for loss in step_losses)
            or not math.isfinite(loss_final) or loss_final >= loss_start
            or test_accuracy <= CHANCE_ACCURACY_MARGIN)


def _initialize(experiment: Experiment, method: Method, model: nn.Module, seed: int,
                gradcosine_batch) -> tuple[Optional[float], Optional[dict[str, Any]]]:
    """Apply ``method`` in place; return (GradCosine before learning, report) for learned ones."""
    if method.redraw is not None:
        method.redraw(model, torch.Generator().manual_seed(seed))
    if method.learned is None:
        return None, None
    before = nio_fast.gradcosine(model, gradcosine_batch).value.item()
    data = digits_loader("train", experiment.layout, batch_size=experiment.init_batch_size,
                         seed=seed + INIT_DATA_SEED_OFFSET, drop_last=True)
    report = nio_fast.initialize(model, data, method=method.learned, progress=False, seed=seed,
                                 **method.settings)
    return before, report.to_dict()


def run_experiment(experiment: Experiment, log: Callable[[str], None] = print) -> list[RunResult]:
    """Every (seed, method, learning rate) run, on one thread; ``log`` gets a line per run."""
    train_set = tuple(tensor[:experiment.eval_samples] for tensor in digits_tensors("train", experiment.layout))
    test_set = tuple(tensor[:experiment.eval_samples] for tensor in digits_tensors("test", experiment.layout))
    gradcosine_batch = next(iter(digits_loader(
        "train", experiment.layout, batch_size=experiment.gradcosine_batch_size, seed=GRADCOSINE_BATCH_SEED)))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    results = []
    try:
        for seed in range(experiment.seeds):
            for method in experiment.methods:
                torch.manual_seed(seed)
                model = experiment.build_model()
                started = time.perf_counter()
                before, report = _initialize(experiment, method, model, seed, gradcosine_batch)
                init_seconds = time.perf_counter() - started
                start = nio_fast.gradcosine(model, gradcosine_batch)
                loss_start = mean_loss(model, *train_set)
                for lr in experiment.learning_rates:
                    trained = copy.deepcopy(model)
                    optimizer = experiment.make_optimizer(trained.parameters(), lr)
                    scheduler = (experiment.make_scheduler(optimizer, experiment.steps)
                                 if experiment.make_scheduler else None)
                    loader = digits_loader("train", experiment.layout, batch_size=experiment.batch_size, seed=seed,
                                           drop_last=experiment.drop_last)
                    step_losses, loss_early = train_for_steps(
                        trained, loader, optimizer, experiment.steps, early_step=experiment.early_step,
                        early_eval_set=train_set, scheduler=scheduler)
                    loss_final = mean_loss(trained, *train_set)
                    test_accuracy = accuracy(trained, *test_set)
                    result = RunResult(
                        seed=seed, method=method.key, lr=lr, gradcosine_start=start.value.item(),
                        gradnorm_start=start.gnorm.item(), init_seconds=init_seconds, loss_start=loss_start,
                        loss_early=loss_early, loss_final=loss_final, test_accuracy=test_accuracy,
                        failed=training_failed(step_losses, loss_start, loss_final, test_accuracy),
                        step_losses=step_losses, gradcosine_before_init=before, report=report)
                    results.append(result)
                    log(f"seed {seed} {method.key:<24} lr {lr:g}: GradCosine {result.gradcosine_start:.3f}, "
                        f"init {init_seconds:.1f} s, loss {loss_start:.3f} -> {loss_final:.3f}, "
                        f"test accuracy {100 * test_accuracy:.1f}%" + (" FAILED" if result.failed else ""))
    finally:
        torch.set_num_threads(threads)
    return results


SUMMARY_METRICS = ("gradcosine_start", "gradnorm_start", "init_seconds", "loss_start", "loss_early",
                   "loss_final", "test_accuracy")


def summarize(experiment: Experiment, results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (method, learning rate): mean and std over seeds of every metric (over the
    finite values; ``<metric>_nonfinite`` counts the others) and the number of failed runs."""
    rows = []
    for method in experiment.methods:
        for lr in experiment.learning_rates:
            runs = [run for run in results if run.method == method.key and run.lr == lr]
            row: dict[str, Any] = {"method": method.key, "label": method.label, "lr": lr, "runs": len(runs),
                                   "failed": sum(run.failed for run in runs)}
            for metric in SUMMARY_METRICS:
                values = [getattr(run, metric) for run in runs]
                finite = [value for value in values if math.isfinite(value)]
                mean, spread = mean_and_spread(finite) if finite else (math.nan, math.nan)
                row[metric] = {"mean": mean, "std": spread}
                row[f"{metric}_nonfinite"] = len(values) - len(finite)
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], metric: str, digits: int, percent: bool = False) -> str:
    mean, spread = row[metric]["mean"], row[metric]["std"]
    if percent:
        mean, spread = 100 * mean, 100 * spread
    text = "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {spread:.{digits}f}"
    nonfinite = row[f"{metric}_nonfinite"]
    return text + (f" ({nonfinite} non-finite)" if nonfinite else "")


def markdown_table(experiment: Experiment, rows: list[dict[str, Any]]) -> str:
    """The results table: mean ± std over seeds; a learning-rate column when there are several."""
    several_rates = len(experiment.learning_rates) > 1
    header = ["method"] + (["Adam lr" if "Adam" in experiment.optimizer_description else "lr"]
                           if several_rates else [])
    header += ["GradCosine@init", "grad norm@init", "init s", "train loss@init",
               f"train loss@{experiment.early_step}", f"train loss@{experiment.steps}", "test acc %",
               experiment.failure_column]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]] + ([f"{row['lr']:g}"] if several_rates else [])
        cells += [_cell(row, "gradcosine_start", 3), _cell(row, "gradnorm_start", 2), _cell(row, "init_seconds", 2),
                  _cell(row, "loss_start", 3), _cell(row, "loss_early", 3), _cell(row, "loss_final", 3),
                  _cell(row, "test_accuracy", 1, percent=True), f"{row['failed']}/{row['runs']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _settings_text(method: Method) -> str:
    if method.learned is None:
        return "no learning"
    shown = {"iters": 100, "gamma": None, "lr": 0.05, "sub_batches": 2, "objective": "gc"} if method.learned == "nio" \
        else {"iters": 100, "gamma": None, "lr": 0.05, "inner": "sgd", "eta": 0.1}
    shown.update(method.settings)
    return ", ".join(f"{key} {'measured on the first batch' if key == 'gamma' and value is None else value}"
                     for key, value in shown.items())


def markdown_report(experiment: Experiment, rows: list[dict[str, Any]], info: dict[str, Any],
                    total_seconds: float, cpu_seconds: float) -> str:
    """The whole Markdown page: provenance, recipe, method settings, table, notes."""
    lines = [
        f"# {experiment.title}", "",
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, {THREADS} torch thread), "
        f"Python {info['python']}, torch {info['torch']}, nio_fast commit {info['commit']}; "
        f"{total_seconds:.0f} s wall clock in all, {cpu_seconds:.0f} s of CPU time (the machine is shared: "
        "wall time grows with its load, CPU time much less).", "",
        f"Training: {experiment.optimizer_description}, {experiment.steps} steps of batch {experiment.batch_size}"
        + (" (each epoch's short last batch dropped)" if experiment.drop_last else "") + ", "
        f"{experiment.seeds} seeds (0..{experiment.seeds - 1}); learned initializations use batches of "
        f"{experiment.init_batch_size}. GradCosine and the mean sub-batch gradient norm at init are measured "
        f"on one fixed training batch of {experiment.gradcosine_batch_size} (2 sub-batches). *init s*: wall "
        "time of the redraw and of nio_fast.initialize, for learned methods with one GradCosine evaluation "
        "before it (the shared machine's load inflates it). Cells: mean ± "
        "standard deviation over seeds. A run *failed* when a training loss was non-finite, the final "
        "training-set loss was not below the loss at init, or test accuracy was <= 20% (chance: 10%).", "",
        "Methods:", "",
    ]
    lines += [f"- **{method.label}**: {_settings_text(method)}" for method in experiment.methods]
    lines += ["", markdown_table(experiment, rows), ""]
    if experiment.notes:
        lines += [experiment.notes, ""]
    return "\n".join(lines)


def plot(experiment: Experiment, results: list[RunResult], path: Path) -> None:
    """Training-loss curves (median over seeds, band = min..max; one panel per learning rate),
    then NIO's GradCosine and GradInit's loss per initialization iteration (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned_kinds = [kind for kind in ("nio", "gradinit")
                     if any(method.learned == kind for method in experiment.methods)]
    curve_panels, history_panels = len(experiment.learning_rates), len(learned_kinds)
    # One row when it fits in three panels, else the curves above the histories.
    if curve_panels + history_panels <= 3:
        rows, columns = 1, curve_panels + history_panels
    else:
        rows, columns = 2, max(curve_panels, history_panels)
    figure, grid = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.5 * rows), squeeze=False)
    panels = list(grid.flat)
    curve_axes = panels[:curve_panels]
    history_axes = panels[curve_panels:curve_panels + history_panels] if rows == 1 else \
        panels[columns:columns + history_panels]
    for unused in panels:
        if unused not in curve_axes and unused not in history_axes:
            unused.set_visible(False)
    window = max(1, experiment.steps // 40)
    colors = {method.key: f"C{index % 10}" for index, method in enumerate(experiment.methods)}
    for axis, lr in zip(curve_axes, experiment.learning_rates):
        for method in experiment.methods:
            curves = [moving_average(run.step_losses, window) for run in results
                      if run.method == method.key and run.lr == lr]
            if not curves:
                continue
            runs = torch.stack(curves).clamp(max=1e3)  # an exploded run would flatten the others
            steps = torch.arange(1, runs.shape[1] + 1)
            axis.plot(steps, runs.nanmedian(0).values, label=method.label, color=colors[method.key])
            axis.fill_between(steps, runs.min(0).values, runs.max(0).values, color=colors[method.key], alpha=0.06)
        axis.set(xlabel="training step", ylabel=f"training loss (moving average of {window})", yscale="log",
                 title=f"{experiment.name}, lr {lr:g}: median of {experiment.seeds} seeds")
        axis.legend(fontsize=7)
    titles = {"nio": ("gradcosine", "NIO: GradCosine on each iteration's batch"),
              "gradinit": ("loss", "GradInit: loss on each iteration's first batch")}
    for axis, kind in zip(history_axes, learned_kinds):
        key, title = titles[kind]
        for method in experiment.methods:
            histories = [torch.tensor([entry[key] for entry in run.report["history"]], dtype=torch.float64)
                         for run in results if run.method == method.key and run.lr == experiment.learning_rates[0]
                         and method.learned == kind and run.report and run.report["history"]]
            if not histories:
                continue
            length = min(len(history) for history in histories)
            mean = torch.stack([history[:length] for history in histories]).mean(0)
            axis.plot(range(1, length + 1), moving_average(mean.tolist(), 5), color=colors[method.key],
                      label=method.label)
        axis.set(xlabel="initialization iteration", ylabel=key,
                 title=f"{title}\n(mean over seeds, moving average of 5)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def results_from_json(path: Path) -> list[RunResult]:
    """The runs of a written quality_<name>.json (null, written for NaN or infinity, back to NaN)."""
    record = json.loads(Path(path).read_text())
    runs = []
    for run in record["runs"]:
        run = {key: math.nan if value is None and key not in ("gradcosine_before_init", "report") else value
               for key, value in run.items()}
        run["step_losses"] = [math.nan if loss is None else loss for loss in run["step_losses"]]
        runs.append(RunResult(**run))
    return runs


def write_outputs(experiment: Experiment, results: list[RunResult], out: Path,
                  total_seconds: float, cpu_seconds: float) -> dict[str, Path]:
    """Write quality_<name>.json, .md and .png into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["torch_threads"] = THREADS
    rows = summarize(experiment, results)
    paths = {suffix: out / f"quality_{experiment.name}.{suffix}" for suffix in ("json", "md", "png")}
    record = {"machine": info, "config": experiment.to_dict(), "total_seconds": total_seconds,
              "cpu_seconds": cpu_seconds,
              "summary": rows, "runs": [dataclasses.asdict(run) for run in results]}
    paths["json"].write_text(json.dumps(json_safe(record), indent=1) + "\n")
    paths["md"].write_text(markdown_report(experiment, rows, info, total_seconds, cpu_seconds))
    plot(experiment, results, paths["png"])
    return paths


def render(experiment: Experiment, out: Path) -> dict[str, Path]:
    """Rewrite quality_<name>.md and .png from the quality_<name>.json in ``out`` (same numbers,
    current formatting); seeds, steps and learning rates are the JSON's."""
    json_path = out / f"quality_{experiment.name}.json"
    record = json.loads(json_path.read_text())
    config = record["config"]  # the run's own budget, not the script's current one
    experiment.seeds, experiment.steps = config["seeds"], config["steps"]
    experiment.learning_rates, experiment.drop_last = config["learning_rates"], config.get("drop_last", False)
    results = results_from_json(json_path)
    paths = {"json": json_path, "md": json_path.with_suffix(".md"), "png": json_path.with_suffix(".png")}
    paths["md"].write_text(markdown_report(experiment, summarize(experiment, results), record["machine"],
                                           record["total_seconds"], record.get("cpu_seconds", math.nan)))
    plot(experiment, results, paths["png"])
    return paths


def main(build: Callable[[bool], Experiment], argv: Optional[Sequence[str]] = None) -> int:
    """Command line of one experiment: ``build(quick)`` gives its configuration."""
    parser = argparse.ArgumentParser(description=(build.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (2 seeds, a few steps)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    parser.add_argument("--render", action="store_true",
                        help="no training: rewrite the .md and .png from the .json already in --out")
    args = parser.parse_args(argv)
    experiment = build(args.quick)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        experiment.seeds = args.seeds
    if args.render:
        paths = render(experiment, args.out)
        print(paths["md"].read_text())
        return 0
    started, cpu_started = time.perf_counter(), time.process_time()
    results = run_experiment(experiment, log=(lambda line: None) if args.quiet
                             else (lambda line: print(line, file=sys.stderr, flush=True)))
    total_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    paths = write_outputs(experiment, results, args.out, total_seconds, cpu_seconds)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())} "
          f"({total_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU)")
    return 0
