"""BatchNorm with batch statistics and a fused double backward (nio_fast.ops.batch_norm): the
extension's kernels against the plain twins, the twins against autograd of F.batch_norm, the op
end to end (values, first and second derivatives), its routing, and NIO's use of it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nio_fast import availability, ops
from nio_fast.algorithms.model_state import nio_modes
from norm_checks import assert_near, random, second_order

BACKENDS = ["torch"] + (["cpp"] if availability.cpp_usable(torch.device("cpu")) else [])
# odd sizes; no spatial axis (BatchNorm1d on [N, C]), 1-d, 2-d and 3-d spatial axes, one channel, 1x1
# maps (three values per channel: two would leave grad_x exactly zero, rounding noise against noise)
SHAPES = [(5, 3, 4, 7), (6, 4), (3, 5, 9), (2, 3, 2, 3, 4), (7, 1, 3), (3, 6, 1, 1)]




def inputs(shape, dtype, gen, affine=True):
    x = (random(shape, torch.float64, gen) * 2 + 0.5).to(dtype)
    weight = random(shape[1:2], dtype, gen) if affine else None
    bias = random(shape[1:2], dtype, gen) if affine else None
    return x, weight, bias


def statistics(x, eps=1e-5):
    _, mean, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, rstd


def cotangents(shape, dtype, gen, present):
    return (random(shape, dtype, gen) if "u" in present else None,
            random(shape[1:2], dtype, gen) if "p" in present else None,
            random(shape[1:2], dtype, gen) if "q" in present else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_twin_equals_autograd_of_f_batch_norm(dtype, shape):
    gen = torch.Generator().manual_seed(len(shape) * 10 + shape[1])
    x, weight, bias = inputs(shape, dtype, gen)
    grad_out = random(shape, dtype, gen)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True), leaves, grad_out)
    for ours, theirs in zip(ops.batch_norm_backward_reference(grad_out, x, weight, 1e-5), expected):
        assert_near(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("present", ["upq", "u", "pq", "q"])
def test_double_backward_twin_equals_autograd_through_pytorchs_backward(dtype, shape, present):
    gen = torch.Generator().manual_seed(len(shape) + shape[0])
    x, weight, _ = inputs(shape, dtype, gen)
    grad_out = random(shape, dtype, gen)
    u, p, q = cotangents(shape, dtype, gen, present)
    leaves = [t.clone().requires_grad_() for t in (grad_out, x, weight)]
    mean, rstd = statistics(leaves[1])  # differentiable in x: PyTorch's formula sees the statistics move
    outputs = torch.ops.aten.native_batch_norm_backward(leaves[0], leaves[1], leaves[2], None, None, mean, rstd,
                                                        True, 1e-5, [True, True, True])
    pairs = [(out, cot) for out, cot in zip(outputs, (u, p, q)) if cot is not None]
    expected = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
    ours = ops.batch_norm_double_backward_reference(grad_out, x, weight, 1e-5, u, p, q)
    for mine, theirs, like in zip(ours, expected, (grad_out, x, weight)):
        assert_near(mine, theirs if theirs is not None else torch.zeros_like(like), dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_cpp_kernels_equal_the_twins(dtype, shape, affine):
    gen = torch.Generator().manual_seed(shape[1] * 7 + len(shape))
    x, weight, _ = inputs(shape, dtype, gen, affine)
    mean, rstd = statistics(x)
    grad_out = random(shape, dtype, gen)
    kernels = availability.extension()
    for ours, theirs in zip(kernels.batch_norm_backward(grad_out, x, mean, rstd, weight),
                            ops.batch_norm_backward_reference(grad_out, x, weight, 1e-5)):
        assert_near(ours, theirs, dtype)
    for present in ("upq", "u", "pq", "q", ""):
        u, p, q = cotangents(shape, dtype, gen, present)
        for ours, theirs in zip(kernels.batch_norm_double_backward(grad_out, x, mean, rstd, weight, u, p, q),
                                ops.batch_norm_double_backward_reference(grad_out, x, weight, 1e-5, u, p, q)):
            assert_near(ours, theirs, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
def test_cpp_kernels_take_strided_inputs_and_reject_bad_ones():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=gen).to(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 6, 5, 7, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    u = torch.randn(3, 6, 5, 7, generator=gen)
    mean, rstd = statistics(x)
    kernels = availability.extension()
    for ours, theirs in zip(kernels.batch_norm_backward(grad_out, x, mean, rstd, None),
                            ops.batch_norm_backward_reference(grad_out, x, None, 1e-5)):
        assert_near(ours, theirs, torch.float32)
    for ours, theirs in zip(kernels.batch_norm_double_backward(grad_out, x, mean, rstd, None, u, None, None),
                            ops.batch_norm_double_backward_reference(grad_out, x, None, 1e-5, u, None, None)):
        assert_near(ours, theirs, torch.float32)
    with pytest.raises(ValueError, match="mean and rstd must have C = 6"):
        kernels.batch_norm_double_backward(grad_out, x, mean[:4], rstd, None, None, None, None)
    with pytest.raises(ValueError, match="grad_out has shape"):
        kernels.batch_norm_double_backward(grad_out[:2], x, mean, rstd, None, None, None, None)
    with pytest.raises(TypeError, match="x's dtype"):
        kernels.batch_norm_double_backward(grad_out.double(), x, mean, rstd, None, None, None, None)
    with pytest.raises(ValueError, match="p and q must hold C = 6"):
        kernels.batch_norm_double_backward(grad_out, x, mean, rstd, None, None, torch.zeros(5), None)
    with pytest.raises(ValueError, match="u must match x"):
        kernels.batch_norm_double_backward(grad_out, x, mean, rstd, None, grad_out[:, :3], None, None)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_values_and_two_derivatives_equal_f_batch_norm(backend, dtype, shape, affine):
    gen = torch.Generator().manual_seed(11 + shape[1])
    x, weight, bias = inputs(shape, dtype, gen, affine)
    cotangent = random(shape, dtype, gen)
    ours = second_order(lambda *t: ops.batch_norm(t[0], None, None, *t[1:], training=True, backend=backend),
                        x, weight, bias, cotangent)
    theirs = second_order(lambda *t: F.batch_norm(t[0], None, None, *t[1:], training=True), x, weight, bias,
                          cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = inputs((3, 2, 3, 2), torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    fn = lambda x, w, b: ops.batch_norm(x, None, None, w, b, True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)  # third derivatives: through the differentiable twin


def test_only_the_batch_statistics_call_is_routed():
    gen = torch.Generator().manual_seed(19)
    x, weight, bias = inputs((4, 3, 5), torch.float32, gen)
    x.requires_grad_()
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    routed = ops.batch_norm(x, None, None, weight, bias, True)
    assert type(routed.grad_fn).__name__ == ("_BatchNormBackward" if "cpp" in BACKENDS
                                             else "NativeBatchNormBackward0")
    # running buffers (read in eval, updated in training) and functorch transforms: F.batch_norm itself
    for training in (True, False):
        ours = ops.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training)
        assert type(ours.grad_fn).__name__ == "NativeBatchNormBackward0"
    assert_near(torch.func.vmap(lambda t: ops.batch_norm(t, None, None, weight, bias, True))(x.detach()[None])[0],
                F.batch_norm(x.detach(), None, None, weight, bias, True), torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # F.batch_norm's error
        ops.batch_norm(torch.randn(1, 3), None, None, training=True)


def test_bad_arguments_are_named():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.batch_norm(x, None, None, training=True, backend="triton")
    if "cpp" in BACKENDS:
        with pytest.raises(ValueError, match="backend: 'cpp' batch_norm kernels need CPU float32/float64"):
            ops.batch_norm(x.half(), None, None, training=True, backend="cpp")


def test_nio_modes_route_nn_batch_norm_through_the_fused_op_and_restore_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with nio_modes(model):
        batch_norm_node = model(x).grad_fn.next_functions[0][0]
    expected = "_BatchNormBackward" if "cpp" in BACKENDS else "NativeBatchNormBackward0"
    assert type(batch_norm_node).__name__ == expected
    outside = model[1](model[0](x)).grad_fn
    assert type(outside).__name__ == "NativeBatchNormBackward0"
    assert model.training and model[1].track_running_stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_twins_second_order_equal_f_batch_norm(dtype):
    gen = torch.Generator().manual_seed(13)
    x, weight, bias = (t.cuda() for t in inputs((6, 8, 9, 7), dtype, gen))
    cotangent = random((6, 8, 9, 7), dtype, gen).cuda()
    ours = second_order(lambda *t: ops.batch_norm(t[0], None, None, *t[1:], training=True, backend="torch"),
                        x, weight, bias, cotangent)  # "auto" is F.batch_norm on CUDA
    theirs = second_order(lambda *t: F.batch_norm(t[0], None, None, *t[1:], training=True), x, weight, bias,
                          cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_from_grad_x_equals_the_twin(dtype, shape, affine):
    gen = torch.Generator().manual_seed(shape[1] * 5 + len(shape))
    x, weight, _ = inputs(shape, dtype, gen, affine)
    mean, rstd = statistics(x)
    grad_out = random(shape, dtype, gen)
    kernels = availability.extension()
    grad_x, grad_weight, grad_bias = kernels.batch_norm_backward(grad_out, x, mean, rstd, weight)  # what the op keeps
    for present in ("upq", "u", "pq", ""):
        u, p, q = cotangents(shape, dtype, gen, present)
        ours = kernels.batch_norm_double_backward_from_grad_x(grad_x, grad_weight, grad_bias, x, mean, rstd, weight,
                                                              u, p, q)
        for mine, theirs in zip(ours, ops.batch_norm_double_backward_reference(grad_out, x, weight, 1e-5, u, p, q)):
            assert_near(mine, theirs, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_second_order_only_keeps_no_grad_out_and_matches_f_batch_norm_to_second_order(dtype, shape):
    gen = torch.Generator().manual_seed(23 + shape[1])
    x, weight, bias = inputs(shape, dtype, gen)
    cotangent = random(shape, dtype, gen)
    ours = second_order(lambda *t: ops.batch_norm(t[0], None, None, *t[1:], training=True, second_order_only=True),
                        x, weight, bias, cotangent)
    theirs = second_order(lambda *t: F.batch_norm(t[0], None, None, *t[1:], training=True), x, weight, bias,
                          cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grad_x = torch.autograd.grad(ops.batch_norm(leaves[0], None, None, *leaves[1:], training=True,
                                                second_order_only=True), leaves, cotangent, create_graph=True)[0]
    node = grad_x.grad_fn  # the backward's own node: what it keeps
    assert node.rebuild_grad_out
    assert not any(t.data_ptr() == cotangent.data_ptr() for t in node.saved_tensors)
    with pytest.raises(RuntimeError, match="second_order_only=True keeps no grad_out, so it has no third"):
        torch.autograd.grad((grad_x * grad_x).sum(), leaves, create_graph=True)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
def test_second_order_only_keeps_grad_out_where_gamma_has_a_zero():
    gen = torch.Generator().manual_seed(29)
    x, weight, bias = inputs((4, 3, 5), torch.float64, gen)
    weight[1] = 0.0  # a zero-initialised gamma: grad_x carries nothing of grad_out there
    cotangent = random((4, 3, 5), torch.float64, gen)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grad_x = torch.autograd.grad(ops.batch_norm(leaves[0], None, None, *leaves[1:], training=True,
                                                second_order_only=True), leaves[0], cotangent, create_graph=True)[0]
    assert not grad_x.grad_fn.rebuild_grad_out
    ours = second_order(lambda *t: ops.batch_norm(t[0], None, None, *t[1:], training=True, second_order_only=True),
                        x, weight, bias, cotangent)
    theirs = second_order(lambda *t: F.batch_norm(t[0], None, None, *t[1:], training=True), x, weight, bias,
                          cotangent)
    for mine, expected in zip(ours, theirs):
        assert_near(mine, expected, torch.float64)
    mean, rstd = statistics(x)
    with pytest.raises(ValueError, match="grad_out cannot be rebuilt where weight is zero"):
        availability.extension().batch_norm_double_backward_from_grad_x(x, weight, weight, x, mean, rstd, weight,
                                                                        None, None, None)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype,tiny,rebuilt", [(torch.float32, 1e-25, False), (torch.float32, 1e-15, True),
                                                (torch.float64, 1e-160, False), (torch.float64, 1e-100, True)])
def test_second_order_only_keeps_grad_out_where_gamma_is_nearly_zero(dtype, tiny, rebuilt):
    gen = torch.Generator().manual_seed(31)
    x, weight, bias = inputs((4, 3, 5), dtype, gen)
    weight[2] = tiny  # gx / (r gamma) would lose its precision (or overflow) near the subnormal range
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grads = torch.autograd.grad(ops.batch_norm(leaves[0], None, None, *leaves[1:], training=True,
                                               second_order_only=True).sin().sum(), leaves, create_graph=True)
    assert grads[0].grad_fn.rebuild_grad_out is rebuilt
    ours = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
    expected_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected_grads = torch.autograd.grad(F.batch_norm(expected_leaves[0], None, None, *expected_leaves[1:],
                                                      training=True).sin().sum(), expected_leaves, create_graph=True)
    for mine, theirs in zip(ours, torch.autograd.grad(sum((g * g).sum() for g in expected_grads), expected_leaves)):
        assert torch.isfinite(mine).all()
        assert_near(mine, theirs, dtype)


def test_nio_iterations_run_batch_norm_second_order_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(3, 3, 6, 6)
    for second_order_only in (False, True):
        with nio_modes(model, second_order_only=second_order_only):
            out = model(x)
        grad = torch.autograd.grad(out.square().sum(), model[1].weight, create_graph=True)[0]
        if "cpp" in BACKENDS:
            assert grad.grad_fn.rebuild_grad_out is second_order_only
