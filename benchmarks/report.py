"""Turn one benchmark run's medians into the ratio tables and plot in benchmarks/results/."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import harness
from harness import write_results


def _iteration_rows(rows: list[dict]) -> list[dict]:
    step = {(r["model"], r["batch"]): r["seconds"] for r in rows if r["implementation"] == "step"}
    timed = defaultdict(dict)
    for r in rows:
        if r["implementation"] != "step":
            timed[(r["model"], r["batch"], r["D"])][r["implementation"]] = r["seconds"]
    table = []
    for (model, batch, d), times in sorted(timed.items()):
        reference, fast = times.get("reference"), times.get("nio_fast")
        one_step = step.get((model, batch))
        table.append({
            "model": model, "N": batch, "D": d, "step s": one_step, "reference s": reference, "nio_fast s": fast,
            "speed-up": reference / fast if reference and fast else None,
            "reference / step": reference / one_step if reference and one_step else None,
            "nio_fast / step": fast / one_step if fast and one_step else None,
        })
    return table


def _growth_notes(table: list[dict]) -> str:
    lines = []
    for model in sorted({r["model"] for r in table}):
        by_d = {r["D"]: r for r in table if r["model"] == model and r["N"] == 64}
        if 2 in by_d and 16 in by_d:
            growth = {impl: by_d[16][f"{impl} s"] / by_d[2][f"{impl} s"] for impl in ("reference", "nio_fast")
                      if by_d[16][f"{impl} s"] and by_d[2][f"{impl} s"]}
            lines.append(f"- {model}: time grows x{growth.get('nio_fast', float('nan')):.2f} (nio_fast) and "
                         f"x{growth.get('reference', float('nan')):.2f} (reference) from D = 2 to D = 16.")
    return "\n".join(lines)


def _plot_iteration(table: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = sorted((r for r in table if r["model"] == model and r["N"] == 64), key=lambda r: r["D"])
        for impl, style in (("reference", "o--"), ("nio_fast", "s-")):
            points = [(r["D"], r[f"{impl} s"]) for r in rows if r[f"{impl} s"]]
            if points:
                axis.plot(*zip(*points), style, label=impl)
        steps = [r["step s"] for r in rows if r["step s"]]
        if steps:
            axis.axhline(steps[0], color="grey", lw=0.8, label="one training step")
        axis.set(title=f"{model}, batch 64", xlabel="sub-batches D", ylabel="seconds per iteration", xscale="log")
        axis.set_xticks([2, 4, 8, 16], labels=["2", "4", "8", "16"])
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(harness.RESULTS / "iteration.png", dpi=120)
    plt.close(fig)


def _memory_rows(rows: list[dict]) -> list[dict]:
    step = {r["model"]: r["extra_mb"] for r in rows if r["implementation"] == "step"}
    grouped = defaultdict(dict)
    for r in rows:
        if r["implementation"] != "step":
            grouped[(r["model"], r["D"])][r["implementation"]] = r["extra_mb"]
    return [{"model": model, "D": d, "step MB": step.get(model), "reference MB": m.get("reference"),
             "nio_fast MB": m.get("nio_fast"),
             "nio_fast / reference": m["nio_fast"] / m["reference"] if m.get("nio_fast") and m.get("reference")
             else None}
            for (model, d), m in sorted(grouped.items())]


GRAM_BACKEND_ORDER = {"torch": 0, "triton": 1, "cpp": 2}


def _gram_rows(rows: list[dict]) -> list[dict]:
    """One row per timing, with the reference's median of the same case beside it."""
    def case(r):
        return r["model"], r["D"], r["device"], r["dtype"], r["direction"]

    reference = {case(r): r["seconds"] for r in rows if r["backend"] == "torch"}
    table = []
    for r in sorted(rows, key=lambda r: (case(r), GRAM_BACKEND_ORDER.get(r["backend"], 9))):
        torch_seconds = reference.get(case(r))
        table.append({
            "model": r["model"], "D": r["D"], "device": r["device"], "dtype": r["dtype"],
            "direction": r["direction"], "backend": r["backend"], "rounds": r["rounds"],
            "median s": r["seconds"],
            "torch / backend": torch_seconds / r["seconds"] if torch_seconds and r["seconds"] else None,
            "D·m GB/s": r["gradient_bytes"] / r["seconds"] / 1e9 if r["seconds"] else None,
        })
    return table


