"""Recomputed segments (``recompute=``): the same sample-wise GradCosine and gradients as the
engine that keeps everything, with only the segments' inputs and output gradients kept."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast.samplewise.segments import resolve_segments
from models import GroupNormBlock, batch_for, make_model
from samplewise_models import MatmulLayer, make_zoo_model, zoo_batch
from samplewise_checks import assert_near, check_against_reference, trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import allocated_peak_mb  # noqa: E402  (the allocator's peak, torch.profiler's memory events)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Chain(nn.Module):
    """A Linear whose output feeds the first segment directly (its gradient is one the engine
    hooks), residual blocks, a head."""

    def __init__(self, features: int = 6, width: int = 8, depth: int = 3, classes: int = 5):
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)).mean(1))


def chain(dtype, seed=0, num=7, positions=4, **sizes):
    torch.manual_seed(seed)
    return Chain(**sizes).to(dtype), (torch.randn(num, positions, sizes.get("features", 6), dtype=dtype),
                                       torch.randint(0, 5, (num,)))


CASES = {  # name: (model and batch, what to recompute)
    "chain": (chain, lambda model: ResidualBlock),
    "chain_one_block": (chain, lambda model: [model.blocks[1]]),
    "gn_resnet": (lambda dtype: (make_model("gn_resnet", dtype), batch_for("gn_resnet", 7, dtype)),
                  lambda model: GroupNormBlock),
    "transformer": (lambda dtype: (make_model("transformer", dtype), batch_for("transformer", 7, dtype)),
                    lambda model: nn.TransformerEncoderLayer),
    "token_transformer": (lambda dtype: (make_zoo_model("token_transformer", dtype),
                                         zoo_batch("token_transformer", 7, dtype)),
                          lambda model: [model.encoder]),
    "conv_zoo": (lambda dtype: (make_zoo_model("conv_zoo", dtype), zoo_batch("conv_zoo", 7, dtype)),
                 lambda model: [model.same, model.line]),
}


def evaluate(model, batch, **kwargs):
    _, params = trainable(model)
    result = nio_fast.gradcosine(model, batch, create_graph=True, **kwargs)
    return result, torch.autograd.grad(result.value, params, allow_unused=True)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_recomputed_segments_equal_the_per_sample_reference(name, dtype, rtol):
    build, segments = CASES[name]
    model, batch = build(dtype)
    result = check_against_reference(model, batch, rtol, sub_batches="samples", recompute=segments(model))
    kept = nio_fast.gradcosine(model, batch, sub_batches="samples")
    assert result.routes == kept.routes  # every parameter, inside segments too, says its route
    assert all("forward" not in module.__dict__ for module in model.modules())  # forwards restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gn_resnet", "transformer", "chain"])
def test_recomputed_segments_on_cuda(name):
    """On a GPU the segments' backward nodes run in the autograd engine's device thread, where the
    Gram parts' values are skipped (a thread-local flag) and the CUDA generator is restored."""
    build, segments = CASES[name]
    model, (inputs, targets) = build(torch.float64)
    model = model.cuda()
    check_against_reference(model, (inputs.cuda(), targets.cuda()), 1e-10, sub_batches="samples",
                            recompute=segments(model))


@pytest.mark.parametrize("sub_batches,overlap", [(3, 0.0), (3, 0.4)])
@pytest.mark.parametrize("name", ["chain", "gn_resnet"])
def test_recomputed_segments_give_sub_batch_grams_in_factors_mode(name, sub_batches, overlap):
    build, segments = CASES[name]
    model, batch = build(torch.float64)
    check_against_reference(model, batch, 1e-10, sub_batches=sub_batches, overlap=overlap, mode="factors",
                            recompute=segments(model))


@pytest.mark.parametrize("name", ["chain", "transformer"])
def test_recomputed_segments_equal_the_kept_graph_exactly_enough(name):
    """Against the engine without segments (not a reference): the same ops in another order."""
    build, segments = CASES[name]
    model, batch = build(torch.float64)
    kept, kept_grads = evaluate(model, batch, sub_batches="samples")
    recomputed, grads = evaluate(model, batch, sub_batches="samples", recompute=segments(model))
    assert_near(recomputed.gram, kept.gram, 1e-12, "Gram")
    for mine, theirs in zip(grads, kept_grads):
        assert_near(mine, theirs, 1e-12, "gradient")
    value = nio_fast.gradcosine(model, batch, sub_batches="samples", recompute=segments(model))
    assert not value.value.requires_grad and abs(float(value.value) - float(kept.value.detach())) < 1e-12


