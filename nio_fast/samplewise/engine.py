"""The N x N Gram of per-sample gradients, in one forward and one backward with graph.

1. Forward the batch once under a :class:`FactorRecorder`: for every parameter, the ops that
   used it, with their inputs and the gradient edges of their outputs.
2. Per-sample losses ``l_i = loss_fn(o[i:i+1], y[i:i+1])`` (NIO.md with one sample a chunk),
   and ONE ``autograd.grad(sum_i l_i, outputs of the recorded ops, create_graph=True)``. With
   no layer coupling samples, the sample-i rows of an op's output gradient are sample i's own.
   With chunks, whose loss the caller checked to be the mean of its samples' losses, the sum is
   N times the batch loss: one loss call instead of N (8% of a GroupNorm ResNet-20 evaluation).
3. Per parameter, the Gram of its per-sample gradients from those factors, by the cheaper
   exact route: ``ghost`` / ``materialize`` (``nio_fast.ops.outer_gram``) for linear and
   convolution weights, or ``pixel_ghost`` (``nio_fast.ops.conv_pixel_gram``: the ghost
   identity over input pixels, for convolutions with small maps and many channels),
   ``embedding`` for an embedding table used once, ``vectors`` (per-sample gradients formed,
   they are small) for the rest. Each part is formed inside the backward of
   step 2, as soon as its layer's output gradient exists (:class:`_PartPlanner`), and its own
   backward recomputes from the layer's input and output gradient (activation checkpointing,
   or per-sample rows a block of output channels at a time, :mod:`.blocked_gram`), so no
   per-sample gradient or unfolded input outlives its own layer.
   With chunks (sub-batch NIO), linear and convolution weights take ``chunks`` instead where it
   is cheaper than ghost: each chunk's gradient is one weight-gradient reduction over its rows,
   as a training step's backward computes it, and no per-sample gradient exists.
4. Parameters used in a way no rule covers get their per-sample gradients from autograd, one
   backward per sample (``autograd``): exact for any op, and the only route whose cost grows
   with N backward passes; :class:`SampleGram` says which parameters took it and why.

Differentiating the Gram then costs one double backward: the whole evaluation is the floor of
any differentiation through a whole-batch backward (about three training steps) plus the
per-sample Gram, 1.4-1.6x that floor on a small ViT and 1.5-1.8x on a GroupNorm ResNet-18 at
N = 64 (benchmarks/interleaved.py MODEL samples), growing little with N.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops.gram import accumulation_dtype
from ..ops.pixel_gram import MAX_MAP_ENTRIES
from ..algorithms.batching import call_model, num_samples, slice_rows
from .blocked_gram import blockable, blocked_weight_gram, rows_fit_beside
from .factors import chunk_sums, conv_padding, has_chunk_rule, is_outer, outer_factors, per_sample_vectors
from .recorder import CONV, EMBEDDING, FactorRecorder, LayerUse
from .segments import SegmentCall, Segments

if TYPE_CHECKING:
    from ..algorithms.scale_probes import ScaleProbes

logger = logging.getLogger("nio_fast")

GHOST, PIXEL_GHOST, MATERIALIZE, EMBEDDING_ROUTE, VECTORS, CHUNKS, AUTOGRAD = (
    "ghost", "pixel_ghost", "materialize", "embedding", "vectors", "chunks", "autograd")


@dataclass
class SampleGram:
    """The per-sample Gram and how each parameter's part of it was computed."""

    gram: torch.Tensor
    """[N, N]: G[i, j] = <g_i, g_j> over the selected parameters ([D, D] of the chunk gradients
    when chunk weights were given)."""
    routes: dict[int, str] = field(default_factory=dict)
    """Parameter index -> route: "ghost", "pixel_ghost", "materialize", "embedding", "vectors", "chunks"
    or "autograd"."""
    reasons: dict[int, str] = field(default_factory=dict)
    """Parameter index -> why it took the autograd route."""


