"""Backwards written for one differentiation (``ops.first_order``): differentiating them again
raises, where PyTorch's ``once_differentiable`` silently left their terms out of a derivative
taken with respect to the real inputs. Their values, with or without a graph, are unchanged.
The fused Gram's backward builds a graph from its plain formula instead: a third derivative of
sub-batch GradCosine is exact."""
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


def third_derivative(value_of, params):
    grads = torch.autograd.grad(value_of(), params, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), params)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_the_fused_gram_is_differentiable_three_times(dtype, rtol):
    generator = torch.Generator().manual_seed(3)
    table = [[torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
              for shape in ((5, 3), (7,), (2, 3, 2))] for _ in range(3)]
    leaves = [t for row in table for t in row]
    ours = third_derivative(lambda: ops.gram(table).sin().sum(), leaves)
    theirs = third_derivative(lambda: ops.gram_reference(table).sin().sum(), leaves)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=rtol, atol=rtol * float(reference.abs().max()))


def chunk_gradcosine(model, batch, chunks):
    """The spec's GradCosine from one autograd call per chunk (graph kept), for the reference."""
    inputs, targets = batch
    params = list(model.parameters())
    rows = []
    for chunk in torch.arange(len(inputs)).chunk(chunks):
        loss = nn.functional.cross_entropy(model(inputs[chunk]), targets[chunk])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)]))
    return ops.gradcosine_from_gram(ops.gram_reference([[row] for row in rows])).value


def test_a_third_derivative_of_gradcosine_is_exact_per_chunk_and_refused_by_the_factor_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batch = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    # per_chunk by name: "auto" takes the factor engine for small chunks on the CPU, which refuses
    ours = third_derivative(lambda: nio_fast.gradcosine(model, batch, sub_batches=3, create_graph=True,
                                                        mode="per_chunk").value, params)
    theirs = third_derivative(lambda: chunk_gradcosine(model, batch, 3), params)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    for sub_batches in ("samples", 3):  # the factor engine, per sample or per chunk
        value = nio_fast.gradcosine(model, batch, sub_batches=sub_batches, create_graph=True).value
        grads = torch.autograd.grad(value, params, create_graph=True)  # second order: supported
        with pytest.raises(RuntimeError, match=REFUSED):
            torch.autograd.grad(sum(g.square().sum() for g in grads), params)


def test_a_third_derivative_through_a_recomputed_segment_is_refused():
    """A segment's double-backward node differentiates its recomputed graph without keeping one:
    with every parameter inside the segment nothing else would refuse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batch = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    value = nio_fast.gradcosine(model, batch, sub_batches="samples", create_graph=True, recompute=[model]).value
    grads = torch.autograd.grad(value, params, create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)


def test_exact_recompute_differentiates_once_with_a_graph_and_refuses_beyond():
    """Its backward differentiates chunk graphs it builds itself: with create_graph=True it used
    to run into its own node again (AttributeError); now its values are those without a graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    batch = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())

    def value():
        return nio_fast.gradcosine(model, batch, sub_batches=3, mode="exact_recompute", create_graph=True).value
    plain = torch.autograd.grad(value(), params)
    grads = torch.autograd.grad(value(), params, create_graph=True)
    for mine, theirs in zip(grads, plain):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_fused_gram_is_exact_and_the_ghost_kernels_refuse():
    generator = torch.Generator().manual_seed(4)
    table = [[torch.randn(shape, generator=generator, dtype=torch.float64).float().cuda().requires_grad_()
              for shape in ((33, 5), (7,))] for _ in range(3)]
    leaves = [t for row in table for t in row]
    ours = third_derivative(lambda: ops.gram(table).sin().sum(), leaves)
    theirs = third_derivative(lambda: ops.gram_reference(table).sin().sum(), leaves)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    a = torch.randn(5, 9, 4, device="cuda", requires_grad=True)
    b = torch.randn(5, 9, 3, device="cuda", requires_grad=True)
    grads = torch.autograd.grad(ops.outer_gram(a, b, "ghost", backend="triton").sum(), (a, b), create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (a, b))
