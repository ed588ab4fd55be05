"""Sample-wise and factor-mode results held against the reference of the spec (one autograd call
per chunk): shared by the sample-wise test files (a module, not a test file: benchmarks/ has a
test_samplewise.py of its own)."""
import torch
import torch.nn.functional as F

import nio_fast
from reference import reference_gradcosine, spec_modes


def trainable(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def assert_near(actual, expected, rtol, what, floor=1e-30):
    """Relative to the norm of the expected tensor (per-entry ratios blow up on tiny entries);
    ``floor``: the smallest norm to divide by (a tensor whose true gradient is zero has roundoff)."""
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).norm() / expected.norm().clamp_min(floor)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def reference(model, batch, params, num_chunks=None, overlap=0.0):
    inputs, targets = batch
    with spec_modes(model):
        gc, _, norms, gram = reference_gradcosine(model, inputs, targets, F.cross_entropy, params,
                                                  num_chunks or len(targets), overlap)
        grads = torch.autograd.grad(gc, params, allow_unused=True)
    return gc, torch.stack(norms), torch.stack([torch.stack(row) for row in gram]), grads


def check_against_reference(model, batch, rtol, **kwargs):
    names, params = trainable(model)
    result = nio_fast.gradcosine(model, batch, create_graph=True, **kwargs)
    ours = torch.autograd.grad(result.value, params, allow_unused=True)
    chunks = None if kwargs.get("sub_batches") == "samples" else kwargs["sub_batches"]
    gc, norms, gram, theirs = reference(model, batch, params, chunks, kwargs.get("overlap", 0.0))
    assert_near(result.gram, gram, rtol, "Gram")
    assert_near(result.norms, norms, rtol, "norms")
    assert abs(float(result.value.detach()) - float(gc.detach())) <= rtol * max(1.0, abs(float(gc.detach()))), "GradCosine"
    scale = max(float(ref.norm()) for ref in theirs if ref is not None)
    for name, mine, ref, p in zip(names, ours, theirs, params):
        mine = torch.zeros_like(p) if mine is None else mine
        ref = torch.zeros_like(p) if ref is None else ref
        # e.g. a conv bias before BatchNorm: zero in exact arithmetic, roundoff in both
        assert_near(mine, ref, rtol, f"d GradCosine / d {name}", floor=1e-3 * scale)
    return result