class NoFactorRule(ValueError):
    """Some parameters would take the autograd route, and the caller asked not to (it has a
    cheaper exact way for such a model than one backward per sample)."""


def per_sample_losses(outputs: Any, targets: Any, loss_fn: Callable, num: int) -> torch.Tensor:
    """[N]: the loss of every sample on its own, from the whole-batch outputs."""
    from ..algorithms.gradcosine import scalar_loss
    return torch.stack([scalar_loss(loss_fn(slice_rows(outputs, i, i + 1), slice_rows(targets, i, i + 1)))
                        for i in range(num)])


def _vector_gram(vectors: torch.Tensor, dtype: torch.dtype, weights: Optional[ops.ChunkWeighting]) -> torch.Tensor:
    """The Gram of per-sample gradients [N, k]; with chunk ``weights``, of the chunk gradients
    W^T V (``ops.chunk_sums``): (N + D^2) k multiply-adds instead of N^2 k."""
    vectors = vectors.to(dtype)
    if weights is not None:
        vectors = ops.chunk_sums(vectors, weights)
    return vectors @ vectors.T


def _reduce(sample_gram: torch.Tensor, weights: Optional[ops.ChunkWeighting]) -> torch.Tensor:
    """A part computed per sample pair, reduced to the chunks: W^T G W (or G itself)."""
    return sample_gram if weights is None else ops.chunk_gram(sample_gram, weights)


def _maybe_checkpoint(function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Run ``function`` so that its backward recomputes it (nothing inside is kept alive)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor)):
        return checkpoint(function, *tensors, use_reentrant=False)
    return function(*tensors)


def choose_outer_route(num: int, positions: int, in_features: int, out_features: int, itemsize: int) -> str:
    """"ghost" or "materialize" for a weight's factors, by the FLOP estimate of ``ops.outer_gram_cost``."""
    return ops.outer_gram_route(num, positions, in_features, out_features, itemsize=itemsize)


