"""The public entry points: ``gradcosine`` and ``initialize``.

Everything a caller can get wrong is checked here, before the model is touched.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .algorithms.batching import BatchStream, num_samples, to_device, unpack_batch
from .algorithms.gradcosine import MODES, SAMPLES, GradCosineResult, LossFn, evaluate_gradcosine
from .algorithms.gradinit import INNER_OPTIMIZERS, run_gradinit
from .algorithms.model_state import nio_modes
from .algorithms.nio import OBJECTIVES, run_nio
from .algorithms.report import InitReport
from .availability import BACKEND_NAMES
from .cpu_memory import cached_cpu_memory
from .samplewise.segments import resolve_segments

METHODS = ("nio", "gradinit")

ParamsArg = Optional[Iterable[Union[str, torch.Tensor]]]
RecomputeArg = Optional[Union[nn.Module, type, Iterable[Union[nn.Module, type]]]]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_choice(name: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")


def _require_number(name: str, value: Any, *, positive: bool = False, non_negative: bool = False,
                    allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    _require(not positive or value > 0, f"{name}: must be > 0, got {value!r}")
    _require(not non_negative or value >= 0, f"{name}: must be >= 0, got {value!r}")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def select_parameters(model: nn.Module, params: ParamsArg) -> tuple[list[str], list[nn.Parameter]]:
    """The (name, tensor) pairs to scale: every trainable parameter, or the ones ``params`` names.

    Shared (tied) parameters appear once, under their first name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        _require(bool(chosen), "model: has no trainable parameters (every requires_grad is False)")
    else:
        if isinstance(params, (str, torch.Tensor)):
            raise TypeError("params: expected an iterable of parameter names or tensors, not a single one")
        by_alias = dict(model.named_parameters(remove_duplicate=False))
        first_name = {id(p): name for name, p in named}
        chosen, seen = [], set()
        for item in params:
            if isinstance(item, str):
                _require(item in by_alias, f"params: the model has no parameter named {item!r}")
                tensor = by_alias[item]
            elif isinstance(item, torch.Tensor):
                _require(id(item) in first_name, "params: a tensor given is not a parameter of the model")
                tensor = item
            else:
                raise TypeError(f"params: expected parameter names or tensors, got {type(item).__name__}")
            _require(tensor.requires_grad, f"params: {first_name[id(tensor)]!r} does not require grad")
            if id(tensor) not in seen:
                seen.add(id(tensor))
                chosen.append((first_name[id(tensor)], tensor))
        _require(bool(chosen), "params: selects no parameters")
    devices = {p.device for _, p in chosen}
    _require(len(devices) == 1, f"model: the selected parameters lie on several devices ({devices}); "
                                "nio_fast needs them on one")
    for name, p in chosen:
        _require(p.is_floating_point(), f"params: {name!r} is not floating point ({p.dtype})")
    return [name for name, _ in chosen], [p for _, p in chosen]


def _check_sampling(sub_batches: Any, overlap: Any, mode: Any, group: Any = None) -> None:
    if isinstance(sub_batches, str):
        _require(sub_batches == SAMPLES, f"sub_batches: expected an integer >= 2 or {SAMPLES!r}, got {sub_batches!r}")
        _require(group is None, "sub_batches: 'samples' is not supported in distributed runs yet; "
                                "give a multiple of the world size")
    else:
        _require_int("sub_batches", sub_batches, 2)
    _require_number("overlap", overlap)
    _require(0 <= overlap < 1, f"overlap: must lie in [0, 1), got {overlap!r}")
    _require(sub_batches != SAMPLES or overlap == 0,
             f"overlap: must be 0 with sub_batches='samples' (one chunk per sample), got {overlap!r}")
    _require_choice("mode", mode, MODES)
    _require(group is None or mode != "exact_recompute",
             "mode: 'exact_recompute' is not supported in distributed runs yet (use 'exact')")


def _check_recompute(model: nn.Module, recompute: Any, sub_batches: Any, mode: Any, group: Any) -> list[nn.Module]:
    segments = resolve_segments(model, recompute)
    _require(not segments or group is None, "recompute: not supported in distributed runs yet")
    _require(not segments or sub_batches == SAMPLES or mode == "factors",
             f"recompute: segments are recomputed by the factors mode only (sub_batches='samples' or "
             f"mode='factors'); got sub_batches={sub_batches!r}, mode={mode!r}")
    return segments


def _check_backend(backend: Any) -> None:
    _require_choice("backend", backend, ("auto",) + BACKEND_NAMES)


