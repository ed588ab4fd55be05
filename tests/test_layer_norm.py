"""LayerNorm with a fused double backward (nio_fast.ops.layer_norm): the extension's kernels
against the plain twins, the twins against autograd of F.layer_norm, the op end to end (values,
first and second derivatives), its routing, and NIO's use of it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nio_fast import availability, ops
from nio_fast.algorithms.model_state import nio_modes
from norm_checks import assert_near, random, second_order

BACKENDS = ["torch"] + (["cpp"] if availability.cpp_usable(torch.device("cpu")) else [])
# (input shape, normalized_shape): odd sizes, one or two normalised axes, a [R, E] input, E = 3 (the
# smallest with a nonzero grad_x: E <= 2 leaves grad_x exactly zero, rounding noise against noise)
CASES = [((5, 7, 6), (6,)), ((3, 4, 5, 3), (5, 3)), ((9, 13), (13,)), ((2, 3, 11), (3, 11)), ((4, 3, 3), (3,))]




def inputs(shape, normalized, dtype, gen, affine=True):
    x = (random(shape, torch.float64, gen) * 2 + 0.5).to(dtype)
    return x, *((random(normalized, dtype, gen), random(normalized, dtype, gen)) if affine else (None, None))


def rows(x, normalized, eps=1e-5):
    """x as [R, E] with native_layer_norm's statistics."""
    _, mean, rstd = torch.native_layer_norm(x, list(normalized), None, None, eps)
    width = 1
    for size in normalized:
        width *= size
    return x.reshape(-1, width), mean.reshape(-1), rstd.reshape(-1), width



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,normalized", CASES)
def test_weight_per_sample_and_its_gradient_equal_the_product_with_x_hat(dtype, shape, normalized):
    gen = torch.Generator().manual_seed(sum(shape))
    x = random(shape, dtype, gen) * 2 + 0.5
    grad_out, cotangent = random(shape, dtype, gen), random((shape[0], *normalized), dtype, gen).flatten(1)
    results = []
    for ours in (True, False):
        g, xs = grad_out.clone().requires_grad_(), x.clone().requires_grad_()
        if ours:
            rows = ops.layer_norm_weight_per_sample(g, xs, normalized)
        else:
            rows = (g * F.layer_norm(xs, normalized)).reshape(shape[0], -1, cotangent.shape[1]).sum(1)
        results.append((rows, *torch.autograd.grad(rows, (g, xs), cotangent)))
    for mine, theirs in zip(*results):
        assert_near(mine, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,normalized", CASES)
def test_twins_equal_autograd_of_f_layer_norm(dtype, shape, normalized):
    gen = torch.Generator().manual_seed(len(shape) * 10 + shape[-1])
    x, weight, _ = inputs(shape, normalized, dtype, gen)
    grad_out = random(shape, dtype, gen)
    width = rows(x, normalized)[3]
    leaves = [t.clone().requires_grad_() for t in (grad_out, x, weight)]
    outputs = ops.layer_norm_backward_reference(*leaves, width, 1e-5)
    expected = torch.autograd.grad(F.layer_norm(leaves[1], normalized, leaves[2], torch.zeros_like(weight)),
                                   leaves[1:], grad_out)
    assert_near(outputs[0], expected[0], dtype)
    assert_near(outputs[1].reshape(normalized), expected[1], dtype)
    u, p, q = random(shape, dtype, gen), random((width,), dtype, gen), random((width,), dtype, gen)
    expected = torch.autograd.grad(outputs, leaves, (u, p, q))
    for mine, theirs in zip(ops.layer_norm_double_backward_reference(grad_out, x, weight, width, 1e-5, u, p, q),
                            expected):
        assert_near(mine.reshape(theirs.shape), theirs, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,normalized", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_cpp_double_backward_equals_the_twin(dtype, shape, normalized, affine):
    gen = torch.Generator().manual_seed(shape[0] * 7 + len(shape))
    x, weight, _ = inputs(shape, normalized, dtype, gen, affine)
    x2, mean, rstd, width = rows(x, normalized)
    flat_weight = None if weight is None else weight.reshape(-1)
    grad_out = random(x2.shape, dtype, gen)
    kernels = availability.extension()
    for present in ("upq", "u", "pq", "q", ""):
        u = random(x2.shape, dtype, gen) if "u" in present else None
        p = random((width,), dtype, gen) if "p" in present else None
        q = random((width,), dtype, gen) if "q" in present else None
        for ours, theirs in zip(kernels.layer_norm_double_backward(grad_out, x2, mean, rstd, flat_weight, u, p, q),
                                ops.layer_norm_double_backward_reference(grad_out, x2, flat_weight, width, 1e-5,
                                                                         u, p, q)):
            assert_near(ours, theirs, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
def test_cpp_double_backward_takes_strided_inputs_and_rejects_bad_ones():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 12, generator=gen).T.contiguous().T  # column-major [7, 12]
    _, mean, rstd, width = rows(x, (12,))
    grad_out, u = torch.randn(12, 7, generator=gen).T, torch.randn(7, 12, generator=gen)
    kernels = availability.extension()
    for ours, theirs in zip(kernels.layer_norm_double_backward(grad_out, x, mean, rstd, None, u, None, None),
                            ops.layer_norm_double_backward_reference(grad_out, x, None, width, 1e-5, u, None, None)):
        assert_near(ours, theirs, torch.float32)
    with pytest.raises(ValueError, match="x must be \\[R, E\\]"):
        kernels.layer_norm_double_backward(grad_out[None], x[None], mean, rstd, None, None, None, None)
    with pytest.raises(ValueError, match="mean and rstd must have R = 7"):
        kernels.layer_norm_double_backward(grad_out, x, mean[:3], rstd, None, None, None, None)
    with pytest.raises(TypeError, match="x's dtype"):
        kernels.layer_norm_double_backward(grad_out.double(), x, mean, rstd, None, None, None, None)
    with pytest.raises(ValueError, match="p and q must hold E = 12"):
        kernels.layer_norm_double_backward(grad_out, x, mean, rstd, None, None, torch.zeros(5), None)
    with pytest.raises(ValueError, match="u must match x"):
        kernels.layer_norm_double_backward(grad_out, x, mean, rstd, None, u[:, :3], None, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,normalized", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_values_and_two_derivatives_equal_f_layer_norm(backend, dtype, shape, normalized, affine):
    gen = torch.Generator().manual_seed(11 + shape[-1])
    x, weight, bias = inputs(shape, normalized, dtype, gen, affine)
    cotangent = random(shape, dtype, gen)
    ours = second_order(lambda *t: ops.layer_norm(t[0], normalized, *t[1:], backend=backend), x, weight, bias,
                        cotangent)
    theirs = second_order(lambda *t: F.layer_norm(t[0], normalized, *t[1:]), x, weight, bias, cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = inputs((3, 2, 4), (4,), torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    fn = lambda x, w, b: ops.layer_norm(x, (4,), w, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)  # third derivatives: through the differentiable twin


def test_routing_and_errors():
    gen = torch.Generator().manual_seed(19)
    x, weight, bias = inputs((4, 3, 5), (5,), torch.float32, gen)
    x.requires_grad_()
    expected = "_LayerNormBackward" if "cpp" in BACKENDS else "NativeLayerNormBackward0"
    assert type(ops.layer_norm(x, 5, weight, bias).grad_fn).__name__ == expected
    vmapped = torch.func.vmap(lambda t: ops.layer_norm(t, (5,), weight, bias))(x.detach())  # F.layer_norm under vmap
    assert_near(vmapped, F.layer_norm(x.detach(), (5,), weight, bias), torch.float32)
    with pytest.raises(RuntimeError):  # F.layer_norm's own message: the shape does not end the input's
        ops.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.layer_norm(x, (5,), backend="triton")
    if "cpp" in BACKENDS:
        with pytest.raises(ValueError, match="backend: 'cpp' layer_norm kernels need CPU float32/float64"):
            ops.layer_norm(x.half(), (5,), backend="cpp")


def test_nio_modes_route_nn_layer_norm_through_the_fused_op_and_restore_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    x = torch.randn(2, 5, 3)
    with nio_modes(model):
        inside = model(x).grad_fn
    outside = model(x).grad_fn
    assert type(inside).__name__ == ("_LayerNormBackward" if "cpp" in BACKENDS else "NativeLayerNormBackward0")
    assert type(outside).__name__ == "NativeLayerNormBackward0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_twins_second_order_equal_f_layer_norm(dtype):
    gen = torch.Generator().manual_seed(13)
    x, weight, bias = (t.cuda() for t in inputs((6, 8, 9), (9,), dtype, gen))
    cotangent = random((6, 8, 9), dtype, gen).cuda()
    ours = second_order(lambda *t: ops.layer_norm(t[0], (9,), *t[1:], backend="torch"), x, weight, bias, cotangent)
    theirs = second_order(lambda *t: F.layer_norm(t[0], (9,), *t[1:]), x, weight, bias, cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, dtype)
