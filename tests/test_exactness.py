"""gradcosine and initialize against the slow reference of the spec (tests/reference.py)."""
import pytest
import torch
import torch.nn.functional as F

import nio_fast
from models import MODELS, batch_for, make_model
from reference import reference_gradcosine, reference_gradinit, reference_nio, spec_modes

ALL_MODELS = sorted(MODELS)


def trainable(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def assert_close(actual, expected, rtol, what):
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    error = ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max()
    assert error <= rtol, f"{what}: max relative error {error:.3g} > {rtol:g}\nactual   {actual}\nexpected {expected}"


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("num,sub_batches,overlap", [
    (23, 2, 0.0), (23, 3, 0.3), (23, 4, 0.0), (23, 5, 0.5),  # odd N: the last chunk takes the remainder
    (24, 4, 0.0), (12, 12, 0.0),  # equal chunks (the vmapped path), down to one sample per chunk
])
def test_gradcosine_matches_reference_values_and_scale_gradients(name, num, sub_batches, overlap):
    model = make_model(name)
    inputs, targets = batch_for(name, num)
    names, params = trainable(model)

    result = nio_fast.gradcosine(model, (inputs, targets), sub_batches=sub_batches, overlap=overlap,
                                 create_graph=True)
    ours = torch.autograd.grad(result.value, params, allow_unused=True)
    with spec_modes(model):
        gc, gnorm, norms, gram = reference_gradcosine(model, inputs, targets, F.cross_entropy, params,
                                                      sub_batches, overlap)
        theirs = torch.autograd.grad(gc, params, allow_unused=True)

    # without coupling: vmap over equal chunks, else factors in place of the loop (or the loop)
    assert result.mode in (("exact",) if name == "bn_cnn" else ("per_chunk", "factors"))
    assert_close(result.value, gc.detach(), 1e-10, "GradCosine")
    assert_close(result.norms.detach(), torch.stack(norms).detach(), 1e-10, "norms")
    assert_close(result.gram.detach(), torch.tensor([[float(x.detach()) for x in row] for row in gram], dtype=torch.float64), 1e-10, "Gram")
    for n, a, b in zip(names, ours, theirs):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, n
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=f"d GradCosine / d {n}")


@pytest.mark.parametrize("name", ["mlp", "gn_resnet", "transformer", "recurrent"])
def test_per_chunk_and_exact_agree_without_batch_coupling(name):
    model = make_model(name)
    batch = batch_for(name, 16)
    exact = nio_fast.gradcosine(model, batch, sub_batches=4, mode="exact")
    per_chunk = nio_fast.gradcosine(model, batch, sub_batches=4, mode="per_chunk")
    torch.testing.assert_close(exact.gram, per_chunk.gram, rtol=1e-10, atol=1e-14)


def test_per_chunk_on_batchnorm_is_a_different_quantity_available_by_name():
    model = make_model("bn_cnn")
    batch = batch_for("bn_cnn", 16)
    auto = nio_fast.gradcosine(model, batch, sub_batches=4)
    ghost = nio_fast.gradcosine(model, batch, sub_batches=4, mode="per_chunk")
    assert auto.mode == "exact" and ghost.mode == "per_chunk"
    assert not torch.allclose(auto.gram, ghost.gram)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_nio_scales_match_reference(name):
    batches = [batch_for(name, 16) for _ in range(3)]
    model, twin = make_model(name), make_model(name)
    names, params = trainable(twin)
    expected, history = reference_nio(twin, batches, F.cross_entropy, names, params, iters=6, sub_batches=4,
                                      overlap=0.25)
    report = nio_fast.initialize(model, batches, iters=6, sub_batches=4, overlap=0.25, progress=False)
    assert_close([report.scales[n] for n in names], expected, 1e-6, "scales")
    assert_close([h["gradcosine"] for h in report.history], [h["gradcosine"] for h in history], 1e-8, "history")
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12, msg=n)


@pytest.mark.parametrize("objective", ["gc", "gc_gn", "gc_gn_sqrt"])
@pytest.mark.parametrize("name", ["mlp", "bn_cnn"])
def test_nio_objectives_and_constraint_steps_match_reference(objective, name):
    batches = [batch_for(name, 12) for _ in range(2)]
    probe = make_model(name)
    start = float(nio_fast.gradcosine(probe, batches[0], sub_batches=3).gnorm)
    # gamma just above the first norm: objective steps push the norm up, constraint steps pull it back
    gamma = 1.02 * start
    model, twin = make_model(name), make_model(name)
    names, params = trainable(twin)
    settings = dict(iters=8, sub_batches=3, gamma=gamma, lr=0.03, objective=objective, mu=0.5)
    expected, history = reference_nio(twin, batches, F.cross_entropy, names, params, **settings)
    report = nio_fast.initialize(model, batches, progress=False, **settings)
    assert [h["constraint"] for h in report.history] == [h["constraint"] for h in history]
    if objective != "gc":
        assert any(h["constraint"] for h in history), "the test should exercise constraint steps"
    assert_close([report.scales[n] for n in names], expected, 1e-6, "scales")


def test_nio_fp32_matches_reference_within_1e4():
    batches = [batch_for("gn_resnet", 16, dtype=torch.float32) for _ in range(2)]
    model, twin = make_model("gn_resnet", torch.float32), make_model("gn_resnet", torch.float32)
    names, params = trainable(twin)
    expected, _ = reference_nio(twin, batches, F.cross_entropy, names, params, iters=5, sub_batches=2)
    report = nio_fast.initialize(model, batches, iters=5, progress=False)
    assert_close([report.scales[n] for n in names], expected, 1e-4, "scales")


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "odd"])
def test_gradinit_matches_reference(inner, name):
    batches = [batch_for(name, 8) for _ in range(5)]
    model, twin = make_model(name), make_model(name)
    names, params = trainable(twin)
    probe_loss = F.cross_entropy(make_model(name)(torch.cat([batches[0][0], batches[1][0]])),
                                 torch.cat([batches[0][1], batches[1][1]]))
    assert probe_loss.isfinite()
    settings = dict(iters=6, lr=0.02, inner=inner, eta=0.05)
    expected, history = reference_gradinit(twin, batches, F.cross_entropy, names, params, **settings)
    report = nio_fast.initialize(model, batches, method="gradinit", progress=False, **settings)
    assert_close([report.scales[n] for n in names], expected, 1e-6, "scales")
    assert_close([h["objective"] for h in report.history], [h["objective"] for h in history], 1e-8, "objective")
