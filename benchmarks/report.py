"""Turn one benchmark run's medians into the ratio tables and plot in benchmarks/results/."""
from __future__ import annotations

import functools
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

import harness
from harness import write_results


def _iteration_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, N, D). Each implementation's '/ step' divides by the median of the
    training steps timed between its own rounds (``step_seconds``); 'step s' shows nio_fast's.
    The floor (``D=None`` rows, one per model and N) is set beside every D of its model and N."""
    timed, steps, floors = defaultdict(dict), defaultdict(dict), {}
    for r in rows:
        if r["implementation"] == "floor":
            floors[(r["model"], r["batch"])] = r
            continue
        key = (r["model"], r["batch"], r["D"])
        timed[key][r["implementation"]] = r["seconds"]
        steps[key][r["implementation"]] = r.get("step_seconds")

    def per_step(key, implementation):
        seconds, step = timed[key].get(implementation), steps[key].get(implementation)
        return seconds / step if seconds and step else None

    table = []
    for key, times in sorted(timed.items()):
        model, batch, d = key
        reference, fast = times.get("reference"), times.get("nio_fast")
        recompute = times.get("nio_fast_recompute")
        floor = floors.get((model, batch), {})
        floor_steps = _ratio(floor.get("seconds"), floor.get("step_seconds"))
        reference_steps, fast_steps = per_step(key, "reference"), per_step(key, "nio_fast")
        table.append({
            "model": model, "N": batch, "D": d, "step s": steps[key].get("nio_fast"), "reference s": reference,
            "nio_fast s": fast, "speed-up": reference / fast if reference and fast else None,
            "reference / step": reference_steps, "nio_fast / step": fast_steps, "floor / step": floor_steps,
            "nio_fast / floor": _ratio(fast_steps, floor_steps),
            "reference / floor": _ratio(reference_steps, floor_steps),
            "exact_recompute / reference": recompute / reference if recompute and reference else None,
        })
    return table


def _growth_notes(table: list[dict]) -> str:
    lines = []
    for model in sorted({r["model"] for r in table}):
        by_d = {r["D"]: r for r in table if r["model"] == model and r["N"] == 64}
        if 2 in by_d and 16 in by_d:
            def growth(column):
                first, last = by_d[2][column], by_d[16][column]
                return f"x{last / first:.2f}" if first and last else "x?"
            # Seconds are timed minutes apart on a machine whose speed drifts; in training steps
            # timed beside each case the drift cancels.
            lines.append(f"- {model}: time grows {growth('nio_fast s')} (nio_fast) and {growth('reference s')} "
                         f"(reference) from D = 2 to D = 16; in training steps {growth('nio_fast / step')} and "
                         f"{growth('reference / step')}.")
        at_4 = by_d.get(4, {})
        if at_4.get("floor / step") and at_4.get("reference / floor"):
            lines.append(f"- {model}: the floor takes {at_4['floor / step']:.2f} training steps; at D = 4 nio_fast "
                         f"is {at_4['nio_fast / floor']:.2f}x the floor, and an iteration AT the floor would be "
                         f"{at_4['reference / floor']:.2f}x faster than the reference (nio_fast: "
                         f"{at_4['speed-up']:.2f}x).")
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
        floors = [r["floor / step"] * r["step s"] for r in rows if r["floor / step"] and r["step s"]]
        if floors:
            axis.axhline(floors[0], color="grey", lw=0.8, ls="--", label="double-backward floor")
        axis.set(title=f"{model}, batch 64", xlabel="sub-batches D", ylabel="seconds per iteration", xscale="log")
        axis.set_xticks([2, 4, 8, 16], labels=["2", "4", "8", "16"])
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(harness.RESULTS / "iteration.png", dpi=120)
    plt.close(fig)


def _memory_rows(rows: list[dict]) -> list[dict]:
    step = {r["model"]: r["extra_mb"] for r in rows if r["implementation"] == "step"}
    grouped, allocated, spread = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for r in rows:
        if r["implementation"] != "step":
            key = (r["model"], r["D"])
            grouped[key][r["implementation"]] = r["extra_mb"]
            allocated[key][r["implementation"]] = r.get("allocated_mb")
            runs = r.get("extra_mb_runs") or []
            spread[key][r["implementation"]] = f"{min(runs):.0f}-{max(runs):.0f}" if runs else None

    def ratio(m, implementation):
        return m[implementation] / m["reference"] if m.get(implementation) and m.get("reference") else None

    return [{"model": model, "D": d, "step MB": step.get(model), "reference MB": m.get("reference"),
             "nio_fast MB": m.get("nio_fast"), "nio_fast / reference": ratio(m, "nio_fast"),
             "nio_fast MB runs": spread[(model, d)].get("nio_fast"),
             "reference MB runs": spread[(model, d)].get("reference"),
             "nio_fast alloc / reference alloc": ratio(allocated[(model, d)], "nio_fast"),
             "exact_recompute MB": m.get("nio_fast_recompute"),
             "exact_recompute / reference": ratio(m, "nio_fast_recompute")}
            for (model, d), m in sorted(grouped.items())]


BACKEND_ORDER = {"native": -1, "torch": 0, "triton": 1, "cpp": 2}


def _beside_reference(rows: list[dict], case, reference_backend: str = "torch"):
    """``(row, reference / backend)`` in case and backend order: each timing against the
    ``reference_backend``'s median of the same case (None where that is missing)."""
    reference_seconds = {case(r): r["seconds"] for r in rows if r["backend"] == reference_backend}
    for r in sorted(rows, key=lambda r: (case(r), BACKEND_ORDER.get(r["backend"], 9))):
        reference = reference_seconds.get(case(r))
        yield r, reference / r["seconds"] if reference and r["seconds"] else None


