"""initialize and gradcosine over torch.distributed (gloo, CPU processes) against one process.

Each world size is one ``torch.multiprocessing`` spawn running every scenario in turn (starting
processes is the expensive part); the ranks save what they saw and the tests below compare it
with single-process runs on the same global batches. Every run uses the debug mode that checks,
each iteration, that the ranks hold the same scale-optimizer state.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast.distributed import DEBUG_ENV, RankFailure
from models import batch_for, make_model

PER_RANK = 6  # samples per rank per batch
CHUNKS_PER_RANK = 2
ITERS = 5
SETTINGS = dict(iters=ITERS, lr=0.05, progress=False)


def global_batches(name: str, world: int, count: int = 3):
    torch.manual_seed(1000)
    return [batch_for(name, PER_RANK * world) for _ in range(count)]


def rank_part(batch, rank: int):
    inputs, targets = batch
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return inputs[rows], targets[rows]


class FailingData:
    """Yields this rank's batches; raises at the ``fail_at``-th batch it yields."""

    def __init__(self, batches, fail_at: int):
        self.batches, self.fail_at = batches, fail_at

    def __iter__(self):
        for index, batch in enumerate(self.batches * 10):
            if index == self.fail_at:
                raise ValueError("boom: this rank's data failed")
            yield batch


class SlowData(FailingData):
    """Hangs (sleeps past the group's timeout) at the ``fail_at``-th batch."""

    def __iter__(self):
        for index, batch in enumerate(self.batches * 10):
            if index == self.fail_at:
                time.sleep(7)
            yield batch


def outcome(call):
    """('ok', value) or ('raised', type name, message)."""
    try:
        return ("ok", call())
    except Exception as error:  # the scenarios that expect a raise record it
        return ("raised", type(error).__name__, str(error))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def nio_result(model, report):
    return {"scales": report.scales, "params": params_of(model), "history": report.history,
            "gamma": report.gamma, "seconds": report.seconds, "distributed": report.distributed,
            "iterations": report.iterations}


