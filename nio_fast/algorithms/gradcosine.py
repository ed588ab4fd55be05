"""One GradCosine evaluation (NIO.md, "One GradCosine evaluation"): chunk gradients, Gram, cosine.

Three ways to get the Gram of the D chunk gradients, equal whenever no layer couples samples:
- ``"exact"``: forward the whole batch once, then one gradient per chunk loss (BatchNorm
  statistics see all N samples, as the spec says); ``"exact_recompute"`` is the same with the
  memory of one chunk's graph instead of D, for one more forward and D more backward passes
  (``recompute.py``);
- ``"per_chunk"``: forward each chunk on its own; each backward then walks only that chunk's
  activations instead of the whole batch's, so D gradients cost about one training step.
  Small equal chunks go through ``torch.func.vmap`` over the chunks (one batched forward and
  backward instead of D small ones); chunks of 16 samples or more on the CPU, and models vmap
  cannot run, loop over chunks;
- ``"factors"``: the per-sample Gram from layer factors (``nio_fast.samplewise``: one
  forward, one backward), reduced to the chunks' Gram by their averaging weights, or, for
  linear and convolution weights where cheaper, their chunk gradients reduced straight from
  the chunks' rows. It is how ``sub_batches="samples"`` (D = N) runs by default, and
  what ``"auto"`` takes instead of per_chunk, when every parameter has a factor rule and the
  chunk loss is the mean of its samples' losses: on the CPU for chunks of fewer than 32 samples
  (instead of vmap and of the loop; the loop stays from 32), on a GPU where vmap cannot run
  (unequal chunks, a model vmap refuses) instead of the loop.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import ops
from .batching import call_model, chunk_bounds, equal_chunks, first_tensor, num_samples, slice_rows
from .model_state import couples_samples
from .recompute import recomputed_exact_gram

if TYPE_CHECKING:
    from ..distributed import DistributedRun
    from .scale_probes import ScaleProbes

logger = logging.getLogger("nio_fast")

LossFn = Callable[[Any, Any], torch.Tensor]

MODES = ("auto", "exact", "exact_recompute", "per_chunk", "factors")
SAMPLES = "samples"
"""``sub_batches="samples"``: one chunk per sample (D = N, overlap 0)."""

SubBatches = Union[int, str]


def chunks_for(sub_batches: SubBatches, batch_size: int) -> int:
    """D for a batch of ``batch_size``: the number given, or N for ``"samples"``."""
    return batch_size if sub_batches == SAMPLES else sub_batches


@dataclass
class GradCosineResult:
    """GradCosine of one batch, with the terms it is made of."""

    value: torch.Tensor
    """0-dim: mean pairwise cosine of the D chunk gradients, in [-1, 1]."""
    norms: torch.Tensor
    """[D]: the chunk gradient norms."""
    gram: torch.Tensor
    """[D, D]: inner products of the chunk gradients."""
    cosine: torch.Tensor
    """[D, D]: the cosine matrix."""
    chunks: list[tuple[int, int]]
    """The (start, end) sample range of each chunk."""
    mode: str
    """The mode that ran: ``"exact"``, ``"exact_recompute"``, ``"per_chunk"`` or ``"factors"``."""
    routes: Optional[dict[int, str]] = None
    """``"factors"`` only: parameter index -> how its part of the Gram was computed
    (``nio_fast.samplewise``); the public API reports it by parameter name."""

    @property
    def gnorm(self) -> torch.Tensor:
        """Mean chunk gradient norm (the quantity NIO bounds by gamma)."""
        return self.norms.mean()


def resolve_mode(mode: str, model: nn.Module, sub_batches: SubBatches = 2) -> str:
    """``"auto"`` never changes the value: with batch coupling ``"exact"``; without it
    ``"factors"`` for one chunk per sample, else ``"per_chunk"``."""
    if mode == "auto":
        if couples_samples(model):
            return "exact"
        return "factors" if sub_batches == SAMPLES else "per_chunk"
    if mode == "factors" and couples_samples(model):
        raise ValueError("mode: 'factors' needs a model without batch coupling; this one has BatchNorm layers "
                         "computing batch statistics (use mode='exact', or 'auto')")
    return mode


def scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: must return the mean loss of the batch as a scalar tensor, got {shape}")
    return loss.reshape(())


def checked_loss(loss: Any) -> torch.Tensor:
    loss = scalar_loss(loss)
    if not loss.requires_grad:
        raise ValueError("loss_fn: the loss it returned does not depend on the selected parameters "
                         "(no gradient can flow); check params and the model")
    return loss.reshape(())


def chunk_gradients(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                    params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]], mode: str,
                    create_graph: bool) -> list[list[Optional[torch.Tensor]]]:
    """``grads[k][p]``: gradient of chunk k's mean loss w.r.t. ``params[p]`` (None: unused)."""
    grads = []
    if mode == "exact":
        outputs = call_model(model, inputs)
        for k, (start, end) in enumerate(bounds):
            loss = checked_loss(loss_fn(slice_rows(outputs, start, end), slice_rows(targets, start, end)))
            grads.append(list(torch.autograd.grad(
                loss, params, create_graph=create_graph, allow_unused=True,
                retain_graph=create_graph or k < len(bounds) - 1)))
        return grads
    for start, end in bounds:
        outputs = call_model(model, slice_rows(inputs, start, end))
        loss = checked_loss(loss_fn(outputs, slice_rows(targets, start, end)))
        grads.append(list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)))
    return grads