# table of benchmarks/test_normalization.py -> (layer, PyTorch's function, what its notes add)
NORMALIZATION_TABLES = {"group_norm": ("GroupNorm", "F.group_norm", "8 groups."),
                        "batch_norm": ("BatchNorm", "F.batch_norm", "Batch statistics, no running buffers."),
                        "layer_norm": ("LayerNorm", "F.layer_norm", "Normalised over the last axis (features)."),
                        "attention": ("Attention", "F.scaled_dot_product_attention",
                                      "Shapes [batch, heads, tokens, head width], no mask; native runs PyTorch's "
                                      "math path (its one twice-differentiable attention). cpp: the softmax part of "
                                      "the double backward in one fused pass (csrc/attention.cpp).")}


def _normalization_rows(rows: list[dict]) -> list[dict]:
    """One row per timing, with PyTorch's ("native") median of the same case beside it."""
    def case(r):
        return r["shape"], r["device"], r["order"]

    return [{"shape": r["shape"], "device": r["device"], "order": r["order"], "backend": r["backend"],
             "median s": r["seconds"], "native / backend": ratio}
            for r, ratio in _beside_reference(rows, case, reference_backend="native")]


def _chunk_reduce_rows(rows: list[dict]) -> list[dict]:
    """One row per timing, with the dense twin's median of the same case beside it."""
    def case(r):
        return r["op"], r["N"], r["D"], r["K"], r["overlap"], r["device"], r["direction"]

    return [{"op": r["op"], "N": r["N"], "D": r["D"], "K": r["K"], "overlap": r["overlap"], "device": r["device"],
             "direction": r["direction"], "backend": r["backend"], "median s": r["seconds"], "torch / backend": ratio}
            for r, ratio in _beside_reference(rows, case)]


def _gram_rows(rows: list[dict]) -> list[dict]:
    """One row per timing, with the reference's median of the same case beside it."""
    def case(r):
        return r["model"], r["D"], r["device"], r["dtype"], r["direction"]

    return [{"model": r["model"], "D": r["D"], "device": r["device"], "dtype": r["dtype"],
             "direction": r["direction"], "backend": r["backend"], "rounds": r["rounds"], "median s": r["seconds"],
             "torch / backend": ratio,
             "D·m GB/s": r["gradient_bytes"] / r["seconds"] / 1e9 if r["seconds"] else None}
            for r, ratio in _beside_reference(rows, case)]


def _gram_memory_rows(rows: list[dict]) -> list[dict]:
    def percent(part, whole):
        return 100.0 * part / whole if whole else None

    ordered = sorted(rows, key=lambda r: (r["model"], r["D"], r["device"],
                                          BACKEND_ORDER.get(r["backend"], 9), r["method"]))
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


SAMPLEWISE_TARGETS = {"N": 64, "steps": 5.0, "memory": 2.0, "growth": (16, 256, 2.0)}


