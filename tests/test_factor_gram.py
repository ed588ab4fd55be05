"""Per-sample gradient Grams from layer factors: both outer_gram routes and embedding_gram
against their plain twins (values and gradients), blocking, saved tensors, input checks."""
import itertools

import pytest
import torch

from nio_fast import ops
from nio_fast.ops import factor_gram

ROUTES = ["ghost", "materialize"]
SIZES = [(n, t, d, p) for (n, t), (d, p) in zip(itertools.product([1, 3, 7], [1, 5, 9]),
                                                 itertools.cycle([(3, 11), (17, 3), (11, 17)]))]


def factors(n, t, d, p, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(n, t, p, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    upstream = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a, b, upstream


def assert_close_scaled(ours, theirs, rel):
    """Equal up to ``rel`` times the magnitude of ``theirs`` (fp32 entries can cancel)."""
    scale = theirs.abs().max().item() or 1.0
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rel, atol=rel * scale)


def value_and_grads(fn, a, b, upstream):
    gram = fn(a, b)
    grads = torch.autograd.grad((gram * upstream.to(gram.dtype)).sum(), (a, b))
    return (gram,) + grads


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}T{}d{}p{}".format(*s))
def test_routes_equal_the_reference_in_fp64(route, size):
    a, b, upstream = factors(*size)
    ours = value_and_grads(lambda x, y: ops.outer_gram(x, y, route), a, b, upstream)
    theirs = value_and_grads(ops.outer_gram_reference, a, b, upstream)
    assert ours[0].dtype == torch.float64 and ours[0].shape == (size[0], size[0])
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10 * (y.abs().max().item() or 1.0))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("size", SIZES[::2], ids=lambda s: "N{}T{}d{}p{}".format(*s))
def test_routes_equal_the_fp64_reference_in_fp32(route, size):
    a, b, upstream = factors(*size, dtype=torch.float32)
    ours = value_and_grads(lambda x, y: ops.outer_gram(x, y, route), a, b, upstream)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    theirs = value_and_grads(ops.outer_gram_reference, a64, b64, upstream)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    for x, y in zip(ours, theirs):
        assert_close_scaled(x, y, 1e-5)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("budget", [64, 1000, 2500])
@pytest.mark.parametrize("size", [(7, 5, 3, 11), (7, 9, 3, 11), (29, 1, 3, 11)],
                         ids=lambda s: "N{}T{}d{}p{}".format(*s))
def test_blocked_routes_equal_the_reference(monkeypatch, route, budget, size):
    monkeypatch.setattr(factor_gram, "_BLOCK_BYTES", budget)
    n, t, d, p = size
    if route == "ghost":
        samples, window = factor_gram._ghost_plan(n, t, max(d, p), 8, budget)
        assert samples < n or window < t  # the blocking really splits
    else:
        assert factor_gram._materialize_plan(n, t, d, p, 8, budget) < n
    a, b, upstream = factors(*size, seed=3)
    ours = value_and_grads(lambda x, y: ops.outer_gram(x, y, route), a, b, upstream)
    theirs = value_and_grads(ops.outer_gram_reference, a, b, upstream)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10 * y.abs().max().item())


def test_ghost_windows_positions_when_one_pair_exceeds_the_budget():
    samples, window = factor_gram._ghost_plan(4, 9, 11, 8, 64)
    assert (samples, window) == (1, 1)
    a, b, upstream = factors(4, 9, 3, 11, seed=5)
    ours = value_and_grads(lambda x, y: ops.outer_gram(x, y, "ghost", block_bytes=64), a, b, upstream)
    theirs = value_and_grads(ops.outer_gram_reference, a, b, upstream)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10 * y.abs().max().item())


