"""Attention with a recomputing double backward (nio_fast.ops.attention) against its plain twin
(autograd of the math path): values and first, second and third derivatives, on odd shapes and
every kind of mask, in blocks of samples and tiles of query rows; what the graph keeps and the
peak a long sequence needs; routing; NIO's use of it."""
import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast import availability, ops
from nio_fast.algorithms.model_state import nio_modes
from norm_checks import assert_near, derivatives, random

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import allocated_peak_mb  # noqa: E402  (the allocator's peak, torch.profiler's memory events)

attention_module = importlib.import_module("nio_fast.ops.attention")  # (ops.attention is the function)

# (q, k, v shapes): heads and samples, one batch axis, none; L != S, head widths != value widths
SHAPES = [((3, 2, 5, 4), (3, 2, 7, 4), (3, 2, 7, 6)), ((4, 5, 3), (4, 5, 3), (4, 5, 2)),
          ((5, 3), (6, 3), (6, 4)), ((2, 3, 1, 9, 5), (2, 3, 1, 4, 5), (2, 3, 1, 4, 5))]
MASKS = ["none", "bool", "bool_with_empty_row", "float_per_sample", "causal"]


def make_mask(kind, q_shape, k_shape, dtype, gen):
    scores = (*q_shape[:-1], k_shape[-2])
    if kind == "none" or kind == "causal":
        return None
    if kind.startswith("bool"):
        mask = torch.rand(scores[-2:], generator=gen) > 0.4
        mask[:, 0] = True  # a key for every query ...
        if kind == "bool_with_empty_row":
            mask[1] = False  # ... but one: its output and gradients are zeros (the safe softmax)
        return mask
    if len(scores) == 2:
        return random(scores, dtype, gen)
    return random((scores[0], *([1] * (len(scores) - 3)), *scores[-2:]), dtype, gen)  # broadcast over heads


