"""Sample-wise GradCosine (sub_batches="samples") held equal to one autograd call per sample."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast.algorithms import gradcosine
from nio_fast.samplewise import engine
from nio_fast.samplewise.recorder import indices_in
from models import batch_for, make_model
from reference import reference_gradcosine, spec_modes
from samplewise_checks import assert_near, check_against_reference, trainable
from samplewise_models import ZOO, make_zoo_model, zoo_batch

ZOO_MODELS = sorted(ZOO)
# From tests/models.py: coupling-free ones (the GRU has no rule: it takes the autograd route)
PLAIN_MODELS = ["mlp", "gn_resnet", "transformer", "odd", "recurrent"]


def build(name, dtype, seed=0):
    if name in ZOO:
        return make_zoo_model(name, dtype, seed), zoo_batch(name, 9, dtype)
    return make_model(name, dtype, seed), batch_for(name, 9, dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", ZOO_MODELS + PLAIN_MODELS)
def test_samples_equal_one_autograd_call_per_sample(name, dtype, rtol):
    model, batch = build(name, dtype)
    result = check_against_reference(model, batch, rtol,
                                     sub_batches="samples")
    assert result.mode == "factors"
    assert result.chunks == [(i, i + 1) for i in range(len(batch[1]))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["conv_zoo", "token_transformer", "gn_resnet"])
def test_samples_on_cuda_equal_one_autograd_call_per_sample(name):
    """On a GPU the Gram parts are formed inside the autograd engine's device thread (hooks)."""
    model, (inputs, targets) = build(name, torch.float64)
    result = check_against_reference(model.cuda(), (inputs.cuda(), targets.cuda()), 1e-10, sub_batches="samples")
    assert result.mode == "factors"


def test_routes_name_every_parameter_and_the_fallbacks():
    model, batch = build("reused_and_unknown", torch.float64)
    result = nio_fast.gradcosine(model, batch, sub_batches="samples")
    assert result.routes["unknown.weight"] == "autograd"  # torch.matmul: no rule
    assert result.routes["shared.weight"] in ("ghost", "materialize")  # two uses, positions joined
    assert result.routes["shared.bias"] == "vectors"
    assert set(result.routes) == {n for n, _ in model.named_parameters()}

    model, batch = build("sequence_zoo", torch.float64)
    routes = nio_fast.gradcosine(model, batch, sub_batches="samples").routes
    assert routes["embed.weight"] == "vectors"  # tied with F.linear: uses of two kinds
    assert routes["position"] == routes["layer_scale"] == "vectors"
    assert routes["mix.weight"] in ("ghost", "materialize")

    model, batch = build("recurrent", torch.float64)
    routes = nio_fast.gradcosine(model, batch, sub_batches="samples").routes
    assert all(routes[name] == "autograd" for name in routes if name.startswith("rnn."))
    assert routes["head.weight"] in ("ghost", "materialize")


