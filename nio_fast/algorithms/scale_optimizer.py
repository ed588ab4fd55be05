"""The scale optimizer of NIO and GradInit (NIO.md, "One NIO iteration", steps 3-5).

One positive scale alpha_p per parameter tensor, theta_p = alpha_p * theta0_p. Adam on the
scales, with separate first moments and step counters for constraint and objective steps and
a shared second moment. All state lives in [P] tensors on the model's device and one step is a
few vector ops: no Python loop over tensors, no host synchronisation (the step kind may itself
be a device tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import ops

CONSTRAINT, OBJECTIVE = 0, 1


def scale_gradients(grads: Sequence[Optional[torch.Tensor]], initial: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_p = dJ/dalpha_p.

    The spec writes s_p = <dJ/dtheta_p, theta_p> * ||theta0_p|| / ||theta_p||. With
    theta_p = alpha_p theta0_p that is <dJ/dtheta_p, theta0_p>: the same number, without the
    0/0 the spec's form hits when a bias scale reaches its lower bound 0.
    """
    return ops.tensor_dots(grads, initial)


@dataclass
class ScaleStep:
    """A proposed update, applied by :meth:`ScaleAdam.commit` once it is known to be finite."""

    scales: torch.Tensor
    first_moments: torch.Tensor
    second_moment: torch.Tensor
    steps: torch.Tensor

    def state(self) -> torch.Tensor:
        """Everything the step leaves behind, as one vector (compared across ranks in debug mode)."""
        return torch.cat([self.scales, self.first_moments.reshape(-1), self.second_moment, self.steps])


class ScaleAdam:
    """Adam on one scale per tensor, with NIO's two step kinds.

    Args:
        lower_bounds: [P] lowest allowed scale of each tensor (0 for biases, else min_scale).
        active: [P] bool; inactive tensors (initial norm 0) keep scale 1 for the whole run.
        lr: learning rate. grad_clip: clip s_p to [-grad_clip, grad_clip] (None: no clipping).
    """

    def __init__(self, lower_bounds: torch.Tensor, active: torch.Tensor, lr: float,
                 grad_clip: Optional[float] = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.lower_bounds = lower_bounds
        self.active = active
        self.lr, self.grad_clip, self.betas, self.eps = lr, grad_clip, betas, eps
        num, dtype, device = lower_bounds.numel(), lower_bounds.dtype, lower_bounds.device
        self.scales = torch.ones(num, dtype=dtype, device=device)
        self.first_moments = torch.zeros(2, num, dtype=dtype, device=device)  # [constraint, objective]
        self.second_moment = torch.zeros(num, dtype=dtype, device=device)
        self.steps = torch.zeros(2, dtype=dtype, device=device)  # t_c, t_o

    def propose(self, grads: torch.Tensor, kind: Union[int, torch.Tensor]) -> ScaleStep:
        """The state after one step with scale gradients ``grads`` [P] of step ``kind``.

        ``kind`` is CONSTRAINT or OBJECTIVE, a Python int or a 0-dim device tensor.
        """
        beta1, beta2 = self.betas
        grads = grads.to(self.scales.dtype)
        if self.grad_clip is not None:
            grads = grads.clamp(-self.grad_clip, self.grad_clip)
        kind = torch.as_tensor(kind, device=self.scales.device)
        this_kind = torch.arange(2, device=self.scales.device) == kind  # [2] one-hot
        first = torch.where(this_kind[:, None], beta1 * self.first_moments + (1 - beta1) * grads,
                            self.first_moments)
        second = beta2 * self.second_moment + (1 - beta2) * grads.square()
        steps = self.steps + this_kind.to(self.steps.dtype)
        step_of_kind = steps[kind]
        first_hat = first[kind] / (1 - beta1 ** step_of_kind)
        second_hat = second / (1 - beta2 ** steps.sum())
        updated = torch.maximum(self.scales - self.lr * first_hat / (second_hat.sqrt() + self.eps),
                                self.lower_bounds)
        scales = torch.where(self.active, updated, self.scales)
        return ScaleStep(scales, first, second, steps)

    def commit(self, step: ScaleStep) -> None:
        self.scales, self.first_moments = step.scales, step.first_moments
        self.second_moment, self.steps = step.second_moment, step.steps


def lower_bounds_for(names: Sequence[str], min_scale: float, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """0 for tensors whose name ends in "bias", ``min_scale`` for the rest (NIO.md groups)."""
    return torch.tensor([0.0 if name.endswith("bias") else min_scale for name in names],
                        dtype=dtype, device=device)


@torch.no_grad()
def apply_scales(params: Sequence[torch.Tensor], initial: Sequence[torch.Tensor], scales: torch.Tensor) -> None:
    """theta_p <- alpha_p * theta0_p, in place (the Parameter objects stay the same)."""
    for param, start, scale in zip(params, initial, scales.to(params[0].device).unbind()):
        param.copy_(start * scale.to(start.dtype))