def _check_batch_size(inputs: Any, chunks: Union[int, str], arg: str, what: Optional[str] = None) -> int:
    size = num_samples(inputs, arg)
    if chunks == SAMPLES:
        _require(size >= 2, f"{arg}: has {size} sample(s); sub_batches='samples' needs at least 2")
        return size
    _require(size >= chunks, f"{arg}: has {size} samples, fewer than {what or 'sub_batches'}={chunks}")
    return size


def _check_local_batch_size(inputs: Any, group: Any, sub_batches: int, arg: str) -> int:
    """Every chunk non-empty; in a distributed run this rank forms sub_batches / world size of them."""
    if group is None:
        return _check_batch_size(inputs, sub_batches, arg)
    return _check_batch_size(inputs, distributed.local_chunks(group, sub_batches), f"{arg} (this rank's part)",
                             "sub_batches / world size")


def gradcosine(model: nn.Module, batch: Any, loss_fn: Optional[LossFn] = None, *,
               sub_batches: Union[int, str] = 2,
               overlap: float = 0.0, params: ParamsArg = None, mode: str = "auto",
               create_graph: bool = False, backend: str = "auto", process_group: Any = None,
               recompute: RecomputeArg = None) -> GradCosineResult:
    """GradCosine of ``model`` on one batch: the mean pairwise cosine of sub-batch gradients.

    Args:
        model: any ``nn.Module``; its modes and buffers are left as they were.
        batch: ``(inputs, targets)``; inputs a tensor, a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``); samples along dimension 0.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss (default: cross-entropy).
        sub_batches: D >= 2 contiguous chunks, or ``"samples"``: one chunk per sample
            (sample-wise GradCosine, D = N). overlap: r in [0, 1), NIO.md step 3 (0 for samples).
        params: names or tensors to take gradients of (default: every trainable parameter).
        mode: ``"exact"`` (whole-batch forward, one backward per chunk), ``"exact_recompute"``
            (the same with the memory of one chunk's graph, for one more forward and D backward
            passes: for BatchNorm models whose D chunk graphs do not fit), ``"per_chunk"`` (each
            chunk alone), ``"factors"`` (the per-sample Gram from layer inputs and output
            gradients, one backward in all; ``nio_fast.samplewise``; no batch coupling), or
            ``"auto"``: ``"exact"`` when a BatchNorm couples samples, else ``"factors"`` for
            ``"samples"``, and ``"per_chunk"`` otherwise, except that ``"factors"`` replaces
            per_chunk's loop over chunks (unequal chunks, or a model vmap cannot run) when it
            applies. Every mode gives the same value where it applies; ``result.mode`` says
            which ran and ``result.routes`` how ``"factors"`` handled each tensor.
        create_graph: keep the graph so the result can be differentiated. A derivative of that
            gradient (a third derivative) goes through the sub-batch Gram exactly; backwards that
            are first order only raise by name instead of dropping their terms (the ``"factors"``
            engine's, the distributed Gram's: ``nio_fast.ops.first_order``).
        backend: Gram backend, see :func:`nio_fast.ops.gram`.
        process_group: a ``torch.distributed`` process group; None uses the default group when
            torch.distributed is initialised (a DDP model's own group when it has one). Then
            every rank calls this with its own part of the global batch (``nio_fast.distributed``):
            ``sub_batches`` must be a multiple of the world size, ``overlap`` 0, and the result
            (the Gram of all D chunks, ``chunks`` as ranges of the global batch) is the same on
            every rank. Every rank of the group must call it (to measure on one rank alone, pass
            a group of that rank only). With ``create_graph=True`` every rank must differentiate
            the result (its backward exchanges data), and gets its own chunks' part of the gradient.
        recompute: submodules (modules, or module classes standing for their outermost instances)
            whose forward, backward and Gram parts are recomputed instead of kept while the result
            is differentiated: the same value and gradients with only each one's input and output
            gradient alive (``nio_fast.samplewise.segments``), for about three more forwards and
            two more backwards of them. The ``"factors"`` mode only (``sub_batches="samples"``, or
            sub-batches with ``mode="factors"``); a recomputed module's parameters must be its own,
            used once per forward. None: none. Name several, from the input side: the first
            one's recomputation runs as the double backward starts, beside everything kept, so
            one alone can raise the peak (a GroupNorm ResNet-18 at N = 64: 2.5x a training step's
            allocator peak with its first block recomputed, 2.35x with none, 2.2x, 2.0x and 1.8x
            with the first two, three and four, 1.5x with all eight).

    Returns:
        :class:`GradCosineResult` with ``value``, ``norms``, ``gram``, ``cosine``, ``chunks``.
    """
    group = distributed.resolve_group(process_group, model)
    model = distributed.unwrap(model)
    with distributed.agreement(group) as notes:
        names, tensors = select_parameters(model, params)
        _check_sampling(sub_batches, overlap, mode, group)
        _check_backend(backend)
        segments = _check_recompute(model, recompute, sub_batches, mode, group)
        distributed.check_chunking(group, sub_batches, overlap)
        inputs, targets = to_device(unpack_batch(batch), tensors[0].device)
        notes.batch_size(_check_local_batch_size(inputs, group, sub_batches, "batch"))
        notes.settings(dict(sub_batches=sub_batches, overlap=overlap, mode=mode, create_graph=create_graph,
                            backend=backend), names, tensors)
    loss_fn = loss_fn or F.cross_entropy
    if group is None:
        with nio_modes(model):
            result = evaluate_gradcosine(model, inputs, targets, loss_fn, tensors, sub_batches, overlap, mode,
                                         create_graph, backend, segments=segments)
        if result.routes is not None:  # by name for the caller
            result.routes = {names[index]: route for index, route in result.routes.items()}
        return result
    run = distributed.DistributedRun(group, tensors, sub_batches, notes.sizes)
    with nio_modes(model), run.step(distributed.GRADCOSINE_PLAN):
        result = evaluate_gradcosine(model, inputs, targets, loss_fn, tensors, sub_batches, overlap, mode,
                                     create_graph, backend, distributed=run)
    run.check_gradcosine()
    return result


