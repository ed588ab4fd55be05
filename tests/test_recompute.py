"""mode="exact_recompute": the exact mode's values and scale gradients with one chunk graph at a
time (nio_fast/algorithms/recompute.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from models import batch_for, make_model
from reference import reference_nio

from nio_fast.api import _check_sampling


def trainable(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def objective_and_grads(model, batch, mode, **kwargs):
    """A NIO-like objective (GradCosine and a norm term) and its gradients."""
    _, params = trainable(model)
    result = nio_fast.gradcosine(model, batch, mode=mode, create_graph=True, **kwargs)
    objective = result.value - 0.1 * result.norms.square().sum()
    return result, torch.autograd.grad(objective, params, allow_unused=True)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", ["bn_cnn", "gn_resnet", "transformer"])
@pytest.mark.parametrize("sub_batches,overlap", [(2, 0.0), (3, 0.3), (5, 0.0)])
def test_recompute_equals_exact(name, sub_batches, overlap, dtype, rtol):
    model = make_model(name, dtype)
    inputs, targets = batch_for(name, 13, dtype)
    exact, theirs = objective_and_grads(model, (inputs, targets), "exact", sub_batches=sub_batches, overlap=overlap)
    ours_result, ours = objective_and_grads(model, (inputs, targets), "exact_recompute", sub_batches=sub_batches,
                                            overlap=overlap)
    assert ours_result.mode == "exact_recompute"
    torch.testing.assert_close(ours_result.gram, exact.gram, rtol=rtol, atol=rtol * float(exact.gram.detach().abs().max()))
    scale = max(float(g.abs().max()) for g in theirs if g is not None)
    for mine, ref in zip(ours, theirs):
        if ref is None:
            assert mine is None or torch.count_nonzero(mine) == 0
            continue
        torch.testing.assert_close(mine, ref, rtol=rtol, atol=rtol * scale)


class NoisyCNN(nn.Module):
    """Randomness that eval mode does not switch off (a hand-written stochastic mask)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        h = h * (torch.rand_like(h) > 0.3)
        return self.head(h.mean((2, 3)))


def test_recompute_keeps_the_forward_randomness():
    inputs, targets = batch_for("bn_cnn", 10)
    model = NoisyCNN().double()
    torch.manual_seed(7)
    exact, theirs = objective_and_grads(model, (inputs, targets), "exact", sub_batches=2)
    torch.manual_seed(7)
    ours_result, ours = objective_and_grads(model, (inputs, targets), "exact_recompute", sub_batches=2)
    torch.testing.assert_close(ours_result.gram, exact.gram, rtol=1e-12, atol=1e-15)
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-14)


def test_nio_with_recompute_takes_the_reference_steps():
    model, twin = make_model("bn_cnn", seed=3), make_model("bn_cnn", seed=3)
    batch = batch_for("bn_cnn", 12)
    names, params = trainable(twin)
    report = nio_fast.initialize(model, batch, sub_batches=3, iters=3, mode="exact_recompute", progress=False)
    reference_nio(twin, [batch], F.cross_entropy, names, params, iters=3, sub_batches=3)
    assert report.iterations == 3
    for (name, mine), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-8, atol=1e-12, msg=name)


def test_recompute_is_refused_in_distributed_runs():
    with pytest.raises(ValueError, match="mode: 'exact_recompute' is not supported in distributed runs"):
        _check_sampling(4, 0.0, "exact_recompute", group=object())
