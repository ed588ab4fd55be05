"""Deep plain ReLU MLP (20 Linear layers, width 64) on the flat digits, trained with plain SGD.

``python -m benchmarks.quality.deep_mlp [--quick] [--seeds N] [--out DIR]``

The FMP paper's MNIST protocol scaled to the digits: SGD lr 0.01 without momentum, batch 128,
30 epochs (330 steps). GradInit and NIO rescale the Kaiming draw (the usual starting point of a
ReLU net); one extra NIO row rescales the PyTorch default draw instead, to see whether NIO can
repair a vanishing start.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

from nio_fast.init import fractional_moment_
from nio_fast.models import digits_mlp

from benchmarks.quality.common import Experiment, Method, main

FMP_S = 0.8  # the published choice for ReLU nets (FMP.md)
EPOCHS = 30
STEPS_PER_EPOCH = 11  # 1347 training digits in batches of 128, the last one short


def kaiming_normal(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's kaiming_normal_ (fan_in, relu) on every Linear weight, biases zero."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
            nn.init.zeros_(module.bias)


def fractional_moment(model: nn.Module, generator: torch.Generator) -> None:
    """Fractional moment-preserving Gaussian weights (s = 0.8, ReLU inputs), biases zero.

    The first layer's inputs are pixels, not ReLU outputs, but the FMP paper's MLPs use the
    ReLU variance throughout; so does this (the difference is one layer's scale).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fractional_moment_(module, s=FMP_S, nonlinearity="relu", generator=generator)


def methods(iters: int) -> list[Method]:
    """The compared initializations; ``iters`` for every learned one."""
    return [
        Method("pytorch_default", "PyTorch default (reference)"),
        Method("kaiming", "Kaiming normal", kaiming_normal),
        Method("fmp", f"fractional moment s={FMP_S}", fractional_moment),
        Method("gradinit_library", "GradInit, library defaults", kaiming_normal, "gradinit", {"iters": iters}),
        Method("gradinit_published", "GradInit, published (gamma 1)", kaiming_normal, "gradinit",
               {"iters": iters, "gamma": 1.0, "eta": 0.1}),
        Method("nio_library", "NIO, library defaults", kaiming_normal, "nio", {"iters": iters}),
        Method("nio_published", "NIO, published (gamma 5)", kaiming_normal, "nio", {"iters": iters, "gamma": 5.0}),
        Method("nio_imagenet", "NIO, ImageNet config (gc_gn_sqrt)", kaiming_normal, "nio",
               {"iters": iters, "gamma": 10.0, "lr": 0.003, "sub_batches": 4, "overlap": 0.2,
                "objective": "gc_gn_sqrt", "mu": 1.0}),
        Method("nio_published_on_default", "NIO gamma 5 on the PyTorch default draw", None, "nio",
               {"iters": iters, "gamma": 5.0}),
        Method("nio_samples_library", "sample-wise NIO, library defaults", kaiming_normal, "nio",
               {"iters": iters, "sub_batches": "samples"}),
        Method("nio_samples_published", "sample-wise NIO, gamma 5", kaiming_normal, "nio",
               {"iters": iters, "gamma": 5.0, "sub_batches": "samples"}),
    ]


NOTES = """Learned methods start from the Kaiming draw of the same seed, except the last row (PyTorch's
default draw, kaiming_uniform with a = sqrt(5), which vanishes through 20 layers). "Library
defaults" means nio_fast.initialize's defaults: gamma measured on the first batch, scale lr 0.05,
100 iterations, D = 2 (NIO), inner SGD with eta 0.1 (GradInit). The ImageNet config is the NIO
ResNet-50 one (gamma 10, lr 0.003, D = 4, overlap 0.2, objective gc_gn_sqrt, mu 1). Sample-wise
NIO (sub_batches="samples") is the same algorithm with one chunk per sample (D = N = 128): the
GradCosine of the paper's theory instead of its two-sub-batch stand-in."""


def build(quick: bool = False) -> Experiment:
    """Deep ReLU MLP on the digits: Kaiming, FMP, GradInit, NIO under plain SGD."""
    iters = 3 if quick else 100
    return Experiment(
        name="deep_mlp",
        title="Deep ReLU MLP (20 x 64) on digits, plain SGD",
        build_model=lambda: digits_mlp(depth=20, width=64),
        layout="flat",
        methods=methods(iters),
        make_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        optimizer_description="SGD lr 0.01, no momentum, no weight decay (the FMP paper's recipe)",
        learning_rates=[0.01],
        seeds=2 if quick else 10,
        steps=10 if quick else EPOCHS * STEPS_PER_EPOCH,
        batch_size=128,
        init_batch_size=128,
        early_step=5 if quick else 20,
        gradcosine_batch_size=64 if quick else 256,
        eval_samples=128 if quick else None,
        notes=NOTES,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    return main(build, argv)


if __name__ == "__main__":
    sys.exit(run())