class _ParameterUses:
    """Every (use, role, output gradient) of one parameter."""

    def __init__(self) -> None:
        self.entries: list[tuple[LayerUse, str, torch.Tensor]] = []

    def outer_only(self) -> bool:
        """All uses are linear / ungrouped conv weights of one factor shape: positions concatenate."""
        return bool(self.entries) and all(is_outer(use, role) for use, role, _ in self.entries) and \
            len({use.kind for use, _, _ in self.entries}) == 1

    def chunk_rule_only(self) -> bool:
        """Every use is a linear or convolution weight: ``chunk_sums`` covers the parameter."""
        return bool(self.entries) and all(has_chunk_rule(use, role) for use, role, _ in self.entries)

    def blockable(self) -> bool:
        """Every use is a linear or ungrouped convolution weight: :mod:`.blocked_gram` takes it."""
        return bool(self.entries) and all(blockable(use, role) for use, role, _ in self.entries)

    def single_embedding(self) -> bool:
        return len(self.entries) == 1 and self.entries[0][0].kind == EMBEDDING

    @property
    def num_samples(self) -> int:
        use, _, grad = self.entries[0]
        return grad.shape[use.sample_axis]

    def positions(self, out_features: int) -> int:
        """T of a linear / conv weight: output-gradient positions per sample, over all uses."""
        return sum(grad.numel() // (self.num_samples * out_features) for _, _, grad in self.entries)

    def checkpoint_inputs(self) -> list[torch.Tensor]:
        """Every use's input and output gradient, flat: what a recomputing route takes."""
        return [t for use, _, grad in self.entries for t in (use.inputs, grad)]

    def bound(self, flat: Sequence[torch.Tensor]) -> Iterator[tuple[LayerUse, str, torch.Tensor]]:
        """(use, role, output gradient), each use bound to ``flat``'s tensors (a checkpoint's own)."""
        for (use, role, _), inputs, grad in zip(self.entries, flat[0::2], flat[1::2]):
            yield replace(use, inputs=inputs), role, grad


def _outer_route(uses: _ParameterUses, param: torch.Tensor) -> str:
    """The route from the shapes alone (no tensor is formed to decide): T positions in all uses."""
    return choose_outer_route(uses.num_samples, uses.positions(param.shape[0]), param[0].numel(), param.shape[0],
                              param.element_size())


def _chunks_beat_ghost(uses: _ParameterUses, param: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> bool:
    """Chunk sums (one weight-gradient reduction over each chunk's rows, then a D x D Gram) cost
    ``(sum of chunk sizes) T d p + D^2 d p`` multiply-adds; the ghost route's per-sample Gram
    ``N^2 T^2 (d + p)``, its W^T G W reduction next to nothing. Materialising per sample is never
    cheaper than chunk sums, so this is the one comparison."""
    num = uses.num_samples
    out_features, in_features = param.shape[0], param[0].numel()
    positions = uses.positions(out_features)
    rows = sum(min(end, num) - start for start, end in bounds)
    chunk_cost = float(rows) * positions * in_features * out_features + float(len(bounds)) ** 2 * param.numel()
    if not uses.outer_only():
        return True  # grouped convolutions, or linear and convolution uses mixed: no ghost route
    cost = ops.outer_gram_cost(num, positions, in_features, out_features, itemsize=param.element_size())
    return chunk_cost < cost.ghost_flops


def _gram_of_summed_rows(uses: _ParameterUses, rows_of_use: Callable[[LayerUse, str, torch.Tensor], torch.Tensor],
                         gram_of_sum: Callable[[torch.Tensor], torch.Tensor], num_rows: int,
                         numel: int) -> torch.Tensor:
    """``gram_of_sum`` of the [num_rows, numel] rows (per-sample gradients, or chunk sums) that
    ``rows_of_use`` forms for each use, summed over the uses (tied weights add up).

    The rows are kept for the backward when they are no bigger than the output gradients a
    training step holds anyway (early convolutions: N x 2.3k values against N x 16k), and
    recomputed there when bigger (late convolutions, wide linears): memory stays that of a
    training step. Keeping them saved 10% of a GroupNorm ResNet-18 evaluation at N = 16.
    """
    def compute(*flat: torch.Tensor) -> torch.Tensor:
        total = None
        for use, role, grad in uses.bound(flat):
            rows = rows_of_use(use, role, grad)
            total = rows if total is None else total + rows
        return gram_of_sum(total)

    flat = uses.checkpoint_inputs()
    if rows_fit_beside(num_rows * numel, (grad for _, _, grad in uses.entries)):
        return compute(*flat)
    return _maybe_checkpoint(compute, *flat)


def _chunk_sums_gram(uses: _ParameterUses, param: torch.Tensor, dtype: torch.dtype,
                     bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The Gram of the chunk gradients of a linear or convolution weight from its chunk sums."""
    num = uses.num_samples
    sizes = torch.tensor([min(end, num) - start for start, end in bounds], dtype=dtype, device=param.device)

    def gram_of_sum(total: torch.Tensor) -> torch.Tensor:
        chunk_grads = total.to(dtype) / sizes.unsqueeze(1)
        return chunk_grads @ chunk_grads.T

    return _gram_of_summed_rows(uses, lambda use, _, grad: chunk_sums(use, grad, param.shape, bounds), gram_of_sum,
                                len(bounds), param.numel())


def _outer_gram(uses: _ParameterUses, param: torch.Tensor, dtype: torch.dtype, route: str) -> torch.Tensor:
    """ghost, or materialize by bmm for linear layers (convolutions materialise by a grouped
    weight-gradient convolution in the vectors route instead: no unfolded input)."""
    entries = uses.entries
    conv = entries[0][0].kind == CONV

    def compute(*flat: torch.Tensor) -> torch.Tensor:
        a_parts, b_parts = [], []
        for use, _, grad in uses.bound(flat):
            a, b = outer_factors(use, grad, param.shape)
            a_parts.append(a)
            b_parts.append(b)
        a = torch.cat(a_parts, 1) if len(a_parts) > 1 else a_parts[0]
        b = torch.cat(b_parts, 1) if len(b_parts) > 1 else b_parts[0]
        return ops.outer_gram(a, b, route=route).to(dtype)

    flat = uses.checkpoint_inputs()
    if conv or len(entries) > 1:  # unfolded patches / concatenated factors: recompute in the backward
        return _maybe_checkpoint(compute, *flat)
    return compute(*flat)


def _pixel_ghost_pays(uses: _ParameterUses, param: torch.Tensor, route: str) -> bool:
    """A single ungrouped convolution use whose ghost Gram over input pixels costs fewer
    multiply-adds than ``route`` (``ops.pixel_gram_cost`` against ``ops.outer_gram_cost``)."""
    if len(uses.entries) != 1 or uses.entries[0][0].kind != CONV:
        return False
    in_features, out_features = param[0].numel(), param.shape[0]
    positions, pixels = uses.positions(out_features), math.prod(uses.entries[0][0].inputs.shape[2:])
    if (positions * pixels) ** 2 > MAX_MAP_ENTRIES:
        return False
    cost = ops.outer_gram_cost(uses.num_samples, positions, in_features, out_features, itemsize=param.element_size())
    pixel_cost = ops.pixel_gram_cost(uses.num_samples, positions, pixels, param.shape[1], out_features)
    return pixel_cost < (cost.ghost_flops if route == GHOST else cost.materialize_flops)


def _pixel_gram(uses: _ParameterUses, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    use, _, grad = uses.entries[0]
    return ops.conv_pixel_gram(use.inputs, grad, tuple(param.shape[2:]), stride=use.config["stride"],
                               padding=conv_padding(use, param.shape), dilation=use.config["dilation"]).to(dtype)


def _embedding_gram(uses: _ParameterUses, dtype: torch.dtype) -> torch.Tensor:
    use, _, grad = uses.entries[0]
    ids = use.inputs.movedim(use.sample_axis, 0) if use.sample_axis else use.inputs
    b = grad.movedim(use.sample_axis, 0) if use.sample_axis else grad
    ids = ids.reshape(ids.shape[0], -1)
    b = b.reshape(b.shape[0], ids.shape[1], -1)
    padding = use.config["padding_idx"]
    padding = None if padding is None else padding % use.config["num_embeddings"]
    return ops.embedding_gram(ids, b, padding_idx=padding).to(dtype)


def _vectors_gram(uses: _ParameterUses, param: torch.Tensor, dtype: torch.dtype,
                  weights: Optional[ops.ChunkWeighting]) -> torch.Tensor:
    if uses.blockable():  # linear / convolution weights: rows formed a block of channels at a time
        finish = (lambda rows: rows) if weights is None else (lambda rows: ops.chunk_sums(rows, weights))
        size = uses.num_samples if weights is None else weights.num_chunks
        return blocked_weight_gram([(use, grad) for use, _, grad in uses.entries], param.shape, dtype, finish, size)
    return _gram_of_summed_rows(uses, lambda use, role, grad: per_sample_vectors(use, role, grad, param),
                                lambda total: _vector_gram(total, dtype, weights), uses.num_samples, param.numel())


class _PartPlanner:
    """Each parameter's part of the Gram, formed during the backward that makes its factors.

    A hook on every recorded output takes its gradient; once all of a parameter's uses have
    theirs, the parameter's part is formed there and then. Why: the double backward runs nodes
    in reverse order of creation, so a part made right after its layer's output gradient has
    its backward run right before that gradient's own producer, which consumes the cotangent
    at once. Parts made after the whole backward ran their backwards first, and every layer's
    output-gradient cotangent waited for the rest of the double backward: the largest item of
    its peak memory.
    """

    def __init__(self, params: Sequence[torch.Tensor], factored: Sequence[LayerUse], unfactored: dict[int, str],
                 dtype: torch.dtype, chunks: Optional[Sequence[tuple[int, int]]],
                 weights: Optional[ops.ChunkWeighting]) -> None:
        self.params, self.unfactored = params, unfactored
        self.dtype, self.chunks, self.weights = dtype, chunks, weights
        self.expected: dict[int, int] = defaultdict(int)
        for use in factored:
            for index in use.roles.values():
                if index not in unfactored:
                    self.expected[index] += 1
        self.uses: dict[int, _ParameterUses] = defaultdict(_ParameterUses)
        self.parts: dict[int, torch.Tensor] = {}
        self.routes: dict[int, str] = {}

    @contextlib.contextmanager
    def listening(self, recorder: FactorRecorder) -> Iterator[None]:
        """Form parts from the recorder's output hooks during the backward run inside."""
        recorder.on_output_grad = self._on_output_grad
        try:
            yield
        finally:
            recorder.on_output_grad = None
            recorder.remove_hooks()

    def _on_output_grad(self, use: LayerUse, grad: torch.Tensor) -> None:
        for role, index in use.roles.items():
            if index in self.unfactored:
                continue
            uses = self.uses[index]
            uses.entries.append((use, role, grad))
            if len(uses.entries) == self.expected[index]:
                self._form(index)

    def finish(self) -> None:
        for index, uses in self.uses.items():
            if index not in self.parts and uses.entries:
                self._form(index)

    def _form(self, index: int) -> None:
        uses, param, dtype, weights = self.uses[index], self.params[index], self.dtype, self.weights
        if self.chunks is not None and uses.chunk_rule_only() and _chunks_beat_ghost(uses, param, self.chunks):
            self.parts[index], self.routes[index] = _chunk_sums_gram(uses, param, dtype, self.chunks), CHUNKS
            return
        route = _outer_route(uses, param) if uses.outer_only() else None
        if route is not None and _pixel_ghost_pays(uses, param, route):
            self.parts[index], self.routes[index] = _reduce(_pixel_gram(uses, param, dtype), weights), PIXEL_GHOST
            return
        # Materialising: by outer_gram's bmm for linear layers per sample pair; as per-sample
        # vectors for convolutions (grouped weight-gradient conv), and for linear layers too
        # when chunks will average them (the N x N Gram of them is then skipped).
        if route == GHOST or (route == MATERIALIZE and uses.entries[0][0].kind != CONV and weights is None):
            part = _reduce(_outer_gram(uses, param, dtype, route), weights)
        elif route == MATERIALIZE:
            part = _vectors_gram(uses, param, dtype, weights)
        elif uses.single_embedding():
            part, route = _reduce(_embedding_gram(uses, dtype), weights), EMBEDDING_ROUTE
        else:
            part, route = _vectors_gram(uses, param, dtype, weights), VECTORS
        self.parts[index], self.routes[index] = part, route


def samplewise_gram(model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: Callable,
                    params: Sequence[torch.Tensor], create_graph: bool,
                    chunks: Optional[Sequence[tuple[int, int]]] = None,
                    segments: Sequence[torch.nn.Module] = (),
                    probes: Optional["ScaleProbes"] = None, autograd_route: bool = True) -> SampleGram:
    """The [N, N] per-sample Gram of ``model`` on one batch; see the module docstring.

    With ``chunks`` ((start, end) sample ranges, overlaps allowed), the [D, D] Gram of the chunk
    gradients (each the mean of its samples' gradients) instead: linear and convolution weights
    take the ``chunks`` route where it is cheaper than ghost (each chunk's gradient reduced from
    its rows, as a training step's backward does); per-sample gradients formed anyway are averaged
    into chunk gradients before their Gram (W^T V, ``ops.chunk_sums``); the other routes' sample
    Grams are reduced as W^T G W (``ops.chunk_gram``). The caller has put the model in NIO's
    modes and checked it has no batch coupling (and, with chunks, that the loss of a chunk is
    its samples' mean).

    ``segments``: submodules recomputed instead of kept (:mod:`.segments`): the same Gram and
    gradients, with only their inputs and output gradients alive for the double backward.
    ``probes``: NIO's probe mode, entered by the caller; the segments route their own weights'
    uses with probes of their own (:mod:`.segments`) and report to it. ``autograd_route=False``:
    raise :class:`NoFactorRule` instead of taking the autograd route (before its N backward passes).
    """
    num = num_samples(inputs)
    dtype = accumulation_dtype(params)  # fp64 when any parameter is, as for ops.gram
    weights = None if chunks is None else ops.ChunkWeighting.from_bounds(chunks, num, dtype, params[0].device)
    recorder = FactorRecorder(params, num)
    gram_size = num if chunks is None else len(chunks)
    segmented = Segments(segments, params, (gram_size, gram_size), dtype,
                         functools.partial(_segment_gram_pass, params, num, dtype, chunks, weights, gram_size),
                         probes)
    with segmented.patched(), recorder:
        outputs = call_model(model, inputs)
    if chunks is None:
        losses = per_sample_losses(outputs, targets, loss_fn, num)
        total_loss = losses.sum()
    else:  # the caller checked that a chunk's loss is its samples' mean: N x the batch loss sums them
        from ..algorithms.gradcosine import scalar_loss
        losses, total_loss = None, scalar_loss(loss_fn(outputs, targets)) * num
    if not total_loss.requires_grad:
        raise ValueError("loss_fn: the loss it returned does not depend on the selected parameters "
                         "(no gradient can flow); check params and the model")

    factored = [use for use in recorder.uses if any(i not in recorder.unfactored for i in use.roles.values())]
    seen = recorder.unfactored.keys() | {i for use in factored for i in use.roles.values()}
    _check_segment_ownership(segmented, seen, params)
    unseen = [i for i in range(len(params)) if i not in seen and i not in segmented.owner]
    planner = _PartPlanner(params, factored, recorder.unfactored, dtype, chunks, weights)
    # One backward: the output gradients of the recorded ops, and (nearly free alongside) whether
    # a parameter no recorded op used still reaches the loss, through an op the mode cannot see
    # (e.g. nn.GRU's fused C++ call): those take the autograd route. Each parameter's part is
    # formed inside it, as soon as its last use's output gradient is ready (a hook).
    wanted = [use.output_edge for use in factored] + [params[i] for i in unseen] + segmented.tokens
    with planner.listening(recorder), segmented.gram_phase():
        grads = torch.autograd.grad(total_loss, wanted, create_graph=create_graph, retain_graph=True,
                                    allow_unused=True) if wanted else []
    unfactored = dict(recorder.unfactored)
    for index, grad in zip(unseen, grads[len(factored):len(factored) + len(unseen)]):
        if grad is not None:
            unfactored[index] = "used by an op that bypasses torch-function dispatch (a fused C++ call)"
    planner.finish()  # parameters some of whose uses never got a gradient
    routes, parts = planner.routes, [planner.parts[index] for index in sorted(planner.parts)]
    routes.update(segmented.routes())
    parts += [part for part in grads[len(factored) + len(unseen):] if part is not None]

    reasons: dict[int, str] = {}
    if unfactored and not autograd_route:
        raise NoFactorRule("; ".join(sorted(set(unfactored.values()))))
    if unfactored:
        indices = sorted(unfactored)
        if losses is None:
            losses = per_sample_losses(outputs, targets, loss_fn, num)
        parts.append(_autograd_gram(losses, [params[i] for i in indices], create_graph, dtype, weights))
        routes.update((index, AUTOGRAD) for index in indices)
        reasons.update((index, unfactored[index]) for index in indices)
        logger.info("sample-wise GradCosine: %d parameter tensor(s) need %d backward passes (%s)",
                    len(indices), num, "; ".join(sorted(set(reasons.values()))))
    if not routes:
        raise ValueError("params: none of the selected parameters influences the loss")
    if not create_graph:
        parts = [part.detach() for part in parts]
    logger.debug("sample-wise Gram routes: %s", routes)
    return SampleGram(torch.stack(parts).sum(0) if len(parts) > 1 else parts[0], routes, reasons)


def _autograd_gram(losses: torch.Tensor, tensors: list[torch.Tensor], create_graph: bool, dtype: torch.dtype,
                   weights: Optional[ops.ChunkWeighting]) -> torch.Tensor:
    """Per-sample gradients of ``tensors`` by one backward per sample: exact for any op."""
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], tensors, create_graph=create_graph, retain_graph=True,
                                    allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                               for g, t in zip(grads, tensors)]))
    return _vector_gram(torch.stack(rows), dtype, weights)


