"""NIO: scales that maximise GradCosine under a gradient-norm bound (NIO.md, "One NIO iteration")."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn

from .batching import BatchStream, num_samples
from .gradcosine import LossFn, SubBatches, chunks_for, evaluate_gradcosine
from .report import InitReport
from .scale_optimizer import CONSTRAINT, OBJECTIVE
from .scale_probes import PROBED_DTYPES, ScaleProbes
from .scale_search import IterationOutcome, logger, run_scale_search, scale_state_dtype

if TYPE_CHECKING:
    from ..distributed import DistributedRun

OBJECTIVES = ("gc", "gc_gn", "gc_gn_sqrt")


def nio_objective(objective: str, gradcosine: torch.Tensor, norms: torch.Tensor, mu: float) -> torch.Tensor:
    """J of an objective step: -GradCosine, minus mu times the sum of squared / plain norms."""
    if objective == "gc":
        return -gradcosine
    if objective == "gc_gn":
        return -gradcosine - mu * norms.square().sum()
    return -gradcosine - mu * norms.sum()


def run_nio(model: nn.Module, stream: BatchStream, loss_fn: LossFn, names: Sequence[str],
            params: Sequence[nn.Parameter], *, iters: int, sub_batches: SubBatches, overlap: float,
            gamma: Optional[float], lr: float, min_scale: float, grad_clip: Optional[float],
            objective: str, mu: float, mode: str, progress: bool, backend: str,
            settings: dict[str, Any], distributed: Optional["DistributedRun"] = None,
            segments: Sequence[nn.Module] = ()) -> InitReport:
    """The NIO loop. Arguments are already validated by ``nio_fast.initialize``.

    With ``distributed``, ``stream`` yields this rank's part of each global batch.
    """
    bound: dict[str, torch.Tensor] = {}
    chunks_here = chunks_for(sub_batches, 2) if distributed is None else distributed.local_chunks
    # Tensors whose scale gradient may come from a probe (scale_probes): those whose scale stays
    # positive, in float32 / float64 (a probe's dot products are taken in the tensor's dtype).
    probe_candidates = [min_scale > 0 and not name.endswith("bias") and param.dtype in PROBED_DTYPES
                        for name, param in zip(names, params)]

    def iteration(index: int) -> IterationOutcome:
        inputs, targets = next(stream)
        if num_samples(inputs) < chunks_here:
            # A short last batch of a DataLoader: chunks would be empty. Take the next one.
            logger.debug("skipping a batch of %d samples (< %d chunks)", num_samples(inputs), chunks_here)
            inputs, targets = next(stream)
        probes = ScaleProbes(params, probe_candidates) if any(probe_candidates) else None
        result = evaluate_gradcosine(model, inputs, targets, loss_fn, params, sub_batches, overlap,
                                     mode, create_graph=True, backend=backend, distributed=distributed,
                                     segments=segments, probes=probes)
        gnorm = result.gnorm
        if "gamma" not in bound:  # gamma=None: the mean chunk norm on the first batch
            bound["gamma"] = gnorm.detach() if gamma is None else torch.as_tensor(gamma, device=gnorm.device)
        constraint = gnorm > bound["gamma"]
        objective_value = torch.where(constraint, gnorm, nio_objective(objective, result.value, result.norms, mu))
        kind = torch.where(constraint, CONSTRAINT, OBJECTIVE)
        stats = {"gradcosine": result.value, "gnorm": gnorm, "objective": objective_value}
        if probes is None:
            return IterationOutcome(torch.autograd.grad(objective_value, params, allow_unused=True), kind, stats)
        grads = torch.autograd.grad(objective_value, probes.targets(), allow_unused=True)
        grads, projected = probes.split(grads, scale_state_dtype(params))
        return IterationOutcome(grads, kind, stats, projected)

    report = run_scale_search("nio", model, names, params, iteration, iters=iters, lr=lr,
                              min_scale=min_scale, grad_clip=grad_clip, progress=progress, settings=settings,
                              distributed=distributed)
    if "gamma" in bound:
        report.gamma = float(bound["gamma"])
    return report
