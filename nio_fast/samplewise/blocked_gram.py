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
(at 4, mkldnn's grouped kernels ran 3-10x slower per FLOP) and a multiple of 16 of them
(CHANNEL_ALIGNMENT): the GroupNorm ResNet-18's sample-wise NIO iteration at N = 64 took 0.875x
the time of near-equal blocks of 25-26 and 43 channels (4.02 against 4.59 training steps,
median of 5 alternated rounds).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..ops import gram_values_wanted
from ..ops.first_order import first_order
from .factors import conv_weight_per_sample_backward, weight_rows
from .recorder import CONV, LINEAR, LayerUse

BLOCK_ELEMENTS = 1 << 21
"""Per-sample rows of one block: about this many values (8 MB in fp32; the width rounded to
the nearest multiple of CHANNEL_ALIGNMENT) where a block can still hold MIN_BLOCK_CHANNELS
channels; the sweet spot of the measurements above."""
MIN_BLOCK_CHANNELS = 16
CHANNEL_ALIGNMENT = 16
"""Block widths are multiples of this: mkldnn's grouped convolutions (one group per sample) ran
2-6x slower per channel for 13, 26 or 43 output channels a group than for 16, 32 or 48
(ResNet-18 layer shapes, N = 64, 2 CPU cores: at 26 oneDNN fell back to im2col and GEMM, at 32
it ran its AVX-512 direct kernel, ONEDNN_VERBOSE=1). Not measured on a GPU."""


def blockable(use: LayerUse, role: str) -> bool:
    """A weight whose per-sample rows split by output channel: linear, or an ungrouped
    convolution (a grouped one would need its input channels split along)."""
    return role == "weight" and (use.kind == LINEAR or (use.kind == CONV and use.config["groups"] == 1))


def channel_blocks(channels: int, rows: int, elements_per_channel: int) -> list[tuple[int, int]]:
    """Output-channel ranges whose rows hold at most about BLOCK_ELEMENTS values (at least
    MIN_BLOCK_CHANNELS channels), as few as that allows, of one width that is a multiple of
    CHANNEL_ALIGNMENT (the last takes the rest)."""
    fits = BLOCK_ELEMENTS // max(rows * elements_per_channel, 1)
    per_block = max(MIN_BLOCK_CHANNELS, (fits + CHANNEL_ALIGNMENT // 2) // CHANNEL_ALIGNMENT * CHANNEL_ALIGNMENT)
    count = -(-channels // per_block)
    width = -(-channels // (count * CHANNEL_ALIGNMENT)) * CHANNEL_ALIGNMENT
    edges = list(range(0, channels, width)) + [channels]
    return list(zip(edges[:-1], edges[1:]))


def rows_fit_beside(num_values: int, output_grads: Iterable[torch.Tensor]) -> bool:
    """Per-sample rows of ``num_values`` values no bigger than the output gradients a training
    step holds anyway: cheap enough to keep for the backward instead of recomputing them."""
    return num_values <= sum(grad.numel() for grad in output_grads)


def output_channel_axis(use: LayerUse, output_grad: torch.Tensor) -> int:
    return 1 if use.kind == CONV else output_grad.dim() - 1


class WeightRows:
    """A weight's per-sample gradient rows for a block of output channels, summed over its uses,
    and the cotangents they send back to each use's input and output gradient.

    ``tensors`` are (input, output gradient) per use, the output gradients narrowed to the block.
    Convolutions take their cotangents from two grouped convolutions
    (``factors.conv_weight_per_sample_backward``), not from autograd's derivative of the
    weight-gradient convolution (0.33-0.75x its CPU time); linear uses from autograd of their einsum.
    """

    def __init__(self, uses: Sequence[LayerUse], weight_shape: Sequence[int], dtype: torch.dtype,
                 finish_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.uses, self.weight_shape, self.dtype, self.finish_rows = list(uses), tuple(weight_shape), dtype, finish_rows

    def _block_shape(self, width: int) -> tuple[int, ...]:
        return (width, *self.weight_shape[1:])

    def sample_rows(self, tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
        """[N, width * per-channel size]: per-sample rows in the parameters' dtype."""
        total = None
        for use, inputs, grad in zip(self.uses, tensors[0::2], tensors[1::2]):
            rows = weight_rows(replace(use, inputs=inputs), grad, self._block_shape(width))
            total = rows if total is None else total + rows
        return total

    def finish(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows whose Gram is wanted (``finish_rows`` in the accumulation dtype)."""
        return self.finish_rows(rows.to(self.dtype))

    def rows_cotangent(self, rows: torch.Tensor, symmetric: torch.Tensor) -> torch.Tensor:
        """d/d rows of <dG, F F^T> for F = finish(rows): (dG + dG^T) F carried back through finish."""
        with torch.enable_grad():
            leaf = rows.detach().requires_grad_()
            finished = self.finish(leaf)
            (grad,) = torch.autograd.grad(finished, leaf, symmetric.to(finished.dtype) @ finished.detach())
        return grad

    def tensor_grads(self, tensors: Sequence[torch.Tensor], width: int, grad_rows: torch.Tensor,
                     needs: Sequence[bool]) -> list[Optional[torch.Tensor]]:
        """Each tensor's cotangent from the rows' cotangent ``grad_rows`` (None where not needed)."""
        grads: list[Optional[torch.Tensor]] = []
        block_shape = self._block_shape(width)
        for use, inputs, grad, need_input, need_grad in zip(self.uses, tensors[0::2], tensors[1::2],
                                                           needs[0::2], needs[1::2]):
            if use.kind == CONV:
                grads += conv_weight_per_sample_backward(replace(use, inputs=inputs), grad, block_shape, grad_rows,
                                                         need_input, need_grad)
                continue
            with torch.enable_grad():
                leaves = [inputs.detach().requires_grad_(need_input), grad.detach().requires_grad_(need_grad)]
                rows = weight_rows(replace(use, inputs=leaves[0]), leaves[1], block_shape)
                wanted = [leaf for leaf in leaves if leaf.requires_grad]
                parts = iter(torch.autograd.grad(rows, wanted, grad_rows.to(rows.dtype), allow_unused=True))
            grads += [next(parts) if leaf.requires_grad else None for leaf in leaves]
        return grads

    def __call__(self, tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
        return self.finish(self.sample_rows(tensors, width))


class _BlockedGram(torch.autograd.Function):
    """G = sum_b F_b F_b^T with F_b = weight_rows(tensors narrowed to block b, b's width).

    ``slice_axes[i]``: the axis along which tensor i is narrowed to a block (output gradients),
    or None (layer inputs, shared by every block). Backward: per block, the per-sample rows
    recomputed, their cotangent (dG + dG^T) F_b carried back through ``finish``, and from it
    each tensor's (``WeightRows.tensor_grads``), the output-gradient blocks written into place.
    With ``keep``, the per-sample rows are kept from the forward instead of recomputed.
    """

    @staticmethod
    def forward(ctx, rows: WeightRows, blocks: list[tuple[int, int]], slice_axes: tuple[Optional[int], ...],
                keep: bool, gram_like: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.blocks, ctx.slice_axes = rows, blocks, slice_axes
        ctx.save_for_backward(*tensors)
        ctx.kept = [rows.sample_rows(_narrowed(tensors, slice_axes, start, end), end - start)
                    for start, end in blocks] if keep else None
        if not gram_values_wanted():  # only the backward will be used (ops.gram_values_unused)
            return torch.zeros_like(gram_like)
        gram = None
        for index, (start, end) in enumerate(blocks):
            finished = rows.finish(ctx.kept[index]) if keep else \
                rows(_narrowed(tensors, slice_axes, start, end), end - start)
            gram = finished @ finished.T if gram is None else gram.addmm_(finished, finished.T)
        return gram

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        tensors, rows = ctx.saved_tensors, ctx.rows
        needs = ctx.needs_input_grad[5:]
        symmetric = grad_gram + grad_gram.T
        kept, ctx.kept = ctx.kept, None
        whole = len(ctx.blocks) == 1  # one block: its parts are the gradients (no copy into place)
        # several blocks tile the sliced axis: every entry of a sliced gradient is written below
        grads: list[Optional[torch.Tensor]] = [
            torch.empty_like(t) if need and axis is not None and not whole else None
            for t, axis, need in zip(tensors, ctx.slice_axes, needs)]
        for index, (start, end) in enumerate(ctx.blocks):
            block = _narrowed(tensors, ctx.slice_axes, start, end)
            per_sample = rows.sample_rows(block, end - start) if kept is None else kept[index]
            if kept is not None:
                kept[index] = None
            grad_rows = rows.rows_cotangent(per_sample, symmetric)
            del per_sample  # freed before the cotangent convolutions: the rows are not needed there
            for i, part in enumerate(rows.tensor_grads(block, end - start, grad_rows, needs)):
                axis = ctx.slice_axes[i]
                if not needs[i]:
                    continue
                if axis is not None and not whole:
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

    keep = rows_fit_beside(num * channels * per_channel, (grad for _, grad in entries))
    # kept rows are small: one block, kept whole for the backward
    blocks = [(0, channels)] if keep else channel_blocks(channels, num, per_channel)

    tensors, slice_axes = [], []
    for use, grad in entries:
        tensors += [use.inputs, grad]
        slice_axes += [None, output_channel_axis(use, grad)]
    gram_like = torch.empty((gram_size, gram_size), dtype=dtype, device=entries[0][1].device)
    rows = WeightRows(uses, weight_shape, dtype, finish_rows)
    return _BlockedGram.apply(rows, blocks, tuple(slice_axes), keep, gram_like, *tensors)
