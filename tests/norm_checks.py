"""Helpers of the normalisation op tests (test_batch_norm.py, test_layer_norm.py)."""
import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_near(ours, theirs, dtype):
    """Equal to the fp64 / fp32 bar, relative to the larger of theirs' entries."""
    scale = theirs.abs().max().item() or 1.0
    torch.testing.assert_close(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


def random(shape, dtype, gen):
    """Fresh normal values, drawn in float64 so both dtypes see the same numbers."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def second_order(fn, x, weight, bias, cotangent):
    """Output, first and second derivatives of a nonlinear function of fn(x, weight, bias)."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(*leaves)
    grads = torch.autograd.grad((y * cotangent).sin().sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum((g.cos() * (i + 1)).sum() for i, g in enumerate(grads)), leaves)
    return [y, *grads, *second]
