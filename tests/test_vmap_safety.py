"""vmap over chunks is used only where its second derivatives are right.

PyTorch 2.13 computes the double backward of layer_norm and instance_norm under vmap(grad)
wrongly (GradCosine itself agrees; its gradient is off by 1e-2 to O(1) relative). These tests
pin that down per layer kind: the per-chunk path must equal the exact whole-batch path in value
AND scale gradient, whichever way (vmap or loop) it went.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast.algorithms import gradcosine as engine


class ImageNet(nn.Module):
    def __init__(self, middle, channels=4):
        super().__init__()
        self.conv, self.middle, self.head = nn.Conv2d(3, channels, 3), middle, nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.middle(self.conv(x)).mean((2, 3)))


class SequenceNet(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.proj, self.middle, self.head = nn.Linear(16, 16), middle, nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.middle(self.proj(x)).mean(1))


class FunctionalLayerNorm(nn.Module):
    """layer_norm called as a function, not through nn.LayerNorm: must still be caught."""

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:])


class LastLSTMOutputs(nn.Module):
    """An LSTM: ops vmap has no batching rule for, which it runs one chunk at a time."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 16, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class WarningLinear(nn.Linear):
    def forward(self, x):
        warnings.warn("a warning of the user's model", UserWarning)
        return super().forward(x)


CASES = {
    "group_norm": (lambda: ImageNet(nn.GroupNorm(2, 4)), True),
    "dilated_grouped_conv": (lambda: ImageNet(nn.Conv2d(4, 4, 3, dilation=2, groups=2)), True),
    "max_pool_silu": (lambda: ImageNet(nn.Sequential(nn.MaxPool2d(2), nn.SiLU())), True),
    "instance_norm": (lambda: ImageNet(nn.InstanceNorm2d(4, affine=True)), False),
    "layer_norm": (lambda: SequenceNet(nn.LayerNorm(16)), False),
    "functional_layer_norm": (lambda: SequenceNet(FunctionalLayerNorm()), False),
    "transformer_layer": (lambda: SequenceNet(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                                         batch_first=True)), False),
    "gelu_softmax": (lambda: SequenceNet(nn.Sequential(nn.GELU(), nn.Softmax(-1))), True),
    "lstm": (lambda: SequenceNet(LastLSTMOutputs()), False),  # float64: vmap raises (float32 below)
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_chunk_path_equals_exact_in_value_and_scale_gradient(case):
    build, vmappable = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    inputs = torch.randn(8, 3, 9, 9) if isinstance(model, ImageNet) else torch.randn(8, 6, 16)
    batch = (inputs.double(), torch.randint(0, 5, (8,)))
    params = list(model.parameters())
    fast = nio_fast.gradcosine(model, batch, sub_batches=4, create_graph=True, mode="per_chunk")  # vmap tried
    exact = nio_fast.gradcosine(model, batch, sub_batches=4, create_graph=True, mode="exact")
    assert (engine._VMAP_VERDICT.get(model) is True) == vmappable, engine._VMAP_VERDICT.get(model)
    torch.testing.assert_close(fast.value, exact.value, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast.value, params), torch.autograd.grad(exact.value, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_chunks_of_sixteen_samples_or_more_loop_on_the_cpu_instead_of_vmap():
    torch.manual_seed(0)
    model = ImageNet(nn.GroupNorm(2, 4)).double()
    batch = (torch.randn(32, 3, 9, 9, dtype=torch.float64), torch.randint(0, 5, (32,)))
    params = list(model.parameters())
    looped = nio_fast.gradcosine(model, batch, sub_batches=2, create_graph=True)
    assert engine._VMAP_VERDICT.get(model) is None  # vmap was never tried: 16 samples per chunk
    exact = nio_fast.gradcosine(model, batch, sub_batches=2, create_graph=True, mode="exact")
    torch.testing.assert_close(looped.value, exact.value, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(looped.value, params), torch.autograd.grad(exact.value, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    nio_fast.gradcosine(model, batch, sub_batches=4, mode="per_chunk")  # 8 samples per chunk: vmap
    assert engine._VMAP_VERDICT.get(model) is True


def test_an_lstm_vmapped_in_float32_is_exact_and_its_fallback_warnings_are_silenced():
    """float32: vmap runs the LSTM's cells one chunk at a time (its own warning, silenced; the
    model's own warnings pass), and the result equals the exact path."""
    torch.manual_seed(0)
    model = SequenceNet(nn.Sequential(LastLSTMOutputs(), WarningLinear(16, 16)))
    batch = (torch.randn(8, 6, 16), torch.randint(0, 5, (8,)))
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = nio_fast.gradcosine(model, batch, sub_batches=4, create_graph=True, mode="per_chunk")
        fast_grads = torch.autograd.grad(fast.value, params)
    assert engine._VMAP_VERDICT.get(model) is True
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if engine._VMAP_FALLBACK_WARNING in m], messages
    assert "a warning of the user's model" in messages
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="a warning of the user's model")
        exact = nio_fast.gradcosine(model, batch, sub_batches=4, create_graph=True, mode="exact")
        exact_grads = torch.autograd.grad(exact.value, params)
    torch.testing.assert_close(fast.value, exact.value, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, exact_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
