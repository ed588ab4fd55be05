"""Scale gradients of linear and convolution weights from probes, in NIO's iteration.

NIO's double backward needs <dJ/dtheta_p, theta0_p> per tensor, not dJ/dtheta_p; for a weight
every use of which is a linear layer or a convolution, ``nio_fast.ops.probed_layers`` gives
<dJ/dtheta_p, theta_p> without the weight-sized products (one matmul or weight-gradient
convolution per use in the forward and one in the chunk backward). :class:`ScaleProbes` is the
mode that routes those uses during an evaluation's forwards and notes every other use of a
weight (any torch call it is passed to, metadata queries aside): such a weight, or one used
where the mode cannot route it (under torch.func transforms, or without a graph), gets its full
gradient as before. The weights of recomputed segments (``nio_fast.samplewise.segments``), whose
recomputations run outside this mode, are handed over to them: each segment routes its own
weights with a mode of its own in every pass and hands the probes' gradients back.
A probe exists only for tensors whose scale stays positive (not a bias, ``min_scale`` > 0), so
s_p = <dJ/dtheta_p, theta_p> / alpha_p is defined.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops import multi_head_attention
from ..ops.probed_layers import ConvConfig, probed_conv, probed_linear
from ..samplewise.recorder import conv_args, indices_in, linear_args

_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
PROBED_DTYPES = (torch.float32, torch.float64)

# Calls that read a tensor's metadata: a weight passed to them is not used.
_METADATA_PROPERTIES = frozenset({"dtype", "device", "shape", "requires_grad", "is_leaf", "ndim", "layout",
                                  "is_cuda", "is_cpu", "is_nested", "is_sparse", "is_meta", "is_quantized",
                                  "is_mkldnn", "grad_fn", "names", "is_mps", "is_xpu"})
_METADATA_METHODS = frozenset({torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement,
                               torch.Tensor.stride, torch.Tensor.is_contiguous, torch.Tensor.element_size,
                               torch.Tensor.is_floating_point, torch.Tensor.get_device, torch.Tensor.data_ptr,
                               torch.Tensor.__len__})


# Differentiation itself: the chunk backwards name the weights as what to differentiate by.
_DIFFERENTIATION = frozenset({torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward})


def _not_a_use(func) -> bool:
    """A call that reads a weight's metadata or differentiates by it, without using its values."""
    if func in _METADATA_METHODS or func in _DIFFERENTIATION:
        return True
    owner = getattr(func, "__self__", None)  # a property getter: Tensor.<name>.__get__
    return getattr(func, "__name__", None) == "__get__" and getattr(owner, "__name__", None) in _METADATA_PROPERTIES


def _autocasting() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _per_dim(value: Any, dims: int) -> Optional[list[int]]:
    if isinstance(value, int):
        return [value] * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(isinstance(v, int) for v in value):
        return list(value)
    return None  # "same" / "valid" padding: left to the plain convolution