def test_initialize_with_recompute_applies_the_same_scales():
    runs = []
    for recompute in (None, ResidualBlock):
        model, batch = chain(torch.float64)
        report = nio_fast.initialize(model, batch, iters=3, sub_batches="samples", progress=False,
                                     recompute=recompute)
        runs.append((report, [p.detach().clone() for p in model.parameters()]))
    (plain, plain_params), (recomputed, recomputed_params) = runs
    assert recomputed.settings["recompute"] == 3 and "recompute" not in plain.settings
    for mine, theirs in zip(recomputed_params, plain_params):
        assert_near(mine, theirs, 1e-10, "scaled parameter")


def _nio_probe_verdicts(model, batch, recompute, iters=2):
    """NIO's (probed, unprobed) tensor indices in each iteration, and the scaled parameters."""
    from nio_fast.algorithms.scale_probes import ScaleProbes
    verdicts, split = [], ScaleProbes.split

    def recording(self, grads, dtype):
        verdicts.append((frozenset(self.probed()), frozenset(self.unprobed)))
        return split(self, grads, dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ScaleProbes, "split", recording)
        nio_fast.initialize(model, batch, iters=iters, sub_batches="samples", gamma=5.0, progress=False,
                            recompute=recompute)
    return verdicts, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["chain", "gn_resnet", "transformer", "conv_zoo"])
def test_segments_route_their_weights_through_nio_probes(name):
    """In NIO's iteration a recomputed segment routes its linear and convolution weights' uses
    through probed layers with probes of its own, in each of its passes: the same tensors are
    probed as without recompute (their scale gradients from probes, no weight-sized gradient),
    weights some use of which no probe takes (conv_zoo's padding="same") keep their whole
    gradient, and the scales are those of the kept engine."""
    build, segments = CASES[name]
    model, batch = build(torch.float64)
    twin = build(torch.float64)[0]
    kept, kept_params = _nio_probe_verdicts(twin, batch, None)
    recomputed, params = _nio_probe_verdicts(model, batch, segments(model))
    owned = {id(param) for module in resolve_segments(model, segments(model)) for param in module.parameters()}
    owned = {index for index, param in enumerate(model.parameters()) if id(param) in owned}
    assert recomputed == kept and kept[0][0] & owned, "the segments' weights should be probed"
    for mine, theirs in zip(params, kept_params):
        assert_near(mine, theirs, 1e-10, "scaled parameter")


class SwitchesItsPadding(nn.Module):
    """A convolution with padding 1 in its first two runs (the forward, the pass that decides
    which weights to probe), padding="same" afterwards: the same values, but a use no probe
    takes, so its recomputations would route the weight differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return x + torch.tanh(F.conv1d(x, self.conv.weight, self.conv.bias, padding=1 if self.runs <= 2 else "same"))


def test_a_segment_recomputed_differently_is_an_error_not_a_wrong_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(SwitchesItsPadding(), nn.Flatten(), nn.Linear(24, 5)).double()
    batch = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 5, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="recompute: SwitchesItsPadding used its weights differently when "
                                           "recomputed"):
        nio_fast.initialize(model, batch, iters=1, sub_batches="samples", progress=False, recompute=[model[0]])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # left as it was


def test_recompute_keeps_a_fraction_of_the_memory():
    """Eight blocks over many positions: the kept engine holds every block's activations and
    output gradients for the double backward, the recomputing one a block's at a time."""
    model, batch = chain(torch.float32, seed=1, num=16, positions=256, features=16, width=32, depth=8)
    _, params = trainable(model)

    def evaluation(recompute):
        result = nio_fast.gradcosine(model, batch, sub_batches="samples", create_graph=True, recompute=recompute)
        torch.autograd.grad(result.value, params)

    evaluation(None)  # lazy imports and first-call choices
    kept, recomputed = allocated_peak_mb(lambda: evaluation(None)), allocated_peak_mb(lambda: evaluation(ResidualBlock))
    assert recomputed < 0.5 * kept, f"recomputed peak {recomputed:.1f} MB against {kept:.1f} MB kept"