def _ratio(part, whole):
    return part / whole if part is not None and whole else None


def _samplewise_rows(timing: list[dict], memory: list[dict]) -> list[dict]:
    """One row per model and N: seconds and peak MB of a training step, sample-wise GradCosine with
    its backward (factors) and the vmap baseline, their ratios, and why a case was skipped."""
    seconds, megabytes, allocated, routes = defaultdict(dict), defaultdict(dict), defaultdict(dict), {}
    steps = defaultdict(dict)  # the median training step timed between each call's rounds
    skipped = defaultdict(lambda: defaultdict(list))  # (model, N) -> reason -> ["seconds", "memory"]
    for r in timing:
        seconds[(r["model"], r["N"])][r["implementation"]] = r.get("seconds")
        steps[(r["model"], r["N"])][r["implementation"]] = r.get("step_seconds")
        if r.get("routes"):
            routes[(r["model"], r["N"])] = r["routes"]
    for r in memory:
        megabytes[(r["model"], r["N"])][r["implementation"]] = r.get("extra_mb")
        allocated[(r["model"], r["N"])][r["implementation"]] = r.get("allocated_mb")
    for rows, measure in ((timing, "seconds"), (memory, "memory")):
        for r in rows:
            if r.get("skipped"):
                skipped[(r["model"], r["N"])][r["skipped"]].append(measure)
    table = []
    for model, n in sorted(set(seconds) | set(megabytes)):
        s, m, a = seconds[(model, n)], megabytes[(model, n)], allocated[(model, n)]
        per_step = functools.partial(_per_step, s, steps[(model, n)])
        table.append({
            "model": model, "N": n, "step s": s.get("step"), "sample-wise s": s.get("samplewise"),
            "vmap s": s.get("vmap_samples"), "floor s": s.get("floor"),
            "sample-wise / step": per_step("samplewise"), "floor / step": per_step("floor"),
            "vmap / sample-wise": _ratio(s.get("vmap_samples"), s.get("samplewise")),
            "step MB": m.get("step"), "sample-wise MB": m.get("samplewise"), "vmap MB": m.get("vmap_samples"),
            "floor MB": m.get("floor"), "sample-wise MB / step MB": _ratio(m.get("samplewise"), m.get("step")),
            "step alloc MB": a.get("step"), "sample-wise alloc MB": a.get("samplewise"),
            "vmap alloc MB": a.get("vmap_samples"), "floor alloc MB": a.get("floor"),
            "sample-wise alloc / step alloc": _ratio(a.get("samplewise"), a.get("step")),
            "floor alloc / step alloc": _ratio(a.get("floor"), a.get("step")),
            **{column: value for implementation, name in VARIANT_COLUMNS.items()
               for column, value in _variant_columns(name, implementation, s, m, a, per_step).items()},
            "routes (sample-wise)": routes.get((model, n)),
            "skipped": "; ".join(f"{reason} ({', '.join(measures)})"
                                 for reason, measures in skipped[(model, n)].items()) or None,
        })
    return table


RECOMPUTED = {  # implementation suffix: (column suffix, what its sentence says is recomputed)
    "_recompute": ("recompute", "every residual block / encoder layer"),
    "_recompute_half": ("half recompute", "the first half of the residual blocks / encoder layers"),
}
NIO_ITERATION = "NIO iteration"  # column prefix of nio_samples: one sample-wise NIO iteration
VARIANT_COLUMNS = {  # implementation: its columns' prefix
    **{f"samplewise{suffix}": name for suffix, (name, _) in RECOMPUTED.items()},
    "nio_samples": NIO_ITERATION,
    **{f"nio_samples{suffix}": f"{NIO_ITERATION}, {name}" for suffix, (name, _) in RECOMPUTED.items()},
}


def _per_step(seconds: dict, steps: dict, implementation: str) -> Optional[float]:
    """A call's seconds over the training steps timed beside it; rows without them (older runs):
    over the step case."""
    return _ratio(seconds.get(implementation), steps.get(implementation) or seconds.get("step"))


