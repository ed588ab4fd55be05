"""Scaled dot-product attention whose backward and double backward recompute the attention
probabilities instead of keeping them.

NIO differentiates through the backward pass. PyTorch's only twice-differentiable attention is
its math path, and once its backward is differentiated the graph keeps, per layer, four or five
tensors of the attention's size ([*, L, S]: the probabilities, their gradient, the scores'
gradient and the softmax backward's products) where the model's activations are [*, L, E] with
E = 16 or 64 values per head. On the small ViT (batch 64, 64 tokens) they were 90 of the 180 MB
allocated at the peak of a sample-wise GradCosine evaluation (torch.profiler memory events).

Here the forward keeps no graph; its backward is an autograd Function of (q, k, v, grad_out)
that recomputes the probabilities, and that Function's backward is the closed-form second
derivative below, which recomputes them again. The graph keeps q, k, v and grad_out, and the
[*, L, S] tensors live for one tile at a time: a block of the leading (sample) axis, or, where
one entry's scores are bigger than a tile (long sequences), a block of its query rows (every
formula below is row by row; the key-side results are summed over the row blocks: a 2-head,
1024-token entry's second derivatives peaked at 68 MB allocated untiled, under 16 MB in tiles,
tests/test_attention.py). Third derivatives go through autograd of the same formulas. The
recomputation costs two more q k^T products and softmaxes per layer, which fewer passes over the
[*, L, S] tensors more than pay for: on the small
ViT (batch 64, 2-core CPU) an NIO iteration at D = 4 took 0.88x the math path's time and a
sample-wise evaluation 0.85x (interleaved medians of 7 rounds).

Per batch entry, with P = softmax(scale q k^T + mask), dO the output's gradient:

    first:   dP = dO v^T,  dS = P * (dP - rowsum(P * dP)),
             dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO
    second:  given cotangents (gq, gk, gv) of (dq, dk, dv):
             H  = scale (gq k^T + q gk^T)               (cotangent of dS)
             GdP = P * (H - rowsum(H * P))              (of dP)
             GP  = dO gv^T + H * (dP - rowsum(P * dP)) - rowsum(H * P) * dP   (of P)
             GS  = P * (GP - rowsum(GP * P))            (of the scores)
             q: scale (dS gk + GS k);  k: scale (dS^T gq + GS^T q);
             v: GdP^T dO;  dO: P gv + GdP v

The softmax part of the second derivative (dS, GdP, GP, GS from P, dP, H and dO gv^T: about a
dozen elementwise passes over [*, L, S] tensors, most of them new allocations) is one fused pass
per row that overwrites its inputs (``attention_softmax_double_backward_`` of the extension on
the CPU, of ``nio_fast.kernels.attention`` on CUDA; ``backend``): on the small ViT's attention
([64, 4, 64, 16], 2-core CPU) forward, backward with a graph and double backward took 0.56-0.86x
the time of the same formulas in torch ops (benchmarks/test_normalization.py, table "attention").
A double backward that builds a graph (third derivatives) takes the torch formulas,
:func:`_softmax_second_order`.

The plain twin is autograd of the math path (:func:`attention_reference`); the tests hold the
two equal for values, first, second and third derivatives, and the kernel equal to
:func:`_softmax_second_order`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .. import availability

Tensor = torch.Tensor

# Values per [*, L, S] intermediate of a tile (the double backward holds about six at once): the
# sample-wise ViT at N = 64 (four blocks of 16 samples) peaked at 109 MB allocated with 2^18,
# 136 MB with 2^20 (one block), in the same time within noise (2-core CPU).
BLOCK_VALUES = 1 << 18
# On a GPU every tile is a dozen kernel launches, and memory is plentiful: 64 MB fp32 tiles keep a
# 4096-token, 8-head entry to 8 tiles where the CPU's size would make 512 (not yet measured on one).
CUDA_BLOCK_VALUES = 1 << 24
ROUTED_DTYPES = (torch.float32, torch.float64)
BACKENDS = ("auto", "cpp", "triton", "torch")


def attention_reference(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The plain twin: softmax(scale q k^T + mask) v in differentiable torch ops (the math path's
    formula; rows every key of which is masked give zeros, as its safe softmax does)."""
    scores = (query @ key.transpose(-2, -1)) * _scale(query, scale)
    mask = _additive_mask(query, key, attn_mask, is_causal)
    return torch.ops.aten._safe_softmax(scores if mask is None else scores + mask, -1) @ value


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, *, backend: str = "auto") -> Tensor:
    """``F.scaled_dot_product_attention`` (same arguments, same values) whose graph, when a
    backward is differentiated, keeps q, k, v and the output gradient instead of the attention
    probabilities and their derivatives (see the module's docstring).

    ``backend`` is where the softmax part of a second derivative taken without a graph runs:
    ``"cpp"`` (the extension's fused CPU kernel), ``"triton"`` (the fused Triton kernel: CUDA, or
    CPU tensors under TRITON_INTERPRET=1), ``"torch"`` (the plain twin's formulas) or ``"auto"``
    (cpp on the CPU, triton on CUDA, for float32/float64; else torch). Third derivatives always
    go through the twin's formulas.

    Taken: float32/float64 q, k, v with the same batch axes, a boolean or float mask that needs no
    gradient, no dropout, no grouped-query broadcasting, outside torch.func transforms. Anything
    else is ``F.scaled_dot_product_attention`` itself (its own errors too).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend in ("cpp", "triton"):
        _kernels(query, backend)  # raises where it cannot run
    if not _routed(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    mask = _additive_mask(query, key, attn_mask, is_causal)
    return _Attention.apply(query, key, value, mask, _scale(query, scale), backend)


def _routed(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> bool:
    tensors = (query, key, value)
    # Calls without a graph are taken too: under NIO's modes PyTorch's would run its math path
    # (1.33x the time of this one in a no-grad forward of the small ViT's encoder layer), and a
    # recomputed segment (nio_fast.samplewise.segments) gets the very values its recomputation sees.
    if dropout_p != 0.0 or enable_gqa or torch._C._are_functorch_transforms_active():
        return False
    if any(t.dtype != query.dtype or t.device != query.device or t.dim() != query.dim() for t in tensors):
        return False
    if query.dtype not in ROUTED_DTYPES or query.dim() < 2 or query.numel() == 0 or key.numel() == 0:
        return False
    if not (query.shape[:-2] == key.shape[:-2] == value.shape[:-2] and query.shape[-1] == key.shape[-1]
            and key.shape[-2] == value.shape[-2]):
        return False
    if attn_mask is not None:
        if is_causal or attn_mask.requires_grad or attn_mask.device != query.device:
            return False
        if not (attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype):
            return False
        try:
            if torch.broadcast_shapes(attn_mask.shape, (*query.shape[:-1], key.shape[-2])) != \
                    (*query.shape[:-1], key.shape[-2]):
                return False
        except RuntimeError:
            return False
    return True


def _kernels(x: Tensor, backend: str):
    """The module whose ``attention_softmax_double_backward_`` runs on ``x``
    (``availability.fused_kernels_for``), or None for :func:`_softmax_second_order`."""
    return availability.fused_kernels_for(x, backend, "attention", "nio_fast.kernels.attention")


def _scale(query: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def _additive_mask(query: Tensor, key: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    """The mask as values added to the scores (-inf where a boolean mask is False), or None."""
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~attn_mask,
                                                                                            float("-inf"))


def _probabilities(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """[R, l, S] softmax(scale q k^T + mask) of [R, l, E] q and [R, S, E] k; ``mask`` is a tile's
    mask of the scores' n-D shape (see :func:`_tiled`)."""
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    if mask is None:
        return torch.softmax(scores, -1)
    # Rows whose every key is masked give zeros, as the math path's safe softmax does; its search
    # for such rows took 7% of a sample-wise ViT evaluation, so unmasked scores skip it.
    return torch.ops.aten._safe_softmax(scores.view(mask.shape) + mask, -1).view(scores.shape)


