"""Backwards written for one differentiation (``ops.first_order``): differentiating them again
raises, where PyTorch's ``once_differentiable`` silently left their terms out of a derivative
taken with respect to the real inputs. Their values, with or without a graph, are unchanged."""
import pytest
import torch
from torch import nn

import nio_fast
from nio_fast import ops

REFUSED = "differentiable once"


def random(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()


OPS = {  # name: (inputs, op)
    "outer_gram ghost": (lambda: (random(5, 3, 4), random(5, 3, 2, seed=1)),
                         lambda a, b: ops.outer_gram(a, b, "ghost")),
    "outer_gram materialize": (lambda: (random(5, 3, 4), random(5, 3, 2, seed=1)),
                               lambda a, b: ops.outer_gram(a, b, "materialize")),
    "gram": (lambda: (random(3, 7), random(3, 4, seed=1)), lambda a, b: ops.gram([[a[i], b[i]] for i in range(3)])),
    "layer_norm_weight_per_sample": (lambda: (random(4, 3, 6), random(4, 3, 6, seed=1)),
                                     lambda g, x: ops.layer_norm_weight_per_sample(g, x, (6,))),
    "group_norm_weight_per_sample": (lambda: (random(4, 6, 5), random(4, 6, 5, seed=1)),
                                     lambda g, x: ops.group_norm_weight_per_sample(g, x, 3)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_derivative_of_a_first_order_backward_is_refused(name):
    make_inputs, op = OPS[name]
    inputs = make_inputs()
    out = op(*inputs)
    weights = random(*out.shape, seed=2)
    plain = torch.autograd.grad((out * weights).sum(), inputs, retain_graph=True)
    with_graph = torch.autograd.grad((out * weights).sum(), inputs, create_graph=True)
    for mine, theirs in zip(with_graph, plain):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        assert mine.requires_grad
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(g.square().sum() for g in with_graph), inputs)


@pytest.mark.parametrize("sub_batches", ["samples", 3])
def test_a_third_derivative_of_gradcosine_is_refused_not_wrong(sub_batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batch = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    value = nio_fast.gradcosine(model, batch, sub_batches=sub_batches, create_graph=True).value
    grads = torch.autograd.grad(value, params, create_graph=True)  # second order: supported
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)