def case(shapes, mask_kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (random(shape, dtype, gen) for shape in shapes)
    return q, k, v, make_mask(mask_kind, shapes[0], shapes[1], dtype, gen), mask_kind == "causal"


def of_attention(fn, q, k, v, gen, order=2):
    """Output and derivatives up to ``order`` of a nonlinear function of fn(q, k, v), against a
    fresh random cotangent (norm_checks.derivatives)."""
    cotangent = random((*q.shape[:-1], v.shape[-1]), q.dtype, gen).to(q.device)
    return derivatives(fn, (q, k, v), cotangent, order)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_values_first_and_second_derivatives_equal_the_twin(dtype, mask_kind, shapes):
    q, k, v, mask, causal = case(shapes, mask_kind, dtype, seed=len(shapes[0]) * 7 + MASKS.index(mask_kind))
    seed = 11 + len(shapes[0])
    ours = of_attention(lambda *t: ops.attention(*t, mask, is_causal=causal, scale=0.7), q, k, v,
                       torch.Generator().manual_seed(seed))
    theirs = of_attention(lambda *t: ops.attention_reference(*t, mask, is_causal=causal, scale=0.7), q, k, v,
                         torch.Generator().manual_seed(seed))
    for mine, reference in zip(ours, theirs):
        assert torch.isfinite(mine).all()
        assert_near(mine, reference, dtype)


def test_the_twin_equals_pytorchs_attention():
    for shapes in SHAPES:
        for mask_kind in MASKS:
            q, k, v, mask, causal = case(shapes, mask_kind, torch.float64, seed=3)
            assert_near(ops.attention_reference(q, k, v, mask, is_causal=causal),
                        F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_third_derivatives_equal_the_twin(dtype):
    q, k, v, mask, causal = case(SHAPES[0], "float_per_sample", dtype, seed=5)
    ours, theirs = (of_attention(lambda *t: fn(*t, mask), q, k, v, torch.Generator().manual_seed(2), order=3)
                    for fn in (ops.attention, ops.attention_reference))
    for mine, reference in zip(ours, theirs):
        assert_near(mine, reference, dtype)


def test_gradgradcheck():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (random(shape, torch.float64, gen).requires_grad_() for shape in SHAPES[0])
    mask = make_mask("bool", SHAPES[0][0], SHAPES[0][1], torch.float64, gen)
    assert torch.autograd.gradgradcheck(lambda *t: ops.attention(*t, mask), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_of_the_sample_axis_give_the_same_numbers(monkeypatch, dtype):
    q, k, v, mask, _ = case(SHAPES[0], "float_per_sample", dtype, seed=4)
    whole = of_attention(lambda *t: ops.attention(*t, mask), q, k, v, torch.Generator().manual_seed(1))
    monkeypatch.setattr(attention_module, "BLOCK_VALUES", 2 * 5 * 7)  # one sample per block: 3 blocks
    blocked = of_attention(lambda *t: ops.attention(*t, mask), q, k, v, torch.Generator().manual_seed(1))
    for mine, reference in zip(blocked, whole):
        assert_near(mine, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_tiles_of_query_rows_equal_the_twin(monkeypatch, dtype, mask_kind, shapes):
    """Where one entry's scores pass BLOCK_VALUES (long sequences), tiles of its query rows: uneven
    ones (2 rows per tile of 3 to 9), masks sliced with them, key-side results summed over them."""
    q, k, v, mask, causal = case(shapes, mask_kind, dtype, seed=31 + MASKS.index(mask_kind))
    scores = (*shapes[0][:-1], shapes[1][-2])
    per_entry = scores[-2] * scores[-1] * (1 if len(scores) == 2 else math.prod(scores[1:-2]))
    monkeypatch.setattr(attention_module, "BLOCK_VALUES", 2 * per_entry // scores[-2])  # two query rows
    seen = []
    probabilities = attention_module._probabilities
    monkeypatch.setattr(attention_module, "_probabilities", lambda q_, *rest: seen.append(q_.shape[-2])
                        or probabilities(q_, *rest))
    ours = of_attention(lambda *t: ops.attention(*t, mask, is_causal=causal), q, k, v, torch.Generator().manual_seed(3))
    theirs = of_attention(lambda *t: ops.attention_reference(*t, mask, is_causal=causal), q, k, v,
                          torch.Generator().manual_seed(3))
    assert seen and max(seen) == 2 and (scores[-2] % 2 == 0 or 1 in seen)
    for mine, reference in zip(ours, theirs):
        assert torch.isfinite(mine).all()
        assert_near(mine, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_third_derivatives_in_tiles_of_query_rows_equal_the_twin(monkeypatch, dtype):
    q, k, v, mask, _ = case(SHAPES[0], "float_per_sample", dtype, seed=6)
    monkeypatch.setattr(attention_module, "BLOCK_VALUES", 2 * 2 * 7)  # 2 heads x 2 rows x 7 keys per tile
    ours, theirs = (of_attention(lambda *t: fn(*t, mask), q, k, v, torch.Generator().manual_seed(8), order=3)
                    for fn in (ops.attention, ops.attention_reference))
    for mine, reference in zip(ours, theirs):
        assert_near(mine, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strided_inputs_as_multi_head_attention_passes_them(dtype):
    """q, k, v as views of one [T, N, 3, H, E] projection (samples and heads not mergeable without
    a copy), differentiated through the views twice."""
    gen = torch.Generator().manual_seed(8)
    projection = random((7, 3, 3, 2, 5), dtype, gen)  # [T, N, q/k/v, H, E]
    mask = make_mask("float_per_sample", (3, 2, 7, 5), (3, 2, 7, 5), dtype, gen)
    cotangent = random((3, 2, 7, 5), dtype, gen)
    results = []
    for fn in (ops.attention, ops.attention_reference):
        leaf = projection.clone().requires_grad_()
        q, k, v = (leaf[:, :, i].permute(1, 2, 0, 3) for i in range(3))  # [N, H, T, E] views
        assert not q.is_contiguous()
        out = fn(q, k, v, mask)
        grad, = torch.autograd.grad((out * cotangent).sin().sum(), leaf, create_graph=True)
        second, = torch.autograd.grad(grad.cos().sum(), leaf)
        results.append((out, grad, second))
    for mine, reference in zip(*results):
        assert_near(mine, reference, dtype)


def test_the_graph_keeps_no_tensor_of_the_attentions_size():
    """With its backward differentiated, the math path keeps [*, L, S] tensors; this op keeps
    nothing bigger than q, k, v and the output gradient."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (random(shape, torch.float32, gen).requires_grad_() for shape in ((4, 2, 3, 16, 2),) * 3)
    largest = {}
    for name, fn in (("ours", ops.attention), ("math", ops.attention_reference)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = fn(q, k, v)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))
        largest[name] = max(saved)
    assert largest["ours"] == q.numel()
    assert largest["math"] == 4 * 2 * 3 * 16 * 16  # the probabilities: what the op leaves out


def test_a_long_sequence_runs_in_tiles_of_query_rows():
    """One entry of 2 heads x 1024 x 1024 scores (8 MB a tensor): its second derivatives never
    hold two tensors of that size at once (untiled: about six), and the values hold."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (random((1, 2, 1024, 8), torch.float32, gen).requires_grad_() for _ in range(3))

    results = {}

    def second_order(fn):
        grads = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v), create_graph=True)
        results[fn] = [g.detach() for g in grads] + list(
            torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v)))
    assert allocated_peak_mb(lambda: second_order(ops.attention)) < 2 * 2 * 1024 * 1024 * 4 / 2**20
    second_order(ops.attention_reference)
    for mine, reference in zip(results.pop(ops.attention), results.pop(ops.attention_reference)):
        assert_near(mine, reference, torch.float32)


@pytest.mark.parametrize("arguments, routed", [
    (dict(), True),
    (dict(dropout_p=0.1), False),
    (dict(mask="grad"), False),
    (dict(dtype=torch.float16), False),
    (dict(key_batch=1), False),  # broadcast batch axes: PyTorch's
    (dict(no_grad=True), True),  # the forward alone: the same formula as with a graph
])
def test_routing(arguments, routed):
    gen = torch.Generator().manual_seed(0)
    dtype = arguments.get("dtype", torch.float32)
    q = random((2, 3, 5, 4), torch.float64, gen).to(dtype).requires_grad_(not arguments.get("no_grad"))
    k = random((arguments.get("key_batch", 2), 3, 6, 4), torch.float64, gen).to(dtype)
    v = random(k.shape, torch.float64, gen).to(dtype)
    mask = random((5, 6), torch.float64, gen).to(dtype).requires_grad_() if arguments.get("mask") else None
    takes = attention_module._routed(q, k, v, mask, arguments.get("dropout_p", 0.0), False, False)
    assert takes == routed
    if not arguments.get("dropout_p"):  # what it returns either way: PyTorch's numbers
        torch.testing.assert_close(ops.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))


def test_nio_modes_route_a_transformers_attention_and_keep_gradcosine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(8 * 5, 3)).double()
    inputs, targets = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    seen = []
    original = attention_module._Attention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module._Attention, "apply", lambda *a: seen.append(1) or original(*a))
        with nio_modes(model):
            model(inputs)
    assert seen, "the encoder layer's attention did not reach ops.attention under nio_modes"
    results = [nio_fast.gradcosine(model, (inputs, targets), sub_batches=3, create_graph=True)]
    with pytest.MonkeyPatch.context() as patch:  # the same evaluation on PyTorch's math path
        patch.setattr(attention_module, "_routed", lambda *a: False)
        results.append(nio_fast.gradcosine(model, (inputs, targets), sub_batches=3, create_graph=True))
    params = list(model.parameters())
    (value, grads), (value_math, grads_math) = ((r.value, torch.autograd.grad(r.value, params)) for r in results)
    assert_near(value, value_math, torch.float64)
    for mine, reference in zip(grads, grads_math):
        assert_near(mine, reference, torch.float64)


