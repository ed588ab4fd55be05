"""Recomputed segments: the sample-wise Gram with only segment boundaries kept for its gradient.

Differentiating the Gram keeps the forward's activations, the backward's output gradients and
the layer factors alive until the double backward reaches them: 2.3x a training step's
allocator peak on a GroupNorm ResNet-18 and on a small ViT (benchmarks/results/samplewise.md),
whatever the Gram route. A *segment* is a submodule (a residual block, a transformer layer)
whose inside is recomputed instead of kept, twice over:

- forward: the segment runs without a graph; its input ``x`` is kept;
- the engine's backward (with graph): the segment's backward node recomputes the segment,
  takes its input gradient and the Gram parts of its parameters (values), and keeps only
  ``x`` and the output gradient ``g`` (:class:`_SegmentBackward`);
- the double backward: that node recomputes the segment, its backward and its Gram parts with
  a graph, and differentiates them at once (one segment's graph alive at a time); the forward
  node, reached later through the activations, recomputes the segment's plain backward.

The last segment the engine's backward reaches (the model's first, in a chain) is the first the
double backward needs: its backward node builds that graph at once and keeps it, since nothing
else runs in between (no second recomputation, and the same peak: one segment's graph).

The Gram parts leave a segment as the *gradient of a token*: a zero [N, N] (or [D, D]) tensor
the segment's forward takes as an input, whose gradient the backward node returns as the
segment's part. The engine asks its backward for the tokens' gradients beside the recorded
outputs' and adds them to the Gram, so the parts are in the graph like any other.

In NIO's iteration (``nio_fast.algorithms.scale_probes``) the segments' weights are handed over
by the probe mode, which the recomputations run outside: each pass of a segment routes its
linear and convolution weights through probed layers with probes of its own, and the segment's
nodes take NIO's probes as inputs and return the passes' probe gradients as theirs, so a
recomputed weight's scale gradient skips its weight-sized products as a kept one's does (the
first pass decides which weights; a recomputation that routes differently is an error).

Cost: each segment's forward runs four times (three more than kept) and its backward three
times (two more), its parameters' Gram parts twice (their values once); the last one reached
runs its forward three times and its backward twice, its parts once. The parameters of a
segment must be used inside it only, once per forward (the Gram of a tied weight is not a sum
over segments), each by an op with a factor rule.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.autograd import Function
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ops.first_order import first_order
from ..ops.fused_calls import active_routing

if TYPE_CHECKING:
    from ..algorithms.scale_probes import ScaleProbes

GramPass = Callable[["SegmentCall", torch.Tensor, torch.Tensor, bool, bool, Optional["ScaleProbes"]],
                    tuple[torch.Tensor, torch.Tensor]]
"""(call, x, g, create_graph, values, probes) -> (dL/dx, the segment's Gram parts): recompute the
segment on ``x`` (its forward inside ``probes`` when given), backpropagate ``g`` through it, form
its parameters' parts (the engine's rules; their values may be skipped in a graph pass unless
``values``)."""


@dataclass
class SegmentCall:
    """One call of a segment module in the forward, with what recomputing it needs."""

    module: nn.Module
    forward: Callable[..., Any]
    """The module's own forward (not the patched one)."""
    args: tuple
    kwargs: dict
    indices: tuple[int, ...]
    """The engine's indices of the selected parameters the segment owns, in order."""
    params: tuple[torch.Tensor, ...]
    """Those parameters."""
    phase: "SegmentPhase"
    training: list[tuple[nn.Module, bool]]
    routing: Any
    """The routing mode (``ops.fused_calls``) active at the forward, re-entered to recompute."""
    rng: tuple[torch.Tensor, list[int], list[torch.Tensor]]
    """The CPU generator's state and the CUDA devices' states at the forward: a segment drawing
    random numbers (noise, dropout left on) draws the same ones every time it is recomputed."""
    routes: dict[int, str] = field(default_factory=dict)
    """Parameter index -> Gram route, from the first Gram pass."""
    probes: dict[int, torch.Tensor] = field(default_factory=dict)
    """Owned parameter index -> NIO's probe of it (``nio_fast.algorithms.scale_probes``), in an
    iteration with probes: the segment routes those weights' uses through probed layers with
    probes of its own in every pass, and its nodes hand those probes' gradients to these."""
    probed: Optional[frozenset[int]] = None
    """Of ``probes``' tensors, those every use of which the first pass routed; the later passes
    route these (a weight some use of which cannot be routed gets its whole gradient)."""
    probes_of: Optional[Callable[[Sequence[torch.Tensor], Sequence[bool]], "ScaleProbes"]] = None
    """Makes the segment's own probe mode over its parameters."""

    @contextlib.contextmanager
    def as_in_forward(self, recomputing: bool = True) -> Iterator[None]:
        """The modes of the forward: module flags, routed calls, the math attention backend, and
        when ``recomputing``, the random generators as they were (and are again after)."""
        now = [(module, module.training) for module, _ in self.training]
        cpu_state, devices, device_states = self.rng
        try:
            for module, training in self.training:
                module.training = training
            with torch.random.fork_rng(devices=devices, enabled=recomputing), sdpa_kernel(SDPBackend.MATH), \
                    (self.routing or contextlib.nullcontext()):
                if recomputing:
                    torch.set_rng_state(cpu_state)
                    for device, state in zip(devices, device_states):
                        torch.cuda.set_rng_state(state, device)
                yield
        finally:
            for module, training in now:
                module.training = training

    def run(self, x: torch.Tensor) -> torch.Tensor:
        output = self.forward(x, *self.args, **self.kwargs)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise TypeError(f"recompute: {type(self.module).__name__} returned {type(output).__name__}; "
                            f"a recomputed segment must return one floating-point tensor")
        return output

    def input_gradient(self, x: torch.Tensor, grad_output: torch.Tensor, create_graph: bool
                       ) -> tuple[Optional[torch.Tensor], ...]:
        """(dL/dx, dL/d(params)..., dL/d(probes)...) of the segment alone: its plain backward,
        recomputed (a probed weight's gradient is None, its probe's is <dL/dW, W>)."""
        probes = self.probe_mode()
        with self.as_in_forward(), torch.enable_grad():
            leaf = x.detach().requires_grad_()
            with probes or contextlib.nullcontext():
                output = self.run(leaf)
            self.note_probed(probes)
            grads = torch.autograd.grad(output, (leaf, *self.targets(probes)), grad_output,
                                        create_graph=create_graph, allow_unused=True)
        return (grads[0], *self.split_gradients(grads[1:]))

    def gram_pass(self, x: torch.Tensor, grad_output: torch.Tensor, create_graph: bool, values: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional["ScaleProbes"]]:
        """(dL/dx, Gram part, the pass's probe mode): one pass of the engine's :data:`GramPass`
        with this call's probe mode, its routing noted."""
        probes = self.probe_mode()
        grad_x, part = self.phase.gram_pass(self, x, grad_output, create_graph, values, probes)
        self.note_probed(probes)
        return grad_x, part, probes

    @property
    def probe_tensors(self) -> tuple[torch.Tensor, ...]:
        """NIO's probes the segment's nodes take as inputs (after the parameters)."""
        return tuple(self.probes.values())

    def probe_mode(self) -> Optional["ScaleProbes"]:
        """A probe mode routing the owned weights' uses with probes of its own: every weight with a
        probe in the first pass, those that pass routed in every use afterwards (None: no probes)."""
        chosen = self.probes.keys() if self.probed is None else self.probed
        if not chosen:
            return None
        return self.probes_of(self.params, [index in chosen for index in self.indices])

    def note_probed(self, probes: Optional["ScaleProbes"]) -> None:
        """After a pass: the first one decides which weights the segment probes; the later ones
        (the same calls, recomputed) must route exactly those."""
        routed = frozenset(self.indices[k] for k in probes.probed()) if probes is not None else frozenset()
        if self.probed is None:
            self.probed = routed
        elif routed != self.probed:
            raise RuntimeError(f"recompute: {type(self.module).__name__} used its weights differently when "
                               f"recomputed (a forward that must be deterministic given its input)")

    def targets(self, probes: Optional["ScaleProbes"]) -> Sequence[torch.Tensor]:
        """What a pass differentiates by: per owned parameter, its probe where routed, else itself."""
        return self.params if probes is None else probes.targets()

    def split_gradients(self, grads: Sequence[Optional[torch.Tensor]]) -> tuple[Optional[torch.Tensor], ...]:
        """The gradients of :meth:`targets` (of a noted pass) as those of the nodes' inputs: the
        parameters (None for a probed weight), then :attr:`probes` (<dL/dW, W> of a probed
        weight, else None)."""
        position = {index: k for k, index in enumerate(self.indices)}
        params = [None if index in self.probed else grad for index, grad in zip(self.indices, grads)]
        probes_grads = [grads[position[index]] if index in self.probed else None for index in self.probes]
        return (*params, *probes_grads)


