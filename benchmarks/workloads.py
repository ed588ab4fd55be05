"""The calls the benchmarks time, shared by the suites and the scripts: a training step, the
double-backward floor and one sample-wise GradCosine evaluation (a module of its own, not a
test file, so that scripts imported from tests/ do not meet tests' modules of the same name)."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import nio_fast
from nio_fast.algorithms.model_state import nio_modes
from harness import synchronize
from networks import BasicBlock


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def training_step(model, batch):
    model.train()
    inputs, targets = batch
    torch.autograd.grad(F.cross_entropy(model(inputs), targets), trainable(model))


def step_timer(model, batch, seconds: list[float]) -> Callable[[], None]:
    """A pytest-benchmark ``setup``: one training step before each round (untimed by pytest-benchmark),
    its seconds appended to ``seconds``, so that '/ step' ratios divide medians taken side by side:
    on these shared cores a step's time drifts by 30% between minutes (the small ViT's step: 0.111 s
    in one sample-wise suite, 0.066 s in the next)."""
    def time_a_step() -> None:
        started = time.perf_counter()
        training_step(model, batch)
        synchronize()
        seconds.append(time.perf_counter() - started)
    return time_a_step


def double_backward_floor(model, batch, sub_batches=None):
    """What an exact NIO iteration that forms every parameter's gradient pays at least: one
    forward, one backward with graph and one double backward over the whole batch (D = 1), here
    of the simplest function of the gradient, ||g||^2, under NIO's modes (nio_fast's own
    normalisation and attention ops). Chunk gradients, their Gram and the scale update only add to
    it; NIO's iteration, whose linear and convolution weights' scale gradients come from probes
    (nio_fast.algorithms.scale_probes), skips their weight gradients and can come in under it.
    (A BatchNorm model in exact mode needs D such backward passes, so for it this is a floor no
    exact iteration reaches.)"""
    inputs, targets = batch
    params = trainable(model)
    with nio_modes(model, second_order_only=True):
        grads = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params, create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)


def samplewise_evaluation(model, batch, recompute=None):
    """Sample-wise GradCosine from layer factors and its gradient: one NIO-like evaluation."""
    result = nio_fast.gradcosine(model, batch, sub_batches="samples", mode="factors", create_graph=True,
                                 recompute=recompute)
    torch.autograd.grad(result.value, trainable(model), allow_unused=True)
    return result


def samplewise_nio_iteration(model, batch, recompute=None):
    """One sample-wise NIO iteration, what ``nio_fast.initialize(sub_batches="samples")`` runs per
    batch: the same Gram, but its double backward takes the scale gradients only (linear and
    convolution weights' from probes, nio_fast.algorithms.scale_probes, recomputed segments'
    included), then one scale update. It rescales the model's weights, as every NIO iteration does."""
    return nio_fast.initialize(model, batch, iters=1, sub_batches="samples", progress=False, recompute=recompute)


SEGMENT_KINDS = (BasicBlock, nn.TransformerEncoderLayer)
"""What the benchmarks recompute: the residual blocks of the ResNets, the ViT's encoder layers."""


def every_segment(model) -> list[type]:
    """recompute= for every residual block or encoder layer."""
    return [kind for kind in SEGMENT_KINDS if any(isinstance(module, kind) for module in model.modules())]


def _segment_modules(model) -> list[nn.Module]:
    """The model's residual blocks or encoder layers, in order."""
    return [module for module in model.modules() if isinstance(module, SEGMENT_KINDS)]


def first_segments(model, count: int) -> list[nn.Module]:
    """recompute= for the first ``count`` residual blocks or encoder layers."""
    return _segment_modules(model)[:count]


def first_half_of_the_segments(model) -> list[nn.Module]:
    """recompute= for the first half of the blocks or layers: the ResNets' early, high-resolution
    stages hold the most memory per FLOP; the ViT's layers are all alike."""
    blocks = _segment_modules(model)
    return blocks[:len(blocks) // 2]


def samplewise_recomputed_evaluation(model, batch):
    """The evaluation, every residual block or encoder layer recomputed instead of kept."""
    return samplewise_evaluation(model, batch, recompute=every_segment(model))


def samplewise_half_recomputed_evaluation(model, batch):
    """The evaluation, the first half of the blocks or layers recomputed and the rest kept."""
    return samplewise_evaluation(model, batch, recompute=first_half_of_the_segments(model))


def samplewise_recomputed_nio_iteration(model, batch):
    """NIO's iteration, every residual block or encoder layer recomputed instead of kept."""
    return samplewise_nio_iteration(model, batch, recompute=every_segment(model))


def samplewise_half_recomputed_nio_iteration(model, batch):
    """NIO's iteration, the first half of the blocks or layers recomputed and the rest kept."""
    return samplewise_nio_iteration(model, batch, recompute=first_half_of_the_segments(model))


SAMPLEWISE_CALLS = {
    "samplewise": samplewise_evaluation, "samplewise_recompute": samplewise_recomputed_evaluation,
    "samplewise_recompute_half": samplewise_half_recomputed_evaluation, "nio_samples": samplewise_nio_iteration,
    "nio_samples_recompute": samplewise_recomputed_nio_iteration,
    "nio_samples_recompute_half": samplewise_half_recomputed_nio_iteration,
}
"""The sample-wise calls of test_samplewise.py and peak_memory.py by name (vmap's lives there)."""
