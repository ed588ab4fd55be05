"""The model's modes during NIO, and putting everything back afterwards.

NIO.md step 1: dropout off (eval mode), but every BatchNorm computes batch statistics
without reading or updating its running buffers. ``track_running_stats=False`` alone is not
enough for a layer in eval mode that has buffers, so each BatchNorm is put in training
behaviour with ``track_running_stats=False``; ``F.batch_norm`` then gets no buffers at all.
Attention runs under the math SDPA backend, the only one with a double backward. In a model
with ``nn.GroupNorm`` layers, ``F.group_norm`` runs ``ops.group_norm``, whose double backward
is a fused kernel instead of autograd over PyTorch's composite backward (the same values;
about 1.27x faster NIO iterations on a GroupNorm ResNet-20); with BatchNorm or LayerNorm
layers, ``F.batch_norm`` / ``F.layer_norm`` run ``ops.batch_norm`` / ``ops.layer_norm``
likewise. A SyncBatchNorm computes the statistics of its own rank's samples, like a
BatchNorm: its synchronised forward has no double backward (and runs only on GPUs).
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.fused_calls import fused_calls


_MISSING = object()


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [module for module in model.modules() if isinstance(module, _BatchNorm)]


def couples_samples(model: nn.Module) -> bool:
    """Whether a layer mixes samples under NIO's modes (BatchNorm computes batch statistics)."""
    return bool(batch_norm_layers(model))


@contextlib.contextmanager
def nio_modes(model: nn.Module, second_order_only: bool = False) -> Iterator[None]:
    """Eval mode, BatchNorm on batch statistics, attention and normalisation layers with lean double
    backwards (PyTorch's math attention for calls they do not take); every flag restored on exit.
    ``second_order_only``: nothing inside takes a third derivative, so BatchNorm graphs may keep
    less (``ops.batch_norm``)."""
    training = [(module, module.training) for module in model.modules()]
    tracking = [(layer, layer.track_running_stats) for layer in batch_norm_layers(model)]
    synced = [(layer, layer.__dict__.get("forward", _MISSING)) for layer, _ in tracking
              if isinstance(layer, nn.SyncBatchNorm)]
    try:
        model.eval()
        for layer, _ in tracking:
            layer.training = True
            layer.track_running_stats = False
        for layer, _ in synced:  # per-rank statistics: the synchronised forward has no double backward
            layer.forward = types.MethodType(_BatchNorm.forward, layer)
        # Only where such layers are: the mode sees every torch call (1.7 us each on torch.add).
        # Attention is routed wherever the mode runs anyway (a model calling F.scaled_dot_product_attention
        # itself has LayerNorms), or the model has nn.MultiheadAttention; the rest takes the math path.
        has_group_norm = any(isinstance(m, nn.GroupNorm) for m in model.modules())
        has_layer_norm = any(isinstance(m, nn.LayerNorm) for m in model.modules())
        has_attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        routed = has_group_norm or bool(tracking) or has_layer_norm or has_attention
        calls = fused_calls(group_norm_calls=has_group_norm, batch_norm_calls=bool(tracking),
                            layer_norm_calls=has_layer_norm, attention_calls=True,
                            second_order_only=second_order_only) if routed else contextlib.nullcontext()
        with sdpa_kernel(SDPBackend.MATH), calls:
            yield
    finally:
        for module, was_training in training:
            module.training = was_training
        for layer, was_tracking in tracking:
            layer.track_running_stats = was_tracking
        for layer, forward in synced:
            if forward is _MISSING:
                del layer.forward
            else:
                layer.forward = forward


class ParameterSnapshot:
    """The values of the parameters and buffers a run may touch, to restore on failure.

    The parameter copies double as theta_0, the initial values every scale multiplies.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        with torch.no_grad():
            self.params = list(params)
            self.initial = [p.detach().clone() for p in self.params]
            self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for param, saved in zip(self.params, self.initial):
            param.copy_(saved)
        self.restore_buffers()

    @torch.no_grad()
    def restore_buffers(self) -> None:
        for buffer, saved in self.buffers:
            buffer.copy_(saved)
