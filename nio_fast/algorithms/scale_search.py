"""The loop NIO and GradInit share: scale gradients in, guarded scale updates out.

Each method supplies one function per iteration that returns dJ/dtheta and the step kind.
This loop turns them into scale updates, refuses anything non-finite (the model keeps its
last finite state), records the history with ONE host synchronisation per iteration, and
restores the model exactly when anything raises.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .model_state import ParameterSnapshot, nio_modes
from .report import InitReport
from .scale_optimizer import ScaleAdam, apply_scales, lower_bounds_for, scale_gradients

if TYPE_CHECKING:
    from ..distributed import DistributedRun

logger = logging.getLogger("nio_fast")


@dataclass
class IterationOutcome:
    """What one method iteration hands the loop."""

    grads: Sequence[Optional[torch.Tensor]]
    """dJ/dtheta_p for every selected parameter (None where J does not depend on it)."""
    kind: Union[int, torch.Tensor]
    """CONSTRAINT or OBJECTIVE (an int, or a 0-dim device tensor: no sync needed)."""
    stats: dict[str, torch.Tensor]
    """0-dim tensors recorded in the history; each must be finite for the step to apply."""
    projected: Optional[torch.Tensor] = None
    """[P] <dJ/dtheta_p, theta_p> of the tensors whose ``grads`` entry a probe took instead
    (``scale_probes``), 0 elsewhere; None when there are none."""


IterationFn = Callable[[int], IterationOutcome]


def scale_state_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 scale state (P numbers: free), except where the device has no fp64."""
    return torch.float32 if params[0].device.type == "mps" else torch.float64


def _scale_gradients(iteration: IterationFn, index: int, initial: Sequence[torch.Tensor], scales: torch.Tensor,
                     distributed: Optional["DistributedRun"]) -> tuple[IterationOutcome, torch.Tensor,
                                                                       Optional[torch.Tensor]]:
    """One iteration's outcome and its scale gradients s (NIO.md step 3).

    Distributed: each rank's s holds its own chunks' part, so s is summed over ranks, with the
    [W] failure flags of the iteration (also returned) riding along; a rank that raises in here
    still takes part in the iteration's remaining collectives.
    """
    def local(outcome: IterationOutcome) -> torch.Tensor:
        s = scale_gradients(outcome.grads, initial)
        if outcome.projected is not None:  # <dJ/dtheta_p, theta_p> / alpha_p = <dJ/dtheta_p, theta0_p>
            projected = outcome.projected.to(scales)
            # Only probed tensors have a nonzero part, and their scales stay >= min_scale > 0; a bias
            # whose scale reached its bound 0 must add 0 here, not 0 / 0.
            s = s + torch.where(projected != 0, projected / scales, torch.zeros_like(projected)).to(s)
        return s

    if distributed is None:
        outcome = iteration(index)
        return outcome, local(outcome), None
    with distributed.nio_step():
        outcome = iteration(index)
        grads, flags = distributed.reduce_scale_gradients(local(outcome))
    return outcome, grads, flags


def run_scale_search(method: str, model: nn.Module, names: Sequence[str], params: Sequence[nn.Parameter],
                     iteration: IterationFn, *, iters: int,
                     lr: float, min_scale: float, grad_clip: Optional[float], progress: bool,
                     settings: dict, distributed: Optional["DistributedRun"] = None) -> InitReport:
    """Run ``iters`` iterations of ``iteration`` and return the report.

    With ``distributed`` every rank runs this loop in step: the scale gradients are summed over
    ranks, so every rank applies the same update; a rank that raises makes every rank raise
    (``nio_fast.distributed``).
    """
    started = time.perf_counter()
    device = params[0].device
    dtype = scale_state_dtype(params)
    snapshot = ParameterSnapshot(model, params)
    initial = snapshot.initial
    initial_norms = torch.stack([t.detach().double().norm() for t in initial]).to(dtype)
    optimizer = ScaleAdam(lower_bounds_for(names, min_scale, dtype, device), initial_norms != 0,
                          lr=lr, grad_clip=grad_clip)
    report = InitReport(method=method, settings=settings)
    bar = tqdm(total=iters, desc=f"nio_fast {method}", disable=not progress, leave=False)
    try:
        with nio_modes(model, second_order_only=True):  # NIO and GradInit: gradients of gradients, no more
            for index in range(iters):
                outcome, grads, flags = _scale_gradients(iteration, index, initial, optimizer.scales, distributed)
                proposal = optimizer.propose(grads, outcome.kind)
                del outcome.grads  # frees the iteration's graphs before the next forward
                names_in_order = list(outcome.stats)
                values = torch.stack([outcome.stats[key].detach().to(dtype) for key in names_in_order]
                                     + [torch.as_tensor(outcome.kind, device=device).to(dtype)])
                finite = torch.isfinite(values).all() & torch.isfinite(proposal.scales).all()
                flag_part = [flags.to(dtype)] if flags is not None else []  # distributed: [W] failure flags
                numbers = torch.cat([values, finite.to(dtype)[None], *flag_part]).tolist()  # the one host sync
                if distributed is not None:  # another rank's failure raises here; debug mode compares ranks
                    numbers = distributed.check_iteration(index, numbers, proposal.state())
                record = dict(zip(names_in_order, numbers))
                record["constraint"] = numbers[-2] == 0  # CONSTRAINT == 0
                if not numbers[-1]:
                    report.stopped_early = True
                    report.stop_reason = (f"non-finite value at iteration {index} "
                                          f"({', '.join(f'{k}={v}' for k, v in record.items())}); "
                                          "kept the last finite scales")
                    warnings.warn(f"nio_fast {method}: {report.stop_reason}", RuntimeWarning, stacklevel=3)
                    break
                optimizer.commit(proposal)
                apply_scales(params, initial, optimizer.scales)
                report.history.append(record)
                report.iterations += 1
                bar.update(1)
                bar.set_postfix({key: f"{value:.4g}" for key, value in record.items() if key != "constraint"})
        snapshot.restore_buffers()
    except BaseException:
        snapshot.restore()
        raise
    finally:
        bar.close()
    report.scales = dict(zip(names, optimizer.scales.tolist()))
    report.seconds = time.perf_counter() - started
    if distributed is not None:  # every rank returns the same report
        report.distributed = distributed.summary()
        report.seconds = distributed.agree_on_seconds(report.seconds)
    logger.info("%s: %d iterations in %.2f s%s", method, report.iterations, report.seconds,
                f" (stopped early: {report.stop_reason})" if report.stopped_early else "")
    return report