@pytest.mark.parametrize("recompute,expected", [
    # the values pass of every block but the last reached, whose graph is built once and kept;
    # the double backward recomputes the others with a graph, their parts' values skipped
    (ResidualBlock, {(False, True): 2, (True, True): 1, (True, False): 2}),
    # a lone segment keeping its graph would keep everything: recomputed like the others
    ("one", {(False, True): 1, (True, False): 1}),
])
def test_the_last_segment_reached_keeps_its_graph_for_the_double_backward(recompute, expected):
    from nio_fast.samplewise import engine
    model, batch = chain(torch.float64)
    segments = [model.blocks[1]] if recompute == "one" else recompute
    _, params = trainable(model)
    passes = []
    original = engine._segment_gram_pass

    def counted(*args):
        passes.append(args[-3:-1])  # (create_graph, values)
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_segment_gram_pass", counted)
        result = nio_fast.gradcosine(model, batch, sub_batches="samples", create_graph=True, recompute=segments)
        first = torch.autograd.grad(result.value, params, retain_graph=True)
        assert {kind: passes.count(kind) for kind in set(passes)} == expected
        second = torch.autograd.grad(result.value, params)  # the kept graph was used up: recomputed
    for mine, theirs in zip(second, first):
        assert_near(mine, theirs, 1e-12, "gradient of a second double backward")


class SquashedBlock(ResidualBlock):
    """Ends in a tanh, whose backward reads the output it saves."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class InPlaceAfterSegments(Chain):
    """Each block's output rectified, in place when ``inplace`` (plain autograd would refuse: the
    tanh saved that output; a recomputed segment keeps only its input)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.blocks = nn.ModuleList(SquashedBlock(8) for _ in range(3))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = F.relu(block(x), inplace=self.inplace)
        return self.head(x.mean(1))


def test_a_segment_output_modified_in_place_afterwards_changes_nothing():
    batch = (torch.randn(7, 4, 6, dtype=torch.float64), torch.randint(0, 5, (7,)))
    models = []
    for inplace in (False, True):
        torch.manual_seed(0)
        models.append(InPlaceAfterSegments(inplace).double())
    kept, kept_grads = evaluate(models[0], batch, sub_batches="samples")  # nothing recomputed, no in-place
    recomputed, grads = evaluate(models[1], batch, sub_batches="samples", recompute=SquashedBlock)
    assert_near(recomputed.gram, kept.gram, 1e-12, "Gram")
    for mine, theirs in zip(grads, kept_grads):
        assert_near(mine, theirs, 1e-12, "gradient")


class FirstBlockFrozen(Chain):
    """Runs its first block under no_grad: no gradient flows through that call."""

    def forward(self, x):
        x = self.inp(x)
        with torch.no_grad():
            x = self.blocks[0](x)
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(x.mean(1))


def test_a_segment_called_under_no_grad_gives_the_kept_engines_values():
    torch.manual_seed(0)
    model = FirstBlockFrozen().double()
    batch = (torch.randn(7, 4, 6, dtype=torch.float64), torch.randint(0, 5, (7,)))
    params = [p for name, p in model.named_parameters() if name.startswith(("blocks.1", "blocks.2", "head"))]
    results = []
    for recompute in (None, ResidualBlock):
        result = nio_fast.gradcosine(model, batch, sub_batches="samples", params=params, create_graph=True,
                                     recompute=recompute)
        results.append((result, torch.autograd.grad(result.value, params)))
    (kept, kept_grads), (recomputed, grads) = results
    assert_near(recomputed.gram, kept.gram, 1e-12, "Gram")
    for mine, theirs in zip(grads, kept_grads):
        assert_near(mine, theirs, 1e-12, "gradient")


class NoisyBlock(ResidualBlock):
    """Multiplicative noise drawn in the forward, whatever the module's mode."""

    def forward(self, x):
        return super().forward(x) * (1 + 0.1 * torch.randn_like(x))


