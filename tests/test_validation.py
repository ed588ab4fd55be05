"""Bad input: a clear error naming the argument, and the model untouched."""
import pytest
import torch
from torch import nn

import nio_fast
from models import batch_for, make_model


def untouched(model):
    return [t.detach().clone() for t in model.state_dict().values()], [m.training for m in model.modules()]


def assert_untouched(model, saved):
    values, modes = saved
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), values))
    assert [m.training for m in model.modules()] == modes


BAD_SETTINGS = [
    (dict(sub_batches=1), "sub_batches"),
    (dict(sub_batches=2.5), "sub_batches"),
    (dict(iters=0), "iters"),
    (dict(overlap=1.0), "overlap"),
    (dict(overlap=-0.1), "overlap"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-2.0), "gamma"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(method="adamw"), "method"),
    (dict(mode="fast"), "mode"),
    (dict(objective="gn"), "objective"),
    (dict(inner="rmsprop"), "inner"),
    (dict(eta=0), "eta"),
    (dict(min_scale=-1), "min_scale"),
    (dict(grad_clip=0), "grad_clip"),
    (dict(backend="cuda"), "backend"),
    (dict(params=["no.such.weight"]), "params"),
    (dict(params=[torch.nn.Parameter(torch.ones(2))]), "params"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("settings,argument", BAD_SETTINGS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_SETTINGS)])
def test_bad_settings_name_the_argument_and_leave_the_model_alone(settings, argument):
    model = make_model("bn_cnn")
    saved = untouched(model)
    with pytest.raises(ValueError, match=f"^{argument}:"):
        nio_fast.initialize(model, batch_for("bn_cnn", 8), progress=False, **settings)
    assert_untouched(model, saved)


def test_batch_smaller_than_sub_batches():
    model = make_model("mlp")
    saved = untouched(model)
    with pytest.raises(ValueError, match=r"^data \(its first batch\): has 3 samples, fewer than sub_batches=4"):
        nio_fast.initialize(model, batch_for("mlp", 3), sub_batches=4, progress=False)
    with pytest.raises(ValueError, match="^batch: has 3 samples"):
        nio_fast.gradcosine(model, batch_for("mlp", 3), sub_batches=4)
    assert_untouched(model, saved)


def test_empty_data():
    model = make_model("mlp")
    saved = untouched(model)
    with pytest.raises(ValueError, match="^data: yielded no batches"):
        nio_fast.initialize(model, [], progress=False)
    empty_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 12)), batch_size=4)
    with pytest.raises(ValueError, match="^data: yielded no batches"):
        nio_fast.initialize(model, empty_loader, progress=False)
    assert_untouched(model, saved)


def test_data_that_is_not_batches():
    with pytest.raises(TypeError, match="^data"):
        nio_fast.initialize(make_model("mlp"), 42, progress=False)
    with pytest.raises(TypeError, match=r"^data \(a batch it yielded\): expected an \(inputs, targets\) pair"):
        nio_fast.initialize(make_model("mlp"), [torch.randn(4, 12)], progress=False)


def test_model_without_trainable_parameters():
    model = make_model("mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="^model: has no trainable parameters"):
        nio_fast.initialize(model, batch_for("mlp", 8), progress=False)
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        nio_fast.initialize(lambda x: x, batch_for("mlp", 8), progress=False)


@pytest.mark.parametrize("bad_loss", [
    lambda outputs, targets: torch.nn.functional.cross_entropy(outputs, targets, reduction="none"),
    lambda outputs, targets: 1.0,
])
def test_loss_that_is_not_a_scalar(bad_loss):
    model = make_model("mlp")
    saved = untouched(model)
    with pytest.raises(ValueError, match="^loss_fn: must return the mean loss"):
        nio_fast.initialize(model, batch_for("mlp", 8), bad_loss, progress=False)
    with pytest.raises(ValueError, match="^loss_fn: must return the mean loss"):
        nio_fast.gradcosine(model, batch_for("mlp", 8), bad_loss)
    assert_untouched(model, saved)


def test_frozen_parameter_named_explicitly():
    model = make_model("odd")
    with pytest.raises(ValueError, match="^params: 'frozen.weight' does not require grad"):
        nio_fast.initialize(model, batch_for("odd", 8), params=["frozen.weight"], progress=False)


def test_params_subset_by_name_and_tensor():
    model = make_model("mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = nio_fast.initialize(model, batch_for("mlp", 8), params=["net.0.weight", model.net[4].weight],
                                 iters=3, progress=False)
    assert set(report.scales) == {"net.0.weight", "net.4.weight"}
    for name, p in model.named_parameters():
        if name not in report.scales:
            assert torch.equal(p, before[name]), name
