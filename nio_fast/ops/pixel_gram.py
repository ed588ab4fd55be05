"""The per-sample Gram of a convolution weight by the ghost identity over input pixels.

The ghost route of :mod:`.factor_gram` takes a convolution's unfolded patches ``A_i`` [T, C_in k]
(k: the kernel's size) and forms, per sample pair, the T x T kernel ``A_i A_j^T``: ``N^2 T^2 C_in k``
multiply-adds. Patches overlap: the inner product of two patches is a sum over kernel offsets
of inner products of input pixels. With ``X_i`` [Q, C_in] the sample's Q input pixels,
``P_ij = X_i X_j^T`` and 0/1 maps ``E_o`` [T, Q] (the pixel output position t reads at
offset o; none in the padding):

    A_i A_j^T = sum_o E_o P_ij E_o^T,    G_ij = <A_i A_j^T, K_ij> = <P_ij, L_ij>,
    K_ij = B_i B_j^T,                    L_ij = sum_o E_o^T K_ij E_o.

Both transforms are one matmul by the pixel-pair map ``M = sum_o E_o (x) E_o`` [T^2, Q^2]:
``vec(A_i A_j^T) = M vec(P_ij)``, ``vec(L_ij) = M^T vec(K_ij)``. Cost per Gram
``N^2 (Q^2 C_in + T^2 C_out + T^2 Q^2)`` against ghost's ``N^2 T^2 (C_in k + C_out)``: it pays
when maps are small and channels many (a ResNet-18's last stage on 32 x 32 inputs, 4 x 4 maps,
512 channels, 3 x 3 kernels: 1.3 G against 5.4 G multiply-adds; 49 against 200 ms for the Gram
with its backward on 2 CPU cores, N = 64), not on larger maps (the map grows as T^2 Q^2).

Backward, with ``S = dG + dG^T``: ``dX_i = sum_j S_ij L_ij X_j``, ``dB_i = sum_j S_ij (A_i A_j^T) B_j``
(``L_ji = L_ij^T``, so the pairs are visited once). Like :func:`.outer_gram`: blockwise over
sample pairs under the same temporary budget, only the inputs saved, first order.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional, Sequence, Union

import torch

from .factor_gram import (_accumulation_dtype, _budget, _check_dtype_and_device, _store_symmetric, _upper_block_pairs,
                          gram_values_wanted)
from .first_order import first_order

MAX_MAP_ENTRIES = 1 << 24
"""Largest pixel-pair map (T^2 Q^2 entries, 64 MB in fp32): past it the transforms alone cost more
than the ghost route's patch kernels on any realistic channel count."""

IntOrTuple = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], Sequence[Sequence[int]]]


def _per_dim(value: IntOrTuple, dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(values) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name}: expected an int or {dims} ints, got {value!r}")
    return values


def _padding_pairs(padding: Padding, dims: int) -> tuple[tuple[int, int], ...]:
    """(before, after) per spatial dim from an int, ints (symmetric) or pairs."""
    if isinstance(padding, int) or all(isinstance(p, int) for p in padding):
        return tuple((p, p) for p in _per_dim(padding, dims, "padding"))
    pairs = tuple(tuple(p) for p in padding)
    if len(pairs) != dims or not all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs):
        raise ValueError(f"padding: expected an int, {dims} ints or {dims} (before, after) pairs, got {padding!r}")
    return pairs


