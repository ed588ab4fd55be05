"""Per-sample gradients of one recorded use, from its input and its output gradient.

Three forms (shared/spec/GHOST.md):
- *outer factors* ``(A [N, T, d], B [N, T, p])`` for the weight of a linear layer or an
  ungrouped convolution: sample i's gradient is ``sum_t B[i, t] A[i, t]^T``, for the ghost
  route (and linear layers' materialising route) of ``nio_fast.ops.outer_gram``;
- *per-sample vectors* ``[N, numel]`` for everything small or irregular (biases, norm-layer
  affines, broadcast parameters, embeddings tied with other uses) and for convolutions on the
  materialising route (one grouped weight-gradient convolution);
- *chunk sums* ``[D, numel]`` of a linear or convolution weight for sub-batch NIO: each chunk's
  summed gradient as that layer's ordinary weight gradient over the chunk's rows, the reduction
  a training step's backward does, so no per-sample gradient exists at all.

Every function here is plain autograd-differentiable PyTorch; ``b`` is the output gradient of
the SUM of the per-sample losses, so its sample-``i`` rows are sample i's own output gradient
(exact when no layer couples samples).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..algorithms.batching import equal_chunks
from ..ops import group_norm_weight_per_sample, layer_norm_weight_per_sample
from .recorder import BROADCAST, CONV, EMBEDDING, GROUP_NORM, LAYER_NORM, LINEAR, LayerUse


def sample_major(tensor: torch.Tensor, use: LayerUse) -> torch.Tensor:
    return tensor.movedim(use.sample_axis, 0) if use.sample_axis else tensor


def _pair(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def conv_padding(use: LayerUse, weight_shape: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, 'same' and 'valid' included."""
    dims = use.config["spatial_dims"]
    padding, dilation = use.config["padding"], _pair(use.config["dilation"], dims)
    kernel = weight_shape[2:]
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":  # PyTorch puts the odd one of the total padding after
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in _pair(padding, dims)]


def conv_patches(use: LayerUse, weight_shape: Sequence[int]) -> torch.Tensor:
    """The unfolded input [N, C_in * prod(kernel), L] of a conv1d / conv2d use."""
    x = use.inputs
    dims = use.config["spatial_dims"]
    stride, dilation = _pair(use.config["stride"], dims), _pair(use.config["dilation"], dims)
    pads = conv_padding(use, weight_shape)
    kernel = tuple(weight_shape[2:])
    if dims == 1:  # a 1-D convolution is a 2-D one over a height of 1
        x, kernel, stride, dilation, pads = x.unsqueeze(2), (1,) + kernel, (1,) + stride, (1,) + dilation, [(0, 0)] + pads
    if any(before or after for before, after in pads):
        x = F.pad(x, [amount for before_after in reversed(pads) for amount in before_after])
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def conv_weight_per_sample(use: LayerUse, output_grad: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """[N, *weight_shape]: per-sample conv weight gradients as ONE grouped weight-gradient
    convolution, the samples stacked as groups. No unfolded input: on 2 CPU cores, N = 64, ResNet
    layer shapes, forward + backward took 1.4-4.5x less time than unfold + bmm (commit 10b47ae)."""
    x = use.inputs
    num, dims, groups = x.shape[0], use.config["spatial_dims"], use.config["groups"]
    x, padding = _padded_input(use, weight_shape)
    stacked_shape = (num * weight_shape[0],) + tuple(weight_shape[1:])
    grads = _conv_weight_grad(x.reshape(1, -1, *x.shape[2:]), stacked_shape,
                              output_grad.reshape(1, -1, *output_grad.shape[2:]),
                              stride=use.config["stride"], padding=padding, dilation=use.config["dilation"],
                              groups=num * groups)
    return grads.reshape(num, *weight_shape)


def _conv_weight_grad(x: torch.Tensor, weight_shape: Sequence[int], grad_output: torch.Tensor, *, stride,
                      padding, dilation, groups: int) -> torch.Tensor:
    """The weight gradient of a 1-D or 2-D convolution (differentiable, like
    torch.nn.grad.conv2d_weight). That function hands convolution_backward a zero-strided stand-in
    for the weight, which it makes contiguous: a weight-sized copy of nothing per call. An
    uninitialised weight instead: the same values in 0.66-0.77x the time at the per-sample shapes of
    ResNet-18's last two stages, 0.94-1.01x at the others (N = 64, 2 CPU cores)."""
    dims = x.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad_output, x, x.new_empty(weight_shape), None, _pair(stride, dims), _pair(padding, dims),
        _pair(dilation, dims), False, [0] * dims, groups, [False, True, False])[1]


