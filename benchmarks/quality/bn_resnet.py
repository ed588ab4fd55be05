"""BatchNorm ResNet-8 on the digits upsampled to 3 x 32 x 32, SGD with momentum and cosine decay.

``python -m benchmarks.quality.bn_resnet [--quick] [--seeds N] [--out DIR]``

The CIFAR recipe in miniature (SGD momentum 0.9, lr 0.1, weight decay 5e-4, cosine decay to 0)
on the digits in the rgb32 layout (each pixel a 4x4 block, copied to three channels). The
network has BatchNorm, so nio_fast's mode="auto" runs NIO and GradCosine in exact mode
(whole-batch forward, batch statistics that couple the sub-batches).
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from benchmarks.quality.common import Experiment, Method, main
from benchmarks.quality.resnet import cifar_resnet

EPOCHS = 5
STEPS_PER_EPOCH = 21  # 1347 training digits in batches of 64, the short last one dropped
# Exact-mode NIO costs about 0.2 s per iteration here on one thread (batch 32; 0.45 s with the
# ImageNet config's D = 4): with 5 seeds and five learned variants, 100 iterations would not
# fit the 8-minute budget.
LEARNED_ITERS = 30


def methods(iters: int) -> list[Method]:
    """The compared initializations; all start from PyTorch's default draw."""
    return [
        Method("pytorch_default", "PyTorch default"),
        Method("gradinit_library", "GradInit, library defaults", None, "gradinit", {"iters": iters}),
        Method("gradinit_published", "GradInit, published (gamma 1)", None, "gradinit",
               {"iters": iters, "gamma": 1.0, "eta": 0.1}),
        Method("nio_library", "NIO, library defaults", None, "nio", {"iters": iters}),
        Method("nio_published", "NIO, published (gamma 5)", None, "nio", {"iters": iters, "gamma": 5.0}),
        Method("nio_imagenet", "NIO, ImageNet config (gc_gn_sqrt)", None, "nio",
               {"iters": iters, "gamma": 10.0, "lr": 0.003, "sub_batches": 4, "overlap": 0.2,
                "objective": "gc_gn_sqrt", "mu": 1.0}),
    ]


NOTES = f"""ResNet-8 (CIFAR-style: 3x3 stem, three stages of one basic block at widths 8, 16, 32,
BatchNorm after every convolution, global average pooling, linear head; 19k parameters) with
PyTorch's default initialization (BatchNorm weight 1, bias 0). GradCosine at init and every NIO
iteration run in exact mode (mode="auto" detects the BatchNorm): one forward of the whole batch
in training-mode BatchNorm without touching the running statistics. Learned methods run
{LEARNED_ITERS} iterations, not the published 100 to 780, to stay in the time budget. "Library
defaults": gamma measured on the first batch, scale lr 0.05, D = 2 (NIO), inner SGD with eta 0.1
(GradInit). The ImageNet config is NIO's ResNet-50 one (gamma 10, lr 0.003, D = 4, overlap 0.2,
objective gc_gn_sqrt, mu 1). Losses are measured in eval mode (running statistics)."""


def build(quick: bool = False) -> Experiment:
    """BatchNorm ResNet-8 on 32x32 digits: default vs GradInit vs NIO."""
    iters = 2 if quick else LEARNED_ITERS
    return Experiment(
        name="bn_resnet",
        title="BatchNorm ResNet-8 on digits at 32x32, SGD + cosine decay",
        build_model=lambda: cifar_resnet(blocks_per_stage=1, widths=(8, 16, 32)),
        layout="rgb32",
        methods=methods(iters),
        make_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4),
        make_scheduler=lambda optimizer, steps: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps),
        optimizer_description="SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine decay to 0 over the run",
        learning_rates=[0.1],
        seeds=2 if quick else 5,
        steps=4 if quick else EPOCHS * STEPS_PER_EPOCH,
        batch_size=64,
        drop_last=True,
        init_batch_size=16 if quick else 32,
        early_step=2 if quick else 20,
        gradcosine_batch_size=32 if quick else 128,
        eval_samples=128 if quick else None,
        notes=NOTES,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    return main(build, argv)


if __name__ == "__main__":
    sys.exit(run())