def conv_output_size(input_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> tuple[int, ...]:
    return tuple((size + before + after - dil * (k - 1) - 1) // step + 1
                 for size, k, step, (before, after), dil in zip(input_size, kernel_size, stride, padding, dilation))


@functools.lru_cache(maxsize=8)  # a model has few distinct small-map shapes; maps are <= 64 MB
def _pixel_map_cached(input_size: tuple[int, ...], output_size: tuple[int, ...], kernel_size: tuple[int, ...],
                      stride: tuple[int, ...], padding_before: tuple[int, ...], dilation: tuple[int, ...],
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    positions, pixels = math.prod(output_size), math.prod(input_size)
    outputs = torch.stack(torch.meshgrid(*[torch.arange(size) for size in output_size], indexing="ij")).reshape(
        len(output_size), -1)  # [dims, T]: each output position's coordinates
    flat = torch.zeros(positions * positions, pixels * pixels, dtype=torch.float64)
    for offset in itertools.product(*[range(k) for k in kernel_size]):
        coords = [outputs[d] * stride[d] - padding_before[d] + offset[d] * dilation[d] for d in range(len(offset))]
        valid = torch.stack([(c >= 0) & (c < size) for c, size in zip(coords, input_size)]).all(0)
        pixel = torch.zeros(positions, dtype=torch.long)
        for c, size in zip(coords, input_size):
            pixel = pixel * size + c
        t, q = torch.arange(positions)[valid], pixel[valid]
        rows = (t[:, None] * positions + t[None, :]).reshape(-1)
        cols = (q[:, None] * pixels + q[None, :]).reshape(-1)
        flat.index_put_((rows, cols), torch.ones(rows.numel(), dtype=torch.float64), accumulate=True)
    return flat.to(device=device, dtype=dtype)


def conv_pixel_map(input_size: Sequence[int], output_size: Sequence[int], kernel_size: Sequence[int],
                   stride: Sequence[int], padding_before: Sequence[int], dilation: Sequence[int],
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """M [T^2, Q^2] for a convolution from ``input_size`` (Q pixels) to ``output_size`` (T
    positions): ``M[t T + s, q Q + r]`` counts the kernel offsets at which output positions t and
    s read input pixels q and r (both inside the input). Cached per sizes, dtype and device."""
    return _pixel_map_cached(tuple(input_size), tuple(output_size), tuple(kernel_size), tuple(stride),
                             tuple(padding_before), tuple(dilation), dtype, torch.device(device))


def pixel_gram_cost(num_samples: int, positions: int, pixels: int, in_channels: int, out_channels: int) -> float:
    """Multiply-adds of the forward: pixel Grams, output-gradient Grams and one map transform
    per sample pair (the backward costs about twice that, as for ``outer_gram_cost``)."""
    n, t, q = float(num_samples), float(positions), float(pixels)
    return n * n * (q * q * in_channels + t * t * out_channels + t * t * q * q)


def _rows(tensor: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[N, C, *spatial] -> [N, positions, C] contiguous in the accumulation dtype."""
    return tensor.flatten(2).transpose(1, 2).to(acc).contiguous()


def _pair_kernels(rows_i: torch.Tensor, rows_j: torch.Tensor) -> torch.Tensor:
    """[i j, R^2]: the R x R kernel of rows of every sample pair of the two blocks, pair-major."""
    (ni, size, width), nj = rows_i.shape, rows_j.shape[0]
    kernel = rows_i.reshape(-1, width) @ rows_j.reshape(-1, width).T
    return kernel.view(ni, size, nj, size).permute(0, 2, 1, 3).reshape(ni * nj, size * size)


def _as_pair_matrix(pair_rows: torch.Tensor, ni: int, nj: int, size: int) -> torch.Tensor:
    """Back from pair-major [i j, R^2] to the [i R, j R] layout of the block's rows."""
    return pair_rows.view(ni, nj, size, size).permute(0, 2, 1, 3).reshape(ni * size, nj * size)


def _samples_per_block(num: int, positions: int, pixels: int, widest_rows: int, itemsize: int, budget: int) -> int:
    """Square sample blocks whose pair kernels (i j max(T, Q)^2 entries) and row slices fit ``budget``."""
    pair = max(positions, pixels) ** 2 * itemsize
    samples = min(math.isqrt(budget // max(pair, 1)), budget // max(1, widest_rows * itemsize))
    return max(1, min(samples, num))


def _forward(x_rows: torch.Tensor, b_rows: torch.Tensor, pixel_map: torch.Tensor, budget: int) -> torch.Tensor:
    num, pixels, _ = x_rows.shape
    positions = b_rows.shape[1]
    gram = torch.zeros((num, num), dtype=x_rows.dtype, device=x_rows.device)
    samples = _samples_per_block(num, positions, pixels, max(x_rows[0].numel(), b_rows[0].numel()),
                                 x_rows.element_size(), budget)
    load = lambda start, end: (x_rows[start:end], b_rows[start:end])  # noqa: E731
    for (i0, i1, (x_i, b_i)), (j0, j1, (x_j, b_j)) in _upper_block_pairs(num, samples, load):
        # carried into the smaller of the two spaces (T^2 or Q^2): the same multiply-adds, a smaller product
        pixel_kernels = _pair_kernels(x_i, x_j)
        output_kernels = _pair_kernels(b_i, b_j)
        if positions <= pixels:
            block = (pixel_kernels @ pixel_map.T).mul_(output_kernels).sum(1)
        else:
            block = (output_kernels @ pixel_map).mul_(pixel_kernels).sum(1)
        _store_symmetric(gram, i0, i1, j0, j1, block.view(i1 - i0, j1 - j0))
    return gram


def _backward(x_rows: torch.Tensor, b_rows: torch.Tensor, pixel_map: torch.Tensor, sym: torch.Tensor, budget: int,
              need_x: bool, need_b: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    num, pixels, _ = x_rows.shape
    positions = b_rows.shape[1]
    samples = _samples_per_block(num, positions, pixels, max(x_rows[0].numel(), b_rows[0].numel()),
                                 x_rows.element_size(), budget)
    grad_x = torch.zeros_like(x_rows) if need_x else None
    grad_b = torch.zeros_like(b_rows) if need_b else None
    load = lambda start, end: (x_rows[start:end], b_rows[start:end])  # noqa: E731
    for (i0, i1, (x_i, b_i)), (j0, j1, (x_j, b_j)) in _upper_block_pairs(num, samples, load):
        weights = sym[i0:i1, j0:j1].reshape(-1, 1)

        def add_mirrored(grad, kernels, size, rows_i, rows_j):
            """grad_i += sum_j S_ij W_ij rows_j, and grad_j += sum_i S_ij W_ij^T rows_i."""
            mixed = _as_pair_matrix(kernels.mul_(weights), i1 - i0, j1 - j0, size)
            grad[i0:i1] += (mixed @ rows_j.reshape(-1, rows_j.shape[-1])).view(rows_i.shape)
            if j0 != i0:
                grad[j0:j1] += (mixed.T @ rows_i.reshape(-1, rows_i.shape[-1])).view(rows_j.shape)

        if need_x:  # L_ij: the output-gradient kernels carried to pixel pairs
            add_mirrored(grad_x, _pair_kernels(b_i, b_j) @ pixel_map, pixels, x_i, x_j)
        if need_b:  # A_i A_j^T: the pixel kernels carried to position pairs
            add_mirrored(grad_b, _pair_kernels(x_i, x_j) @ pixel_map.T, positions, b_i, b_j)
    return grad_x, grad_b


class _PixelGram(torch.autograd.Function):
    """Saves the input and output gradient only; the backward recomputes the pair kernels."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output_grads: torch.Tensor, pixel_map: torch.Tensor,
                budget: int) -> torch.Tensor:
        ctx.save_for_backward(inputs, output_grads)
        ctx.pixel_map, ctx.budget = pixel_map, budget
        acc = pixel_map.dtype
        if not gram_values_wanted():
            return inputs.new_zeros((inputs.shape[0],) * 2, dtype=acc)
        return _forward(_rows(inputs, acc), _rows(output_grads, acc), pixel_map, budget)

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        inputs, output_grads = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        if not (need_x or need_b):
            return None, None, None, None
        acc = ctx.pixel_map.dtype
        sym = (grad_gram + grad_gram.T).to(acc)
        grad_x, grad_b = _backward(_rows(inputs, acc), _rows(output_grads, acc), ctx.pixel_map, sym, ctx.budget,
                                   need_x, need_b)

        def back(grad_rows: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
            return None if grad_rows is None else grad_rows.transpose(1, 2).reshape(like.shape).to(like.dtype)

        return back(grad_x, inputs), back(grad_b, output_grads), None, None


def _check(inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
    for name, t in (("inputs", inputs), ("output_grads", output_grads)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name}: expected [N, C, L] or [N, C, H, W], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if output_grads.dim() != inputs.dim() or output_grads.shape[0] != inputs.shape[0]:
        raise ValueError(f"output_grads: shape {tuple(output_grads.shape)} does not match inputs' "
                         f"{tuple(inputs.shape)} (same N and number of spatial dims)")
    _check_dtype_and_device(inputs, output_grads)


def conv_pixel_gram(inputs: torch.Tensor, output_grads: torch.Tensor, kernel_size: IntOrTuple, *,
                    stride: IntOrTuple = 1, padding: Padding = 0, dilation: IntOrTuple = 1,
                    block_bytes: Optional[int] = None) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` for the per-sample weight gradients ``g_i`` of an ungrouped
    conv1d / conv2d, from its input and output gradient, differentiable (see the module docstring).

    Args:
        inputs: [N, C_in, *spatial] the convolution's input (unpadded).
        output_grads: [N, C_out, *spatial_out] the gradient at its output (taken with
            ``create_graph=True`` when G is differentiated through it); same dtype and device.
        kernel_size, stride, dilation: as the convolution's (an int or one per spatial dim).
        padding: an int, one per dim, or a (before, after) pair per dim (``"same"`` with an even
            kernel pads unevenly).
        block_bytes: budget for one temporary; default that of ``outer_gram`` (32 MiB).

    Returns:
        [N, N], fp64 for fp64 inputs else fp32, equal to ``outer_gram`` of the unfolded patches.
        Gradients flow to both inputs (first order); the graph holds only the two inputs.
    """
    _check(inputs, output_grads)
    dims = inputs.dim() - 2
    kernel = _per_dim(kernel_size, dims, "kernel_size")
    steps, dilations = _per_dim(stride, dims, "stride"), _per_dim(dilation, dims, "dilation")
    pads = _padding_pairs(padding, dims)
    if min(kernel + steps + dilations) < 1 or min(p for pair in pads for p in pair) < 0:
        raise ValueError(f"kernel_size, stride, dilation: expected positive, padding non-negative; got "
                         f"{kernel}, {steps}, {dilations}, {pads}")
    input_size, output_size = tuple(inputs.shape[2:]), tuple(output_grads.shape[2:])
    expected = conv_output_size(input_size, kernel, steps, pads, dilations)
    if output_size != expected:
        raise ValueError(f"output_grads: spatial size {output_size}, but a convolution of these settings maps "
                         f"{input_size} to {expected}")
    entries = math.prod(output_size) ** 2 * math.prod(input_size) ** 2
    if entries > MAX_MAP_ENTRIES:
        raise ValueError(f"inputs: a {input_size} -> {output_size} convolution needs a pixel map of {entries} "
                         f"entries (> {MAX_MAP_ENTRIES}); use outer_gram on the unfolded patches")
    pixel_map = conv_pixel_map(input_size, output_size, kernel, steps, [before for before, _ in pads], dilations,
                               _accumulation_dtype(inputs.dtype), inputs.device)
    return _PixelGram.apply(inputs, output_grads, pixel_map, _budget(block_bytes))
