"""The drop-in guarantees of nio_fast.initialize: what it leaves alone, and what happens on failure."""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from models import batch_for, make_model


def module_state(model):
    """Everything about a model that initialize must leave as it was, except parameter values."""
    return {
        "training": [m.training for m in model.modules()],
        "tracking": [getattr(m, "track_running_stats", None) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dtypes": [p.dtype for p in model.parameters()],
        "devices": [p.device for p in model.parameters()],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._state_dict_hooks)) for m in model.modules()],
    }


def snapshot_values(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_values_equal(model, saved):
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def prepared_model():
    """A BatchNorm model in a mixed train/eval state, with .grad set and a frozen layer."""
    model = make_model("bn_cnn", torch.float32)
    model.train()
    model.features[1].eval()
    model.features[4].track_running_stats = True
    model.features[4].running_mean.normal_()
    model.features[4].num_batches_tracked.fill_(7)
    model.head.bias.requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model


def batches(num=3, size=12):
    return [batch_for("bn_cnn", size, torch.float32) for _ in range(num)]


def test_only_parameter_values_change_each_by_one_positive_factor():
    model = prepared_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = [id(p) for p in model.parameters()]
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    state = module_state(model)
    before = snapshot_values(model)

    report = nio_fast.initialize(model, batches(), iters=4, sub_batches=3, progress=False)

    assert [id(p) for p in model.parameters()] == ids
    assert module_state(model) == state
    for name, p in model.named_parameters():
        assert (p.grad is None) == (grads[name] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    changed = 0
    for name, p in model.named_parameters():
        start = before[name]
        if name not in report.scales:
            assert torch.equal(p, start), f"{name} is frozen and must not change"
            continue
        scale = report.scales[name]
        assert scale >= 0
        torch.testing.assert_close(p, start * scale, rtol=1e-6, atol=0)
        changed += scale != 1.0
    assert changed > 0
    # an optimizer built before the call still drives the same tensors
    loss = F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1])
    loss.backward()
    weight_before = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.head.weight, weight_before)


def test_zero_initialised_tensors_are_left_alone():
    model = make_model("odd")
    before = model.head.bias.detach().clone()
    assert torch.count_nonzero(before) == 0
    report = nio_fast.initialize(model, batch_for("odd", 12), iters=3, progress=False)
    assert report.scales["head.bias"] == 1.0
    assert torch.equal(model.head.bias, before)


def failing_data(fail_at):
    good = batches(fail_at)
    for index in range(fail_at):
        yield good[index]
    raise RuntimeError("data source broke")


class Exploding(nn.Module):
    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.calls, self.after = inner, 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("model broke")
        return self.inner(x)


@pytest.mark.parametrize("where", ["data", "model", "loss"])
@pytest.mark.parametrize("method", ["nio", "gradinit"])
def test_a_failure_mid_run_restores_the_model_exactly(where, method):
    model = prepared_model()
    target = model
    data = batches(4)
    loss_fn = F.cross_entropy
    if where == "data":
        data = failing_data(5)
    elif where == "model":
        target = Exploding(model, after=7)
    else:
        calls = []

        def loss_fn(outputs, targets):
            calls.append(1)
            if len(calls) > 6:
                raise RuntimeError("loss broke")
            return F.cross_entropy(outputs, targets)
    state, values = module_state(model), snapshot_values(model)
    with pytest.raises(RuntimeError, match="broke"):
        nio_fast.initialize(target, data, loss_fn, method=method, iters=10, sub_batches=3, progress=False)
    assert module_state(model) == state
    assert_values_equal(model, values)


def test_keyboard_interrupt_restores_too():
    model = prepared_model()
    values = snapshot_values(model)

    def loss_fn(outputs, targets):
        if loss_fn.calls == 5:
            raise KeyboardInterrupt
        loss_fn.calls += 1
        return F.cross_entropy(outputs, targets)
    loss_fn.calls = 0
    with pytest.raises(KeyboardInterrupt):
        nio_fast.initialize(model, batches(), loss_fn, iters=10, sub_batches=2, progress=False)
    assert_values_equal(model, values)