def initialize(model: nn.Module, data: Any, loss_fn: Optional[LossFn] = None, *, method: str = "nio",
               iters: int = 100, sub_batches: Union[int, str] = 2, overlap: float = 0.0,
               gamma: Optional[float] = None,
               lr: float = 0.05, min_scale: float = 0.01, grad_clip: Optional[float] = 1.0,
               objective: str = "gc", mu: float = 1.0, mode: str = "auto", progress: bool = True,
               seed: Optional[int] = None, inner: str = "sgd", eta: float = 0.1, params: ParamsArg = None,
               backend: str = "auto", process_group: Any = None, recompute: RecomputeArg = None) -> InitReport:
    """Rescale every parameter tensor of ``model`` in place for a better start; return a report.

    ``method="nio"`` learns one positive scale per tensor that maximises GradCosine while
    the mean sub-batch gradient norm stays under ``gamma`` (NIO.md); ``method="gradinit"``
    chooses the scales so that one ``inner`` optimizer step of size ``eta`` lowers the loss
    most (GRADINIT.md). The Parameter objects stay the same (an optimizer built earlier still
    works); modes, buffers, flags and ``.grad`` are as before; each tensor changes by one
    positive factor. If anything raises, the model is restored exactly and the exception
    propagates. A non-finite value stops the run with a warning, keeping the last finite state.
    Freed CPU tensor memory is kept and reused for the run (``nio_fast.cpu_memory``;
    ``NIO_FAST_CPU_CACHE=0`` turns that off).

    Args:
        model: the network. data: an iterable of ``(inputs, targets)`` batches (cycled) or one
            batch. loss_fn: ``loss_fn(outputs, targets)`` -> mean loss (default cross-entropy).
        method: ``"nio"`` or ``"gradinit"``. iters: iterations (>= 1).
        sub_batches, overlap, mode: how each batch is split (see :func:`gradcosine`);
            ``sub_batches="samples"`` is sample-wise NIO.
        gamma: gradient-norm bound; None measures it on the first batch (the mean sub-batch
            norm for NIO, the inner optimizer's gradient norm for GradInit).
        lr: scale-optimizer (Adam) learning rate. min_scale: lower bound of non-bias scales.
        grad_clip: clip each scale gradient to [-grad_clip, grad_clip]; None: no clipping.
        objective: NIO's ``"gc"``, ``"gc_gn"`` or ``"gc_gn_sqrt"``; mu weighs their norm term.
        progress: show a progress bar. seed: run under this RNG seed (global RNG untouched).
        inner, eta: GradInit's inner optimizer (``"sgd"`` or ``"adam"``) and its step size.
        params: names or tensors to scale (default: every trainable parameter).
        backend: Gram backend, see :func:`nio_fast.ops.gram`.
        process_group: a ``torch.distributed`` process group; None uses the default group when
            torch.distributed is initialised (a DDP model's own group when it has one); a group
            of one rank runs alone. In a distributed run every rank calls ``initialize`` with the
            same arguments, the same initial parameters (DDP ensures it) and ``data`` yielding
            its own part of each global batch; ``sub_batches`` must be a multiple of the world
            size and ``overlap`` 0; NIO only. Every rank applies the same scales and returns the
            same report; only rank 0 shows progress. See ``nio_fast.distributed``.
        recompute: submodules recomputed in each iteration instead of kept (sample-wise NIO's
            memory at about a training step's; see :func:`gradcosine`). NIO with the
            ``"factors"`` mode only.
    """
    group = distributed.resolve_group(process_group, model)
    model = distributed.unwrap(model)  # a DDP model runs through its module (nio_fast.distributed)
    with contextlib.ExitStack() as run_context:
        run_context.enter_context(cached_cpu_memory())  # freed CPU tensor memory reused across iterations
        with distributed.agreement(group) as notes:
            names, tensors, settings = _check_initialize_arguments(
                model, params, method=method, iters=iters, sub_batches=sub_batches, overlap=overlap, gamma=gamma,
                lr=lr, min_scale=min_scale, grad_clip=grad_clip, objective=objective, mu=mu, mode=mode, seed=seed,
                inner=inner, eta=eta, backend=backend, loss_fn=loss_fn, group=group)
            _require(recompute is None or method == "nio", "recompute: applies to method='nio' only")
            segments = _check_recompute(model, recompute, sub_batches, mode, group)
            if segments:
                settings["recompute"] = len(segments)
            notes.settings(settings, names, tensors)
            device = tensors[0].device
            if seed is not None:  # run under this seed, the caller's RNG untouched
                run_context.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
                torch.manual_seed(seed)
            stream = BatchStream(data, device)
            first = stream.peek()[0]
            if method == "nio":
                notes.batch_size(_check_local_batch_size(first, group, sub_batches, "data (its first batch)"))
            else:
                _check_batch_size(first, 1, "data (its first batch)")
        common = dict(iters=iters, gamma=gamma, lr=lr, min_scale=min_scale, grad_clip=grad_clip,
                      progress=progress and distributed.is_main_rank(group), settings=settings)
        if method == "nio":
            run = distributed.DistributedRun(group, tensors, sub_batches) if group is not None else None
            return run_nio(model, stream, loss_fn or F.cross_entropy, names, tensors, sub_batches=sub_batches,
                           overlap=overlap, objective=objective, mu=mu, mode=mode, backend=backend,
                           distributed=run, segments=segments, **common)
        return run_gradinit(model, stream, loss_fn or F.cross_entropy, names, tensors, inner=inner, eta=eta,
                            **common)


