"""Which op used which parameter, with what input: recorded during one forward.

A ``TorchFunctionMode`` sees every torch call of the forward, functional ones included, so
tied weights (one tensor, several calls) and models that call ``F.linear`` themselves are
recorded like ``nn.Linear`` is. A call that uses a selected parameter is recorded as a
:class:`LayerUse` when its per-sample gradient has a known factor form (linear, conv1d/2d,
embedding, layer_norm, group_norm, and broadcasting add/sub/mul/expand, which is how position
embeddings, class tokens and layer scales enter a model). Any other use of a parameter, or a
known op whose sample axis cannot be told apart, marks that parameter *unfactored*: the engine
then takes its per-sample gradients by autograd instead, which is exact for any op.

``F.multi_head_attention_forward`` projects with a 2-D ``[T*N, E]`` view that mixes the
sequence and sample axes; it is replaced by an equal decomposition whose projections run on
``[T, N, E]`` (sample axis 1), see :mod:`nio_fast.ops.multi_head_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from ..ops import multi_head_attention as attention

LINEAR, CONV, EMBEDDING, LAYER_NORM, GROUP_NORM, BROADCAST = (
    "linear", "conv", "embedding", "layer_norm", "group_norm", "broadcast")


@dataclass
class LayerUse:
    """One call of a known op that used selected parameters."""

    kind: str
    roles: dict[str, int]
    """Role ("weight", "bias", "operand") -> index of the parameter in the selection."""
    inputs: Optional[torch.Tensor]
    """The op's data input (layer input, embedding ids, or the other operand of a broadcast op)."""
    output_edge: GradientEdge
    """Where dL/d(output) of this op arrives: the engine asks autograd for it by this edge (the
    output itself is not kept alive), and a hook registered at the call passes it on. Both
    belong to the op's own output even where the model then modifies it in place (a
    ReLU(inplace=True) after a GroupNorm): a hook or a tensor taken later would see the gradient
    of the modified value."""
    sample_axis: int
    """Axis of ``inputs`` and ``output`` that indexes samples (0, or 1 inside attention)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Op settings the factor rule needs (stride, padding_idx, eps, the broadcast op, ...)."""


# The argument lists of the functional ops with a rule, as PyTorch names them: each returns its
# arguments as a dict, defaults filled in, however the call passed them (``input`` shadows the
# builtin, as in torch.nn.functional).
def linear_args(input, weight, bias=None) -> dict[str, Any]:
    return dict(locals())


def conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> dict[str, Any]:
    return dict(locals())


def _embedding_args(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                    scale_grad_by_freq=False, sparse=False) -> dict[str, Any]:
    return dict(locals())


def _layer_norm_args(input, normalized_shape, weight=None, bias=None, eps=1e-05) -> dict[str, Any]:
    return dict(locals())


def _group_norm_args(input, num_groups, weight=None, bias=None, eps=1e-05) -> dict[str, Any]:
    return dict(locals())


def indices_in(index_of: dict[int, int], args: Sequence[Any], kwargs: Optional[dict[str, Any]]) -> list[int]:
    """``index_of[id(t)]`` for every object ``t`` of ``index_of`` in a call's ``args`` and
    ``kwargs``, at any depth of lists, tuples and dicts, in order. Every torch call inside a
    mode pays this: ``torch.utils._pytree.tree_flatten`` took 30% of a recorded forward of the
    small ViT (cProfile), a plain walk a fraction of it."""
    found: list[int] = []
    _collect(index_of, args, found)
    if kwargs:
        _collect(index_of, kwargs.values(), found)
    return found


def _collect(index_of: dict[int, int], values: Iterable[Any], found: list[int]) -> None:
    for value in values:
        if isinstance(value, (list, tuple)):
            _collect(index_of, value, found)
        elif isinstance(value, dict):
            _collect(index_of, value.values(), found)
        else:
            index = index_of.get(id(value))
            if index is not None:
                found.append(index)


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_RSUB = {torch.Tensor.__rsub__}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_EXPAND = {torch.Tensor.expand, torch.Tensor.expand_as}


