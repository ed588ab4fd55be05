"""Chunk reductions (nio_fast.ops.chunk_reduce): the extension's sparse kernels and the Triton
ones against the dense twin, for chunk weightings with and without overlap and for arbitrary
sparse weightings; values, gradients and second derivatives; input checks."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nio_fast import availability, ops  # noqa: E402
from nio_fast.algorithms.batching import chunk_bounds  # noqa: E402
from nio_fast.ops import chunk_reduce  # noqa: E402

FUSED = [backend for backend, usable in (("cpp", availability.cpp_usable(torch.device("cpu"))),
                                         ("triton", availability.triton_usable(torch.device("cpu"))))]
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def sample_gram(n, dtype, gen, k=9):
    per_sample = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return (per_sample @ per_sample.T).to(dtype)


def random_weighting(n, d, gen, dtype):
    """Sparse, irregular: some samples in several chunks, one chunk with a single sample."""
    mask = torch.rand(n, d, generator=gen) < 0.4
    mask[0, 0] = True
    mask[:, d - 1] = False
    mask[n // 2, d - 1] = True
    return torch.where(mask, torch.rand(n, d, generator=gen, dtype=torch.float64) + 0.1, 0.0).to(dtype)


def weightings(n, gen, dtype):
    yield "equal", ops.chunk_weights(chunk_bounds(n, 3, 0.0), n, dtype)
    yield "overlap", ops.chunk_weights(chunk_bounds(n, 4, 0.5), n, dtype)
    yield "random", random_weighting(n, 5, gen, dtype)


def assert_near(ours, theirs, dtype):
    scale = theirs.abs().max().item() or 1.0
    torch.testing.assert_close(ours, theirs, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [7, 33])
def test_fused_chunk_gram_and_sums_equal_the_dense_twin(backend, dtype, n):
    gen = torch.Generator().manual_seed(n)
    for name, weights in weightings(n, gen, dtype):
        gram = sample_gram(n, dtype, gen).requires_grad_()
        values = torch.randn(n, 70, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        weighting = ops.ChunkWeighting.from_dense(weights)
        for ours, theirs, data in ((ops.chunk_gram(gram, weighting, backend), ops.chunk_gram_reference(gram, weights),
                                    gram),
                                   (ops.chunk_sums(values, weighting, backend), ops.chunk_sums_reference(values, weights),
                                    values)):
            assert ours.dtype == dtype
            assert_near(ours, theirs, dtype)
            upstream = torch.randn(theirs.shape, generator=gen, dtype=torch.float64).to(dtype)
            (grad_ours,) = torch.autograd.grad(ours, data, upstream)
            (grad_theirs,) = torch.autograd.grad(theirs, data, upstream)
            assert_near(grad_ours, grad_theirs, dtype)


CUDA_BACKENDS = [backend for backend, usable in (
    ("cpp", torch.cuda.is_available() and availability.cpp_usable(torch.device("cuda"))),
    ("triton", torch.cuda.is_available() and availability.triton_usable(torch.device("cuda")))) if usable]


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a GPU and a CUDA build of the extension or Triton")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_backends_equal_the_dense_twin(dtype):
    gen = torch.Generator().manual_seed(11)
    for backend in CUDA_BACKENDS:
        for _, weights in weightings(45, gen, dtype):
            gram = sample_gram(45, dtype, gen).cuda()
            values = torch.randn(45, 1000, generator=gen, dtype=torch.float64).to(dtype).cuda()
            weighting = ops.ChunkWeighting.from_dense(weights.cuda())
            assert_near(ops.chunk_gram(gram, weighting, backend), ops.chunk_gram_reference(gram, weights.cuda()), dtype)
            assert_near(ops.chunk_sums(values, weighting, backend), ops.chunk_sums_reference(values, weights.cuda()),
                        dtype)


@pytest.mark.skipif("cpp" not in FUSED, reason="needs the extension")
def test_fused_reductions_differentiate_twice():
    """Linear ops whose backward is the same op transposed (any backend: the extension's here, the
    Triton interpreter takes 20 s for it): gradcheck and gradgradcheck."""
    backend = "cpp"
    gen = torch.Generator().manual_seed(3)
    weighting = ops.ChunkWeighting.from_dense(random_weighting(6, 3, gen, torch.float64))
    gram = sample_gram(6, torch.float64, gen).requires_grad_()
    values = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for fn, data in ((lambda g: ops.chunk_gram(g, weighting, backend), gram),
                     (lambda v: ops.chunk_sums(v, weighting, backend), values)):
        assert torch.autograd.gradcheck(fn, (data,))
        assert torch.autograd.gradgradcheck(fn, (data,))


@pytest.mark.parametrize("num_chunks", [2, 3, 5])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_chunk_gram_is_the_gram_of_averaged_per_sample_gradients(num_chunks, overlap):
    n = 11
    gen = torch.Generator().manual_seed(num_chunks)
    per_sample = torch.randn(n, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    bounds = chunk_bounds(n, num_chunks, overlap)
    weighting = ops.ChunkWeighting.from_bounds(bounds, n, torch.float64)
    assert weighting.num_chunks == num_chunks and weighting.num_samples == n
    chunks = torch.stack([per_sample[start:end].mean(0) for start, end in bounds])
    expected = chunks @ chunks.T
    upstream = torch.randn(num_chunks, num_chunks, generator=gen, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), per_sample)
    for backend in ["torch", *FUSED]:
        ours = ops.chunk_gram(per_sample @ per_sample.T, weighting, backend)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), per_sample)
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.chunk_sums(per_sample, weighting, backend), chunks, rtol=1e-12, atol=1e-12)


def test_chunk_gram_from_outer_gram_matches_chunk_gradients_of_a_linear_layer():
    gen = torch.Generator().manual_seed(31)
    a = torch.randn(8, 3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(8, 3, 2, generator=gen, dtype=torch.float64)
    bounds = chunk_bounds(8, 3, 0.5)
    weights = ops.chunk_weights(bounds, 8, torch.float64)
    chunk_grads = torch.stack([torch.einsum("ntp,ntd->pd", b[s:e], a[s:e]).reshape(-1) / (e - s) for s, e in bounds])
    torch.testing.assert_close(ops.chunk_gram(ops.outer_gram(a, b, "ghost"), weights), chunk_grads @ chunk_grads.T,
                               rtol=1e-12, atol=1e-12)


def test_auto_takes_the_extension_on_cpu_and_weights_that_require_grad_take_the_twin():
    if "cpp" in FUSED:
        assert chunk_reduce._backend("auto", torch.zeros(2, 2)) == "cpp"
    assert chunk_reduce._backend("auto", torch.zeros(2, 2, dtype=torch.float16)) == "torch"
    gen = torch.Generator().manual_seed(5)
    weights = random_weighting(6, 3, gen, torch.float64).requires_grad_()
    gram = sample_gram(6, torch.float64, gen)
    (grad,) = torch.autograd.grad(ops.chunk_gram(gram, weights).sum(), weights)
    torch.testing.assert_close(grad, (gram + gram.T) @ weights.detach().sum(1, keepdim=True).expand(6, 3),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cpp" not in FUSED, reason="needs the extension")
def test_auto_keeps_small_chunk_grams_on_the_dense_twin(monkeypatch):
    calls = []
    original = chunk_reduce._ChunkReduce.apply
    monkeypatch.setattr(chunk_reduce._ChunkReduce, "apply", lambda *args: calls.append(args[1]) or original(*args))
    for num, fused in ((64, False), (600, True)):
        gram = torch.randn(num, num)
        weighting = ops.ChunkWeighting.from_bounds(chunk_bounds(num, 4, 0.0), num)
        torch.testing.assert_close(ops.chunk_gram(gram, weighting), ops.chunk_gram_reference(gram, weighting.dense),
                                   rtol=1e-5, atol=1e-4)
        assert (calls[-1:] == ["chunk_sandwich"]) == fused
        ops.chunk_sums(torch.randn(num, 3), weighting)  # the row sums always take the kernel
        assert calls[-1] == "chunk_row_sums"


@pytest.mark.skipif("cpp" not in FUSED, reason="needs the extension")
def test_extension_rejects_malformed_rows():
    from nio_fast import _C
    gram = torch.randn(3, 3)
    weights = torch.ones(2)
    with pytest.raises(ValueError, match="index 3 is outside"):
        _C.chunk_sandwich(gram, torch.tensor([0, 2]), torch.tensor([0, 3]), weights)
    with pytest.raises(ValueError, match="offsets must run from 0"):
        _C.chunk_sandwich(gram, torch.tensor([0, 1]), torch.tensor([0, 1]), weights)
    with pytest.raises(ValueError, match="nondecreasing"):
        _C.chunk_row_sums(gram, torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), weights)
    with pytest.raises(TypeError, match="weights have dtype"):
        _C.chunk_row_sums(gram, torch.tensor([0, 2]), torch.tensor([0, 1]), weights.double())
    with pytest.raises(ValueError, match="matrix must be square"):
        _C.chunk_sandwich(torch.randn(3, 2), torch.tensor([0, 2]), torch.tensor([0, 1]), weights)


def test_chunk_helpers_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"^bounds\[1\]"):
        ops.chunk_weights([(0, 2), (3, 3)], 4)
    with pytest.raises(ValueError, match=r"^bounds\[0\]"):
        ops.chunk_weights([(5, 7)], 4)
    with pytest.raises(ValueError, match=r"^bounds\[0\]"):
        ops.chunk_weights([(-1, 2)], 4)
    torch.testing.assert_close(ops.chunk_weights([(2, 9)], 4), torch.tensor([[0.0], [0.0], [0.5], [0.5]]))
    with pytest.raises(ValueError, match="^bounds: expected at least one"):
        ops.chunk_weights([], 4)
    with pytest.raises(TypeError, match="^dtype"):
        ops.chunk_weights([(0, 2)], 4, torch.long)
    with pytest.raises(ValueError, match="^sample_gram"):
        ops.chunk_gram(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="^weights: has 2 rows"):
        ops.chunk_gram(torch.randn(3, 3), torch.randn(2, 2))
    with pytest.raises(ValueError, match="^weights: expected a 2-d"):
        ops.chunk_gram(torch.randn(3, 3), torch.randn(3))
    with pytest.raises(TypeError, match="^weights: expected a floating-point"):
        ops.chunk_sums(torch.randn(3, 2), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="^values: expected a 2-d"):
        ops.chunk_sums(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="^backend: expected one of"):
        ops.chunk_sums(torch.randn(3, 2), torch.randn(3, 2), backend="cuda")
    with pytest.raises(ValueError, match="^backend='cpp': the chunk kernels take float32 or float64"):
        ops.chunk_sums(torch.randn(3, 2).half(), torch.randn(3, 2).half(), backend="cpp")