# Per model, once: whether vmap over chunks is exact for it (True), or why not (a string).
_VMAP_VERDICT: "weakref.WeakKeyDictionary[nn.Module, Union[bool, str]]" = weakref.WeakKeyDictionary()

# Ops whose second derivative under vmap(grad(...)) is WRONG in PyTorch 2.13 (values agree, the
# gradient of GradCosine does not: 1e-2 relative for layer_norm, O(1) for instance_norm; see
# tests/test_vmap_safety.py). A model that calls any of them takes the loop over chunks.
_WRONG_UNDER_VMAP = {F.layer_norm, F.instance_norm, F.batch_norm,
                     torch.layer_norm, torch.instance_norm, torch.batch_norm, torch.native_layer_norm}


class _CallRecorder(TorchFunctionMode):
    """Notes which of ``watched`` a forward calls (functional uses included, not just modules)."""

    def __init__(self, watched: set):
        super().__init__()
        self.watched, self.seen = watched, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.watched:
            self.seen.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _split_leading(obj: Any, num_chunks: int) -> tuple[list, list, Any]:
    """Flatten ``obj``; tensors with a batch dimension become [D, N/D, ...] views (vmapped at 0)."""
    leaves, spec = tree_flatten(obj)
    dims = [0 if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None for leaf in leaves]
    split = [leaf.reshape(num_chunks, leaf.shape[0] // num_chunks, *leaf.shape[1:]) if dim == 0 else leaf
             for leaf, dim in zip(leaves, dims)]
    return split, dims, spec


# PyTorch warns when vmap runs an op without a batching rule one chunk at a time (an LSTM's
# cells): nothing a caller can act on, and still faster than the loop over chunks (embedding, a
# 32 -> 64 LSTM over 20 steps and a linear head; two-iteration initialize calls alternated over 5
# rounds on 2 CPU cores: the loop took 1.9x, 2.9x and 5.2x vmap's time at D = 4, 8, 16, N = 16, 64, 64).
_VMAP_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def vmapped_chunk_gradients(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                            params: Sequence[torch.Tensor], num_chunks: int,
                            create_graph: bool) -> list[torch.Tensor]:
    """Per-parameter [D, ...] gradients of equal chunks, by ``vmap(grad(chunk loss))``.

    The result stays in the outer autograd graph (it is what ``create_graph=True`` gives).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    selected = {names[id(p)]: p for p in params}
    input_leaves, input_dims, input_spec = _split_leading(inputs, num_chunks)
    target_leaves, target_dims, target_spec = _split_leading(targets, num_chunks)

    def chunk_loss(parameters, chunk_inputs, chunk_targets):
        outputs = call_model(model, tree_unflatten(chunk_inputs, input_spec), parameters)
        return scalar_loss(loss_fn(outputs, tree_unflatten(chunk_targets, target_spec)))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_VMAP_FALLBACK_WARNING)
        grads = torch.func.vmap(torch.func.grad(chunk_loss), in_dims=(None, input_dims, target_dims))(
            selected, input_leaves, target_leaves)
    stacked = [grads[names[id(p)]] for p in params]
    return stacked if create_graph else [g.detach() for g in stacked]


# On the CPU, chunks of at least this many samples run as a loop of ordinary forward and
# backward passes: vmap turns every convolution of the chunk gradients into a grouped one, which
# mkldnn runs 1.5-2x slower per FLOP. GroupNorm ResNet-20, batch 64, training steps timed between
# the calls: the loop takes 3.5 / 3.6 steps at 32 / 16 samples per chunk against vmap's 4.5 / 4.6,
# ties at 8 (5.0 / 4.9) and loses at 4 (6.9 / 4.7). A small MLP: 5.8 ms against 8.2 at 32.
_LOOP_FROM_CHUNK_SAMPLES = 16


def _on_cpu(inputs: Any) -> bool:
    first = first_tensor(inputs)
    return first is None or first.device.type == "cpu"


def _loop_is_faster(inputs: Any, bounds: Sequence[tuple[int, int]]) -> bool:
    return _on_cpu(inputs) and min(end - start for start, end in bounds) >= _LOOP_FROM_CHUNK_SAMPLES


def per_chunk_gradients(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                        params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]],
                        create_graph: bool, probes: Optional["ScaleProbes"] = None):
    """Chunk gradients without coupling: vmapped where the chunks allow it and are small (or
    on a GPU), else the loop.

    Returns either layout ``ops.gram`` takes: [D, ...] per parameter, or D lists of P.
    """
    verdict = _VMAP_VERDICT.get(model)
    if equal_chunks(bounds) and verdict in (None, True) and not _loop_is_faster(inputs, bounds):
        try:
            if verdict is True:
                return vmapped_chunk_gradients(model, inputs, targets, loss_fn, params, len(bounds), create_graph)
            recorder = _CallRecorder(_WRONG_UNDER_VMAP)
            with recorder:
                grads = vmapped_chunk_gradients(model, inputs, targets, loss_fn, params, len(bounds),
                                                create_graph)
            if not recorder.seen:
                _VMAP_VERDICT[model] = True
                return grads
            _VMAP_VERDICT[model] = f"calls {', '.join(sorted(recorder.seen))}, whose vmapped double backward is wrong"
        except Exception as error:  # an op without a batching rule, a data-dependent branch, ...
            _VMAP_VERDICT[model] = f"{type(error).__name__}: {error}"
        logger.info("vmap over chunks not used for %s (%s); looping over chunks instead",
                    type(model).__name__, _VMAP_VERDICT[model])
    with probes or contextlib.nullcontext():
        return chunk_gradients(model, inputs, targets, loss_fn, params, bounds, "per_chunk", create_graph)


def dense_gradient_table(grads: list[list[Optional[torch.Tensor]]],
                         params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Drop parameters no chunk reaches (they add nothing to the Gram); zero-fill the rest."""
    used = [p for p in range(len(params)) if any(row[p] is not None for row in grads)]
    if not used:
        raise ValueError("params: none of the selected parameters influences the loss")
    return [[row[p] if row[p] is not None else torch.zeros_like(params[p]) for p in used] for row in grads]


def evaluate_gradcosine(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                        params: Sequence[torch.Tensor], sub_batches: SubBatches, overlap: float, mode: str,
                        create_graph: bool, backend: str = "auto",
                        distributed: Optional["DistributedRun"] = None,
                        segments: Sequence[nn.Module] = (),
                        probes: Optional["ScaleProbes"] = None) -> GradCosineResult:
    """GradCosine of one batch; the caller has already put the model in NIO's modes.

    With ``distributed``, ``inputs`` is this rank's part of the global batch: it forms its
    D / W chunks and the Gram covers every rank's (``nio_fast.distributed``). ``probes``
    (NIO's iteration): entered around the forwards and backwards of the loop over chunks,
    ``"exact"`` and ``"factors"``, whose graphs it can route (``scale_probes``); vmap and
    ``"exact_recompute"`` leave every probe unused.
    """
    chunks_here = chunks_for(sub_batches, num_samples(inputs)) if distributed is None else distributed.local_chunks
    bounds = chunk_bounds(num_samples(inputs), chunks_here, overlap)
    requested, mode = mode, resolve_mode(mode, model, sub_batches)
    if segments and mode != "factors":
        raise ValueError(f"recompute: segments are recomputed by the factors mode only (sub_batches='samples' "
                         f"or mode='factors' on a model without batch coupling); this evaluation runs {mode!r}")
    if mode == "factors":
        with probes or contextlib.nullcontext():
            return _factored_gradcosine(model, inputs, targets, loss_fn, params, bounds, create_graph, segments,
                                        probes)
    if mode == "exact_recompute":
        if distributed is not None:
            raise ValueError("mode: 'exact_recompute' does not run under torch.distributed yet (use 'exact')")
        if create_graph:  # without a graph to keep, "exact" is already lean
            gram = recomputed_exact_gram(model, inputs, targets, loss_fn, params, bounds, backend)
            terms = ops.gradcosine_from_gram(gram)
            return GradCosineResult(terms.value, terms.norms, gram, terms.cosine, list(bounds), mode)
        mode = "exact"
    if requested == "auto" and mode == "per_chunk" and distributed is None and \
            _factors_replace_loop(model, inputs, bounds):
        with probes or contextlib.nullcontext():
            result = _factors_instead_of_loop(model, inputs, targets, loss_fn, params, bounds, create_graph, probes)
        if result is not None:
            return result
    if mode == "per_chunk":
        grads = per_chunk_gradients(model, inputs, targets, loss_fn, params, bounds, create_graph, probes)
    else:
        with probes or contextlib.nullcontext():
            grads = chunk_gradients(model, inputs, targets, loss_fn, params, bounds, mode, create_graph)
    if distributed is not None:
        gram = distributed.gram(grads)  # the sharded exchange; None entries count as zeros
        bounds = distributed.chunk_ranges(bounds)
    else:
        if isinstance(grads[0], list):
            grads = dense_gradient_table(grads, params)
        gram = ops.gram(grads, backend=backend)
    terms = ops.gradcosine_from_gram(gram)
    return GradCosineResult(terms.value, terms.norms, gram, terms.cosine, bounds, mode)


# Per model: whether "auto" may take "factors" where per_chunk would loop or vmap over chunks
# (True), or why not (a string). The loop costs one forward and backward per chunk, so its time
# grows with D (the small ViT: 3.1 training steps at D = 2, 5.8 at D = 16, benchmarks/results/
# iteration.md); "factors" is one forward and one backward whatever D. On the CPU it also beats
# vmap over chunks, whose convolutions mkldnn runs grouped: GroupNorm ResNet-20, N = 64, side by
# side (7 rounds), 0.81x vmap's time at D = 8 and 0.82x at D = 16 once its chunk sums of small maps
# took one grouped call (factors.chunk_sums; 0.95x and 1.09x before). On a GPU vmap stays.
_FACTORS_VERDICT: "weakref.WeakKeyDictionary[nn.Module, Union[bool, str]]" = weakref.WeakKeyDictionary()

# On the CPU, where the loop runs for chunks of 16+ samples, "factors" replaces it below this many:
# at D = 4, N = 64 (16 samples a chunk; benchmarks/interleaved.py MODEL 4 --mode factors) it took
# 0.90-0.97x the loop's time on the small ViT (three runs of 9-11 rounds) and 0.95-1.03x on the
# GroupNorm ResNet-20 (two runs); at 32 samples a chunk (D = 2) the loop is faster (3.4 against 4.1
# training steps on the ViT, 2.9 against 3.3 on the ResNet-20).
_LOOP_OVER_FACTORS_FROM_CHUNK_SAMPLES = 32


def _factors_replace_loop(model: nn.Module, inputs: Any, bounds: Sequence[tuple[int, int]]) -> bool:
    if _FACTORS_VERDICT.get(model, True) is not True:
        return False
    if _on_cpu(inputs):  # instead of vmap and of the loop, up to the chunk size where the loop wins
        return min(end - start for start, end in bounds) < _LOOP_OVER_FACTORS_FROM_CHUNK_SAMPLES
    vmap_will_run = equal_chunks(bounds) and _VMAP_VERDICT.get(model) in (None, True)
    return not vmap_will_run


def _factors_instead_of_loop(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                             params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]],
                             create_graph: bool, probes: Optional["ScaleProbes"] = None
                             ) -> Optional[GradCosineResult]:
    """"factors" for "auto", or None where it does not apply: the loss is not a per-sample mean, or
    some parameter has no factor rule (found after the forward and backward, before the autograd
    route's one backward per sample: per_chunk is exact for it at the cost of D chunk passes)."""
    from ..samplewise.engine import NoFactorRule
    try:
        return _factored_gradcosine(model, inputs, targets, loss_fn, params, bounds, create_graph,
                                    probes=probes, autograd_route=False)
    except NotASampleMean as error:
        _FACTORS_VERDICT[model] = str(error)
    except NoFactorRule as error:
        _FACTORS_VERDICT[model] = f"some parameters have no factor rule ({error})"
    if probes is not None:  # the attempt routed weights of a graph that is now dropped
        probes.forget()
    return None