def _check_initialize_arguments(model: nn.Module, params: ParamsArg, *, method: str, iters: int,
                                sub_batches: Union[int, str], overlap: float, gamma: Optional[float], lr: float,
                                min_scale: float, grad_clip: Optional[float], objective: str, mu: float,
                                mode: str, seed: Optional[int], inner: str, eta: float, backend: str,
                                loss_fn: Any, group: Any) -> tuple[list[str], list[nn.Parameter], dict]:
    """Every check of ``initialize``'s arguments; returns the selected tensors and the settings."""
    names, tensors = select_parameters(model, params)
    _require_choice("method", method, METHODS)
    _require_int("iters", iters, 1)
    _check_sampling(sub_batches, overlap, mode, group)
    _require_number("gamma", gamma, positive=True, allow_none=True)
    _require_number("lr", lr, positive=True)
    _require_number("min_scale", min_scale, non_negative=True)
    _require_number("grad_clip", grad_clip, positive=True, allow_none=True)
    _require_choice("objective", objective, OBJECTIVES)
    _require_number("mu", mu, non_negative=True)
    _require_choice("inner", inner, INNER_OPTIMIZERS)
    _require_number("eta", eta, positive=True)
    _check_backend(backend)
    if seed is not None:
        _require_int("seed", seed, 0)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")

    if group is not None:
        _require(method == "nio", f"method: distributed runs support 'nio' only, got {method!r}")
        distributed.check_chunking(group, sub_batches, overlap)
    settings = dict(method=method, iters=iters, sub_batches=sub_batches, overlap=overlap, gamma=gamma, lr=lr,
                    min_scale=min_scale, grad_clip=grad_clip, objective=objective, mu=mu, mode=mode,
                    seed=seed, inner=inner, eta=eta, backend=backend, num_tensors=len(tensors))
    if group is not None:
        settings["world_size"] = torch.distributed.get_world_size(group)
    return names, tensors, settings
