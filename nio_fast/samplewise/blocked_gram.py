"""The Gram of a weight's per-sample gradients, formed a block of output channels at a time.

A convolution or linear weight on the materialising route has per-sample gradients of N x
(weight size) values: 151 MB for a 256 x 256 x 3 x 3 convolution at N = 64, three times the
training step's activations of that layer. The Gram is a sum over weight entries, so it can
be accumulated over blocks of output channels, each block's rows formed from the layer input
and that block's output-gradient channels, reduced to the Gram and freed. The backward
recomputes the rows of one block at a time: at no point do all of them exist.

It is also faster: on 2 CPU cores, the grouped weight-gradient convolution and the Gram of
one block of ~8 MB ran 1.2-2.1x faster than the whole tensor at once (cache-sized operands;
ResNet-18 layer shapes, N = 16 to 256), as long as a block keeps at least 8 output channels
(at 4, mkldnn's grouped kernels ran 3-10x slower per FLOP).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..ops import gram_values_wanted
from ..ops.first_order import first_order
from .factors import weight_rows
from .recorder import CONV, LINEAR, LayerUse

BLOCK_ELEMENTS = 1 << 21
"""Per-sample rows of one block: at most this many values (8 MB in fp32) where a block can
still hold MIN_BLOCK_CHANNELS channels; the sweet spot of the measurements above."""
MIN_BLOCK_CHANNELS = 16


def blockable(use: LayerUse, role: str) -> bool:
    """A weight whose per-sample rows split by output channel: linear, or an ungrouped
    convolution (a grouped one would need its input channels split along)."""
    return role == "weight" and (use.kind == LINEAR or (use.kind == CONV and use.config["groups"] == 1))


def channel_blocks(channels: int, rows: int, elements_per_channel: int) -> list[tuple[int, int]]:
    """Output-channel ranges of near-equal size whose rows hold about BLOCK_ELEMENTS values."""
    per_block = max(MIN_BLOCK_CHANNELS, BLOCK_ELEMENTS // max(rows * elements_per_channel, 1))
    count = -(-channels // per_block)
    edges = [round(i * channels / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def rows_fit_beside(num_values: int, output_grads: Iterable[torch.Tensor]) -> bool:
    """Per-sample rows of ``num_values`` values no bigger than the output gradients a training
    step holds anyway: cheap enough to keep for the backward instead of recomputing them."""
    return num_values <= sum(grad.numel() for grad in output_grads)


def output_channel_axis(use: LayerUse, output_grad: torch.Tensor) -> int:
    return 1 if use.kind == CONV else output_grad.dim() - 1


RowsOfBlock = Callable[[Sequence[torch.Tensor], int], torch.Tensor]


class _BlockedGram(torch.autograd.Function):
    """G = sum_b R_b R_b^T with R_b = rows_of_block(tensors narrowed to block b, b's width).

    ``slice_axes[i]``: the axis along which tensor i is narrowed to a block (output gradients),
    or None (layer inputs, shared by every block). Backward: dG -> dR_b = (dG + dG^T) R_b per
    block, through R_b's recomputed graph, the output-gradient blocks written into place. With
    ``keep``, the rows and their graph are kept from the forward instead of recomputed.
    """

    @staticmethod
    def forward(ctx, rows_of_block: RowsOfBlock, blocks: list[tuple[int, int]], slice_axes: tuple[Optional[int], ...],
                keep: bool, gram_like: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        needs = ctx.needs_input_grad[5:]
        ctx.kept = None
        if keep:
            leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs)]
            with torch.enable_grad():
                kept_rows = [rows_of_block(_narrowed(leaves, slice_axes, start, end), end - start)
                             for start, end in blocks]
            ctx.kept = (leaves, kept_rows)
        ctx.rows_of_block, ctx.blocks, ctx.slice_axes = rows_of_block, blocks, slice_axes
        ctx.save_for_backward(*tensors)
        if not gram_values_wanted():  # only the backward will be used (ops.gram_values_unused)
            return torch.zeros_like(gram_like)
        gram = None
        for index, (start, end) in enumerate(blocks):
            rows = ctx.kept[1][index].detach() if keep else \
                rows_of_block(_narrowed(tensors, slice_axes, start, end), end - start)
            gram = rows @ rows.T if gram is None else gram.addmm_(rows, rows.T)
        return gram

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        symmetric = grad_gram + grad_gram.T
        wanted = [i for i, need in enumerate(needs) if need]
        if ctx.kept is not None:
            (leaves, kept_rows), ctx.kept = ctx.kept, None
            parts = torch.autograd.grad(kept_rows, [leaves[i] for i in wanted],
                                        [symmetric.to(rows.dtype) @ rows.detach() for rows in kept_rows],
                                        allow_unused=True)
            grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
            for i, part in zip(wanted, parts):
                grads[i] = part
            return (None, None, None, None, None, *grads)
        shared = [t.detach().requires_grad_(need) if axis is None else None
                  for t, axis, need in zip(tensors, ctx.slice_axes, needs)]
        # the blocks tile the sliced axis: every entry of a sliced gradient is written below
        grads: list[Optional[torch.Tensor]] = [
            torch.empty_like(t) if need and axis is not None else None
            for t, axis, need in zip(tensors, ctx.slice_axes, needs)]
        for start, end in ctx.blocks:
            with torch.enable_grad():
                leaves = [s if axis is None else t.narrow(axis, start, end - start).detach().requires_grad_(need)
                          for t, s, axis, need in zip(tensors, shared, ctx.slice_axes, needs)]
                rows = ctx.rows_of_block(leaves, end - start)
                parts = torch.autograd.grad(rows, [leaves[i] for i in wanted],
                                            symmetric.to(rows.dtype) @ rows.detach(), allow_unused=True)
            for i, part in zip(wanted, parts):
                axis = ctx.slice_axes[i]
                if axis is not None:
                    grads[i].narrow(axis, start, end - start).copy_(0 if part is None else part)
                elif part is not None:
                    grads[i] = part if grads[i] is None else grads[i].add_(part)
        return (None, None, None, None, None, *grads)


def _narrowed(tensors: Sequence[torch.Tensor], slice_axes: Sequence[Optional[int]], start: int,
              end: int) -> list[torch.Tensor]:
    return [t if axis is None else t.narrow(axis, start, end - start) for t, axis in zip(tensors, slice_axes)]


def blocked_weight_gram(entries: Sequence[tuple[LayerUse, torch.Tensor]], weight_shape: Sequence[int],
                        dtype: torch.dtype, finish_rows: Callable[[torch.Tensor], torch.Tensor],
                        gram_size: int) -> torch.Tensor:
    """The Gram of a weight's per-sample gradients, summed over its uses ((use, output gradient)
    pairs, every one ``blockable``), a block of output channels at a time.

    ``finish_rows`` maps a block's per-sample rows [N, k] (in ``dtype``) to the ``gram_size``
    rows whose Gram is wanted: themselves, or the chunk gradients W^T V of sub-batch NIO.

    Rows no bigger than the output gradients a training step holds anyway (early convolutions:
    N x 37k values against N x 66k at N = 64 on ResNet-18) are kept for the backward instead of
    recomputed there: 7% of a sample-wise GroupNorm ResNet-18 evaluation at N = 16, within the
    noise at N = 64 (paired medians of 5, 2 CPU cores).
    """
    uses = [use for use, _ in entries]
    num = entries[0][1].shape[uses[0].sample_axis]
    channels, per_channel = weight_shape[0], math.prod(weight_shape[1:])

    def rows_of_block(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
        block_shape = (width, *weight_shape[1:])
        total = None
        for use, inputs, grad in zip(uses, tensors[0::2], tensors[1::2]):
            rows = weight_rows(replace(use, inputs=inputs), grad, block_shape)
            total = rows if total is None else total + rows
        return finish_rows(total.to(dtype))

    keep = rows_fit_beside(num * channels * per_channel, (grad for _, grad in entries))
    # kept rows are small: one block (a narrowed output gradient would be copied for their graph)
    blocks = [(0, channels)] if keep else channel_blocks(channels, num, per_channel)

    tensors, slice_axes = [], []
    for use, grad in entries:
        tensors += [use.inputs, grad]
        slice_axes += [None, output_channel_axis(use, grad)]
    gram_like = torch.empty((gram_size, gram_size), dtype=dtype, device=entries[0][1].device)
    return _BlockedGram.apply(rows_of_block, blocks, tuple(slice_axes), keep, gram_like, *tensors)
