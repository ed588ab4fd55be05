"""ops.conv_pixel_gram (the ghost identity over input pixels) against per-sample convolution weight
gradients (values and gradients, fp64 and fp32, odd settings, blocking), its checks, and the
sample-wise engine's pixel_ghost route against the reference of the spec."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast import ops
from nio_fast.ops import factor_gram, pixel_gram
from nio_fast.samplewise import engine
from samplewise_checks import check_against_reference
from samplewise_models import make_zoo_model, zoo_batch

# (input shape, C_out, kernel, stride, padding as the op takes it, dilation)
SETTINGS = {
    "2d strided dilated": ((5, 3, 7, 6), 4, (3, 2), (2, 1), (1, 0), (1, 2)),
    "2d uneven padding": ((3, 2, 5, 4), 3, (2, 2), 1, ((0, 1), (1, 0)), 1),
    "2d small map wide": ((6, 9, 3, 3), 7, 3, 1, 1, 1),
    "1d": ((4, 3, 9), 5, (3,), 1, 2, 2),
    "1d stride": ((7, 2, 11), 3, 4, 3, 1, 1),
}


def convolution(x, weight, stride, padding, dilation):
    """PyTorch's own convolution; (before, after) padding pairs are applied explicitly (F.pad
    takes the last dim first)."""
    if not (isinstance(padding, int) or all(isinstance(p, int) for p in padding)):
        x, padding = F.pad(x, [amount for pair in reversed(padding) for amount in pair]), 0
    return (F.conv2d if x.dim() == 4 else F.conv1d)(x, weight, stride=stride, padding=padding, dilation=dilation)


def conv_weight_grad(x, weight_shape, dy, stride, padding, dilation):
    """One sample's weight gradient of the convolution, through PyTorch's own convolution."""
    weight = torch.zeros(weight_shape, dtype=x.dtype, requires_grad=True)
    (grad,) = torch.autograd.grad((convolution(x, weight, stride, padding, dilation) * dy).sum(), weight,
                                  create_graph=True)
    return grad


def reference_gram(x, dy, weight_shape, stride, padding, dilation):
    rows = torch.stack([conv_weight_grad(x[i:i + 1], weight_shape, dy[i:i + 1], stride, padding, dilation).reshape(-1)
                        for i in range(x.shape[0])])
    return rows @ rows.T


def case(name, dtype=torch.float64, seed=0):
    shape, out_channels, kernel, stride, padding, dilation = SETTINGS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    kernel_tuple = (kernel,) * (len(shape) - 2) if isinstance(kernel, int) else kernel
    weight_shape = (out_channels, shape[1], *kernel_tuple)
    # the output size from a throwaway forward
    out_shape = convolution(x, torch.zeros(weight_shape, dtype=torch.float64), stride, padding, dilation).shape
    dy = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(shape[0], shape[0], generator=gen, dtype=torch.float64)
    x, dy = x.to(dtype).requires_grad_(), dy.to(dtype).requires_grad_()
    return x, dy, upstream, weight_shape, dict(stride=stride, padding=padding, dilation=dilation)


def value_and_grads(gram, x, dy, upstream):
    return (gram,) + torch.autograd.grad((gram * upstream.to(gram.dtype)).sum(), (x, dy))


def ours(x, dy, weight_shape, settings, **options):
    return ops.conv_pixel_gram(x, dy, weight_shape[2:], **settings, **options)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_equals_per_sample_convolution_gradients_in_fp64(name):
    x, dy, upstream, weight_shape, settings = case(name)
    mine = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    theirs = value_and_grads(reference_gram(x, dy, weight_shape, **settings), x, dy, upstream)
    assert mine[0].dtype == torch.float64 and mine[0].shape == (x.shape[0],) * 2
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())


@pytest.mark.parametrize("name", ["2d strided dilated", "1d stride", "2d small map wide"])
def test_fp32_equals_the_fp64_reference(name):
    x, dy, upstream, weight_shape, settings = case(name, torch.float32, seed=1)
    mine = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    x64, dy64 = x.detach().double().requires_grad_(), dy.detach().double().requires_grad_()
    theirs = value_and_grads(reference_gram(x64, dy64, weight_shape, **settings), x64, dy64, upstream)
    assert mine[0].dtype == mine[1].dtype == mine[2].dtype == torch.float32
    for a, b in zip(mine, theirs):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("budget", [64, 3000])
def test_blocks_of_samples_give_the_same_values_and_gradients(monkeypatch, budget):
    x, dy, upstream, weight_shape, settings = case("2d small map wide", seed=2)
    whole = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    monkeypatch.setattr(factor_gram, "_BLOCK_BYTES", budget)
    pixels, positions = x[0, 0].numel(), dy[0, 0].numel()
    assert pixel_gram._samples_per_block(x.shape[0], positions, pixels, 81, 8, budget) < x.shape[0]
    blocked = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    for a, b in zip(blocked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())


def test_equals_outer_gram_of_the_unfolded_patches():
    x, dy, upstream, weight_shape, settings = case("2d strided dilated", seed=3)
    patches = F.unfold(x, weight_shape[2:], dilation=settings["dilation"], padding=settings["padding"],
                       stride=settings["stride"]).transpose(1, 2)
    ghost = ops.outer_gram(patches, dy.flatten(2).transpose(1, 2), "ghost")
    torch.testing.assert_close(ours(x, dy, weight_shape, settings), ghost, rtol=1e-12, atol=1e-12 * ghost.abs().max().item())


def test_gradcheck():
    x, dy, _, weight_shape, settings = case("1d stride", seed=4)
    x, dy = x[:3].detach().requires_grad_(), dy[:3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ours(a, b, weight_shape, settings, block_bytes=100), (x, dy))
    assert torch.autograd.gradcheck(lambda a: ours(a, dy.detach(), weight_shape, settings), (x,))


def test_the_function_saves_only_its_inputs():
    x, dy, _, weight_shape, settings = case("2d small map wide", seed=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gram = ours(x, dy, weight_shape, settings)
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), dy.data_ptr()}
    torch.autograd.grad(gram.sum(), (x, dy))


def test_values_unused_gives_zeros_and_the_same_gradients():
    x, dy, upstream, weight_shape, settings = case("2d small map wide", seed=6)
    full = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    with ops.gram_values_unused():
        skipped = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    assert not skipped[0].any()
    for a, b in zip(skipped[1:], full[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_derivative_of_its_backward_is_refused():
    x, dy, upstream, weight_shape, settings = case("1d", seed=7)
    grads = torch.autograd.grad((ours(x, dy, weight_shape, settings) * upstream).sum(), (x, dy), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (x, dy))


def test_the_pixel_map_counts_shared_offsets():
    # 1-D, kernel 2, no padding: input 3 -> output 2; positions (0, 1) read pixels (0, 1) at
    # offset 0 and (1, 2) at offset 1
    pixel_map = pixel_gram.conv_pixel_map((3,), (2,), (2,), (1,), (0,), (1,), torch.float64)
    dense = pixel_map.view(2, 2, 3, 3)
    assert dense[0, 1, 0, 1] == 1 and dense[0, 1, 1, 2] == 1 and dense[0, 0, 0, 0] == 1 and dense[0, 0, 1, 1] == 1
    assert dense.sum() == 2 * 2 * 2  # every (t, s) pair at each of the 2 offsets


def test_bad_arguments_are_named():
    x, dy, _, weight_shape, settings = case("2d small map wide")
    with pytest.raises(ValueError, match="output_grads: spatial size"):
        ops.conv_pixel_gram(x, dy, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="output_grads: shape"):
        ops.conv_pixel_gram(x, dy[:-1], 3, padding=1)
    with pytest.raises(TypeError, match="output_grads: dtype"):
        ops.conv_pixel_gram(x, dy.float(), 3, padding=1)
    with pytest.raises(ValueError, match="inputs: expected"):
        ops.conv_pixel_gram(x[0, 0], dy[0, 0], 3, padding=1)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.conv_pixel_gram(x, dy, (3, 3, 3), padding=1)
    with pytest.raises(ValueError, match="padding"):
        ops.conv_pixel_gram(x, dy, 3, padding=((1, 1),))
    big = torch.randn(2, 1, 64, 64)
    with pytest.raises(ValueError, match="pixel map"):
        ops.conv_pixel_gram(big, torch.randn(2, 1, 64, 64), 3, padding=1)


def test_the_cost_picks_small_wide_maps_only():
    # a ResNet-18's last stage on 32 x 32 inputs (4 x 4 maps, 512 channels) and its third (8 x 8, 256)
    last, third = ops.pixel_gram_cost(64, 16, 16, 512, 512), ops.pixel_gram_cost(64, 64, 64, 256, 256)
    assert last < ops.outer_gram_cost(64, 16, 512 * 9, 512).ghost_flops / 3
    cost = ops.outer_gram_cost(64, 64, 256 * 9, 256)
    assert third > min(cost.ghost_flops, cost.materialize_flops)


class SmallMaps(nn.Module):
    """Wide convolutions on 3 x 3 maps (where pixels beat patches) beside a stride-2 one and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(24, 24, 3, padding=1)
        self.dilated = nn.Conv2d(24, 16, 2, padding=1, dilation=2, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.wide(torch.relu(self.stem(x))))
        return self.head(torch.tanh(self.dilated(x)).mean((2, 3)))


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_the_engine_takes_pixel_ghost_for_small_wide_maps_and_stays_exact(dtype, rtol):
    torch.manual_seed(0)
    model = SmallMaps().to(dtype)
    batch = (torch.randn(7, 3, 6, 6, dtype=dtype), torch.randint(0, 5, (7,)))
    result = check_against_reference(model, batch, rtol, sub_batches="samples")
    assert result.routes["wide.weight"] == "pixel_ghost"
    assert result.routes["stem.weight"] != "pixel_ghost"  # 6 x 6 -> 3 x 3: 36 pixels cost more than patches