@dataclass
class SegmentPhase:
    """Whether the engine's own backward (the one forming the Gram) is running."""

    gram: bool = False
    gram_pass: Optional[GramPass] = None
    calls: int = 0
    """Segment calls in the forward."""
    unreached: int = 0
    """Of those, the ones the engine's backward has yet to reach."""


class _Segment(Function):
    """y = segment(x), keeping x only. Its gradient for the token is the segment's Gram part
    during the engine's backward; any other backward gets the segment's recomputed VJP."""

    @staticmethod
    def forward(ctx, call: SegmentCall, token: torch.Tensor, x: torch.Tensor, *params_and_probes: torch.Tensor
                ) -> torch.Tensor:
        ctx.call = call
        ctx.save_for_backward(x)
        # Without a graph: keeping it for the first backward (one forward less) took 0.9x the
        # time on the small ViT at N = 64, but 1.31x a training step's allocator peak, not 1.01x.
        with call.as_in_forward(recomputing=False), torch.no_grad():
            output = call.run(x)
        return output.clone() if output is x else output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        call, (x,) = ctx.call, ctx.saved_tensors
        if call.phase.gram:
            call.phase.unreached -= 1
            if torch.is_grad_enabled():  # a backward with graph: the double backward needs the segment's
                # graph, recomputed there; the last segment reached builds it here and keeps it (a lone
                # segment would so keep everything).
                keep_graph = call.phase.unreached == 0 and call.phase.calls > 1
                grad_x, part = _SegmentBackward.apply(call, keep_graph, x, grad_output, *call.params,
                                                      *call.probe_tensors)
            else:
                grad_x, part, _ = call.gram_pass(x, grad_output, False, True)
            return (None, part, grad_x) + (None,) * (len(call.params) + len(call.probes))
        return (None, None, *call.input_gradient(x, grad_output, torch.is_grad_enabled()))


