"""Routing a model's normalisation and attention calls to the ops with lean double backwards, for
the span of a ``with`` block (NIO's modes enter it; nothing in the model changes)."""
from __future__ import annotations

import functools
import threading
from typing import Callable, Optional

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention import attention
from .batch_norm import batch_norm
from .group_norm import group_norm
from . import multi_head_attention
from .layer_norm import layer_norm


_entered = threading.local()  # the routing modes this thread is inside, innermost last


def active_routing() -> Optional[TorchFunctionMode]:
    """The innermost routing mode this thread is inside, or None: what code that recomputes a
    forward later (``nio_fast.samplewise.segments``) re-enters to run the same ops."""
    stack = getattr(_entered, "stack", None)
    return stack[-1] if stack else None


class _RoutedCalls(TorchFunctionMode):
    """Every call of a function in ``routes`` inside runs its replacement (same arguments)."""

    def __init__(self, routes: dict[Callable, Callable]):
        super().__init__()
        self.routes = routes

    def __enter__(self):
        if not hasattr(_entered, "stack"):
            _entered.stack = []
        _entered.stack.append(self)
        return super().__enter__()

    def __exit__(self, *exc_info):
        _entered.stack.pop()
        return super().__exit__(*exc_info)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and F.scaled_dot_product_attention in self.routes:
            # PyTorch's function would run with this mode off, its attention unrouted: the equal
            # decomposition runs with the mode re-entered instead (NotImplemented: what it does not cover).
            with self:
                result = multi_head_attention.multi_head_attention_forward(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return self.routes.get(func, func)(*args, **kwargs)


def fused_calls(*, group_norm_calls: bool = True, batch_norm_calls: bool = True, layer_norm_calls: bool = True,
                attention_calls: bool = True, second_order_only: bool = False) -> TorchFunctionMode:
    """A context manager: inside, ``F.group_norm`` (so every ``nn.GroupNorm``) runs
    :func:`~nio_fast.ops.group_norm`, ``F.batch_norm`` (every ``nn.BatchNorm*``)
    :func:`~nio_fast.ops.batch_norm`, ``F.layer_norm`` (every ``nn.LayerNorm``)
    :func:`~nio_fast.ops.layer_norm` and ``F.scaled_dot_product_attention`` (so every
    ``nn.MultiheadAttention`` asked for no attention weights, through the decomposition of
    :mod:`~nio_fast.ops.multi_head_attention`) :func:`~nio_fast.ops.attention`, each where asked.
    Same values; the mode sees every torch call (1.7 us each on torch.add, 2-core CPU), so callers
    ask only for the layers a model has. ``second_order_only``: BatchNorm graphs keep no
    ``grad_out`` (``ops.batch_norm``), for callers that never take a third derivative (NIO's
    iterations)."""
    routes = {}
    if group_norm_calls:
        routes[F.group_norm] = group_norm
    if batch_norm_calls:
        routes[F.batch_norm] = functools.partial(batch_norm, second_order_only=second_order_only)
    if layer_norm_calls:
        routes[F.layer_norm] = layer_norm
    if attention_calls:
        routes[F.scaled_dot_product_attention] = attention
    return _RoutedCalls(routes)
