"""Routing a model's normalisation calls to the ops with fused double backwards, for the span of
a ``with`` block (NIO's modes enter it; nothing in the model changes)."""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .batch_norm import batch_norm
from .group_norm import group_norm
from .layer_norm import layer_norm


class _RoutedCalls(TorchFunctionMode):
    """Every call of a function in ``routes`` inside runs its replacement (same arguments)."""

    def __init__(self, routes: dict[Callable, Callable]):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.routes.get(func, func)(*args, **(kwargs or {}))


def fused_norms(*, group_norm_calls: bool = True, batch_norm_calls: bool = True, layer_norm_calls: bool = True,
                second_order_only: bool = False) -> TorchFunctionMode:
    """A context manager: inside, ``F.group_norm`` (so every ``nn.GroupNorm``) runs
    :func:`~nio_fast.ops.group_norm`, ``F.batch_norm`` (every ``nn.BatchNorm*``)
    :func:`~nio_fast.ops.batch_norm` and ``F.layer_norm`` (every ``nn.LayerNorm``)
    :func:`~nio_fast.ops.layer_norm`, each where asked. Same values; the mode sees every torch call
    (1.7 us each on torch.add, 2-core CPU), so callers ask only for the layers a model has.
    ``second_order_only``: BatchNorm graphs keep no ``grad_out`` (``ops.batch_norm``), for
    callers that never take a third derivative (NIO's iterations)."""
    routes = {}
    if group_norm_calls:
        routes[F.group_norm] = group_norm
    if batch_norm_calls:
        routes[F.batch_norm] = functools.partial(batch_norm, second_order_only=second_order_only)
    if layer_norm_calls:
        routes[F.layer_norm] = layer_norm
    return _RoutedCalls(routes)