@pytest.mark.parametrize("forced", ["ghost", "materialize"])
def test_both_outer_routes_are_exact(forced, monkeypatch):
    monkeypatch.setattr(engine, "choose_outer_route", lambda *sizes: forced)
    for name in ("conv_zoo", "token_transformer"):
        model, batch = build(name, torch.float64)
        result = check_against_reference(model, batch, 1e-10, sub_batches="samples")
        assert forced in set(result.routes.values())


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sub_batches", ["samples", 3])
@pytest.mark.parametrize("name", ["conv_zoo", "sequence_zoo", "token_transformer", "reused_and_unknown"])
def test_weights_materialised_in_channel_blocks_are_exact(monkeypatch, name, sub_batches, dtype, rtol, keep):
    """Per-sample weight rows formed a block of 1-2 output channels at a time (forward, and a
    backward that recomputes them or keeps them) give the Gram and scale gradients of the reference."""
    from nio_fast.samplewise import blocked_gram
    monkeypatch.setattr(blocked_gram, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(blocked_gram, "MIN_BLOCK_CHANNELS", 2 if dtype == torch.float64 else 1)
    monkeypatch.setattr(blocked_gram, "CHANNEL_ALIGNMENT", 1)
    monkeypatch.setattr(engine, "choose_outer_route", lambda *sizes: "materialize")
    monkeypatch.setattr(engine, "_chunks_beat_ghost", lambda *args: False)
    calls = []
    monkeypatch.setattr(blocked_gram._BlockedGram, "apply",
                        lambda rows, blocks, axes, _, *tensors, _apply=blocked_gram._BlockedGram.apply:
                        calls.append(blocks) or _apply(rows, blocks, axes, keep, *tensors))
    model, batch = build(name, dtype, seed=4)
    check_against_reference(model, batch, rtol, sub_batches=sub_batches, mode="factors")
    if name == "conv_zoo" or sub_batches != "samples":  # (linear layers alone materialise per sample pair)
        assert calls and any(len(blocks) > 1 for blocks in calls)


def test_channel_blocks_tile_the_channels_in_aligned_widths():
    from nio_fast.samplewise.blocked_gram import BLOCK_ELEMENTS, CHANNEL_ALIGNMENT, MIN_BLOCK_CHANNELS, channel_blocks
    assert channel_blocks(64, 16, 576) == [(0, 64)]  # rows of 590k values: one block
    for channels, rows, per_channel in [(256, 64, 2304), (128, 64, 1152), (128, 64, 576), (100, 1, 1 << 16),
                                        (512, 256, 4608), (200, 7, 300)]:
        blocks = channel_blocks(channels, rows, per_channel)
        assert blocks[0][0] == 0 and blocks[-1][1] == channels
        assert all(end == start for (_, end), (start, _) in zip(blocks[:-1], blocks[1:]))
        widths = [end - start for start, end in blocks]
        assert len(set(widths[:-1])) <= 1 and widths[-1] <= widths[0]  # one width, the last takes the rest
        assert all(width % CHANNEL_ALIGNMENT == 0 for width in widths[:-1])
        # at most about BLOCK_ELEMENTS values a block (rounded to the alignment), MIN_BLOCK_CHANNELS at least
        fits = BLOCK_ELEMENTS / (rows * per_channel)
        assert widths[0] <= max(MIN_BLOCK_CHANNELS, fits + CHANNEL_ALIGNMENT / 2)
        assert len(blocks) == 1 or widths[0] >= MIN_BLOCK_CHANNELS
    # a 128 x 128 x 3 x 3 convolution at N = 64 (28 channels fit): 4 blocks of 32, not 5 of 25-26
    assert channel_blocks(128, 64, 1152) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert channel_blocks(100, 1, 1 << 16) == [(0, 32), (32, 64), (64, 96), (96, 100)]


@pytest.mark.parametrize("chunk_sums", [True, False], ids=["chunk-sums", "sample-grams"])
@pytest.mark.parametrize("sub_batches,overlap", [(2, 0.0), (3, 0.3), (4, 0.0), (5, 0.5)])
@pytest.mark.parametrize("name", ["conv_zoo", "sequence_zoo", "token_transformer", "token_transformer_seq_first",
                                  "reused_and_unknown"])
def test_factor_mode_chunk_grams_equal_the_sub_batch_reference(monkeypatch, name, sub_batches, overlap, chunk_sums):
    # chunk sums: linear / conv weights reduced per chunk; else every part through W^T G W or W^T V
    monkeypatch.setattr(engine, "_chunks_beat_ghost", lambda *args: chunk_sums)
    model, batch = build(name, torch.float64, seed=1)
    result = check_against_reference(model, batch, 1e-10, sub_batches=sub_batches, overlap=overlap,
                                     mode="factors")
    assert result.mode == "factors"
    assert ("chunks" in result.routes.values()) == chunk_sums


@pytest.mark.parametrize("name", ["conv_zoo", "token_transformer"])
def test_chunk_sums_in_fp32(name):
    model, batch = build(name, torch.float32, seed=2)
    result = check_against_reference(model, batch, 1e-5, sub_batches=4, overlap=0.25, mode="factors")
    assert "chunks" in result.routes.values()


def test_chunk_sums_win_where_chunks_are_few_and_ghost_where_layers_are_wide():
    model, batch = build("conv_zoo", torch.float64)
    few = nio_fast.gradcosine(model, batch, sub_batches=2, mode="factors")
    assert all(route in ("chunks", "vectors") for route in few.routes.values()), few.routes
    # a 2048 x 2048 linear layer seen by 8 samples: the ghost Gram (8^2 x 4096) beats 8 x 2048^2
    wide = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 3)).double()
    inputs = torch.randn(8, 2048, dtype=torch.float64)
    result = check_against_reference(wide, (inputs, torch.randint(0, 3, (8,))), 1e-10, sub_batches=4,
                                     mode="factors")
    assert result.routes["0.weight"] == "ghost"


def test_batchnorm_model_runs_the_exact_whole_batch_semantics():
    model, batch = build("bn_cnn", torch.float64)
    result = check_against_reference(model, batch, 1e-10, sub_batches="samples")
    assert result.mode == "exact"
    with pytest.raises(ValueError, match="mode: 'factors' needs a model without batch coupling"):
        nio_fast.gradcosine(model, batch, sub_batches="samples", mode="factors")