def test_non_finite_values_never_reach_the_model():
    model = make_model("mlp", torch.float32)
    good = [batch_for("mlp", 12, torch.float32) for _ in range(3)]
    poisoned = (torch.full((12, 12), float("inf")), good[0][1])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        report = nio_fast.initialize(model, good + [poisoned], iters=10, progress=False)
    assert report.stopped_early and "non-finite value at iteration 3" in report.stop_reason
    assert report.iterations == len(report.history) == 3
    fresh = make_model("mlp", torch.float32)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q * report.scales[name], rtol=1e-6, atol=0)


def test_report_is_json_serialisable_and_logs_go_to_the_nio_fast_logger(caplog):
    import json
    model = make_model("mlp")
    with caplog.at_level(logging.INFO, logger="nio_fast"):
        report = nio_fast.initialize(model, batch_for("mlp", 8), iters=2, progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "nio" and len(data["history"]) == 2 and set(data["scales"]) == set(report.scales)
    assert set(report.history[0]) == {"gradcosine", "gnorm", "constraint", "objective"}
    assert any(r.name == "nio_fast" for r in caplog.records)


def test_progress_bar_shows_gradcosine_and_norm(capsys):
    nio_fast.initialize(make_model("mlp"), batch_for("mlp", 8), iters=2, progress=True)
    err = capsys.readouterr().err
    assert "nio_fast nio" in err and "gradcosine" in err and "gnorm" in err


def test_dict_and_tuple_inputs_give_the_same_result_as_a_tensor():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 5), nn.Linear(3, 5)

        def forward(self, x, extra):
            return self.a(x) + self.b(extra)
    torch.manual_seed(0)
    model = TwoInputs().double()
    x, y = batch_for("mlp", 10)
    extra = torch.randn(10, 3, dtype=torch.float64)
    as_tuple = nio_fast.gradcosine(model, ((x, extra), y), sub_batches=3)
    as_dict = nio_fast.gradcosine(model, ({"x": x, "extra": extra}, y), sub_batches=3)
    torch.testing.assert_close(as_tuple.gram, as_dict.gram)


def test_seed_makes_runs_repeatable_without_touching_the_global_rng():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch_for("mlp", 40)), batch_size=8,
                                         shuffle=True)
    models = make_model("mlp"), make_model("mlp")
    state = torch.get_rng_state()
    first = nio_fast.initialize(models[0], loader, iters=3, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = nio_fast.initialize(models[1], loader, iters=3, seed=3, progress=False)
    assert first.scales == second.scales


def test_a_short_last_batch_is_skipped():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch_for("mlp", 9)), batch_size=4)
    report = nio_fast.initialize(make_model("mlp"), loader, iters=4, sub_batches=4, progress=False)
    assert report.iterations == 4 and not report.stopped_early


def count_host_reads(monkeypatch):
    counter = {"n": 0, "inside": False}
    for method in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, method)

        def wrapped(self, *args, _original=original, **kwargs):
            # Under a TorchFunctionMode (NIO's fused GroupNorm) the original method re-dispatches
            # to this wrapper once more: count the outer call only.
            if counter["inside"]:
                return _original(self, *args, **kwargs)
            counter["n"] += 1
            counter["inside"] = True
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter["inside"] = False
        monkeypatch.setattr(torch.Tensor, method, wrapped)
    return counter


@pytest.mark.parametrize("method", ["nio", "gradinit"])
def test_host_reads_per_iteration_do_not_grow_with_the_number_of_tensors(monkeypatch, method):
    def deep(layers):
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(12, 12), nn.Tanh())], nn.Linear(12, 5))
    data = [batch_for("mlp", 8, torch.float32) for _ in range(3)]
    counts = []
    for layers in (2, 12):
        model = deep(layers)
        counter = count_host_reads(monkeypatch)
        nio_fast.initialize(model, data, method=method, iters=4, progress=False)
        counts.append(counter["n"])
        monkeypatch.undo()
    assert counts[0] == counts[1], counts
    assert counts[0] <= 4 * 3 + 2, counts  # a few per iteration, not one per tensor
