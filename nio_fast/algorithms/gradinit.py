"""GradInit: scales that make one inner optimizer step lower the loss most (GRADINIT.md)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .batching import BatchStream, call_model, concat_rows
from .gradcosine import LossFn, checked_loss
from .report import InitReport
from .scale_optimizer import CONSTRAINT, OBJECTIVE
from .scale_search import IterationOutcome, run_scale_search

INNER_OPTIMIZERS = ("sgd", "adam")


def gradient_norm(grads: Sequence[Optional[torch.Tensor]], inner: str) -> torch.Tensor:
    """||g||_1 for an Adam inner step (its step is sign(g)), ||g||_2 for SGD."""
    present = [g for g in grads if g is not None]
    if inner == "adam":
        return sum(g.abs().sum() for g in present)
    return torch.sqrt(sum(g.square().sum() for g in present))


def inner_step(grads: Sequence[Optional[torch.Tensor]], inner: str, eta: float,
               norm: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """The inner optimizer's first step, detached as in the published code."""
    if inner == "adam":
        return [None if g is None else eta * g.detach().sign() for g in grads]
    scale = eta / norm.detach()
    return [None if g is None else scale * g.detach() for g in grads]


def run_gradinit(model: nn.Module, stream: BatchStream, loss_fn: LossFn, names: Sequence[str],
                 params: Sequence[nn.Parameter], *, iters: int, gamma: Optional[float], lr: float,
                 min_scale: float, grad_clip: Optional[float], inner: str, eta: float, progress: bool,
                 settings: dict[str, Any]) -> InitReport:
    """The GradInit loop. Arguments are already validated by ``nio_fast.initialize``."""
    bound: dict[str, float] = {}

    def iteration(index: int) -> IterationOutcome:
        first, second, third = next(stream), next(stream), next(stream)
        joined_inputs = concat_rows([first[0], second[0]])  # S1 = A + B
        loss = checked_loss(loss_fn(call_model(model, joined_inputs), concat_rows([first[1], second[1]])))
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        norm = gradient_norm(grads, inner)
        if "gamma" not in bound:
            bound["gamma"] = float(norm.detach()) if gamma is None else gamma
        # One sync, to run only the branch that is needed (the objective branch costs a forward).
        if float(norm.detach()) > bound["gamma"]:
            objective = norm
            kind = CONSTRAINT
        else:
            steps = inner_step(grads, inner, eta, norm)
            stepped = {name: param if step is None else param - step
                       for name, param, step in zip(names, params, steps)}
            outputs = call_model(model, concat_rows([first[0], third[0]]), stepped)  # S2' = A + C
            objective = checked_loss(loss_fn(outputs, concat_rows([first[1], third[1]]))) / eta
            kind = OBJECTIVE
            del grads
        dj = torch.autograd.grad(objective, params, allow_unused=True)
        return IterationOutcome(dj, kind, {"loss": loss, "gnorm": norm, "objective": objective})

    report = run_scale_search("gradinit", model, names, params, iteration, iters=iters, lr=lr,
                              min_scale=min_scale, grad_clip=grad_clip, progress=progress, settings=settings)
    report.gamma = bound.get("gamma")
    return report