def _variant_columns(name: str, implementation: str, s: dict, m: dict, a: dict, per_step) -> dict:
    return {f"{name} s": s.get(implementation), f"{name} / step": per_step(implementation),
            f"{name} MB": m.get(implementation), f"{name} alloc MB": a.get(implementation),
            f"{name} MB / step MB": _ratio(m.get(implementation), m.get("step")),
            f"{name} alloc / step alloc": _ratio(a.get(implementation), a.get("step"))}


def _verdict(value, limit: float, strict: bool = False) -> str:
    if value is None:
        return "not measured"
    return "met" if (value < limit if strict else value <= limit) else "MISSED"


def _samplewise_notes(table: list[dict]) -> str:
    """Per model: the growth of the sample-wise time over N and the targets' verdicts."""
    n_target, (low, high, growth_limit) = SAMPLEWISE_TARGETS["N"], SAMPLEWISE_TARGETS["growth"]
    lines = []
    for model in sorted({r["model"] for r in table}):
        rows = {r["N"]: r for r in table if r["model"] == model}
        # Growth in training steps: a step itself grows about N-fold, so "less than 2x" can only
        # mean the cost relative to the step it replaces; the absolute growth is given beside it.
        timed = sorted(n for n, r in rows.items() if r["sample-wise / step"])

        def growth_between(first: int, last: int) -> tuple[float, float]:
            return (rows[last]["sample-wise / step"] / rows[first]["sample-wise / step"],
                    rows[last]["sample-wise s"] / rows[first]["sample-wise s"])
        if low in timed and high in timed:
            growth, seconds = growth_between(low, high)
            growth_text = (f"sample-wise time in training steps grows x{growth:.2f} from N = {low} to N = {high} "
                           f"(target < {growth_limit:g}: {_verdict(growth, growth_limit, strict=True)}; "
                           f"seconds x{seconds:.2f})")
        elif len(timed) >= 2:
            growth, seconds = growth_between(timed[0], timed[-1])
            growth_text = (f"sample-wise time in training steps grows x{growth:.2f} from N = {timed[0]} to "
                           f"N = {timed[-1]} (target < {growth_limit:g} from N = {low} to {high}: not measured)")
        else:
            growth_text = f"sample-wise time growth from N = {low} to N = {high}: not measured"
        at = rows.get(n_target, {})
        steps, memory = at.get("sample-wise / step"), at.get("sample-wise MB / step MB")
        allocated = at.get("sample-wise alloc / step alloc")
        limit = SAMPLEWISE_TARGETS["memory"]

        def in_steps(value):
            return f"{value:.2f} training steps" if value is not None else "? training steps"

        def times(value):
            return f"{value:.2f}x" if value is not None else "?x"
        floor_steps, floor_allocated = at.get("floor / step"), at.get("floor alloc / step alloc")
        floor_text = ""
        if floor_steps is not None or floor_allocated is not None:
            floor_text = (f" The double-backward floor (one backward with graph and one double backward over "
                          f"the whole batch, no per-sample Gram) takes {in_steps(floor_steps)} "
                          f"and {times(floor_allocated)} a step's allocated memory.")
        def variant_text(name: str, label: str) -> str:
            """' {label}: time (verdict), allocator peak (verdict) and resident peak.' of the columns
            ``name`` (a recompute variant's, NIO's iteration's), or '' where it was not measured."""
            variant_steps, variant_allocated = at.get(f"{name} / step"), at.get(f"{name} alloc / step alloc")
            if variant_steps is None and variant_allocated is None:
                return ""
            return (f" {label}: {in_steps(variant_steps)} (target: "
                    f"{_verdict(variant_steps, SAMPLEWISE_TARGETS['steps'])}), {times(variant_allocated)} a step's "
                    f"allocated memory (target: {_verdict(variant_allocated, limit)}) and "
                    f"{times(at.get(f'{name} MB / step MB'))} its resident memory.")
        recompute_text = "".join(variant_text(name, f"Recomputing {recomputed} (recompute=) instead")
                                 for name, recomputed in RECOMPUTED.values())
        nio_text = variant_text(NIO_ITERATION, "NIO's own sample-wise iteration (scale gradients only, linear and "
                                               "convolution weights' from probes, and the scale update)")
        nio_text += "".join(variant_text(f"{NIO_ITERATION}, {name}", f"NIO's iteration with {recomputed} recomputed")
                            for name, recomputed in RECOMPUTED.values())
        lines.append(f"- {model}: {growth_text}; at N = {n_target} it takes {in_steps(steps)} "
                     f"(target <= {SAMPLEWISE_TARGETS['steps']:g}: {_verdict(steps, SAMPLEWISE_TARGETS['steps'])}), "
                     f"{times(allocated)} a step's peak of allocated tensor memory (target <= {limit:g}: "
                     f"{_verdict(allocated, limit)}) and {times(memory)} its peak resident memory "
                     f"(target <= {limit:g}: {_verdict(memory, limit)}).{floor_text}{nio_text}{recompute_text}")
    return "\n".join(lines)


