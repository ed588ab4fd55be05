"""GroupNorm with a fused double backward (nio_fast.ops.group_norm): the extension's kernels
against the plain twins, the twins against autograd of F.group_norm, the op end to end
(values, first and second derivatives, vmap over chunks), and NIO's use of it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nio_fast import availability, ops
from nio_fast.algorithms.model_state import nio_modes

BACKENDS = ["torch"] + (["cpp"] if availability.cpp_usable(torch.device("cpu")) else [])
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# (shape, groups): odd sizes, 1-d / 2-d / 3-d spatial axes, none, one group, one channel per group
CASES = [((3, 6, 5, 7), 3), ((4, 6, 9), 2), ((2, 4, 3, 2, 5), 4), ((3, 8), 2), ((2, 5, 3, 3), 1), ((3, 4, 7), 4)]


def assert_near(ours, theirs, dtype):
    scale = theirs.abs().max().item() or 1.0
    torch.testing.assert_close(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def inputs(shape, dtype, gen, affine=True):
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    weight = (torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype) if affine else None)
    bias = (torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype) if affine else None)
    return x, weight, bias


def statistics(x, groups, eps=1e-5):
    _, mean, rstd = torch.native_group_norm(x, None, None, x.shape[0], x.shape[1],
                                            x.numel() // (x.shape[0] * x.shape[1]), groups, eps)
    return mean, rstd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups", CASES)
def test_backward_twin_equals_autograd_of_f_group_norm_per_sample(dtype, shape, groups):
    gen = torch.Generator().manual_seed(len(shape) * 10 + groups)
    x, weight, bias = inputs(shape, dtype, gen)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad_x, grad_weight, grad_bias = ops.group_norm_backward_reference(grad_out, x, weight, groups, 1e-5)
    assert grad_weight.shape == grad_bias.shape == shape[:2]
    for n in range(shape[0]):  # GroupNorm is per sample: sample n alone gives its own affine gradients
        xs, w, b = x[n:n + 1].clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        expected = torch.autograd.grad(F.group_norm(xs, groups, w, b), (xs, w, b), grad_out[n:n + 1])
        assert_near(grad_x[n:n + 1], expected[0], dtype)
        assert_near(grad_weight[n], expected[1], dtype)
        assert_near(grad_bias[n], expected[2], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups", CASES)
def test_weight_per_sample_and_its_gradient_equal_the_product_with_x_hat(backend, dtype, shape, groups):
    gen = torch.Generator().manual_seed(len(shape) * 7 + groups)
    x, _, _ = inputs(shape, dtype, gen)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    cotangent = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for ours in (True, False):
        g, xs = grad_out.clone().requires_grad_(), x.clone().requires_grad_()
        if ours:
            rows = ops.group_norm_weight_per_sample(g, xs, groups, backend=backend)
        else:
            rows = (g * F.group_norm(xs, groups)).reshape(shape[0], shape[1], -1).sum(-1)
        results.append((rows, *torch.autograd.grad(rows, (g, xs), cotangent)))
    for mine, theirs in zip(*results):
        assert_near(mine, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("present", ["upq", "u", "pq", "p"])
def test_double_backward_twin_equals_autograd_through_the_backward_twin(dtype, shape, groups, present):
    gen = torch.Generator().manual_seed(len(shape) + groups)
    x, weight, _ = inputs(shape, dtype, gen)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if "u" in present else None
    p = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype) if "p" in present else None
    q = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype) if "q" in present else None
    leaves = [t.clone().requires_grad_() for t in (grad_out, x, weight)]
    outputs = ops.group_norm_backward_reference(*leaves, groups, 1e-5)
    pairs = [(out, cot) for out, cot in zip(outputs, (u, p, q)) if cot is not None]
    expected = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
    ours = ops.group_norm_double_backward_reference(grad_out, x, weight, groups, 1e-5, u, p, q)
    assert_near(ours[0], expected[0], dtype)
    assert_near(ours[1], expected[1], dtype)
    assert_near(ours[2].sum(0), expected[2] if expected[2] is not None else torch.zeros_like(weight), dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_cpp_kernels_equal_the_twins(dtype, shape, groups, affine):
    gen = torch.Generator().manual_seed(groups * 7 + len(shape))
    x, weight, _ = inputs(shape, dtype, gen, affine)
    mean, rstd = statistics(x, groups)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    kernels = availability.extension()
    for ours, theirs in zip(kernels.group_norm_backward(grad_out, x, mean, rstd, weight, groups),
                            ops.group_norm_backward_reference(grad_out, x, weight, groups, 1e-5)):
        assert_near(ours, theirs, dtype)
    for present in ("upq", "u", "q", ""):
        u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if "u" in present else None
        p = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype) if "p" in present else None
        q = torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(dtype) if "q" in present else None
        for ours, theirs in zip(kernels.group_norm_double_backward(grad_out, x, mean, rstd, weight, groups, u, p, q),
                                ops.group_norm_double_backward_reference(grad_out, x, weight, groups, 1e-5, u, p, q)):
            assert_near(ours, theirs, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the extension is not built")
def test_cpp_kernels_take_strided_inputs_and_reject_bad_ones():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=gen).to(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 6, 5, 7, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    mean, rstd = statistics(x, 3)
    kernels = availability.extension()
    ours = kernels.group_norm_backward(grad_out, x, mean, rstd, None, 3)
    for a, b in zip(ours, ops.group_norm_backward_reference(grad_out, x, None, 3, 1e-5)):
        assert_near(a, b, torch.float32)
    with pytest.raises(ValueError, match="groups = 4 does not divide C = 6"):
        kernels.group_norm_backward(grad_out, x, mean, rstd, None, 4)
    with pytest.raises(ValueError, match="grad_out has shape"):
        kernels.group_norm_backward(grad_out[:2], x, mean, rstd, None, 3)
    with pytest.raises(TypeError, match="x's dtype"):
        kernels.group_norm_backward(grad_out.double(), x, mean, rstd, None, 3)
    with pytest.raises(ValueError, match="p and q must hold N \\* C"):
        kernels.group_norm_double_backward(grad_out, x, mean, rstd, None, 3, None, torch.zeros(3, 5), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,groups", CASES[:4])
def test_group_norm_values_and_two_derivatives_equal_f_group_norm(backend, dtype, shape, groups):
    gen = torch.Generator().manual_seed(11 + groups)
    x, weight, bias = inputs(shape, dtype, gen)
    cotangent = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves)
        grads = torch.autograd.grad((y * cotangent).sin().sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum((g.cos() * (i + 1)).sum() for i, g in enumerate(grads)), leaves)
        return [y, *grads, *second]

    for ours, theirs in zip(run(lambda x, w, b: ops.group_norm(x, groups, w, b, backend=backend)),
                            run(lambda x, w, b: F.group_norm(x, groups, w, b))):
        assert_near(ours, theirs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = inputs((2, 4, 3, 3), torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    fn = lambda x, w, b: ops.group_norm(x, 2, w, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)  # third derivatives: through the differentiable twin


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_chunks_and_the_outer_second_derivative_equal_f_group_norm(backend):
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = inputs((12, 6, 5, 3), torch.float64, gen)
    chunks = x.reshape(4, 3, 6, 5, 3)

    def scale_gradients(fn):
        leaves = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        per_chunk = torch.func.vmap(torch.func.grad(lambda params, xc: fn(xc, 3, *params).sin().sum()),
                                    in_dims=(None, 0))(tuple(leaves), chunks)
        assert per_chunk[0].shape == (4, 6)
        gram = sum(g.reshape(4, -1) @ g.reshape(4, -1).T for g in per_chunk)
        return torch.autograd.grad(ops.gradcosine_from_gram(gram).value, leaves)

    for ours, theirs in zip(scale_gradients(lambda x, g, w, b: ops.group_norm(x, g, w, b, backend=backend)),
                            scale_gradients(F.group_norm)):
        assert_near(ours, theirs, torch.float64)


def test_vmap_with_batched_affine_parameters_equals_f_group_norm():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 6, 5, generator=gen, dtype=torch.float64)  # vmapped: 4 batches of [3, 6, 5]
    weights, bias = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen,
                                                                                      dtype=torch.float64)
    ours = torch.func.vmap(lambda xc, w: ops.group_norm(xc, 3, w, bias))(x, weights)
    theirs = torch.func.vmap(lambda xc, w: F.group_norm(xc, 3, w, bias))(x, weights)
    assert_near(ours, theirs, torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_twins_second_order_equals_f_group_norm(dtype):
    gen = torch.Generator().manual_seed(13)
    x, weight, bias = (t.cuda() for t in inputs((6, 8, 9, 7), dtype, gen))
    cotangent = torch.randn(6, 8, 9, 7, generator=gen, dtype=torch.float64).to(dtype).cuda()

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grads = torch.autograd.grad(fn(*leaves), leaves, cotangent, create_graph=True)
        return [*grads, *torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)]

    twins = run(lambda x, w, b: ops.group_norm(x, 4, w, b, backend="torch"))  # "auto" is F.group_norm on CUDA
    for ours, theirs in zip(twins, run(lambda x, w, b: F.group_norm(x, 4, w, b))):
        assert_near(ours, theirs, dtype)


def test_bad_arguments_are_named():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.group_norm(x, 3, backend="cuda")
    with pytest.raises(RuntimeError):  # F.group_norm's own message
        ops.group_norm(x, 4)
    if "cpp" in BACKENDS:
        with pytest.raises(ValueError, match="backend: 'cpp' group_norm kernels need CPU float32/float64"):
            ops.group_norm(x.half(), 3, backend="cpp")


def test_nio_modes_route_nn_group_norm_through_the_fused_op_and_restore_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    x = torch.randn(2, 3, 6, 6)
    with nio_modes(model):
        inside = model(x).grad_fn
    outside = model(x).grad_fn
    assert "GroupNorm" in type(inside).__name__ and type(inside).__name__ != type(outside).__name__
    assert type(outside).__name__ == "NativeGroupNormBackward0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_without_affine_parameters_matches_to_second_order(backend):
    gen = torch.Generator().manual_seed(17)
    x, _, _ = inputs((3, 6, 4, 5), torch.float64, gen)
    cotangent = torch.randn(3, 6, 4, 5, generator=gen, dtype=torch.float64)

    def run(fn):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad((fn(leaf) * cotangent).sin().sum(), leaf, create_graph=True)
        return grad, torch.autograd.grad(grad.cos().sum(), leaf)[0]

    for ours, theirs in zip(run(lambda t: ops.group_norm(t, 3, backend=backend)), run(lambda t: F.group_norm(t, 3))):
        assert_near(ours, theirs, torch.float64)
