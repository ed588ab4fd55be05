"""Small post-LayerNorm Transformer on digit rows, Adam at high constant learning rates, no warmup.

``python -m benchmarks.quality.transformer_no_warmup [--quick] [--seeds N] [--out DIR]``

Post-LN Transformers are known to need learning-rate warmup with Adam; GradInit was proposed
partly to remove it. Each initialization is trained at three constant Adam rates from the first
step (no warmup, no gradient clipping) and counted as diverged when training blows up or never
leaves chance (see `benchmarks.quality.common.training_failed`).
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

from nio_fast.init import fractional_moment_
from nio_fast.models import digits_transformer

from benchmarks.quality.common import Experiment, Method, main

# FMP.md: s = 0.8 for layers fed by ReLU, s = 1 for linear inputs.
FMP_S_RELU = 0.8
FMP_S_LINEAR = 1.0


def fractional_moment_linears(model: nn.Module, generator: torch.Generator) -> None:
    """FMP on every nn.Linear (embedding, attention out_proj, both feed-forward layers, head),
    biases zeroed. Only the feed-forward ``linear2`` reads ReLU outputs; the rest read linear
    (LayerNorm / attention) outputs. The attention in_proj weights are not Linear modules and
    keep PyTorch's Xavier draw; LayerNorm and the position embedding are untouched."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fed_by_relu = name.endswith("linear2")
            fractional_moment_(module, s=FMP_S_RELU if fed_by_relu else FMP_S_LINEAR,
                               nonlinearity="relu" if fed_by_relu else "linear", generator=generator)


def methods(iters: int) -> list[Method]:
    """The compared initializations; ``iters`` for every learned one (all start from the default draw)."""
    return [
        Method("pytorch_default", "PyTorch default"),
        Method("fmp", "fractional moment (Linear layers)", fractional_moment_linears),
        Method("gradinit_library", "GradInit adam, library defaults (eta 0.1)", None, "gradinit",
               {"iters": iters, "inner": "adam"}),
        Method("gradinit_published", "GradInit adam, published (eta 1e-3, lr 2.5e-3)", None, "gradinit",
               {"iters": iters, "inner": "adam", "eta": 1e-3, "lr": 2.5e-3}),
        Method("nio_library", "NIO, library defaults", None, "nio", {"iters": iters}),
        Method("nio_published", "NIO, published (gamma 5)", None, "nio", {"iters": iters, "gamma": 5.0}),
        Method("nio_samples_library", "sample-wise NIO, library defaults", None, "nio",
               {"iters": iters, "sub_batches": "samples"}),
        Method("nio_samples_published", "sample-wise NIO, gamma 5", None, "nio",
               {"iters": iters, "gamma": 5.0, "sub_batches": "samples"}),
    ]


NOTES = """All methods start from the same PyTorch default draw per seed (TransformerEncoderLayer:
Xavier-uniform attention in_proj, kaiming_uniform(a = sqrt(5)) Linear layers). Every initialized
model is trained at each learning rate from the same weights and batch order. GradInit's published
IWSLT'14 setting is inner Adam, eta 1e-3, scale lr 2.5e-3 (beta2 0.98, 780 iterations there; here
Adam's beta2 0.999 of nio_fast's scale optimizer and 100 iterations); its gamma is not given in
GRADINIT.md, so it is measured on the first batch. "Library defaults" = nio_fast.initialize's
defaults with only inner="adam" set for GradInit. Sample-wise NIO (sub_batches="samples") has one
chunk per sample (D = N = 64) instead of two sub-batches."""


def build(quick: bool = False) -> Experiment:
    """Post-LN Transformer on digit rows: Adam at high learning rates without warmup."""
    iters = 3 if quick else 100
    return Experiment(
        name="transformer_no_warmup",
        title="Post-LN Transformer on digit rows, Adam without warmup",
        build_model=lambda: digits_transformer(d_model=32, nhead=4, layers=2, dim_feedforward=64),
        layout="image",
        methods=methods(iters),
        make_optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        optimizer_description=("Adam (betas 0.9, 0.999) at a constant learning rate from step 1: "
                               "no warmup, no gradient clipping, no weight decay"),
        learning_rates=[0.01] if quick else [0.01, 0.03, 0.1],
        seeds=2 if quick else 10,
        steps=10 if quick else 150,
        batch_size=64,
        init_batch_size=64,
        early_step=5 if quick else 20,
        gradcosine_batch_size=64 if quick else 256,
        failure_column="diverged runs",
        eval_samples=128 if quick else None,
        notes=NOTES,
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    return main(build, argv)


if __name__ == "__main__":
    sys.exit(run())