def _scenarios(rank: int, world: int, group) -> dict:
    """Every scenario on a group of ``world`` ranks; ``group`` None: the default group, detected."""
    chunks = CHUNKS_PER_RANK * world
    settings = {**SETTINGS, "process_group": group}
    results = {}

    mlp_data = [rank_part(b, rank) for b in global_batches("mlp", world)]
    model = make_model("mlp")
    report = nio_fast.initialize(model, mlp_data, sub_batches=chunks, **settings)
    results["mlp"] = nio_result(model, report)

    model = make_model("mlp")
    wrapped = nn.parallel.DistributedDataParallel(model, process_group=group)
    report = nio_fast.initialize(wrapped, mlp_data, sub_batches=chunks, **SETTINGS)  # DDP's own group
    results["mlp_ddp"] = nio_result(model, report)
    F.cross_entropy(wrapped(mlp_data[0][0]), mlp_data[0][1]).backward()  # DDP still trains afterwards
    results["ddp_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    bn_data = [rank_part(b, rank) for b in global_batches("bn_cnn", world)]
    model = make_model("bn_cnn")
    report = nio_fast.initialize(model, bn_data, sub_batches=chunks, **settings)
    results["bn"] = nio_result(model, report)

    model = nn.SyncBatchNorm.convert_sync_batchnorm(make_model("bn_cnn"), process_group=group)
    report = nio_fast.initialize(model, bn_data, sub_batches=chunks, **settings)
    results["bn_sync"] = nio_result(model, report)

    model = make_model("mlp")
    params = list(model.parameters())
    result = nio_fast.gradcosine(model, mlp_data[0], sub_batches=chunks, create_graph=True, process_group=group)
    grads = torch.autograd.grad(result.value, params)  # this rank's chunks' part
    for g in grads:
        dist.all_reduce(g, group=group)
    results["gradcosine"] = {"value": result.value.detach(), "gram": result.gram.detach(), "chunks": result.chunks,
                             "mode": result.mode, "grads": grads}

    # A rank whose data raises in iteration 2: every rank raises, every model is restored.
    model = make_model("mlp")
    before = params_of(model)
    data = FailingData(mlp_data, fail_at=2) if rank == 1 else mlp_data
    results["failure"] = outcome(lambda: nio_fast.initialize(model, data, sub_batches=chunks, **settings))
    results["failure_restored"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # A rank that raises after the Gram's exchange (here: in the objective), mid-plan.
    from nio_fast.algorithms import nio as nio_module
    objective = nio_module.nio_objective
    calls = []

    def failing_objective(*args):
        calls.append(1)
        if len(calls) == 2:
            raise ArithmeticError("boom: this rank's objective failed")
        return objective(*args)

    if rank == 1:
        nio_module.nio_objective = failing_objective
    results["late_failure"] = outcome(lambda: nio_fast.initialize(make_model("mlp"), mlp_data, sub_batches=chunks,
                                                                  **settings))
    nio_module.nio_objective = objective

    def failing_loss(outputs, targets):
        raise ValueError("boom: this rank's loss failed")

    results["gradcosine_failure"] = outcome(lambda: nio_fast.gradcosine(
        make_model("mlp"), mlp_data[0], failing_loss if rank == 1 else None, sub_batches=chunks,
        process_group=group))

    # Arguments: checked on every rank, then compared; nobody waits for a rank that refused.
    results["different_lr"] = outcome(lambda: nio_fast.initialize(
        make_model("mlp"), mlp_data, sub_batches=chunks, **{**settings, "lr": 0.05 + 0.01 * rank}))
    small = [(x[:1], y[:1]) for x, y in mlp_data] if rank == 1 else mlp_data
    results["small_batch"] = outcome(lambda: nio_fast.initialize(make_model("mlp"), small, sub_batches=chunks,
                                                                 **settings))
    results["different_params"] = outcome(lambda: nio_fast.initialize(
        make_model("mlp", seed=rank), mlp_data, sub_batches=chunks, **settings))
    results["not_a_multiple"] = outcome(lambda: nio_fast.initialize(
        make_model("mlp"), mlp_data, sub_batches=chunks + 1, **settings))
    results["overlap"] = outcome(lambda: nio_fast.initialize(
        make_model("mlp"), mlp_data, sub_batches=chunks, overlap=0.25, **settings))
    results["gradinit"] = outcome(lambda: nio_fast.initialize(make_model("mlp"), mlp_data, method="gradinit",
                                                              **settings))
    recomputed = make_model("mlp")
    results["recompute"] = outcome(lambda: nio_fast.initialize(recomputed, mlp_data, sub_batches=chunks,
                                                               mode="factors", recompute=nn.Linear, **settings))
    return results


def _hang_and_drift(rank: int, group, short_group) -> dict:
    """Two ranks: a perturbed optimizer on rank 1 (caught by the debug check), then a rank that hangs."""
    mlp_data = [rank_part(b, rank) for b in global_batches("mlp", 2)]
    settings = {**SETTINGS, "process_group": group, "sub_batches": 2 * CHUNKS_PER_RANK}
    results = {}
    from nio_fast.algorithms import scale_optimizer
    original = scale_optimizer.ScaleAdam.propose

    def perturbed(self, grads, kind):
        return original(self, grads * (1 + 1e-9), kind)

    if rank == 1:
        scale_optimizer.ScaleAdam.propose = perturbed
    results["drift"] = outcome(lambda: nio_fast.initialize(make_model("mlp"), mlp_data, **settings))
    scale_optimizer.ScaleAdam.propose = original

    # The others stop at the group's timeout, then the slow rank does too when it comes back.
    model = make_model("mlp")
    before = params_of(model)
    data = SlowData(mlp_data, fail_at=2) if rank == 1 else mlp_data
    started = time.perf_counter()
    results["hang"] = outcome(lambda: nio_fast.initialize(model, data, **{**settings, "process_group": short_group}))
    results["hang_seconds"] = time.perf_counter() - started
    results["hang_restored"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return results


def _worker(rank: int, store: str, out: str) -> None:
    """Three ranks: every scenario on all three (the default group), then on ranks 0 and 1 (a subgroup
    given as ``process_group``)."""
    os.environ[DEBUG_ENV] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=60))
    results = {3: _scenarios(rank, 3, None)}
    # A group of one rank is a run of its own; a process group that is not one is refused.
    alone = [dist.new_group([r], backend="gloo") for r in range(3)][rank]
    model = make_model("mlp")
    data = [rank_part(b, rank) for b in global_batches("mlp", 3)]
    report = nio_fast.initialize(model, data, sub_batches=CHUNKS_PER_RANK, process_group=alone, **SETTINGS)
    results["alone"] = {**nio_result(model, report), "data": data}
    results["not_a_group"] = outcome(lambda: nio_fast.initialize(make_model("mlp"), data, process_group="world",
                                                                 **SETTINGS))
    pair = dist.new_group([0, 1], backend="gloo")
    short = dist.new_group([0, 1], backend="gloo", timeout=datetime.timedelta(seconds=3))
    if rank < 2:
        results[2] = {**_scenarios(rank, 2, pair), **_hang_and_drift(rank, pair, short)}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def spawn(tmp: Path, deadline: float = 150.0) -> dict[int, list[dict]]:
    """{world size: [what each rank saw]}."""
    context = mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=3, join=False)
    started = time.perf_counter()
    while not context.join(timeout=5):
        if time.perf_counter() - started > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the ranks did not finish within {deadline} s")
    ranks = [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(3)]
    return {"alone": [r["alone"] for r in ranks], "not_a_group": [r["not_a_group"] for r in ranks],
            **{world: [ranks[r][world] for r in range(world)] for world in (2, 3)}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The single-process twins are tiny: one thread (several threads on a busy machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def runs(request, spawned):
    return request.param, spawned[request.param]


class RankBlocks(nn.Module):
    """The single-process twin of per-rank BatchNorm statistics: each rank's rows forwarded alone."""

    def __init__(self, inner: nn.Module, world: int):
        super().__init__()
        self.inner, self.world = inner, world

    def forward(self, x):
        return torch.cat([self.inner(part) for part in x.chunk(self.world)])


def assert_close(actual, expected, rtol, what):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    error = ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max()
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}\n{actual}\n{expected}"


def assert_same_run(got, model, report, prefix=""):
    names = list(got["scales"])
    assert_close([got["scales"][n] for n in names], [report.scales[prefix + n] for n in names], 1e-5, "scales")
    params = dict(model.named_parameters())
    for name, value in got["params"].items():
        assert_close(value, params[prefix + name].detach(), 1e-5, name)
    assert [h["constraint"] for h in got["history"]] == [h["constraint"] for h in report.history]
    assert_close([h["gradcosine"] for h in got["history"]], [h["gradcosine"] for h in report.history], 1e-5,
                 "GradCosine history")


def assert_same_on_every_rank(results, key):
    first = results[0][key]
    for other in results[1:]:
        got = other[key]
        assert got["scales"] == first["scales"] and got["history"] == first["history"]
        assert got["seconds"] == first["seconds"] and got["distributed"] == first["distributed"]
        assert got["gamma"] == first["gamma"]
        for name, value in got["params"].items():
            assert torch.equal(value, first["params"][name]), name


def test_coupling_free_model_matches_one_process(runs):
    world, results = runs
    assert_same_on_every_rank(results, "mlp")
    model = make_model("mlp")
    report = nio_fast.initialize(model, global_batches("mlp", world), sub_batches=CHUNKS_PER_RANK * world,
                                 **SETTINGS)
    assert results[0]["mlp"]["iterations"] == ITERS
    assert results[0]["mlp"]["gamma"] == pytest.approx(report.gamma, rel=1e-10)
    assert_same_run(results[0]["mlp"], model, report)


def test_communication_is_as_documented(runs):
    world, results = runs
    info = results[0]["mlp"]["distributed"]
    chunks, m = CHUNKS_PER_RANK * world, info["gradient_numel"]
    num_tensors = len(results[0]["mlp"]["scales"])
    shard = -(-m // world)
    # two shard exchanges, the Gram and its flags, the scale gradients and theirs, the debug drift check
    elements = 2 * CHUNKS_PER_RANK * shard * (world - 1) + chunks * chunks + world + num_tensors + world
    drift = 2 * (4 * num_tensors + 2)
    assert info["bytes_per_iteration"] == 8 * (elements + drift)
    assert info["world_size"] == world and info["backend"] == "gloo"


def test_ddp_wrapped_model_matches_plain_and_still_trains(runs):
    world, results = runs
    assert_same_on_every_rank(results, "mlp_ddp")
    for name, value in results[0]["mlp_ddp"]["params"].items():
        assert torch.equal(value, results[0]["mlp"]["params"][name]), name
    for other in results[1:]:  # DDP averaged the gradients of the training step that followed
        for name, grad in other["ddp_grads"].items():
            torch.testing.assert_close(grad, results[0]["ddp_grads"][name], rtol=1e-12, atol=1e-15)


def test_batchnorm_uses_per_rank_statistics_exactly(runs):
    world, results = runs
    assert_same_on_every_rank(results, "bn")
    batches = global_batches("bn_cnn", world)
    model = RankBlocks(make_model("bn_cnn"), world)
    report = nio_fast.initialize(model, batches, sub_batches=CHUNKS_PER_RANK * world, mode="exact", **SETTINGS)
    assert_same_run(results[0]["bn"], model, report, prefix="inner.")
    # ... and that is a different quantity from whole-batch statistics, so the test means something
    whole = nio_fast.initialize(make_model("bn_cnn"), batches, sub_batches=CHUNKS_PER_RANK * world, **SETTINGS)
    assert abs(whole.history[0]["gradcosine"] - results[0]["bn"]["history"][0]["gradcosine"]) > 1e-6
    # SyncBatchNorm layers take per-rank statistics too (their synchronised forward has no double backward)
    assert results[0]["bn_sync"]["scales"] == results[0]["bn"]["scales"]


def test_gradcosine_matches_one_process(runs):
    world, results = runs
    chunks = CHUNKS_PER_RANK * world
    model = make_model("mlp")
    params = list(model.parameters())
    # (one process on the CPU takes factors for these small chunks; ranks run per_chunk)
    expected = nio_fast.gradcosine(model, global_batches("mlp", world)[0], sub_batches=chunks, create_graph=True,
                                   mode="per_chunk")
    expected_grads = torch.autograd.grad(expected.value, params)
    for got in (r["gradcosine"] for r in results):
        assert got["chunks"] == expected.chunks and got["mode"] == expected.mode == "per_chunk"
        assert_close(got["gram"], expected.gram.detach(), 1e-10, "Gram")
        assert_close(got["value"], expected.value.detach(), 1e-10, "GradCosine")
        for g, e in zip(got["grads"], expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-14)


def test_a_rank_that_raises_stops_every_rank(runs):
    world, results = runs
    for rank, result in enumerate(results):
        assert result["failure_restored"], rank
        if rank == 1:
            assert result["failure"][:2] == ("raised", "ValueError") and "boom" in result["failure"][2]
            assert result["gradcosine_failure"][:2] == ("raised", "ValueError")
            assert result["late_failure"][:2] == ("raised", "ArithmeticError")
        else:
            assert result["failure"][:2] == ("raised", RankFailure.__name__)
            assert "rank(s) [1]" in result["failure"][2] and "iteration 2" in result["failure"][2]
            assert result["gradcosine_failure"][:2] == ("raised", RankFailure.__name__)
            assert result["late_failure"][:2] == ("raised", RankFailure.__name__)
            assert "iteration 1" in result["late_failure"][2]


def test_arguments_are_checked_on_every_rank_and_compared(runs):
    world, results = runs
    for rank, result in enumerate(results):
        assert result["different_lr"][:2] == ("raised", "ValueError")
        assert "different settings" in result["different_lr"][2]
        assert result["different_params"][:2] == ("raised", "ValueError")
        assert "parameters differ between ranks" in result["different_params"][2]
        assert result["not_a_multiple"][:2] == ("raised", "ValueError") and "multiple" in result["not_a_multiple"][2]
        assert result["overlap"][:2] == ("raised", "ValueError") and "overlap" in result["overlap"][2]
        assert result["gradinit"][:2] == ("raised", "ValueError") and "nio" in result["gradinit"][2]
        assert result["recompute"][:2] == ("raised", "ValueError")
        assert "recompute: not supported in distributed runs yet" in result["recompute"][2]
        expected = ("raised", "ValueError") if rank == 1 else ("raised", RankFailure.__name__)
        assert result["small_batch"][:2] == expected, result["small_batch"]


def test_a_group_of_one_rank_runs_alone(spawned):
    for got in spawned["alone"]:
        model = make_model("mlp")
        report = nio_fast.initialize(model, got["data"], sub_batches=CHUNKS_PER_RANK, **SETTINGS)
        assert got["distributed"] is None
        assert_same_run(got, model, report)
    for got in spawned["not_a_group"]:
        assert got[:2] == ("raised", "TypeError") and "process_group" in got[2]


def test_process_group_without_torch_distributed_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process_group: given, but torch.distributed is not initialised"):
        nio_fast.initialize(make_model("mlp"), batch_for("mlp", 8), process_group=object(), progress=False)
    with pytest.raises(ValueError, match="process_group"):
        nio_fast.gradcosine(make_model("mlp"), batch_for("mlp", 8), process_group=object())


def test_drift_between_ranks_is_caught_in_debug_mode(spawned):
    for result in spawned[2]:
        assert result["drift"][:2] == ("raised", "RuntimeError") and "drifted apart" in result["drift"][2]


def test_a_rank_that_hangs_ends_in_a_timeout_on_every_rank(spawned):
    for result in spawned[2]:
        assert result["hang"][0] == "raised", result["hang"]
        assert result["hang_restored"]
        assert result["hang_seconds"] < 30