def conv_weight_per_sample_backward(use: LayerUse, output_grad: torch.Tensor, weight_shape: Sequence[int],
                                    grad_rows: torch.Tensor, need_input: bool, need_output_grad: bool
                                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The input and output-gradient cotangents of :func:`conv_weight_per_sample` for ``grad_rows``
    [N, prod(weight_shape)]: the rows are bilinear in the two, so each is one grouped convolution
    with the cotangent rows as per-sample weights (forward convolution for the output gradient,
    transposed convolution for the input). The same values as autograd's derivative of the
    weight-gradient convolution, in 0.33-0.75x its CPU time (ResNet-18 layer shapes, N = 64)."""
    x = use.inputs
    num, dims, groups = x.shape[0], use.config["spatial_dims"], use.config["groups"]
    padded, padding = _padded_input(use, weight_shape)
    stacked = grad_rows.reshape(num * weight_shape[0], *weight_shape[1:]).to(x.dtype)
    settings = dict(stride=use.config["stride"], padding=padding, dilation=use.config["dilation"], groups=num * groups)
    grouped_input = padded.reshape(1, -1, *padded.shape[2:])
    grad_output_grad = grad_input = None
    if need_output_grad:
        conv = F.conv1d if dims == 1 else F.conv2d
        grad_output_grad = conv(grouped_input, stacked, **settings).reshape(output_grad.shape)
    if need_input:
        grad_input = _conv_input_grad(output_grad.reshape(1, -1, *output_grad.shape[2:]), stacked,
                                      grouped_input.shape[2:], **settings).reshape(padded.shape)
        for axis, (before, _) in enumerate(conv_padding(use, weight_shape) if padded is not x else []):
            grad_input = grad_input.narrow(axis + 2, before, x.shape[axis + 2])  # drop the explicit padding
    return grad_input, grad_output_grad


def _conv_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, input_size: Sequence[int], *, stride,
                     padding, dilation, groups: int) -> torch.Tensor:
    """The input gradient of a 1-D or 2-D convolution of ``input_size`` (spatial), as the
    transposed convolution itself. torch.nn.grad.conv2d_input hands convolution_backward a
    zero-strided stand-in for the input, which mkldnn takes for channels-last: it computes in that
    layout and copies back (a copy of the input's size). The same values in 0.74-0.94x the time
    at ResNet-18's per-sample shapes (N = 64, 2 CPU cores)."""
    dims = len(input_size)
    stride, padding, dilation = _pair(stride, dims), _pair(padding, dims), _pair(dilation, dims)
    output_padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k
                      in zip(input_size, grad_output.shape[2:], stride, padding, dilation, weight.shape[2:])]
    transposed = F.conv_transpose1d if dims == 1 else F.conv_transpose2d
    return transposed(grad_output, weight, None, stride, padding, output_padding, groups, dilation)


def _padded_input(use: LayerUse, weight_shape: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """(input, padding) for a weight-gradient convolution: symmetric padding is passed on as
    the convolution's own (no padded copy of the input, which autograd would keep for the
    backward: 77 MB on a GroupNorm ResNet-18 at N = 64); asymmetric ('same' with an even
    kernel) is applied with F.pad."""
    pads = conv_padding(use, weight_shape)
    if all(before == after for before, after in pads):
        return use.inputs, [before for before, _ in pads]
    padded = F.pad(use.inputs, [amount for before_after in reversed(pads) for amount in before_after])
    return padded, [0] * len(pads)


def weight_rows(use: LayerUse, output_grad: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """[N, prod(weight_shape)]: per-sample gradients of a linear or convolution weight of
    ``weight_shape`` (``output_grad`` may hold only some output channels: a block of them)."""
    num = output_grad.shape[use.sample_axis]
    if use.kind == LINEAR:
        a, b = outer_factors(use, output_grad, weight_shape)
        return torch.einsum("ntp,ntd->npd", b, a).reshape(num, -1)
    return conv_weight_per_sample(use, output_grad, weight_shape).reshape(num, -1)


def has_chunk_rule(use: LayerUse, role: str) -> bool:
    """``chunk_sums`` takes it: a linear or convolution weight (grouped convolutions too)."""
    return role == "weight" and use.kind in (LINEAR, CONV)


def chunk_rows(tensor: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Each chunk's rows of ``tensor``. Chunks that tile the rows in order come from one
    ``split``, whose backward is one concatenation; a slice's backward writes into a zero-filled
    full-size tensor per chunk, which cost 12% of a GroupNorm ResNet-20 iteration at D = 4."""
    starts = [start for start, _ in bounds]
    ends = [min(end, tensor.shape[0]) for _, end in bounds]
    if starts[0] == 0 and ends[-1] == tensor.shape[0] and all(s == e for s, e in zip(starts[1:], ends[:-1])):
        return list(tensor.split([end - start for start, end in zip(starts, ends)]))
    return [tensor[start:end] for start, end in zip(starts, ends)]


def chunk_sums(use: LayerUse, output_grad: torch.Tensor, weight_shape: Sequence[int],
               bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[D, numel]: ``sum_{i in chunk k} g_i`` of a linear or conv weight for chunk rows
    ``start:end``, each one weight-gradient reduction over the chunk's samples (overlapping
    chunks each reduce their own rows). Linear weights of equal chunks tiling the batch take one
    bmm (:func:`_batched_linear_chunk_sums`), others one matmul per chunk; convolutions run as D
    plain weight-gradient calls, or as one grouped over the chunks where that is faster
    (:func:`_grouped_chunks_pay`)."""
    if use.kind == LINEAR:
        a, b = outer_factors(use, output_grad, weight_shape)
        if _tiles_equally(bounds, a.shape[0]):
            return _batched_linear_chunk_sums(a, b, len(bounds))
        rows = [b_k.reshape(-1, b.shape[-1]).T @ a_k.reshape(-1, a.shape[-1])
                for a_k, b_k in zip(chunk_rows(a, bounds), chunk_rows(b, bounds))]
        return torch.stack([row.reshape(-1) for row in rows])
    x, padding = _padded_input(use, weight_shape)
    settings = dict(stride=use.config["stride"], padding=padding, dilation=use.config["dilation"])
    if _grouped_chunks_pay(x, output_grad, bounds):
        return _grouped_conv_chunk_sums(x, output_grad, weight_shape, len(bounds), use.config["groups"], settings)
    rows = [_conv_weight_grad(x_k, weight_shape, b_k, groups=use.config["groups"], **settings)
            for x_k, b_k in zip(chunk_rows(x, bounds), chunk_rows(output_grad, bounds))]
    return torch.stack([row.reshape(-1) for row in rows])


def _tiles_equally(bounds: Sequence[tuple[int, int]], num: int) -> bool:
    return len(bounds) > 1 and bounds[-1][1] == num and equal_chunks(bounds)


def _batched_linear_chunk_sums(a: torch.Tensor, b: torch.Tensor, chunks: int) -> torch.Tensor:
    """[D, p * d] chunk sums of a linear weight for D equal chunks tiling the batch: one bmm of
    the factors viewed as [D, rows of a chunk, .] (:class:`_ChunkOuterSums`)."""
    a_chunks, b_chunks = a.reshape(chunks, -1, a.shape[-1]), b.reshape(chunks, -1, b.shape[-1])
    return _ChunkOuterSums.apply(a_chunks, b_chunks).reshape(chunks, -1)


class _ChunkOuterSums(torch.autograd.Function):
    """[D, p, d] = B_c^T A_c per chunk c, for A [D, r, d] and B [D, r, p].

    Autograd's bmm derivative hands one factor's cotangent back as a transposed view, which the
    factors' reshape to [N, T, .] then copies (on the small ViT: as much copying as the split
    chunks' concatenation this replaced); here both come out contiguous: dA = B dW, dB = A dW^T.
    The backward is itself bmm calls, so it differentiates again."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(b.transpose(1, 2), a)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.bmm(b, grad_sums) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(a, grad_sums.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


# mkldnn's grouped weight-gradient kernels run slower per FLOP than plain ones on large maps and
# faster on small ones. Chunk sums of a 3x3 convolution, N = 64, 2 CPU cores, with their backward,
# one grouped call against D plain ones: 32x32 maps with 16 channels 1.45-1.83x the time at D = 8
# and 16; 16x16 maps with 32 channels 0.56-0.87x and 8x8 with 64 0.42-0.88x at D = 4 to 16.
_GROUPED_CHUNKS_UP_TO_POSITIONS = 256


def _grouped_chunks_pay(x: torch.Tensor, output_grad: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> bool:
    """One grouped call for equal chunks tiling the batch, on the CPU, at small output maps."""
    return x.device.type == "cpu" and _tiles_equally(bounds, x.shape[0]) \
        and math.prod(output_grad.shape[2:]) <= _GROUPED_CHUNKS_UP_TO_POSITIONS


def _grouped_conv_chunk_sums(x: torch.Tensor, output_grad: torch.Tensor, weight_shape: Sequence[int], chunks: int,
                             groups: int, settings: dict) -> torch.Tensor:
    """[D, numel] chunk sums of a conv weight for D equal chunks as ONE weight-gradient
    convolution: the chunks side by side as channel groups ([N/D, D * C, ...]), so that the
    batch reduction sums each chunk's samples only."""
    def side_by_side(t: torch.Tensor) -> torch.Tensor:
        per_chunk = t.reshape(chunks, t.shape[0] // chunks, *t.shape[1:])
        return per_chunk.transpose(0, 1).reshape(t.shape[0] // chunks, chunks * t.shape[1], *t.shape[2:])
    stacked_shape = (chunks * weight_shape[0],) + tuple(weight_shape[1:])
    grads = _conv_weight_grad(side_by_side(x), stacked_shape, side_by_side(output_grad), groups=chunks * groups,
                              **settings)
    return grads.reshape(chunks, -1)


def outer_factors(use: LayerUse, output_grad: torch.Tensor, weight_shape: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [N, T, d], B [N, T, p]) of a linear or ungrouped conv weight."""
    if use.kind == LINEAR:
        x, b = sample_major(use.inputs, use), sample_major(output_grad, use)
        return x.reshape(x.shape[0], -1, x.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
    patches = conv_patches(use, weight_shape)
    return patches.transpose(1, 2), output_grad.reshape(output_grad.shape[0], output_grad.shape[1], -1).transpose(1, 2)


def is_outer(use: LayerUse, role: str) -> bool:
    return role == "weight" and (use.kind == LINEAR or (use.kind == CONV and use.config["groups"] == 1))


def per_sample_vectors(use: LayerUse, role: str, output_grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """[N, param.numel()]: the per-sample gradients of ``param`` through this one use."""
    b = sample_major(output_grad, use)
    num = b.shape[0]
    if use.kind in (LINEAR, CONV) and role == "bias":
        channel_axis = 1 if use.kind == CONV else b.dim() - 1
        return b.movedim(channel_axis, -1).reshape(num, -1, b.shape[channel_axis]).sum(1)
    if use.kind in (LINEAR, CONV):
        return weight_rows(use, output_grad, param.shape)
    if use.kind == EMBEDDING:
        return _embedding_vectors(use, b, param)
    if use.kind == LAYER_NORM:
        shape = use.config["normalized_shape"]
        if role == "weight":
            return layer_norm_weight_per_sample(b, sample_major(use.inputs, use), shape, use.config["eps"])
        return b.reshape(num, -1, math.prod(shape)).sum(1)
    if use.kind == GROUP_NORM:
        if role == "weight":
            return group_norm_weight_per_sample(b, sample_major(use.inputs, use), use.config["num_groups"],
                                                use.config["eps"])
        return b.reshape(num, b.shape[1], -1).sum(-1)
    if use.kind == BROADCAST:
        return _broadcast_vectors(use, b, param)
    raise AssertionError(f"no per-sample rule for {use.kind}")


def _embedding_vectors(use: LayerUse, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ids = sample_major(use.inputs, use)
    num, vocab, width = b.shape[0], weight.shape[0], weight.shape[1]
    ids = ids.reshape(num, -1)
    rows = b.reshape(num, -1, width)
    padding = use.config["padding_idx"]
    if padding is not None:  # PyTorch gives the padding row no gradient
        rows = rows * (ids != (padding % vocab)).unsqueeze(-1).to(rows.dtype)
    flat_ids = (ids + torch.arange(num, device=ids.device).unsqueeze(1) * vocab).reshape(-1)
    grads = rows.new_zeros(num * vocab, width).index_add(0, flat_ids, rows.reshape(-1, width))
    return grads.reshape(num, -1)


def _broadcast_vectors(use: LayerUse, b: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    op = use.config["op"]
    if op == "mul":
        other = use.inputs if use.inputs is not None else use.config["scalar"]
        b = b * (other.expand_as(b) if isinstance(other, torch.Tensor) else other)
    elif op == "neg":
        b = -b
    # sum b over the axes the parameter was broadcast along (all but the sample axis)
    leading = b.dim() - param.dim()
    target = (1,) * leading + tuple(param.shape)
    axes = [axis for axis in range(1, b.dim()) if target[axis] == 1 and b.shape[axis] != 1]
    if axes:
        b = b.sum(dim=axes, keepdim=True)
    return b.reshape(b.shape[0], -1)