class NotASampleMean(ValueError):
    """The loss of a chunk is not the mean of its samples' losses."""


def _factored_gradcosine(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                         params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]],
                         create_graph: bool, segments: Sequence[nn.Module] = (),
                         probes: Optional["ScaleProbes"] = None, autograd_route: bool = True) -> GradCosineResult:
    """``"factors"``: the Gram of the chunk gradients from layer factors (``nio_fast.samplewise``;
    per-sample gradients the engine forms anyway are averaged into chunks before their Gram, the
    rest reduced as W^T G W).

    A chunk's gradient is the mean of its samples' gradients only when the loss of a chunk is
    the mean of its samples' losses; that is checked on every model and loss the first time.
    """
    from ..samplewise import samplewise_gram
    num = num_samples(inputs)
    per_sample = len(bounds) == num and all(end - start == 1 for start, end in bounds)
    if not per_sample:
        with probes.pausing() if probes is not None else contextlib.nullcontext():
            _check_mean_loss(model, inputs, targets, loss_fn, bounds)
    sample = samplewise_gram(model, inputs, targets, loss_fn, params, create_graph,
                             chunks=None if per_sample else bounds, segments=segments, probes=probes,
                             autograd_route=autograd_route)
    gram = sample.gram
    terms = ops.gradcosine_from_gram(gram)
    return GradCosineResult(terms.value, terms.norms, gram, terms.cosine, list(bounds), "factors", sample.routes)