class FactorRecorder(TorchFunctionMode):
    """Records, during a forward, how each of ``params`` is used; see the module docstring."""

    def __init__(self, params: Sequence[torch.Tensor], num_samples: int):
        super().__init__()
        self.position = {id(p): k for k, p in enumerate(params)}
        self.num_samples = num_samples
        self.uses: list[LayerUse] = []
        self.unfactored: dict[int, str] = {}
        """Parameter index -> why its per-sample gradient needs autograd (the first reason seen)."""
        self.on_output_grad: Optional[Callable[[LayerUse, torch.Tensor], None]] = None
        """Called with (use, dL/d(output)) as a backward reaches each recorded output."""
        self._sample_axis = 0
        self._hooks: list[Any] = []

    def remove_hooks(self) -> None:
        """Detach the output hooks (before any other backward runs through the recorded graph)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _output_grad(self, use: LayerUse, grad: torch.Tensor) -> None:
        if self.on_output_grad is not None:
            self.on_output_grad(use, grad)

    # -- bookkeeping ------------------------------------------------------------------------
    def _selected(self, obj: Any) -> Optional[int]:
        return self.position.get(id(obj)) if isinstance(obj, torch.Tensor) else None

    def _mark_unfactored(self, indices: Sequence[int], reason: str) -> None:
        for index in indices:
            self.unfactored.setdefault(index, reason)

    def _has_sample_axis(self, tensor: Any) -> bool:
        axis = self._sample_axis
        return isinstance(tensor, torch.Tensor) and tensor.dim() > axis and tensor.shape[axis] == self.num_samples

    # -- the mode ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # no gradient flows from here (a recomputed segment's first run)
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        touched = indices_in(self.position, args, kwargs)
        if not touched:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out  # shape queries, detach(), no_grad code: no gradient flows through here
        try:
            use = self._recognise(func, args, kwargs, out)
        except Exception as error:  # an argument form no rule expected: the exact autograd route takes it
            use = f"{_name(func)} called in a form the factor rules do not parse ({type(error).__name__}: {error})"
        if isinstance(use, LayerUse):
            self.uses.append(use)
            self._hooks.append(out.register_hook(functools.partial(self._output_grad, use)))
            stray = set(touched) - set(use.roles.values())
            self._mark_unfactored(sorted(stray), f"passed to {_name(func)} as data")
        else:
            self._mark_unfactored(touched, use)
        return out

    def _attention(self, func, args, kwargs):
        """Attention through the decomposition whose projections keep the sample axis."""
        previous = self._sample_axis
        self._sample_axis = attention.sample_axis
        try:
            with self:  # re-enter: the decomposition's F.linear calls are recorded like any other
                result = attention.multi_head_attention_forward(*args, **kwargs)
        finally:
            self._sample_axis = previous
        if result is NotImplemented:
            touched = indices_in(self.position, args, kwargs)
            self._mark_unfactored(touched, "an attention configuration the decomposition does not cover")
            return func(*args, **kwargs)
        return result

    def _recognise(self, func, args, kwargs, out) -> "LayerUse | str":
        """The use, or the reason it cannot be factored."""
        if func is F.linear:
            return self._weighted(LINEAR, linear_args(*args, **kwargs), out, batched_rank=2)
        if func in _CONV_FUNCS:
            bound, dims = conv_args(*args, **kwargs), _CONV_FUNCS[func]
            config = {key: bound[key] for key in ("stride", "padding", "dilation", "groups")}
            return self._weighted(CONV, bound, out, batched_rank=dims + 2, exact_rank=True,
                                  config={**config, "spatial_dims": dims})
        if func is F.embedding:
            bound = _embedding_args(*args, **kwargs)
            if bound["max_norm"] is not None or bound["scale_grad_by_freq"]:
                return "embedding with max_norm or scale_grad_by_freq"
            return self._weighted(EMBEDDING, bound, out, batched_rank=1,
                                  config={"padding_idx": bound["padding_idx"],
                                          "num_embeddings": bound["weight"].shape[0]})
        if func is F.layer_norm:
            bound = _layer_norm_args(*args, **kwargs)
            shape = tuple(bound["normalized_shape"])
            return self._weighted(LAYER_NORM, bound, out, batched_rank=len(shape) + 1,
                                  config={"normalized_shape": shape, "eps": bound["eps"]})
        if func is F.group_norm:
            bound = _group_norm_args(*args, **kwargs)
            return self._weighted(GROUP_NORM, bound, out, batched_rank=2,
                                  config={"num_groups": bound["num_groups"], "eps": bound["eps"]})
        if func in _ADD or func in _SUB or func in _RSUB or func in _MUL or func in _EXPAND:
            return self._broadcast(func, args, kwargs, out)
        return f"used by {_name(func)}, which has no factor rule"

    def _weighted(self, kind: str, bound: dict[str, Any], out: torch.Tensor, *, batched_rank: int,
                  exact_rank: bool = False, config: Optional[dict[str, Any]] = None) -> "LayerUse | str":
        """A layer op: data in ``input``, parameters in ``weight`` / ``bias``. ``batched_rank``: the
        fewest dimensions (or, ``exact_rank``, the only count) of a batched input; an unbatched
        input (a 1-D vector whose length happens to be N, say) has no sample axis."""
        data = bound["input"]
        if self._selected(data) is not None:
            return f"a parameter is the data input of {kind}"
        rank = data.dim() if isinstance(data, torch.Tensor) else 0
        if rank < batched_rank or (exact_rank and rank != batched_rank):
            return f"{kind} on an unbatched input (shape {tuple(getattr(data, 'shape', ()))})"
        if not self._has_sample_axis(data) or not self._has_sample_axis(out):
            return f"{kind} input without the sample axis (shape {tuple(getattr(data, 'shape', ()))})"
        roles = {}
        for role in ("weight", "bias"):
            tensor = bound.get(role)
            index = self._selected(tensor)
            if index is not None:
                roles[role] = index
        return LayerUse(kind, roles, data, get_gradient_edge(out), self._sample_axis, dict(config or {}))

    def _broadcast(self, func, args, kwargs, out) -> "LayerUse | str":
        """``x + p``, ``x - p``, ``p - x``, ``x * p``, ``p.expand(N, ...)``: p broadcast over samples."""
        if kwargs.get("alpha", 1) != 1 or "out" in kwargs:
            return f"{_name(func)} with alpha or out="
        if func in _EXPAND:
            param, other, op = args[0], None, "expand"
        else:
            if len(args) != 2:
                return f"{_name(func)} with {len(args)} operands"
            first, second = args
            param, other = (first, second) if self._selected(first) is not None else (second, first)
            if self._selected(other) is not None:
                return f"{_name(func)} of two parameters"
            if func in _MUL:
                op = "mul"
            elif func in _ADD:
                op = "add"
            else:  # x - p is -1 * p on the p side; p - x is +1
                op = "add" if (func in _RSUB) != (param is first) else "neg"
        if self._sample_axis != 0 or not self._has_sample_axis(out) or out.dim() == 0:
            return f"{_name(func)} whose output has no leading sample axis"
        aligned = out.dim() - param.dim()
        if aligned < 0 or (aligned == 0 and param.shape[0] != 1):
            return f"{_name(func)} where the parameter itself spans the sample axis"
        if isinstance(other, torch.Tensor) and other.dim() >= out.dim() and other.shape[0] not in (1, self.num_samples):
            return f"{_name(func)} with an operand whose leading axis is not the sample axis"
        tensor_operand = isinstance(other, torch.Tensor)
        return LayerUse(BROADCAST, {"operand": self._selected(param)}, other if tensor_operand else None,
                        get_gradient_edge(out), 0, {"op": op, "scalar": None if tensor_operand else other})


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