class ScaleProbes(TorchFunctionMode):
    """One evaluation's probes (see the module docstring); enter it around the forwards and chunk
    backwards, then differentiate J with respect to :meth:`targets` and read :meth:`split`."""

    def __init__(self, params: Sequence[torch.Tensor], candidates: Sequence[bool]):
        super().__init__()
        self.params = list(params)
        self.index = {id(p): k for k, (p, wanted) in enumerate(zip(params, candidates)) if wanted}
        self.probes = {k: torch.zeros((), dtype=self.params[k].dtype, device=self.params[k].device,
                                      requires_grad=True) for k in self.index.values()}
        self.routed: set[int] = set()
        self.unprobed: set[int] = set()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            # The decomposition that issues one F.linear per projection, with this mode re-entered.
            with self:
                result = multi_head_attention.multi_head_attention_forward(*args, **kwargs)
            if result is not NotImplemented:
                return result
        touched = indices_in(self.index, args, kwargs)
        if not touched or _not_a_use(func):
            return func(*args, **kwargs)
        # Not routed: under torch.func transforms, without a graph (a recomputed segment's first
        # run, whose recomputation later runs outside this mode) and under autocast (whose casts
        # the probed layers' backwards would not repeat).
        routed = (self._route(func, args, kwargs)
                  if torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
                  and not _autocasting() else None)
        if routed is not None:
            weight_index, output = routed
            self.routed.add(weight_index)
            touched.remove(weight_index)
            self.unprobed.update(touched)  # (a bias that has a probe of its own: taken whole)
            return output
        self.unprobed.update(touched)
        return func(*args, **kwargs)

    def _route(self, func, args, kwargs) -> Optional[tuple[int, torch.Tensor]]:
        if func is F.linear:
            bound = linear_args(*args, **kwargs)
            x, weight = bound["input"], bound["weight"]
            index = self.index.get(id(weight))
            if index is None or not isinstance(x, torch.Tensor):
                return None
            return index, probed_linear(x, weight.view_as(weight), bound["bias"], self._probe(index))
        dims = _CONV_DIMS.get(func)
        if dims is None:
            return None
        bound = conv_args(*args, **kwargs)
        x, weight = bound["input"], bound["weight"]
        index = self.index.get(id(weight))
        numeric = [_per_dim(bound[key], dims) for key in ("stride", "padding", "dilation")]
        if index is None or any(value is None for value in numeric) or not isinstance(x, torch.Tensor) \
                or x.dim() != dims + 2:
            return None
        config = ConvConfig(dims, *numeric, bound["groups"])
        return index, probed_conv(x, weight.view_as(weight), bound["bias"], self._probe(index), config)

    def _probe(self, index: int) -> torch.Tensor:
        probe = self.probes[index]
        return probe.view_as(probe)

    def hand_over(self, indices: Iterable[int]) -> dict[int, torch.Tensor]:
        """The probes of those ``indices`` that have one, for a recomputed segment owning those
        tensors (``nio_fast.samplewise.segments``): their uses with a graph run where this mode
        is not entered, so the segment routes them with a mode of its own (:meth:`for_tensors`),
        hands the probes' gradients to these, and reports with :meth:`settle`. From now on this
        mode ignores those tensors."""
        handed = {k: self.probes[k] for k in indices if k in self.probes}
        for k in handed:
            del self.index[id(self.params[k])]
        return handed

    def settle(self, routed: Iterable[int], unrouted: Iterable[int]) -> None:
        """A segment's verdict on the tensors handed over: every use routed, or not."""
        self.routed.update(routed)
        self.unprobed.update(unrouted)

    @contextlib.contextmanager
    def pausing(self) -> Iterator[None]:
        """Inside, calls pass through unseen: for forwards whose outputs no gradient is taken of
        (the factor mode's no-grad check that a chunk's loss is its samples' mean), which would
        otherwise count as uses the mode cannot route and cost the probes of that iteration."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def forget(self) -> None:
        """Drop what the calls so far routed: an abandoned attempt (``"auto"`` trying the factor
        engine) says nothing of the graph the evaluation then builds another way."""
        self.routed.clear()
        self.unprobed.clear()

    def for_tensors(self, tensors: Sequence[torch.Tensor], candidates: Sequence[bool]) -> "ScaleProbes":
        """A mode of the same kind over ``tensors`` (indices are positions in it), with probes of
        its own."""
        return type(self)(tensors, candidates)

    def probed(self) -> set[int]:
        """Tensors whose every use with a graph went through a probed layer."""
        return self.routed - self.unprobed

    def targets(self) -> list[torch.Tensor]:
        """What to differentiate J by: the probe of a probed tensor, else the tensor itself."""
        probed = self.probed()
        return [self.probes[k] if k in probed else p for k, p in enumerate(self.params)]

    def split(self, grads: Sequence[Optional[torch.Tensor]], dtype: torch.dtype
              ) -> tuple[list[Optional[torch.Tensor]], Optional[torch.Tensor]]:
        """(dJ/dtheta_p, None for probed tensors; [P] <dJ/dtheta_p, theta_p>, 0 elsewhere, or
        None when no tensor was probed) from the gradients of :meth:`targets`."""
        probed = self.probed()
        if not probed:
            return list(grads), None
        zero = torch.zeros((), dtype=dtype, device=self.params[0].device)
        projected = torch.stack([grads[k].to(dtype) if k in probed and grads[k] is not None else zero
                                 for k in range(len(self.params))])
        return [None if k in probed else g for k, g in enumerate(grads)], projected