SAMPLEWISE_NOTES = (
    "step: one training step (forward + backward); '/ step': a call's median seconds over the median of the "
    "training steps timed between its own rounds (side by side: the step case runs minutes apart). "
    "sample-wise: nio_fast.gradcosine(sub_batches=\"samples\", "
    "mode=\"factors\", create_graph=True) and autograd.grad(value, params), one NIO-like evaluation (routes: "
    "how many parameter tensors took each route of nio_fast.samplewise). recompute: the same with every residual "
    "block (ResNet) or encoder layer (ViT) passed as recompute=, recomputed instead of kept "
    "(nio_fast.samplewise.segments); half recompute: the first half of them (the ResNet's first two stages, the "
    "ViT's first two layers), the others kept. NIO iteration: one sample-wise NIO iteration, "
    "nio_fast.initialize(sub_batches=\"samples\", iters=1): the same Gram, differentiated for the scale gradients "
    "NIO needs (linear and convolution weights' from probes) instead of every parameter's gradient, and the scale "
    "update; NIO iteration, recompute / half recompute: the same with recompute= as above (the recomputed "
    "segments' weights' scale gradients from probes too). vmap: per-sample gradients by "
    "vmap(grad(loss)) with graph, ops.gram, GradCosine and the same backward (on vit_small its double backward "
    "through layer_norm is inexact in torch 2.13, tests/test_vmap_safety.py: timed for its cost only). Seconds: "
    "medians of test_samplewise.py's schedule (one or two timed calls after at most one warm-up). MB: peak resident "
    "memory of one call in a fresh process above the process with model and batch built and one warm-up call on 2 "
    "samples made (the first call's lazy imports, ~190 MB, are not the method's; peak_memory.py --warmup); it "
    "includes what glibc's malloc keeps back after frees. alloc MB: the tensor allocator's peak of a second call "
    "in that process (torch.profiler's memory events; on CUDA the allocator's peak), the memory the method "
    "itself needs at once (harness.allocated_peak_mb). floor: one forward, one backward with graph and one double "
    "backward of ||g||^2 over the whole batch under NIO's modes (workloads.double_backward_floor): what "
    "differentiating through one whole-batch backward costs, the yardstick of the sample-wise figures (which pay "
    "that, less the batch weight gradients they do not form, plus the per-sample Gram). vmap "
    "is skipped where its per-sample gradients (N x parameters x 4 B x 3) would pass 6 GB.")