TileFn = Callable[[Tensor, Tensor, Optional[Tensor], list, list], tuple[Sequence[Tensor], Sequence[Tensor]]]


def _tiled(fn: TileFn, q: Tensor, k: Tensor, mask: Optional[Tensor], rows: Sequence[Tensor] = (),
           keys: Sequence[Tensor] = ()) -> tuple[list[Tensor], list[Tensor]]:
    """``fn(q, k, mask, rows, keys) -> (row results, key results)`` tile by tile, assembled.

    ``q`` and ``rows`` are [*, L, .] (split by query row), ``k`` and ``keys`` [*, S, .] (whole in
    every tile of a leading block); fn sees them as [R, l, .] and [R, S, .] (R: the tile's entries
    times the inner batch axes) and the mask as the tile's n-D view of the scores' shape. Row
    results come back as [R_all, L, .] (the tiles' rows concatenated), key results as
    [R_all, S, .] (summed over a block's row tiles): callers view them as their shapes.
    """
    if q.dim() < 3:  # one entry: a leading axis of 1
        mask = None if mask is None else mask.expand(q.shape[0], k.shape[0])[None]
        return _tiled(fn, q[None], k[None], mask, [t[None] for t in rows], [t[None] for t in keys])
    scores_shape = (*q.shape[:-1], k.shape[-2])
    if mask is not None:
        mask = mask.expand(scores_shape)
    num_rows, per_entry = scores_shape[-2], math.prod(scores_shape[1:])
    budget = CUDA_BLOCK_VALUES if q.device.type == "cuda" else BLOCK_VALUES
    entries_per_block = max(1, budget // max(per_entry, 1))
    rows_per_tile = num_rows if per_entry <= budget else max(1, budget // max(per_entry // num_rows, 1))
    row_blocks, key_blocks = [], []
    for start in range(0, q.shape[0], entries_per_block):
        entries = slice(start, start + entries_per_block)
        k_, keys_ = _batched(k[entries]), [_batched(t[entries]) for t in keys]
        row_tiles, key_sums = [], None
        for first_row in range(0, num_rows, rows_per_tile):
            tile = (entries, Ellipsis, slice(first_row, first_row + rows_per_tile), slice(None))
            row_results, key_results = fn(_batched(q[tile]), k_, None if mask is None else mask[tile],
                                          [_batched(t[tile]) for t in rows], keys_)
            row_tiles.append(row_results)
            key_sums = list(key_results) if key_sums is None else \
                [total.add_(part) for total, part in zip(key_sums, key_results)]
        row_blocks.append([_cat(parts, 1) for parts in zip(*row_tiles)])
        key_blocks.append(key_sums)
    return [_cat(parts, 0) for parts in zip(*row_blocks)], [_cat(parts, 0) for parts in zip(*key_blocks)]


def _batched(t: Tensor) -> Tensor:
    return t.reshape(-1, *t.shape[-2:])


def _cat(parts: Sequence[Tensor], dim: int) -> Tensor:
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


# Fewer passes over the [R, L, S] tensors is the speed here (64 tokens of 16 values per head: the
# products are small): PyTorch's fused softmax backward P * (g - rowsum(g * P)), products added into
# in place (baddbmm_), scales applied to the [R, L, E] results. In-place ops only touch results no
# other op keeps for its backward, so the formulas stay differentiable (third derivatives).


def _backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, mask: Optional[Tensor], scale: float):
    """(dq, dk, dv): the attention's gradients for output gradient ``grad_out``."""
    def tile(q_, k_, mask_, rows, keys):
        (grad_,), (v_,) = rows, keys
        p = _probabilities(q_, k_, mask_, scale)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad_, v_.transpose(1, 2)), p, -1, p.dtype)
        return ((torch.bmm(grad_scores, k_).mul_(scale),),
                (torch.bmm(grad_scores.transpose(1, 2), q_).mul_(scale), torch.bmm(p.transpose(1, 2), grad_)))
    (dq,), (dk, dv) = _tiled(tile, q, k, mask, rows=(grad_out,), keys=(v,))
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def _double_backward(q, k, v, grad_out, mask, scale, cot_q, cot_k, cot_v, kernels=None):
    """(d q, d k, d v, d grad_out): the VJP of :func:`_backward` with cotangents (cot_q, cot_k,
    cot_v) of (dq, dk, dv), None meaning zero; the softmax part by the fused kernel of
    ``kernels`` (the extension, or the Triton module; no graph) when given, else by
    :func:`_softmax_second_order`."""
    cot_q, cot_k, cot_v = (torch.zeros_like(t) if c is None else c
                           for c, t in ((cot_q, q), (cot_k, k), (cot_v, v)))

    def tile(q_, k_, mask_, rows, keys):
        (grad_, cq), (v_, ck, cv) = rows, keys
        p = _probabilities(q_, k_, mask_, scale)
        grad_p = torch.bmm(grad_, v_.transpose(1, 2))
        unscaled_h = torch.bmm(cq, k_.transpose(1, 2)).baddbmm_(q_, ck.transpose(1, 2))
        cot_p_from_v = torch.bmm(grad_, cv.transpose(1, 2))
        if kernels is not None:
            kernels.attention_softmax_double_backward_(p, grad_p, unscaled_h, cot_p_from_v, scale)
            grad_scores, cot_grad_p, cot_scores = grad_p, unscaled_h, cot_p_from_v
        else:
            grad_scores, cot_grad_p, cot_scores = _softmax_second_order(p, grad_p, unscaled_h, cot_p_from_v, scale)
        return ((torch.bmm(grad_scores, ck).baddbmm_(cot_scores, k_).mul_(scale),
                 torch.bmm(cot_grad_p, v_).baddbmm_(p, cv)),
                (torch.bmm(grad_scores.transpose(1, 2), cq).baddbmm_(cot_scores.transpose(1, 2), q_).mul_(scale),
                 torch.bmm(cot_grad_p.transpose(1, 2), grad_)))
    (d_q, d_grad_out), (d_k, d_v) = _tiled(tile, q, k, mask, rows=(grad_out, cot_q), keys=(v, cot_k, cot_v))
    return d_q.view(q.shape), d_k.view(k.shape), d_v.view(v.shape), d_grad_out.view(grad_out.shape)