def _check_segment_ownership(segmented: Segments, seen: set, params: Sequence[torch.Tensor]) -> None:
    """A segment's parameters are used inside it only: their Gram is then the segment's part."""
    shared = sorted(seen & segmented.owner.keys())
    if shared:
        raise ValueError(f"recompute: a parameter of shape {tuple(params[shared[0]].shape)} of "
                         f"{type(segmented.owner[shared[0]]).__name__} is also used outside it; its per-sample "
                         f"Gram needs all its uses at once (leave that module out of recompute)")


def _segment_gram_pass(params: Sequence[torch.Tensor], num: int, dtype: torch.dtype,
                       chunks: Optional[Sequence[tuple[int, int]]], weights: Optional[ops.ChunkWeighting],
                       gram_size: int, call: SegmentCall, x: torch.Tensor, grad_output: torch.Tensor,
                       create_graph: bool, values: bool, probes: Optional["ScaleProbes"]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, Gram part) of one segment: recompute it on ``x`` under a recorder, backpropagate
    ``grad_output`` to its input and its recorded outputs, and form the parts of the parameters
    it owns there, as the engine does for the whole model (with a graph when ``create_graph``;
    without the parts' values, which a graph pass may skip, unless ``values``). ``probes``: the
    segment's own probe mode, entered outside the recorder (which sees the plain calls first)."""
    recorder = FactorRecorder(params, num)
    with call.as_in_forward(), torch.enable_grad():
        # The values pass takes a leaf of its own: a backward reaching the model's x would fire the
        # engine's hook on it (the output of the layer feeding this segment) with these values. The
        # graph pass gets the leaves its caller differentiates by.
        x_in = x if create_graph else x.detach().requires_grad_()
        with probes or contextlib.nullcontext(), recorder:
            output = call.run(x_in)
        owned = set(call.indices)
        used = recorder.unfactored.keys() | {index for use in recorder.uses for index in use.roles.values()}
        foreign = sorted(used - owned)
        if foreign:
            raise ValueError(f"recompute: {type(call.module).__name__} uses a parameter of shape "
                             f"{tuple(params[foreign[0]].shape)} that is not its own; its per-sample Gram needs "
                             f"all its uses at once (leave that module out of recompute)")
        unfactored = {index: reason for index, reason in recorder.unfactored.items() if index in owned}
        if unfactored:
            index, reason = next(iter(unfactored.items()))
            raise ValueError(f"recompute: {type(call.module).__name__} uses a parameter of shape "
                             f"{tuple(params[index].shape)} in a way no factor rule covers ({reason}); "
                             f"leave that module out of recompute")
        factored = [use for use in recorder.uses if any(i in owned for i in use.roles.values())]
        planner = _PartPlanner(params, factored, {}, dtype, chunks, weights)
        wanted = [use.output_edge for use in factored] + [x_in]
        # A graph pass that only differentiates the parts, whose values the values pass formed,
        # has the factor-Gram Functions skip them (ops.gram_values_unused).
        skipped = contextlib.nullcontext() if values else ops.gram_values_unused()
        with planner.listening(recorder), skipped:
            grads = torch.autograd.grad(output, wanted, grad_output, create_graph=create_graph, allow_unused=True)
            planner.finish()
    if not call.routes:
        call.routes.update(planner.routes)
    parts = [planner.parts[index] for index in sorted(planner.parts)]
    part = torch.stack(parts).sum(0) if parts else torch.zeros((gram_size, gram_size), dtype=dtype, device=x.device)
    grad_x = grads[-1] if grads[-1] is not None else torch.zeros_like(x)
    return grad_x, part