def test_factor_mode_refuses_a_loss_that_is_not_a_per_sample_mean():
    model, batch = build("conv_zoo", torch.float64)

    def sum_loss(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")
    with pytest.raises(ValueError, match="loss_fn: mode='factors' with sub-batches"):
        nio_fast.gradcosine(model, batch, sum_loss, sub_batches=3, mode="factors")
    # one chunk per sample needs no such assumption: the spec's chunk loss IS the sample's loss
    names, params = trainable(model)
    result = nio_fast.gradcosine(model, batch, sum_loss, sub_batches="samples", create_graph=True)
    with spec_modes(model):
        gc, *_ = reference_gradcosine(model, *batch, sum_loss, params, len(batch[1]), 0.0)
    assert abs(float(result.value.detach()) - float(gc.detach())) < 1e-10


def test_bad_samples_arguments_are_named():
    model, batch = build("mlp", torch.float64)
    with pytest.raises(ValueError, match="sub_batches: expected an integer >= 2 or 'samples'"):
        nio_fast.gradcosine(model, batch, sub_batches="sample")
    with pytest.raises(ValueError, match="overlap: must be 0 with sub_batches='samples'"):
        nio_fast.gradcosine(model, batch, sub_batches="samples", overlap=0.2)
    with pytest.raises(ValueError, match="needs at least 2"):
        nio_fast.gradcosine(model, (batch[0][:1], batch[1][:1]), sub_batches="samples")


def test_samplewise_nio_matches_the_reference_loop():
    """initialize(sub_batches="samples") takes the same steps as NIO with D = N by the reference."""
    from reference import reference_nio
    model, batch = build("conv_zoo", torch.float64, seed=3)
    twin = make_zoo_model("conv_zoo", torch.float64, seed=3)
    names, params = trainable(twin)
    report = nio_fast.initialize(model, batch, sub_batches="samples", iters=4, gamma=5.0, progress=False)
    reference_nio(twin, [batch], F.cross_entropy, names, params, iters=4, sub_batches=len(batch[1]), gamma=5.0)
    assert report.iterations == 4
    for (name, mine), theirs in zip(model.named_parameters(), twin.parameters()):
        assert_near(mine.detach(), theirs.detach(), 1e-8, name)


def test_auto_takes_factors_on_a_gpu_where_vmap_cannot_run(monkeypatch):
    monkeypatch.setattr(gradcosine, "_on_cpu", lambda inputs: False)  # the GPU's choices, on CPU tensors
    # equal chunks on a vmappable model: vmap over chunks stays the choice
    model, batch = build("mlp", torch.float64)
    assert nio_fast.gradcosine(model, batch, sub_batches=3).mode == "per_chunk"
    assert gradcosine._VMAP_VERDICT.get(model) is True
    # unequal chunks (overlap): the loop would run, factors replaces it
    assert check_against_reference(model, batch, 1e-10, sub_batches=3, overlap=0.3).mode == "factors"
    # layer_norm: vmap is refused on the first call (loop), factors from the second on
    model, batch = build("token_transformer", torch.float64)
    assert nio_fast.gradcosine(model, batch, sub_batches=3).mode == "per_chunk"
    assert check_against_reference(model, batch, 1e-10, sub_batches=3).mode == "factors"


def test_auto_takes_factors_for_chunks_below_32_samples_on_the_cpu():
    """On the CPU factors replaces vmap and the loop for chunks below 32 samples (faster there side
    by side, gradcosine._FACTORS_VERDICT's comment); the loop stays from 32
    (gradcosine._LOOP_OVER_FACTORS_FROM_CHUNK_SAMPLES)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batch = (torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,)))
    assert check_against_reference(model, batch, 1e-10, sub_batches=4).mode == "factors"  # 16 a chunk
    assert check_against_reference(model, batch, 1e-10, sub_batches=2).mode == "per_chunk"  # 32 a chunk
    assert nio_fast.gradcosine(model, (batch[0][:62], batch[1][:62]), sub_batches=2).mode == "factors"  # 31
    assert check_against_reference(model, batch, 1e-10, sub_batches=8).mode == "factors"  # 8 a chunk
    assert check_against_reference(model, batch, 1e-10, sub_batches=32).mode == "factors"  # 2 a chunk
    assert gradcosine._VMAP_VERDICT.get(model) is None  # vmap never ran


def test_auto_keeps_the_loop_for_a_loss_that_is_not_a_sample_mean():
    model, batch = build("token_transformer", torch.float64)

    def sum_loss(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")
    names, params = trainable(model)
    for _ in range(2):
        result = nio_fast.gradcosine(model, batch, sum_loss, sub_batches=3, overlap=0.2)
        assert result.mode == "per_chunk"
    with spec_modes(model):
        gc, *_ = reference_gradcosine(model, *batch, sum_loss, params, 3, 0.2)
    assert abs(float(result.value.detach()) - float(gc.detach())) < 1e-10


@pytest.mark.parametrize("sub_batches", ["samples", 3])
def test_layers_whose_output_is_then_modified_in_place(sub_batches):
    """ReLU(inplace=True) after a GroupNorm and after a convolution: each layer's factor is the
    gradient of its own output, not of the value the in-place op left in that tensor."""
    from torch import nn
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(6 * 25, 4), nn.ReLU(inplace=True), nn.Linear(4, 4)).double()
    batch = (torch.randn(7, 3, 5, 5, dtype=torch.float64), torch.randint(0, 4, (7,)))
    result = check_against_reference(model, batch, 1e-10, sub_batches=sub_batches, mode="factors")
    assert "autograd" not in result.routes.values()


def test_unbatched_layer_calls_take_the_autograd_route():
    """A layer applied to one unbatched tensor (no sample axis) is not read as per-sample."""
    from torch import nn

    class SharedQuery(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.randn(7))
            self.norm = nn.LayerNorm(7)
            self.project = nn.Linear(7, 7)
            self.head = nn.Linear(7, 5)

        def forward(self, x):  # x: [N, 7]; the projected query is one vector for the whole batch
            return self.head(x * self.project(self.norm(2 * self.query)))

    torch.manual_seed(0)
    model = SharedQuery().double()
    batch = (torch.randn(7, 7, dtype=torch.float64), torch.randint(0, 5, (7,)))  # N = 7 = the width
    result = check_against_reference(model, batch, 1e-10, sub_batches="samples")
    assert result.routes["project.weight"] == result.routes["project.bias"] == "autograd"
    assert result.routes["norm.weight"] == result.routes["norm.bias"] == "autograd"


def test_a_rule_that_cannot_parse_a_call_falls_back_to_autograd(monkeypatch):
    from nio_fast.samplewise import recorder

    def broken(*args, **kwargs):
        raise TypeError("an unexpected argument form")
    monkeypatch.setattr(recorder, "linear_args", broken)
    model, batch = build("mlp", torch.float64)
    result = check_against_reference(model, batch, 1e-10, sub_batches="samples")
    assert all(route == "autograd" for name, route in result.routes.items() if name.endswith("weight"))


class UnevenSame(nn.Module):
    """'same' zero padding with even kernels (padded unevenly: the odd one after), 2-D and 1-D."""

    def __init__(self):
        super().__init__()
        self.plane = nn.Conv2d(3, 5, (2, 4), padding="same")
        self.line = nn.Conv1d(5, 4, 2, padding="same", dilation=3)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.tanh(self.plane(x))
        return self.head(torch.relu(self.line(x.flatten(2))).mean(-1))


@pytest.mark.parametrize("route", ["materialize", "ghost", "pixel_ghost"])
def test_uneven_same_padding_is_exact_on_every_convolution_route(monkeypatch, route):
    from nio_fast.samplewise import blocked_gram
    monkeypatch.setattr(blocked_gram, "BLOCK_ELEMENTS", 1)  # several channel blocks
    monkeypatch.setattr(blocked_gram, "MIN_BLOCK_CHANNELS", 2)
    monkeypatch.setattr(engine, "choose_outer_route", lambda *sizes: "ghost" if route == "ghost" else "materialize")
    monkeypatch.setattr(engine, "_pixel_ghost_pays",
                        lambda uses, *_: route == "pixel_ghost" and uses.entries[0][0].kind == "conv")
    torch.manual_seed(0)
    model = UnevenSame().double()
    batch = (torch.randn(6, 3, 5, 4, dtype=torch.float64), torch.randint(0, 5, (6,)))
    result = check_against_reference(model, batch, 1e-10, sub_batches="samples")
    assert result.routes["plane.weight"] == result.routes["line.weight"] == route


def test_indices_in_finds_selected_tensors_at_any_depth_in_call_order():
    """What the recorder and the scale probes see of every torch call: each selected tensor in the
    arguments, nested in lists, tuples and dicts, in the order torch.utils._pytree flattens them."""
    from torch.utils._pytree import tree_flatten
    first, second, third = torch.randn(2), torch.randn(3), torch.randn(4)
    index_of = {id(first): 0, id(second): 1, id(third): 2}
    args = (first, [1.5, (second, {"inner": third})], "text", torch.randn(2), None)
    kwargs = {"weights": [first], "flag": True}
    assert indices_in(index_of, args, kwargs) == [0, 1, 2, 0]
    leaves = tree_flatten((args, kwargs))[0]
    assert indices_in(index_of, args, kwargs) == [index_of[id(leaf)] for leaf in leaves if id(leaf) in index_of]
    assert indices_in(index_of, (torch.randn(2), [torch.randn(1)]), None) == []