KERNEL_BUILT = availability.extension() is not None


def softmax_second_order_inputs(shape, dtype, gen, empty_row=False):
    """(P, dP, H / scale, dO gv^T) of one tile: probabilities of fresh scores (with a row of
    zeros, as a fully masked row gives, when asked) and fresh values for the rest."""
    p = torch.softmax(random(shape, torch.float64, gen) * 3, -1)
    if empty_row:
        p[(0,) * (len(shape) - 1)] = 0.0
    return (p.to(dtype), *(random(shape, dtype, gen) for _ in range(3)))


@pytest.mark.skipif(not KERNEL_BUILT, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 1), (1, 3, 1500), (4, 9, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cpp_softmax_double_backward_equals_the_twin(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    p, grad_p, unscaled_h, cot_p = softmax_second_order_inputs(shape, dtype, gen, empty_row=True)
    theirs = attention_module._softmax_second_order(p, grad_p.clone(), unscaled_h.clone(), cot_p.clone(), 0.37)
    ours = (grad_p.clone(), unscaled_h.clone(), cot_p.clone())  # overwritten in place: (dS, GdP, GS)
    availability.extension().attention_softmax_double_backward_(p, *ours, 0.37)
    for mine, reference in zip(ours, theirs):
        assert_near(mine, reference, dtype)
    assert all(t[0, 0].abs().max() == 0 for t in ours)  # the fully masked row: zeros, not NaN


@pytest.mark.skipif(not KERNEL_BUILT, reason="the extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", ["none", "bool_with_empty_row", "causal"])
def test_second_derivatives_by_backend_are_equal_and_only_cpp_calls_the_kernel(monkeypatch, dtype, mask_kind):
    q, k, v, mask, causal = case(SHAPES[0], mask_kind, dtype, seed=17)
    kernel = availability.extension().attention_softmax_double_backward_
    calls = []
    monkeypatch.setattr(attention_module.availability, "extension",
                        lambda: types.SimpleNamespace(attention_softmax_double_backward_=lambda *a: calls.append(1)
                                                      or kernel(*a)))
    results = {}
    for backend in ("torch", "cpp"):
        before = len(calls)
        results[backend] = of_attention(lambda *t: ops.attention(*t, mask, is_causal=causal, backend=backend),
                                        q, k, v, torch.Generator().manual_seed(4))
        assert (len(calls) > before) == (backend == "cpp")
    for mine, reference in zip(results["cpp"], results["torch"]):
        assert_near(mine, reference, dtype)


@pytest.mark.skipif(not KERNEL_BUILT, reason="the extension is not built")
def test_cpp_softmax_double_backward_rejects_bad_tensors():
    gen = torch.Generator().manual_seed(5)
    p, grad_p, unscaled_h, cot_p = softmax_second_order_inputs((2, 3, 4), torch.float32, gen)
    kernel = availability.extension().attention_softmax_double_backward_
    with pytest.raises(ValueError, match="probabilities' shape"):
        kernel(p, grad_p[:, :2].contiguous(), unscaled_h, cot_p, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(p, grad_p.transpose(1, 2).contiguous().transpose(1, 2), unscaled_h, cot_p, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        kernel(p, grad_p.double(), unscaled_h, cot_p, 1.0)
    with pytest.raises(ValueError, match="must not share memory"):
        kernel(p, grad_p, grad_p, cot_p, 1.0)
    with pytest.raises(ValueError, match="backend: expected one of 'auto', 'cpp', 'triton', 'torch'"):
        ops.attention(p, p, p, backend="cuda")
    with pytest.raises(ValueError, match="backend: 'cpp' attention kernels need CPU float32/float64"):
        ops.attention(p.half(), p.half(), p.half(), backend="cpp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", ["none", "bool_with_empty_row", "float_per_sample", "causal"])
@pytest.mark.parametrize("tile_values", [None, 2 * 2 * 7], ids=["one_tile", "tiles_of_two_rows"])
def test_on_cuda_values_and_derivatives_equal_the_twin_on_the_cpu(monkeypatch, dtype, mask_kind, tile_values):
    if tile_values is not None:
        monkeypatch.setattr(attention_module, "CUDA_BLOCK_VALUES", tile_values)  # 2 heads x 2 rows x 7 keys
    q, k, v, mask, causal = case(SHAPES[0], mask_kind, dtype, seed=21)
    ours = of_attention(lambda *t: ops.attention(*t, None if mask is None else mask.cuda(), is_causal=causal),
                       q.cuda(), k.cuda(), v.cuda(), torch.Generator().manual_seed(3))
    theirs = of_attention(lambda *t: ops.attention_reference(*t, mask, is_causal=causal), q, k, v,
                         torch.Generator().manual_seed(3))
    for mine, reference in zip(ours, theirs):
        assert_near(mine.cpu(), reference, dtype)
