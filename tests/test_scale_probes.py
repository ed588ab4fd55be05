"""Probed linear / convolution layers and NIO's scale gradients from probes (nio_fast.ops.probed_layers,
nio_fast.algorithms.scale_probes) against autograd of the plain layers and the reference NIO."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nio_fast
from nio_fast.algorithms import scale_probes
from nio_fast.algorithms.scale_probes import ScaleProbes
from nio_fast.ops.probed_layers import ConvConfig, probed_conv, probed_linear
from models import batch_for, make_model
from reference import reference_nio

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=1e-5)}

# (name, input shape, weight shape, layer kwargs): odd sizes, a 3-D linear input, strided, dilated,
# padded and grouped convolutions.
CASES = [
    ("linear_2d", (7, 5), (3, 5), {}),
    ("linear_3d", (4, 6, 5), (9, 5), {}),
    ("conv1d", (3, 4, 11), (6, 4, 3), dict(stride=2, padding=1, dilation=1, groups=1)),
    ("conv2d", (3, 4, 9, 7), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    ("conv3d", (2, 2, 5, 4, 5), (3, 2, 2, 2, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
]


def _plain(kind, x, weight, bias, kwargs):
    if kind.startswith("linear"):
        return F.linear(x, weight, bias)
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2](x, weight, bias, **kwargs)


def _probed(kind, x, weight, bias, probe, kwargs):
    if kind.startswith("linear"):
        return probed_linear(x, weight.view_as(weight), bias, probe.view_as(probe))
    dims = x.dim() - 2
    per_dim = [list(v) if isinstance(v, tuple) else [v] * dims for v in
               (kwargs["stride"], kwargs["padding"], kwargs["dilation"])]
    return probed_conv(x, weight.view_as(weight), bias, probe.view_as(probe), ConvConfig(dims, *per_dim,
                                                                                           kwargs["groups"]))


def _tensors(input_shape, weight_shape, dtype, with_bias):
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=dtype, requires_grad=True)
    bias = torch.randn(weight_shape[0], dtype=dtype, requires_grad=True) if with_bias else None
    return x, weight, bias


def _second_order(layer, x, weight, bias):
    """A loss whose gradient depends on the output (so the double backward reaches the forward
    use), the chunk-like gradients of it with graph, and a function J of those gradients."""
    y = layer(x, weight, bias)
    torch.manual_seed(1)
    targets = torch.randn_like(y)
    loss = (y * targets).sum() + 0.5 * (y.square() * targets.abs()).sum()
    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    weights = [torch.randn_like(g) for g in grads]
    objective = sum((g * w).sum() + 0.25 * g.square().sum() for g, w in zip(grads, weights))
    return y, grads, objective


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kind,input_shape,weight_shape,kwargs", CASES)
def test_probed_layers_match_autograd(kind, input_shape, weight_shape, kwargs, with_bias, dtype):
    torch.manual_seed(0)
    x, weight, bias = _tensors(input_shape, weight_shape, dtype, with_bias)
    probe = torch.zeros((), dtype=dtype, requires_grad=True)
    y, grads, objective = _second_order(lambda *a: _plain(kind, *a, kwargs), x, weight, bias)
    others = [t for t in (x, bias) if t is not None]
    d_weight, *d_others = torch.autograd.grad(objective, [weight, *others], retain_graph=True)

    def probed_run():
        return _second_order(lambda *a: _probed(kind, *a, probe, kwargs), x, weight, bias)

    y_probed, grads_probed, objective_probed = probed_run()
    torch.testing.assert_close(y_probed, y, **TOLERANCE[dtype])
    for got, expected in zip(grads_probed, grads):  # the gradients a Gram is made of
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(objective_probed, objective, **TOLERANCE[dtype])
    # NIO's double backward: the probe instead of the weight gives <dJ/dW, W>
    d_probe, *d_others_probed = torch.autograd.grad(objective_probed, [probe, *others])
    torch.testing.assert_close(d_probe, (d_weight * weight).sum(), **TOLERANCE[dtype])
    for got, expected in zip(d_others_probed, d_others):
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    # asked for, the weight's own gradient is formed as ever (with the probe's, or alone)
    _, _, objective_probed = probed_run()
    d_weight_probed, d_probe_again = torch.autograd.grad(objective_probed, [weight, probe])
    torch.testing.assert_close(d_weight_probed, d_weight, **TOLERANCE[dtype])
    torch.testing.assert_close(d_probe_again, d_probe, **TOLERANCE[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,input_shape,weight_shape,kwargs", [CASES[1], CASES[3]])
def test_probed_layers_on_cuda(kind, input_shape, weight_shape, kwargs):
    torch.manual_seed(0)
    x, weight, bias = (t.detach().cuda().requires_grad_() for t in _tensors(input_shape, weight_shape,
                                                                             torch.float64, True))
    probe = torch.zeros((), dtype=torch.float64, device="cuda", requires_grad=True)
    _, _, objective = _second_order(lambda *a: _plain(kind, *a, kwargs), x, weight, bias)
    d_weight = torch.autograd.grad(objective, weight)[0]
    _, _, objective = _second_order(lambda *a: _probed(kind, *a, probe, kwargs), x, weight, bias)
    torch.testing.assert_close(torch.autograd.grad(objective, probe)[0], (d_weight * weight).sum(),
                               **TOLERANCE[torch.float64])


class _WeightGradients(TorchDispatchMode):
    """Counts the products (matmuls, convolution backwards) whose result has the weight's shape:
    weight gradients. (The cotangents of the chunk gradients are weight-shaped too, but they are
    sums and products of the Gram's cotangent, not such products.)"""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.convolution_backward.default}

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS:
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.count += sum(isinstance(o, torch.Tensor) and o.shape == self.shape for o in results)
        return out


@pytest.mark.parametrize("kind,input_shape,weight_shape,kwargs", [CASES[1], CASES[3]])
def test_the_double_backward_forms_no_weight_sized_gradient_for_a_probe(kind, input_shape, weight_shape, kwargs):
    torch.manual_seed(0)
    x, weight, bias = _tensors(input_shape, weight_shape, torch.float64, True)
    probe = torch.zeros((), dtype=torch.float64, requires_grad=True)
    counts = {}
    for wanted in ("probe", "weight"):
        _, _, objective = _second_order(lambda *a: _probed(kind, *a, probe, kwargs), x, weight, bias)
        spy = _WeightGradients(weight_shape)
        with spy:
            torch.autograd.grad(objective, [probe if wanted == "probe" else weight, x])
        counts[wanted] = spy.count
    assert counts["probe"] == 0
    assert counts["weight"] >= 2  # the forward use's and the backward use's weight gradients


class TwoUses(nn.Module):
    """fc.weight: a linear layer and a plain matmul; conv.weight: a convolution only; norm: LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.same(torch.relu(self.conv(x))).mean(dim=(2, 3))
        h = self.norm(torch.relu(self.fc(h)) + h @ self.fc.weight.t())
        return self.head(h)


def _probe_verdicts(model, batch, **options):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    probes = ScaleProbes(params, [not n.endswith("bias") for n in names])
    with probes, torch.enable_grad():
        loss = F.cross_entropy(model(batch[0]), batch[1])
        torch.autograd.grad(loss, params, create_graph=True, **options)
    return {names[k] for k in probes.probed()}, {names[k] for k in probes.unprobed}


def test_a_weight_used_outside_the_probed_layers_keeps_its_full_gradient():
    torch.manual_seed(0)
    model = TwoUses().double()
    batch = (torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    probed, unprobed = _probe_verdicts(model, batch)
    assert probed == {"conv.weight", "head.weight"}
    assert unprobed == {"fc.weight", "norm.weight", "same.weight"}  # a matmul, LayerNorm, padding="same"


@pytest.mark.parametrize("use", ["vmap", "no_grad", "autocast"])
def test_vmapped_graphless_and_autocast_uses_are_not_probed(use):
    model = nn.Linear(3, 2)
    probes = ScaleProbes(list(model.parameters()), [True, False])
    x = torch.randn(4, 3)
    with probes:
        model(x)
        if use == "vmap":
            torch.func.vmap(model)(x[:, None])
        elif use == "no_grad":  # no graph: nothing to route
            with torch.no_grad():
                model(x)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
    assert probes.routed == {0} and probes.unprobed == {0} and not probes.probed()


def _spy_probed(monkeypatch):
    seen = []
    split = ScaleProbes.split

    def recording(self, grads, dtype):
        seen.append(len(self.probed()))
        return split(self, grads, dtype)
    monkeypatch.setattr(scale_probes.ScaleProbes, "split", recording)
    return seen


@pytest.mark.parametrize("name,mode", [("mlp", "per_chunk"), ("gn_resnet", "per_chunk"), ("transformer", "per_chunk"),
                                       ("odd", "per_chunk"), ("bn_cnn", "exact"), ("mlp", "factors"),
                                       ("gn_resnet", "factors")])
def test_nio_with_probes_matches_reference(monkeypatch, name, mode):
    seen = _spy_probed(monkeypatch)
    batches = [batch_for(name, 16) for _ in range(2)]
    model, twin = make_model(name), make_model(name)
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    params = [p for p in twin.parameters() if p.requires_grad]
    expected, history = reference_nio(twin, batches, F.cross_entropy, names, params, iters=4, sub_batches=3,
                                      overlap=0.25)
    report = nio_fast.initialize(model, batches, iters=4, sub_batches=3, overlap=0.25, mode=mode, progress=False)
    assert seen and all(count > 0 for count in seen), "the probes should have taken some weights"
    torch.testing.assert_close(torch.tensor([report.scales[n] for n in names]), torch.tensor(expected),
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.tensor([h["gradcosine"] for h in report.history]),
                               torch.tensor([h["gradcosine"] for h in history]), rtol=1e-8, atol=1e-12)


def test_nio_fp32_with_probes_matches_reference_within_1e4(monkeypatch):
    seen = _spy_probed(monkeypatch)
    batches = [batch_for("gn_resnet", 16, dtype=torch.float32) for _ in range(2)]
    model, twin = make_model("gn_resnet", torch.float32), make_model("gn_resnet", torch.float32)
    names = [n for n, _ in twin.named_parameters()]
    expected, _ = reference_nio(twin, batches, F.cross_entropy, names, list(twin.parameters()), iters=4,
                                sub_batches=2, overlap=0.25)
    report = nio_fast.initialize(model, batches, iters=4, overlap=0.25, mode="per_chunk", progress=False)
    assert seen and all(count > 0 for count in seen)
    torch.testing.assert_close(torch.tensor([report.scales[n] for n in names]), torch.tensor(expected),
                               rtol=1e-4, atol=1e-6)


def test_min_scale_zero_takes_every_gradient_whole(monkeypatch):
    seen = _spy_probed(monkeypatch)
    nio_fast.initialize(make_model("mlp"), batch_for("mlp", 16), iters=1, sub_batches=2, mode="per_chunk",
                        min_scale=0.0, progress=False)
    assert not seen  # a scale that may reach 0 has no s_p = <g, theta> / alpha: no probes at all


@pytest.mark.parametrize("name", ["conv_zoo", "token_transformer"])
def test_samplewise_nio_with_probes_matches_reference(monkeypatch, name):
    """The factors engine records the layers above the probes: its per-sample Gram and the probes'
    scale gradients together take the reference's steps (D = N)."""
    from samplewise_models import make_zoo_model, zoo_batch
    seen = _spy_probed(monkeypatch)
    model, twin = make_zoo_model(name, torch.float64, seed=3), make_zoo_model(name, torch.float64, seed=3)
    batch = zoo_batch(name, 6, torch.float64)
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    params = [p for p in twin.parameters() if p.requires_grad]
    report = nio_fast.initialize(model, batch, sub_batches="samples", iters=3, gamma=5.0, progress=False)
    reference_nio(twin, [batch], F.cross_entropy, names, params, iters=3, sub_batches=len(batch[1]), gamma=5.0)
    assert report.iterations == 3 and seen and all(count > 0 for count in seen)
    for (n, mine), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-12, msg=n)