def _softmax_second_order(p: Tensor, grad_p: Tensor, unscaled_h: Tensor, cot_p_from_v: Tensor, scale: float):
    """(dS, GdP, GS) of the module's formulas from P, dP, H / scale and dO gv^T: the plain twin of
    the extension's attention_softmax_double_backward_, differentiable (third derivatives)."""
    h = unscaled_h.mul_(scale)
    centred = grad_p - (p * grad_p).sum(-1, keepdim=True)
    weighted = (h * p).sum(-1, keepdim=True)
    cot_p = (h * centred).addcmul_(weighted, grad_p, value=-1).add_(cot_p_from_v)
    return p * centred, p * (h - weighted), torch._softmax_backward_data(cot_p, p, -1, p.dtype)


class _Attention(Function):
    """softmax(scale q k^T + mask) v, no graph kept; backward through :class:`_AttentionBackward`
    when a graph is built."""

    @staticmethod
    def forward(q, k, v, mask, scale, backend):
        # The recomputation's formula, not F.scaled_dot_product_attention: NIO runs under the math
        # backend, whose safe softmax searches every row for masked ones (2% of a ViT iteration).
        def tile(q_, k_, mask_, rows, keys):
            (v_,) = keys
            return (torch.bmm(_probabilities(q_, k_, mask_, scale), v_),), ()
        (out,), _ = _tiled(tile, q, k, mask, keys=(v,))
        return out.view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, backend = inputs
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale, ctx.backend = scale, backend

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        if torch.is_grad_enabled():
            grads = _AttentionBackward.apply(q, k, v, grad_out, mask, ctx.scale, ctx.backend)
        else:
            grads = _backward(q, k, v, grad_out, mask, ctx.scale)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None)


class _AttentionBackward(Function):
    """(dq, dk, dv) of the attention, with the closed-form derivative of :func:`_double_backward`."""

    @staticmethod
    def forward(q, k, v, grad_out, mask, scale, backend):
        return _backward(q, k, v, grad_out, mask, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, grad_out, mask, scale, backend = inputs
        ctx.save_for_backward(q, k, v, grad_out, mask)
        ctx.scale, ctx.backend = scale, backend

    @staticmethod
    def backward(ctx, cot_q, cot_k, cot_v):
        q, k, v, grad_out, mask = ctx.saved_tensors
        # A graph to build (third derivatives) goes through the twin's differentiable formulas.
        kernels = None if torch.is_grad_enabled() else _kernels(q, ctx.backend)
        grads = _double_backward(q, k, v, grad_out, mask, ctx.scale, cot_q, cot_k, cot_v, kernels)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None)