class _SegmentBackward(Function):
    """(dL/dx, Gram part) of a segment from x and its output gradient g, keeping those two only;
    the backward recomputes the segment, its backward and its parts with a graph. With
    ``keep_graph`` (the last segment the engine's backward reaches), the forward builds that graph
    and keeps it for the backward's first run instead."""

    @staticmethod
    def forward(ctx, call: SegmentCall, keep_graph: bool, x: torch.Tensor, grad_output: torch.Tensor,
                *params_and_probes: torch.Tensor):
        ctx.call = call
        ctx.save_for_backward(x, grad_output)
        ctx.kept = None
        if not keep_graph:
            grad_x, part, _ = call.gram_pass(x, grad_output, False, True)
            return grad_x, part
        with torch.enable_grad():
            leaves = x.detach().requires_grad_(), grad_output.detach().requires_grad_()
            grad_x, part, probes = call.gram_pass(*leaves, True, True)
        ctx.kept = (leaves, grad_x, part, probes)
        return grad_x.detach(), part.detach()

    @staticmethod
    @first_order  # its recomputed graph is differentiated without one
    def backward(ctx, cot_grad_x: Optional[torch.Tensor], cot_part: Optional[torch.Tensor]):
        call, (x, grad_output) = ctx.call, ctx.saved_tensors
        with torch.enable_grad():
            if ctx.kept is not None:  # consumed once: a second double backward recomputes
                (x_leaf, grad_leaf), grad_x, part, probes = ctx.kept
                ctx.kept = None
            else:
                x_leaf, grad_leaf = x.detach().requires_grad_(), grad_output.detach().requires_grad_()
                grad_x, part, probes = call.gram_pass(x_leaf, grad_leaf, True, False)
            pairs = [(out, cot) for out, cot in ((grad_x, cot_grad_x), (part, cot_part))
                     if cot is not None and out.requires_grad]
            if not pairs:
                return (None,) * (4 + len(call.params) + len(call.probes))
            outputs, cotangents = zip(*pairs)
            grads = torch.autograd.grad(outputs, (x_leaf, grad_leaf, *call.targets(probes)), cotangents,
                                        allow_unused=True)
        return (None, None, grads[0], grads[1], *call.split_gradients(grads[2:]))


