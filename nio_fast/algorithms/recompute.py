"""``mode="exact_recompute"``: the exact mode's Gram with the memory of ONE chunk's graph.

The exact mode (whole-batch forward, one backward with graph per chunk) keeps all D chunk
gradient graphs alive until GradCosine is differentiated: with BatchNorm every chunk's backward
walks the whole batch, so its graph is as large as a training step's, and peak memory grows
with D. Here the Gram is an autograd Function:

- forward: the D chunk gradients WITHOUT graph (the forward's graph is freed after the last
  one), kept (D x P values) for the backward, and their Gram;
- backward (given dJ/dG): ``v_k = sum_j S[k, j] g_j`` with ``S = dJ/dG + dJ/dG^T``, then one
  recomputed whole-batch forward and, chunk by chunk, chunk k's gradient WITH graph and the
  gradient of ``<g_k, v_k>`` (v_k held constant): ``sum_k H_k v_k = dJ/dtheta``, since
  ``dJ/dg_k = v_k``. Chunk k's graph is freed before chunk k+1's is built.

Same value and the same gradient as "exact" (to rounding); costs one more forward, D more
backward passes without graph, and one pass over the forward graph per chunk instead of one in
all (a saved tensor cannot be cut from the forward graph: PyTorch re-attaches what a
saved-tensor hook returns to the original grad_fn). BatchNorm ResNet-20, batch 64 (2 CPU cores,
benchmarks/results/): 0.48x the reference's peak memory at D = 8, for 1.22x (D = 2) and 1.63x
(D = 8) its time. Randomness in the forward (dropout left on by a custom model,
stochastic depth) is replayed from the RNG state of the first forward, in NIO's modes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import ops
from .batching import call_model, slice_rows
from .model_state import nio_modes

LossFn = Callable[[Any, Any], torch.Tensor]


def _chunk_loss(outputs: Any, targets: Any, loss_fn: LossFn, start: int, end: int) -> torch.Tensor:
    from .gradcosine import checked_loss
    return checked_loss(loss_fn(slice_rows(outputs, start, end), slice_rows(targets, start, end)))


class _RecomputedChunkGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                bounds: Sequence[tuple[int, int]], backend: str, *params: torch.Tensor) -> torch.Tensor:
        devices = [p.device for p in params if p.device.type == "cuda"][:1]
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices)
        ctx.model, ctx.inputs, ctx.targets, ctx.loss_fn, ctx.bounds = model, inputs, targets, loss_fn, bounds
        from .gradcosine import chunk_gradients  # (gradcosine imports this module)
        with torch.enable_grad():  # the exact mode's chunk gradients, without graph
            rows = chunk_gradients(model, inputs, targets, loss_fn, params, bounds, "exact", create_graph=False)
        grads = [[torch.zeros_like(p) if g is None else g for g, p in zip(row, params)] for row in rows]
        ctx.grads, ctx.params = grads, params
        return ops.gram(grads, backend=backend)

    @staticmethod
    def backward(ctx, grad_gram: torch.Tensor):
        params, grads = ctx.params, ctx.grads
        sym = grad_gram + grad_gram.T
        # v_k = sum_j S[k, j] g_j (dJ/dg_k), per parameter as a [D, ...] tensor.
        directions = [torch.tensordot(sym.to(p.dtype), torch.stack([row[i] for row in grads]), dims=1)
                      for i, p in enumerate(params)]
        del ctx.grads, grads
        total = [torch.zeros_like(p) for p in params]
        cpu_state, cuda_states, devices = ctx.rng
        # The backward may run after the caller left NIO's modes (gradcosine(create_graph=True)
        # returns first): the recomputed forward re-enters them, as the first forward ran in them.
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), nio_modes(ctx.model):
            torch.set_rng_state(cpu_state)
            for device, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, device)
            outputs = call_model(ctx.model, ctx.inputs)
            for k, (start, end) in enumerate(ctx.bounds):
                loss = _chunk_loss(outputs, ctx.targets, ctx.loss_fn, start, end)
                chunk = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
                inner = sum((g * v[k]).sum() for g, v in zip(chunk, directions) if g is not None and g.requires_grad)
                if not isinstance(inner, torch.Tensor):
                    continue  # chunk k's gradient does not depend on the parameters (a linear model's bias)
                contribution = torch.autograd.grad(inner, params, allow_unused=True,
                                                   retain_graph=k < len(ctx.bounds) - 1)
                for p, piece in enumerate(contribution):
                    if piece is not None:
                        total[p] += piece
                del chunk, inner, contribution  # chunk k's graph goes here
        return (None,) * 6 + tuple(total)


def recomputed_exact_gram(model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                          params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]],
                          backend: str = "auto") -> torch.Tensor:
    """The [D, D] Gram of the exact mode's chunk gradients, differentiable w.r.t. ``params`` with
    the peak memory of one chunk's graph (module docstring)."""
    return _RecomputedChunkGram.apply(model, inputs, targets, loss_fn, list(bounds), backend, *params)