def test_a_bias_scale_at_its_bound_zero_adds_nothing_to_the_probed_scale_gradients():
    """The probes' part is 0 for every tensor they did not take; a bias whose scale reached 0 must
    add 0 there, not 0 / 0 (which stopped the demo's NIO run at iteration 49 with a non-finite step)."""
    from nio_fast.algorithms.scale_search import IterationOutcome, _scale_gradients
    initial = [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    gradient = torch.randn(2, dtype=torch.float64)
    scales = torch.tensor([0.5, 0.0], dtype=torch.float64)  # the weight's probe; the bias at its bound

    def iteration(index):
        return IterationOutcome([None, gradient], 1, {}, torch.tensor([2.0, 0.0], dtype=torch.float64))
    _, s, _ = _scale_gradients(iteration, 0, initial, scales, None)
    torch.testing.assert_close(s, torch.stack([torch.tensor(4.0, dtype=torch.float64),
                                               (gradient * initial[1]).sum()]))


def test_the_demo_setting_runs_every_iteration_with_probes():
    """make demo's NIO on its CNN, seed 0."""
    from nio_fast.data import digits_loader
    from nio_fast.models import digits_cnn
    torch.manual_seed(0)
    model = digits_cnn(channels=16)
    data = digits_loader("train", "image", batch_size=64, seed=5000, drop_last=True)  # the demo's seed 0
    report = nio_fast.initialize(model, data, iters=60, gamma=5.0, progress=False, seed=0)
    # a bias scale reaches its bound 0 on the way (iteration 49 stopped with a 0 / 0 before the fix)
    assert report.iterations == 60 and report.stop_reason is None


class WithAnUnknownLayer(nn.Module):
    """Linear layers (probed) around a weight used through torch.matmul (no factor rule)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.unknown = nn.Parameter(torch.randn(6, 6) / 6 ** 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.tanh(self.inp(x)) @ self.unknown))


def test_auto_falls_back_from_factors_before_the_autograd_route_with_exact_probed_scales(monkeypatch):
    """On the CPU "auto" tries the factor engine for small chunks; a weight without a factor rule
    sends it back to per_chunk (vmap) after the forward and backward, before one backward per
    sample, and the probes forget the abandoned attempt's routing (else the Linear weights' scale
    gradients would be read from probes the vmap graph never used: zero)."""
    from nio_fast.samplewise import engine
    torch.manual_seed(0)
    model, twin = WithAnUnknownLayer().double(), WithAnUnknownLayer().double()
    twin.load_state_dict(model.state_dict())
    batch = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    # factors by name first (the autograd route is taken there): the loss is then known to be a
    # per-sample mean, so the attempt below routes weights with a graph before it gives up
    nio_fast.gradcosine(model, batch, sub_batches=8, mode="factors")
    monkeypatch.setattr(engine, "_autograd_gram", lambda *args: pytest.fail("the autograd route ran"))
    seen = _spy_probed(monkeypatch)
    names = [n for n, _ in twin.named_parameters()]
    expected, _ = reference_nio(twin, [batch], F.cross_entropy, names, list(twin.parameters()), iters=3,
                                sub_batches=8)
    report = nio_fast.initialize(model, batch, iters=3, sub_batches=8, progress=False)
    assert seen == [0, 0, 0]  # vmap ran every iteration: nothing probed (the first one's attempt forgotten)
    torch.testing.assert_close(torch.tensor([report.scales[n] for n in names]), torch.tensor(expected),
                               rtol=1e-8, atol=1e-12)