class Segments:
    """The segment modules of one evaluation: patches their forwards while the model runs, makes
    one token per call, and says which parameters they own."""

    def __init__(self, modules: Sequence[nn.Module], params: Sequence[torch.Tensor], gram_shape: tuple[int, int],
                 dtype: torch.dtype, gram_pass: GramPass, probes: Optional["ScaleProbes"] = None) -> None:
        self.modules = list(modules)
        self.phase = SegmentPhase(gram_pass=gram_pass)
        self.gram_shape, self.dtype = gram_shape, dtype
        position = {id(p): index for index, p in enumerate(params)}
        self.owner: dict[int, nn.Module] = {}  # parameter index -> the segment module holding it
        for module in self.modules:
            for param in module.parameters():
                index = position.get(id(param))
                if index is not None and params[index].requires_grad:
                    self.owner[index] = module
        self.params = params
        # NIO's probes of the segments' weights: the segments route those weights themselves.
        self.probes = probes
        self.handed_probes = probes.hand_over(sorted(self.owner)) if probes is not None else {}
        self.calls: list[SegmentCall] = []
        self.tokens: list[torch.Tensor] = []

    def _call(self, module: nn.Module, forward: Callable[..., Any], x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"recompute: {type(module).__name__} was called with {type(x).__name__} first; a "
                            f"recomputed segment takes a floating-point tensor as its first argument")
        constants = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        if any(value.requires_grad for value in constants):
            raise ValueError(f"recompute: {type(module).__name__} takes a second tensor that requires grad; a "
                             f"recomputed segment differentiates its first argument only")
        if any(call.module is module for call in self.calls):
            raise ValueError(f"recompute: {type(module).__name__} runs twice in one forward; its weights' "
                             f"per-sample Gram would need both uses at once (leave it out of recompute)")
        indices = tuple(sorted(index for index, owner in self.owner.items() if owner is module))
        call = SegmentCall(module, forward, args, kwargs, indices, tuple(self.params[i] for i in indices), self.phase,
                           [(m, m.training) for m in module.modules()], active_routing(), _rng_state(x),
                           probes={i: self.handed_probes[i] for i in indices if i in self.handed_probes},
                           probes_of=None if self.probes is None else self.probes.for_tensors)
        token = torch.zeros(self.gram_shape, dtype=self.dtype, device=x.device, requires_grad=True)
        self.calls.append(call)
        self.tokens.append(token)
        return _Segment.apply(call, token, x, *call.params, *call.probe_tensors)

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Inside, calling a segment module runs it as a :class:`_Segment`."""
        saved = [(module, module.__dict__.get("forward")) for module in self.modules]
        try:
            for module in self.modules:
                module.forward = functools.partial(self._call, module, module.forward)
            yield
        finally:
            for module, forward in saved:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    @contextlib.contextmanager
    def gram_phase(self) -> Iterator[None]:
        """The span of the engine's backward: segment nodes return their Gram parts."""
        self.phase.gram, self.phase.calls, self.phase.unreached = True, len(self.calls), len(self.calls)
        try:
            yield
        finally:
            self.phase.gram = False
        if self.probes is not None:  # each call's first pass decided which of its weights it probes
            for call in self.calls:
                routed = call.probed or frozenset()
                self.probes.settle(routed, call.probes.keys() - routed)

    def routes(self) -> dict[int, str]:
        return {index: route for call in self.calls for index, route in call.routes.items()}


def _rng_state(x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(device) for device in devices]


def resolve_segments(model: nn.Module, recompute: Any) -> list[nn.Module]:
    """``recompute`` (None, a module, a module class, or an iterable of those) as the list of
    segment modules of ``model``: a class stands for its outermost instances in the model."""
    if recompute is None:
        return []
    items = list(recompute) if isinstance(recompute, (list, tuple, set, frozenset)) else [recompute]
    inside = {id(m) for m in model.modules()}
    chosen: list[nn.Module] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            found = _outermost(model, item)
            if not found:
                raise ValueError(f"recompute: the model has no {item.__name__}")
            chosen += found
        elif isinstance(item, nn.Module):
            if id(item) not in inside:
                raise ValueError(f"recompute: {type(item).__name__} is not a submodule of the model")
            chosen.append(item)
        else:
            raise TypeError(f"recompute: expected modules or module classes, got {type(item).__name__}")
    unique = list({id(m): m for m in chosen}.values())
    for module in unique:
        for other in unique:
            if other is not module and any(sub is module for sub in other.modules()):
                raise ValueError(f"recompute: {type(module).__name__} lies inside another recomputed "
                                 f"{type(other).__name__}; segments cannot nest")
    return unique


def _outermost(model: nn.Module, kind: type) -> list[nn.Module]:
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, kind):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found