@pytest.mark.parametrize("sub_batches", ["samples", 3])
def test_every_convolution_of_the_zoo_forced_onto_pixel_ghost_is_exact(monkeypatch, sub_batches):
    monkeypatch.setattr(engine, "_pixel_ghost_pays", lambda uses, *_: len(uses.entries) == 1
                        and uses.entries[0][0].kind == "conv")
    monkeypatch.setattr(engine, "_chunks_beat_ghost", lambda *_: False)
    model, batch = make_zoo_model("conv_zoo"), zoo_batch("conv_zoo", 9, torch.float64)
    result = check_against_reference(model, batch, 1e-10, sub_batches=sub_batches, mode="factors")
    # stride 2 (stem), reflect-padded with an even kernel (same), 1-D (line); dilated is grouped
    assert {name for name, route in result.routes.items() if route == "pixel_ghost"} == \
        {"stem.weight", "same.weight", "line.weight"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_equals_the_cpu_result():
    x, dy, upstream, weight_shape, settings = case("2d strided dilated", torch.float32, seed=8)
    cpu = value_and_grads(ours(x, dy, weight_shape, settings), x, dy, upstream)
    xc, dyc = x.detach().cuda().requires_grad_(), dy.detach().cuda().requires_grad_()
    gpu = value_and_grads(ours(xc, dyc, weight_shape, settings), xc, dyc, upstream.cuda())
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
