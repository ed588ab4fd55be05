"""Per-sample convolution weight gradients (samplewise.factors) and their two cotangents, against
PyTorch: the rows against one autograd call per sample, the cotangents (a grouped convolution
and a transposed one) against autograd's derivative of the rows."""
import pytest
import torch

from nio_fast.samplewise import factors
from nio_fast.samplewise.factors import chunk_sums, conv_weight_per_sample, conv_weight_per_sample_backward
from nio_fast.samplewise.recorder import CONV, LayerUse

# (spatial input size, weight shape, stride, padding, dilation, groups)
CASES = [
    ((7, 9), (5, 3, 3, 3), 1, 1, 1, 1),
    ((10, 9), (4, 3, 3, 2), 2, 1, 1, 1),  # stride 2, even height: output_padding 1 in the transpose; a 3 x 2 kernel
    ((11, 10), (6, 4, 3, 3), (2, 1), (1, 2), 2, 2),  # per-dimension stride and padding, dilation, groups
    ((8, 8), (5, 3, 4, 4), 4, 0, 1, 1),  # non-overlapping patches
    ((7, 6), (4, 3, 2, 2), 1, "same", 1, 1),  # 'same' with an even kernel: uneven padding
    ((14,), (5, 3, 3), 2, 1, 1, 1),  # 1-D, stride 2, even length: output_padding 1
    ((12,), (4, 2, 4), 1, "same", 2, 1),  # 1-D, 'same', dilation
]


def _use(x: torch.Tensor, stride, padding, dilation, groups) -> LayerUse:
    config = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
              "spatial_dims": x.dim() - 2}
    return LayerUse(CONV, {"weight": 0}, x, None, 0, config)


def _conv(x, weight, stride, padding, dilation, groups):
    conv = torch.nn.functional.conv1d if x.dim() == 3 else torch.nn.functional.conv2d
    return conv(x, weight, None, stride, padding, dilation, groups)


def assert_equal_with_cotangents(ours, theirs, leaves, rtol):
    """Equal values, and equal cotangents of ``leaves`` for one fresh random cotangent."""
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol)
    cotangent = torch.randn_like(ours)
    for got, expected in zip(torch.autograd.grad(ours, leaves, cotangent),
                             torch.autograd.grad(theirs, leaves, cotangent)):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


