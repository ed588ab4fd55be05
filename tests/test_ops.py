"""The op layer: nio_fast.ops.gram on every backend through autograd, the cosine terms, per-tensor dots."""
import pytest
import torch

import nio_fast
from nio_fast import availability, ops

CPU = torch.device("cpu")
FUSED = [name for name in ("cpp", "triton")
         if (availability.cpp_usable(CPU) if name == "cpp" else availability.triton_usable(CPU))]


def random_grads(num_grads, shapes, dtype=torch.float64, requires_grad=True):
    return [[torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for shape in shapes]
            for _ in range(num_grads)]


SHAPES = [(3, 5), (7,), (1,), (0, 4), (2, 3, 3), (129,)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_grads", [2, 3, 8])
def test_gram_forward_and_backward_through_autograd_equal_the_reference(backend, num_grads):
    grads = random_grads(num_grads, SHAPES)
    weights = torch.randn(num_grads, num_grads, dtype=torch.float64)
    ours = ops.gram(grads, backend=backend)
    theirs = ops.gram(grads, backend="torch")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    flat = [t for row in grads for t in row]
    ours_grad = torch.autograd.grad((ours * weights).sum(), flat)
    theirs_grad = torch.autograd.grad((theirs * weights).sum(), flat)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_stacked_layout_equals_lists(backend):
    stacked = [torch.randn(4, *shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
    as_lists = [[t[d] for t in stacked] for d in range(4)]
    ours = ops.gram(stacked, backend=backend)
    torch.testing.assert_close(ours, ops.gram(as_lists, backend="torch"), rtol=1e-10, atol=1e-12)
    (grad_stacked,) = torch.autograd.grad(ours[0, 1] + ours[2, 2], stacked[0])
    (grad_lists,) = torch.autograd.grad(ops.gram(as_lists, backend="torch")[0, 1]
                                        + ops.gram(as_lists, backend="torch")[2, 2], stacked[0])
    torch.testing.assert_close(grad_stacked, grad_lists, rtol=1e-10, atol=1e-12)


def test_fp32_gradients_give_an_fp32_gram_and_fp64_an_fp64_one():
    grads32 = random_grads(2, [(5,)], torch.float32, requires_grad=False)
    assert ops.gram(grads32).dtype == torch.float32
    assert ops.gram(random_grads(2, [(5,)], requires_grad=False)).dtype == torch.float64
    bf16 = random_grads(2, [(5,)], torch.bfloat16, requires_grad=False)
    assert ops.gram(bf16, backend="torch").dtype == torch.float32


def test_gram_rejects_bad_layouts():
    with pytest.raises(ValueError, match="^grads: expected at least one gradient"):
        ops.gram([])
    with pytest.raises(ValueError, match=r"^grads\[1\]\[0\]: shape"):
        ops.gram([[torch.randn(3)], [torch.randn(4)]])
    with pytest.raises(ValueError, match="^grads: gradient 0 has 1 tensors but gradient 1 has 2"):
        ops.gram([[torch.randn(3)], [torch.randn(3), torch.randn(2)]])
    with pytest.raises(TypeError, match="floating-point"):
        ops.gram([[torch.ones(3, dtype=torch.long)], [torch.ones(3, dtype=torch.long)]])
    with pytest.raises(ValueError, match="^backend: expected one of"):
        ops.gram([[torch.randn(3)], [torch.randn(3)]], backend="numpy")


def test_gradcosine_from_gram_matches_explicit_cosines():
    vectors = torch.randn(5, 11, dtype=torch.float64)
    terms = ops.gradcosine_from_gram(vectors @ vectors.T)
    cosines = [torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)
               for i in range(5) for j in range(5) if i != j]
    torch.testing.assert_close(terms.value, torch.stack(cosines).mean())
    torch.testing.assert_close(terms.norms, vectors.norm(dim=1))
    with pytest.raises(ValueError, match="^gram: expected a square"):
        ops.gradcosine_from_gram(torch.ones(1, 1))


def test_tensor_dots_equal_the_reference_and_treat_none_as_zero():
    a = [torch.randn(3, 4), None, torch.randn(7, dtype=torch.float64).as_strided((3,), (2,)), torch.randn(0)]
    b = [torch.randn(3, 4), torch.randn(2), torch.randn(3, dtype=torch.float64), torch.randn(0)]
    torch.testing.assert_close(ops.tensor_dots(a, b), ops.tensor_dots_reference(a, b), rtol=1e-6, atol=1e-9)
    assert ops.tensor_dots(a, b)[1] == 0
    with pytest.raises(ValueError, match="^a, b: expected the same number"):
        ops.tensor_dots(a, b[:2])


def test_backends_report_says_what_is_available():
    report = nio_fast.backends()
    assert set(report) == {"triton", "cpp", "torch"}
    assert report["torch"]["available"]
    for entry in report.values():
        assert isinstance(entry["reason"], str) and entry["reason"]


@pytest.mark.parametrize("backend", FUSED)
def test_nio_on_a_fused_backend_equals_the_torch_backend(backend):
    from models import batch_for, make_model
    batches = [batch_for("bn_cnn", 12) for _ in range(2)]
    ours = nio_fast.initialize(make_model("bn_cnn"), batches, iters=3, sub_batches=3, backend=backend,
                               progress=False)
    theirs = nio_fast.initialize(make_model("bn_cnn"), batches, iters=3, sub_batches=3, backend="torch",
                                 progress=False)
    for name, scale in theirs.scales.items():
        assert ours.scales[name] == pytest.approx(scale, rel=1e-9), name


def test_a_missing_extension_falls_back_to_torch_with_one_warning(monkeypatch):
    import warnings
    monkeypatch.setattr(availability, "_load_extension", lambda: (None, "ImportError: simulated"))
    monkeypatch.setattr(availability, "_warned_missing_extension", False)
    grads = random_grads(3, SHAPES, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="nio_fast._C is unavailable .ImportError: simulated.; falling back"):
        assert availability.default_backend(CPU) == "torch"
        result = ops.gram(grads)
    torch.testing.assert_close(result, ops.gram(grads, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not per call
        ops.gram(grads)
    assert not nio_fast.backends()["cpp"]["available"]
    assert "simulated" in nio_fast.backends()["cpp"]["reason"]
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run on cpu: ImportError: simulated"):
        ops.gram(grads, backend="cpp")