def _plot_samplewise(table: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = sorted((r for r in table if r["model"] == model), key=lambda r: r["N"])
        for column, label, style in (("step s", "one training step", "^:"), ("sample-wise s", "sample-wise", "s-"),
                                     ("recompute s", "sample-wise, recomputed", "d-."),
                                     ("half recompute s", "sample-wise, half recomputed", "x-."),
                                     (f"{NIO_ITERATION} s", "sample-wise NIO iteration", "*-"),
                                     (f"{NIO_ITERATION}, half recompute s", "NIO iteration, half recomputed", "P-."),
                                     ("vmap s", "vmap per-sample", "o--"), ("floor s", "double-backward floor", "v:")):
            points = [(r["N"], r[column]) for r in rows if r[column]]
            if points:
                axis.plot(*zip(*points), style, label=label)
        sizes = [r["N"] for r in rows]
        axis.set(title=model, xlabel="batch N (one chunk per sample)", ylabel="seconds", xscale="log", yscale="log")
        if sizes:
            axis.set_xticks(sizes, labels=[str(n) for n in sizes])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(harness.RESULTS / "samplewise.png", dpi=120)
    plt.close(fig)


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
                            "(forward + backward) on the same batch, timed between the rounds of the same "
                            "case (step s: those of nio_fast's); floor: one forward, one backward with graph and "
                            "one double backward over the whole batch, of ||g||^2 under NIO's modes "
                            "(workloads.double_backward_floor), what an exact iteration that forms every parameter's "
                            "gradient pays at least on a coupling-free model (NIO's, whose linear and convolution "
                            "weights' scale gradients come from probes, can come in under it; one per model and "
                            "N; a BatchNorm model in exact mode needs D such backward passes); reference / floor: "
                            "the speed-up of an iteration at the floor. "
                            "exact_recompute: nio_fast with mode='exact_recompute' (BatchNorm, one chunk graph in "
                            "memory at a time), its time over the reference's.\n\n" + _growth_notes(table))
        _plot_iteration(table)
    table = _memory_rows(tables.get("memory", []))
    if table:
        write_results("memory", table, list(table[0]), "Peak resident memory of one iteration, fresh processes "
                      "(MB above the process with model and batch built; CPU, 1 thread)",
                      notes="nio_fast runs mode='auto' (exact on the BatchNorm ResNet-20); exact_recompute: "
                            "mode='exact_recompute', the same values with one chunk graph in memory at a time. "
                            "MB: the median of three fresh processes (runs: their range). alloc: the tensor "
                            "allocator's peak of a second call in the first process (harness.allocated_peak_mb), "
                            "which does not include what malloc keeps back and does not move between runs.")
    if tables.get("gram"):
        table = _gram_rows(tables["gram"])
        write_results("gram", table, list(table[0]), "Seconds of nio_fast.ops.gram (medians) on "
                      "ResNet-50- and ViT-B/16-shaped gradients", notes=GRAM_NOTES)
    if tables.get("gram_memory"):
        table = _gram_memory_rows(tables["gram_memory"])
        write_results("gram_memory", table, list(table[0]), "Extra memory of nio_fast.ops.gram",
                      notes=GRAM_MEMORY_NOTES)
    if tables.get("chunk_reduce"):
        table = _chunk_reduce_rows(tables["chunk_reduce"])
        write_results("chunk_reduce", table, list(table[0]), "Chunk reductions: the dense twin against the sparse "
                      "kernels (medians of 5)",
                      notes="chunk_gram: W^T G W for a [N, N] sample Gram; chunk_sums: W^T V for [N, K] per-sample "
                            "gradients; W [N, D] the chunks' averaging weights (overlap 0.5: twice the nonzeros). "
                            "torch: dense matmuls; cpp: the extension's sparse kernels. forward+backward: the "
                            "gradient with respect to G or V as well.")
    for name, (layer, native, what) in NORMALIZATION_TABLES.items():
        if tables.get(name):
            table = _normalization_rows(tables[name])
            write_results(name, table, list(table[0]), f"{layer}: {native} against nio_fast.ops.{name} (medians of 7)",
                          notes="second order: forward, backward with a graph, and the backward of the squared "
                                f"gradients (what an NIO iteration does with each {layer}); first order: forward "
                                f"and backward. native: {native}; torch: ops.{name} with its plain twins; cpp: with "
                                "the extension's fused CPU kernels; triton: with the Triton kernels (CUDA). " + what)
    if tables.get("samplewise") or tables.get("samplewise_memory"):
        table = _samplewise_rows(tables.get("samplewise", []), tables.get("samplewise_memory", []))
        memory_rows = tables.get("samplewise_memory", [])
        threads = sorted({r["threads"] for r in memory_rows if r.get("threads") and r.get("device") != "cuda"})
        where = (" (CUDA allocator peak)" if any(r.get("device") == "cuda" for r in memory_rows)
                 else f" (CPU, {', '.join(map(str, threads))} thread(s))" if threads else "")
        write_results("samplewise", table, list(table[0]), "Sample-wise GradCosine with its backward against vmap "
                      "and one training step: seconds (medians) and peak memory" + where,
                      notes=SAMPLEWISE_NOTES + "\n\n" + _samplewise_notes(table))
        if any(r["step s"] or r["sample-wise s"] or r["vmap s"] for r in table):
            _plot_samplewise(table)
    for name, rows in tables.items():
        if name not in ("iteration", "memory", "gram", "gram_memory", "samplewise", "samplewise_memory",
                        "chunk_reduce", *NORMALIZATION_TABLES) and rows:
            write_results(name, rows, list(rows[0]), name)