# (the autograd reference's own convolution warns of the copy 'same' padding with an even kernel makes)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size,weight_shape,stride,padding,dilation,groups", CASES)
def test_rows_and_their_cotangents_match_autograd(size, weight_shape, stride, padding, dilation, groups, dtype, rtol,
                                                  device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions stay fp32 on a GPU
    torch.manual_seed(0)
    num = 3
    channels_in = weight_shape[1] * groups
    x = torch.randn(num, channels_in, *size, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=dtype, device=device, requires_grad=True)
    output = _conv(x, weight, stride, padding, dilation, groups)
    output_grad = torch.randn_like(output).requires_grad_()
    use = _use(x, stride, padding, dilation, groups)

    rows = conv_weight_per_sample(use, output_grad, weight_shape)
    for i in range(num):  # sample i's own weight gradient, by autograd
        expected, = torch.autograd.grad(_conv(x[i:i + 1], weight, stride, padding, dilation, groups), weight,
                                        output_grad[i:i + 1])
        torch.testing.assert_close(rows[i], expected, rtol=rtol, atol=rtol)

    grad_rows = torch.randn(num, weight.numel(), dtype=dtype, device=device)
    expected_x, expected_output_grad = torch.autograd.grad(rows.reshape(num, -1), (x, output_grad), grad_rows)
    got_x, got_output_grad = conv_weight_per_sample_backward(use, output_grad.detach(), weight_shape, grad_rows,
                                                             True, True)
    torch.testing.assert_close(got_x, expected_x, rtol=rtol, atol=rtol)
    torch.testing.assert_close(got_output_grad, expected_output_grad, rtol=rtol, atol=rtol)
    assert conv_weight_per_sample_backward(use, output_grad.detach(), weight_shape, grad_rows, False, False) == \
        (None, None)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bounds", [[(0, 2), (2, 4), (4, 6)], [(0, 3), (3, 6)], [(0, 6)]])
@pytest.mark.parametrize("size,weight_shape,stride,padding,dilation,groups", CASES)
def test_grouped_chunk_sums_equal_one_call_per_chunk(size, weight_shape, stride, padding, dilation, groups, bounds,
                                                    dtype, rtol, monkeypatch):
    """Equal chunks on small maps take one weight-gradient convolution grouped over the chunks:
    the same chunk sums, and the same cotangents of input and output gradient, as one plain call
    per chunk, and as autograd's sum of each chunk's samples' gradients."""
    torch.manual_seed(1)
    num = 6
    x = torch.randn(num, weight_shape[1] * groups, *size, dtype=dtype, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=dtype)
    output = _conv(x, weight, stride, padding, dilation, groups)
    output_grad = torch.randn_like(output).requires_grad_()
    use = _use(x, stride, padding, dilation, groups)
    assert factors._grouped_chunks_pay(x, output_grad, bounds) == (len(bounds) > 1)

    grouped = chunk_sums(use, output_grad, weight_shape, bounds)
    monkeypatch.setattr(factors, "_grouped_chunks_pay", lambda *args: False)
    per_chunk = chunk_sums(use, output_grad, weight_shape, bounds)
    weight = weight.requires_grad_()
    for k, (start, end) in enumerate(bounds):
        expected, = torch.autograd.grad(_conv(x[start:end], weight, stride, padding, dilation, groups), weight,
                                        output_grad[start:end])
        torch.testing.assert_close(per_chunk[k], expected.reshape(-1), rtol=rtol, atol=rtol)
    assert_equal_with_cotangents(grouped, per_chunk, (x, output_grad), rtol)


def test_chunk_sums_stay_one_call_per_chunk_on_large_maps_and_unequal_chunks():
    x, output_grad = torch.randn(8, 3, 32, 32), torch.randn(8, 4, 16, 16)
    assert factors._grouped_chunks_pay(x, output_grad, [(0, 4), (4, 8)])
    assert not factors._grouped_chunks_pay(x, torch.randn(8, 4, 17, 16), [(0, 4), (4, 8)])  # 272 positions
    assert not factors._grouped_chunks_pay(x, output_grad, [(0, 5), (3, 8)])  # overlapping
    assert not factors._grouped_chunks_pay(x, output_grad, [(0, 3), (3, 6)])  # not the whole batch


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sample_axis", [0, 1], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("chunks", [2, 3, 6])
def test_linear_chunk_sums_of_equal_chunks_are_one_bmm_equal_to_one_matmul_per_chunk(dtype, rtol, sample_axis,
                                                                                    chunks, monkeypatch):
    """Equal chunks tiling the batch take one bmm over the factors viewed per chunk: the same chunk
    sums and cotangents as one matmul per chunk, and as autograd's sum of each chunk's samples'
    gradients, with a position axis on either side of the samples."""
    from nio_fast.samplewise.recorder import LINEAR
    torch.manual_seed(chunks)
    num, positions, weight = 6, 5, torch.randn(4, 7, dtype=dtype)
    x = torch.randn((num, positions, 7) if sample_axis == 0 else (positions, num, 7), dtype=dtype,
                    requires_grad=True)
    output_grad = torch.randn(*x.shape[:2], 4, dtype=dtype, requires_grad=True)
    use = LayerUse(LINEAR, {"weight": 0}, x, None, sample_axis, {})
    bounds = [(k * num // chunks, (k + 1) * num // chunks) for k in range(chunks)]
    assert factors._tiles_equally(bounds, num)
    batched = chunk_sums(use, output_grad, weight.shape, bounds)
    monkeypatch.setattr(factors, "_tiles_equally", lambda *args: False)
    per_chunk = chunk_sums(use, output_grad, weight.shape, bounds)
    weight = weight.requires_grad_()
    for k, (start, end) in enumerate(bounds):
        rows = slice(start, end)
        x_k, g_k = (x[rows], output_grad[rows]) if sample_axis == 0 else (x[:, rows], output_grad[:, rows])
        expected, = torch.autograd.grad(torch.nn.functional.linear(x_k, weight), weight, g_k)
        torch.testing.assert_close(per_chunk[k], expected.reshape(-1), rtol=rtol, atol=rtol)
    assert_equal_with_cotangents(batched, per_chunk, (x, output_grad), rtol)


def test_linear_chunk_sums_differentiate_twice():
    torch.manual_seed(3)
    a, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    leaves = (a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(factors._ChunkOuterSums.apply, leaves)
    assert torch.autograd.gradgradcheck(factors._ChunkOuterSums.apply, leaves)