def _gram_memory_rows(rows: list[dict]) -> list[dict]:
    def percent(part, whole):
        return 100.0 * part / whole if whole else None

    ordered = sorted(rows, key=lambda r: (r["model"], r["D"], r["device"],
                                          GRAM_BACKEND_ORDER.get(r["backend"], 9), r["method"]))
    return [{"model": r["model"], "D": r["D"], "device": r["device"], "backend": r["backend"],
             "measured by": r["method"], "D·m MB": r["gradient_bytes"] / 2**20,
             "forward extra MB": r["forward_extra_bytes"] / 2**20,
             "forward extra % of D·m": percent(r["forward_extra_bytes"], r["gradient_bytes"]),
             "fwd+bwd extra MB": r["forward_backward_extra_bytes"] / 2**20,
             "fwd+bwd extra % of D·m": percent(r["forward_backward_extra_bytes"], r["gradient_bytes"])}
            for r in ordered]


GRAM_NOTES = ("torch / backend: the reference's median over this backend's, measured side by side in one "
              "run (> 1: faster than the reference). D·m GB/s: the gradients' bytes (D x m x element size) "
              "over the median, for either direction. rounds: timed calls behind each median (on CPU, above 512 "
              "MiB of gradients, one for the reference and three for the fused backends, with no warm-up: "
              "every call there pays its page faults anyway, and one call of the reference takes seconds). On CPU "
              "the fused forward+backward is mostly the kernel zero-filling fresh pages for the D x m gradients "
              "it returns (system time), which varies with whether glibc reuses freed memory.")

GRAM_MEMORY_NOTES = ("Extra: bytes the op allocates beyond its inputs and its results (G, and for the backward the "
                     "D x m input gradients it returns), at its peak; % of the D x m gradient bytes (target for "
                     "the fused backends: under 1 %). 'peak RSS, fresh process': the resident high-water mark "
                     "(reset through /proc/self/clear_refs; glibc's mmap threshold fixed at 64 KiB so freed "
                     "blocks are returned, not silently reused), which sees every allocation; 'allocator events "
                     "(profiler)': the peak of the running sum of the CPU allocator's events in "
                     "torch.profiler(profile_memory=True), which sees tensors only; 'CUDA allocator peak': "
                     "torch.cuda.max_memory_allocated above the allocation before the call. On CPU one fresh process "
                     "per model and D measures its backends in turn, the fused ones first, and the reference only "
                     "up to 1 GiB of gradients: its fraction does not depend on size.")


def _redirect_results() -> None:
    """NIO_FAST_BENCH_RESULTS=DIR sends the tables there instead of benchmarks/results (gpu_check)."""
    override = os.environ.get("NIO_FAST_BENCH_RESULTS")
    if override:
        harness.RESULTS = Path(override)  # harness.write_results reads the module attribute


def write_tables(tables: dict[str, list[dict]], machine: dict) -> None:
    _redirect_results()
    table = _iteration_rows(tables.get("iteration", []))
    if table:  # (training steps alone make no rows)
        write_results("iteration", table, list(table[0]), "Seconds per NIO iteration (medians)",
                      notes="speed-up = reference / nio_fast; '/ step' = in units of one training step "
                            "(forward + backward) on the same batch.\n\n" + _growth_notes(table))
        _plot_iteration(table)
    table = _memory_rows(tables.get("memory", []))
    if table:
        write_results("memory", table, list(table[0]), "Peak resident memory of one iteration, fresh process (MB "
                      "above the process with model and batch built; CPU, 1 thread)")
    if tables.get("gram"):
        table = _gram_rows(tables["gram"])
        write_results("gram", table, list(table[0]), "Seconds of nio_fast.ops.gram (medians) on "
                      "ResNet-50- and ViT-B/16-shaped gradients", notes=GRAM_NOTES)
    if tables.get("gram_memory"):
        table = _gram_memory_rows(tables["gram_memory"])
        write_results("gram_memory", table, list(table[0]), "Extra memory of nio_fast.ops.gram",
                      notes=GRAM_MEMORY_NOTES)
    for name, rows in tables.items():
        if name not in ("iteration", "memory", "gram", "gram_memory") and rows:
            write_results(name, rows, list(rows[0]), name)