def test_a_segment_drawing_random_numbers_draws_the_same_ones_when_recomputed():
    model, batch = chain(torch.float64)
    model.blocks[1] = NoisyBlock(8).double()
    results = []
    for recompute in (None, NoisyBlock):
        torch.manual_seed(5)
        results.append(evaluate(model, batch, sub_batches="samples", recompute=recompute))
        results[-1] += (torch.rand(()),)  # the generator is left where one forward leaves it
    (kept, kept_grads, after_kept), (recomputed, grads, after_recomputed) = results
    assert_near(recomputed.gram, kept.gram, 1e-12, "Gram")
    for mine, theirs in zip(grads, kept_grads):
        assert_near(mine, theirs, 1e-12, "gradient")
    assert torch.equal(after_kept, after_recomputed)


class ReturnsATuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)

    def forward(self, x):
        return self.block(x), x


class TupleUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = ReturnsATuple()
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        return self.head(self.pair(x)[0])


class EmbeddingSegment(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 5)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(5, 5)

    def forward(self, x, other):
        return self.mix(x) * other


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(5, 5)
        self.mixer = Mixer()

    def forward(self, x):
        return self.mixer(x, torch.sigmoid(self.gate(x)))


class SharesWithTheHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x))) + F.linear(x, self.block.weight)


class UsesAForeignWeight(nn.Module):
    def __init__(self, other: nn.Linear):
        super().__init__()
        self.other = [other]  # not a submodule: the weight belongs to the model, not to this segment
        self.own = nn.Linear(5, 5)

    def forward(self, x):
        return self.own(x) + F.linear(x, self.other[0].weight)


class ForeignUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 5)
        self.segment = UsesAForeignWeight(self.head)

    def forward(self, x):
        return self.head(self.segment(x))


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = MatmulLayer(5, 5)
        self.head = nn.Linear(5, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)))


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)

    def forward(self, x):
        return self.block(torch.tanh(self.block(x)))


def small_batch():
    return torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))


@pytest.mark.parametrize("build,recompute,error,message", [
    (SharesWithTheHead, lambda m: [m.block], ValueError, "also used outside it"),
    (ForeignUser, lambda m: [m.segment], ValueError, "not its own"),
    (Unknown, lambda m: [m.layer], ValueError, "no factor rule"),
    (TwiceCalled, lambda m: [m.block], ValueError, "runs twice"),
    (TupleUser, lambda m: [m.pair], TypeError, "must return one floating-point tensor"),
    (EmbeddingSegment, lambda m: [m.embed], TypeError, "floating-point tensor as its first argument"),
    (TwoInputs, lambda m: [m.mixer], ValueError, "differentiates its first argument only"),
    (TwiceCalled, lambda m: [nn.Linear(5, 5)], ValueError, "not a submodule"),
    (Chain, lambda m: [m.blocks, m.blocks[0]], ValueError, "cannot nest"),
    (Chain, lambda m: nn.Conv2d, ValueError, "has no Conv2d"),
    (Chain, lambda m: 3, TypeError, "expected modules or module classes"),
])
def test_unsupported_segments_are_refused_by_name(build, recompute, error, message):
    model = build().double()
    batch = chain(torch.float64)[1] if build is Chain else small_batch()
    if build is EmbeddingSegment:
        batch = (torch.randint(0, 7, (6, 3)), batch[1])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match="recompute: .*" + message):
        evaluate(model, batch, sub_batches="samples", recompute=recompute(model))
    with pytest.raises(error, match="recompute: .*" + message):
        nio_fast.initialize(model, batch, iters=1, sub_batches="samples", progress=False, recompute=recompute(model))
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_recompute_needs_the_factors_mode():
    model, batch = chain(torch.float64)
    with pytest.raises(ValueError, match="recompute: segments are recomputed by the factors mode only.*per_chunk"):
        nio_fast.gradcosine(model, batch, sub_batches=2, mode="per_chunk", recompute=ResidualBlock)
    coupled = make_model("bn_cnn")  # BatchNorm: "samples" runs the exact whole-batch mode
    with pytest.raises(ValueError, match="recompute: .*this evaluation runs 'exact'"):
        nio_fast.gradcosine(coupled, batch_for("bn_cnn", 4), sub_batches="samples", recompute=[coupled.head])
    with pytest.raises(ValueError, match="recompute: applies to method='nio' only"):
        nio_fast.initialize(model, batch, method="gradinit", iters=1, progress=False, recompute=ResidualBlock)