# Per model, the loss functions whose chunk loss was checked to be the mean of its samples'
# losses. Weak references, not ids: a new loss function may reuse a collected one's id. (A loss
# that cannot be weakly referenced is checked on every call.)
_MEAN_LOSS_CHECKED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _check_mean_loss(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                     bounds: Sequence[tuple[int, int]]) -> None:
    checked = _MEAN_LOSS_CHECKED.setdefault(model, weakref.WeakSet())
    try:
        if loss_fn in checked:
            return
    except TypeError:  # not weakly referenceable
        checked = None
    with torch.no_grad():
        outputs = call_model(model, inputs)
        samples = torch.stack([scalar_loss(loss_fn(slice_rows(outputs, i, i + 1), slice_rows(targets, i, i + 1)))
                               for i in range(num_samples(inputs))])
        for start, end in bounds:
            chunk = scalar_loss(loss_fn(slice_rows(outputs, start, end), slice_rows(targets, start, end)))
            if not torch.allclose(chunk, samples[start:end].mean(), rtol=1e-4, atol=1e-6):
                raise NotASampleMean(
                    "loss_fn: mode='factors' with sub-batches needs the loss of a chunk to be the mean of its "
                    f"samples' losses; chunk {start}:{end} gives {chunk.item():.6g}, the mean of its samples' "
                    f"{samples[start:end].mean().item():.6g} (use mode='per_chunk' or 'exact')")
    if checked is not None:
        checked.add(loss_fn)
