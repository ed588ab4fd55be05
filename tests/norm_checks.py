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


def derivatives(fn, leaves, cotangent, order=2):
    """Output and derivatives up to ``order`` of a nonlinear function of fn(*leaves): the sine of
    the output against ``cotangent``, then at each level a cosine-weighted sum of the gradients."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    results, scalar = [y], (y * cotangent).sin().sum()
    for level in range(order):
        grads = torch.autograd.grad(scalar, leaves, create_graph=level + 1 < order)
        results += grads
        scalar = sum((g.cos() * (i + level + 1)).sum() for i, g in enumerate(grads))
    return results


def second_order(fn, x, weight, bias, cotangent):
    """Output, first and second derivatives of a nonlinear function of fn(x, weight, bias)."""
    return derivatives(fn, [t for t in (x, weight, bias) if t is not None], cotangent)