def test_the_reference_is_the_gram_of_true_per_sample_linear_gradients():
    a, b, _ = factors(3, 4, 5, 2, seed=7)
    weight = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    per_sample = [torch.autograd.grad((torch.nn.functional.linear(a[i], weight) * b[i]).sum(), weight)[0].reshape(-1)
                  for i in range(3)]
    stacked = torch.stack(per_sample)
    expected = stacked @ stacked.T
    torch.testing.assert_close(ops.outer_gram_reference(a, b), expected, rtol=1e-12, atol=1e-12)
    for route in ROUTES:
        torch.testing.assert_close(ops.outer_gram(a, b, route), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("block_bytes", [None, 100])
def test_gradcheck(route, block_bytes):
    a, b, _ = factors(3, 2, 3, 2, seed=11)
    assert torch.autograd.gradcheck(lambda x, y: ops.outer_gram(x, y, route, block_bytes=block_bytes), (a, b))


def test_gradcheck_one_factor_only():
    a, b, _ = factors(3, 2, 3, 2, seed=12)
    for route in ROUTES:
        assert torch.autograd.gradcheck(lambda x: ops.outer_gram(x, b.detach(), route), (a,))
        assert torch.autograd.gradcheck(lambda y: ops.outer_gram(a.detach(), y, route), (b,))


@pytest.mark.parametrize("route", ROUTES)
def test_the_function_saves_only_its_inputs(route):
    a, b, _ = factors(5, 6, 7, 3, seed=13)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gram = ops.outer_gram(a, b, route)
    assert 1 <= len(saved) <= 2
    largest = max(a.numel(), b.numel())
    assert all(t.numel() <= largest for t in saved)
    assert {t.data_ptr() for t in saved} <= {a.data_ptr(), b.data_ptr()}
    torch.autograd.grad(gram.sum(), (a, b))  # the graph still works


def test_embedding_gram_saves_only_indices_and_output_grads():
    indices = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(2))
    _, b, _ = factors(5, 6, 1, 3, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.embedding_gram(indices, b, padding_idx=1)
    assert {t.data_ptr() for t in saved} <= {indices.data_ptr(), b.data_ptr()}
    assert all(t.numel() <= b.numel() for t in saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    a, b, upstream = factors(4, 3, 5, 7, dtype=dtype, seed=17)
    expected = ops.outer_gram_reference(a.detach().float(), b.detach().float())
    for route in ROUTES:
        gram = ops.outer_gram(a, b, route)
        assert gram.dtype == torch.float32
        assert_close_scaled(gram, expected, 1e-5)
        grad_a, grad_b = torch.autograd.grad((gram * upstream.float()).sum(), (a, b))
        assert grad_a.dtype == dtype and grad_b.dtype == dtype


def test_route_choice_follows_the_cost_estimate():
    linear = ops.outer_gram_cost(64, 1, 512, 10)
    assert linear.route == "ghost" and linear.ghost_flops < linear.materialize_flops
    conv = ops.outer_gram_cost(64, 256, 27, 16)
    assert conv.route == "materialize" and conv.materialize_passes == 1
    assert ops.outer_gram_route(64, 256, 27, 16) == "materialize"
    assert "materialize" in conv.reason
    # A budget that splits the samples makes materialize rebuild per-sample gradients.
    assert ops.outer_gram_cost(64, 4, 100, 100, block_bytes=40_000 * 8).materialize_passes > 1


@pytest.mark.parametrize("size", [(6, 1, 3, 11), (6, 9, 5, 3)])
def test_auto_takes_the_route_the_estimate_names(monkeypatch, size):
    a, b, _ = factors(*size, seed=19)
    chosen = ops.outer_gram_route(size[0], size[1], size[2], size[3], itemsize=8)
    taken = []
    original = factor_gram._OuterGram.apply
    monkeypatch.setattr(factor_gram._OuterGram, "apply", lambda *args: taken.append(args[2]) or original(*args))
    gram = ops.outer_gram(a, b)
    assert taken == [chosen]
    torch.testing.assert_close(gram, ops.outer_gram_reference(a, b), rtol=1e-10, atol=1e-10)


def test_empty_batch_and_no_positions():
    a, b = torch.randn(0, 3, 4, dtype=torch.float64), torch.randn(0, 3, 2, dtype=torch.float64)
    for route in ROUTES:
        assert ops.outer_gram(a, b, route).shape == (0, 0)
    a, b = torch.randn(3, 0, 4, dtype=torch.float64), torch.randn(3, 0, 2, dtype=torch.float64)
    for route in ROUTES:
        torch.testing.assert_close(ops.outer_gram(a, b, route), torch.zeros(3, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Embedding.

def embedding_factors(n, t, e, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, vocab, (n, t), generator=gen)
    b = torch.randn(n, t, e, generator=gen, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return indices, b, upstream


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("block_bytes", [None, 64, 700])
@pytest.mark.parametrize("size", [(1, 5, 3), (3, 1, 11), (7, 9, 3)], ids=lambda s: "N{}T{}E{}".format(*s))
def test_embedding_gram_equals_the_reference(size, block_bytes, padding_idx):
    n, t, e = size
    indices, b, upstream = embedding_factors(n, t, e, vocab=4, seed=n + t)
    indices[0, 0] = 2  # padding appears at least once
    if t > 1:
        indices[0, 1] = 2
    ours = ops.embedding_gram(indices, b, padding_idx, block_bytes=block_bytes)
    theirs = ops.embedding_gram_reference(indices, b, padding_idx)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * theirs.abs().max().item())
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), b)
    (grad_theirs,) = torch.autograd.grad((theirs * upstream).sum(), b)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-10 * grad_theirs.abs().max().item())
    if padding_idx is not None:
        assert grad_ours[indices == padding_idx].abs().max() == 0


def test_embedding_reference_matches_true_per_sample_embedding_gradients():
    indices, b, _ = embedding_factors(3, 6, 4, vocab=5, seed=23)
    indices[1, :3] = 3  # repeats within a sample
    table = torch.nn.Embedding(6, 4, padding_idx=3).double()
    per_sample = []
    for i in range(3):
        (grad,) = torch.autograd.grad((table(indices[i]) * b[i]).sum(), table.weight)
        per_sample.append(grad.reshape(-1))
    stacked = torch.stack(per_sample)
    torch.testing.assert_close(ops.embedding_gram(indices, b, padding_idx=3), stacked @ stacked.T,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.embedding_gram_reference(indices, b, padding_idx=3), stacked @ stacked.T,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_bytes", [None, 48])
def test_embedding_gradcheck(block_bytes):
    indices, b, _ = embedding_factors(3, 3, 2, vocab=3, seed=29)
    indices[1, 1] = 0
    assert torch.autograd.gradcheck(lambda y: ops.embedding_gram(indices, y, 0, block_bytes=block_bytes), (b,))


# ---------------------------------------------------------------------------------------------
# Bad inputs.

def test_outer_gram_rejects_bad_inputs():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="^inputs: expected a 3-d"):
        ops.outer_gram(a[:, 0], b)
    with pytest.raises(ValueError, match="^output_grads: expected a 3-d"):
        ops.outer_gram(a, b[0])
    with pytest.raises(ValueError, match=r"^output_grads: \[N, T\]"):
        ops.outer_gram(a, b[:2])
    with pytest.raises(ValueError, match=r"^output_grads: \[N, T\]"):
        ops.outer_gram(a, b[:, :3])
    with pytest.raises(TypeError, match="^inputs: expected a floating-point"):
        ops.outer_gram(torch.ones(3, 4, 5, dtype=torch.long), b)
    with pytest.raises(TypeError, match="^output_grads: dtype"):
        ops.outer_gram(a, b.double())
    with pytest.raises(TypeError, match="^inputs: expected a tensor"):
        ops.outer_gram([[1.0]], b)
    with pytest.raises(ValueError, match="^route: expected one of"):
        ops.outer_gram(a, b, "fast")
    with pytest.raises(ValueError, match="^block_bytes"):
        ops.outer_gram(a, b, block_bytes=0)
    with pytest.raises(ValueError, match="^positions"):
        ops.outer_gram_route(3, -1, 5, 2)


def test_embedding_gram_rejects_bad_inputs():
    indices, b = torch.randint(0, 3, (3, 4)), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="^indices: expected a 2-d"):
        ops.embedding_gram(indices[0], b)
    with pytest.raises(TypeError, match="^indices: expected an integer"):
        ops.embedding_gram(indices.float(), b)
    with pytest.raises(ValueError, match="^output_grads: expected a 3-d"):
        ops.embedding_gram(indices, b[0])
    with pytest.raises(TypeError, match="^output_grads: expected a floating-point"):
        ops.embedding_gram(indices, indices.unsqueeze(-1))
    with pytest.raises(ValueError, match=r"^output_grads: \[N, T\]"):
        ops.embedding_gram(indices, b[:, :2])
    with pytest.raises(ValueError, match="^padding_idx"):
        ops.embedding_gram(indices, b, padding_idx=-1)


@pytest.mark.parametrize("route", ["ghost", "materialize"])
def test_skipped_values_keep_the_backward(route):
    """Under gram_values_unused the Gram is zeros and its backward the same (a caller that only
    differentiates a Gram whose value it formed before)."""
    torch.manual_seed(3)
    a = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 5, dtype=torch.float64)
    expected = torch.autograd.grad((ops.outer_gram(a, b, route=route) * weights).sum(), (a, b))
    with ops.gram_values_unused():
        assert ops.gram_values_wanted() is False
        skipped = ops.outer_gram(a, b, route=route)
    assert ops.gram_values_wanted() is True
    assert torch.equal(skipped, torch.zeros_like(skipped))
    for mine, theirs in zip(torch.autograd.grad((skipped * weights).sum(), (a, b)), expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
