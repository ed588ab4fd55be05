"""Multi-head attention with every projection on a tensor that keeps the batch axis.

``torch.nn.functional.multi_head_attention_forward`` (called by ``nn.MultiheadAttention`` and so
by ``nn.TransformerEncoderLayer``/``DecoderLayer``) runs its output projection as
``linear(attn.reshape(T * N, E), out_proj_weight, out_proj_bias)``: the sequence and batch axes
are merged into one, so a ``TorchFunctionMode`` that records ``F.linear`` inputs to form
per-sample weight gradients cannot tell the samples apart.

:func:`multi_head_attention_forward` here takes the same arguments, returns the same values and
computes the same numbers (the same kernels in the same order: the explicit softmax path when
``need_weights`` is true, ``F.scaled_dot_product_attention`` when it is false), with these
differences in how the projections are issued:

* every projection is a single ``torch.nn.functional.linear`` call, looked up when called so an
  active ``TorchFunctionMode`` sees it, whose input is a 3-D ``[T, N, E_in]`` tensor with the
  batch (sample) axis at position :data:`sample_axis` == 1, and whose weight argument is the
  weight tensor the caller passed (the parameter itself, never a slice or view of it):

  - packed self-attention (``use_separate_proj_weight=False``, ``query is key is value``):
    ``linear(query, in_proj_weight, in_proj_bias) -> [T, N, 3E]``, then split into the same
    q, k, v views PyTorch takes;
  - separate projection weights (``use_separate_proj_weight=True``): three calls
    ``linear(query, q_proj_weight, b_q)``, ``linear(key, k_proj_weight, b_k)``,
    ``linear(value, v_proj_weight, b_v)``.  NOTE: ``b_q, b_k, b_v`` are ``in_proj_bias.chunk(3)``,
    i.e. *views* of the packed bias parameter, not the parameter itself (PyTorch does the same).
    A recorder that needs the bias parameter must map a bias view back to
    ``in_proj_bias`` (``bias._base is in_proj_bias``, offset ``0``, ``E`` or ``2E``);
  - output projection: ``linear(attn[T, N, E], out_proj_weight, out_proj_bias) -> [T, N, E]``.

* it returns ``NotImplemented`` for every configuration it does not reproduce exactly; the
  caller must then run PyTorch's own function (which also raises PyTorch's own error for invalid
  arguments, since argument errors are answered with ``NotImplemented`` too):

  - packed ``in_proj_weight`` with ``query``, ``key``, ``value`` not all the same tensor object
    (encoder-decoder / cross attention): PyTorch would project with row slices of the packed
    weight, so the weight argument could not be the parameter itself;
  - ``bias_k``/``bias_v`` (``add_bias_kv=True``): extra learned key/value rows that are not a
    projection of the input;
  - ``add_zero_attn``;
  - ``static_k``/``static_v``;
  - ``dropout_p > 0`` while ``training``: PyTorch's RNG consumption (dropout on the weights in
    the explicit path, inside SDPA otherwise) would have to be replayed bit for bit;
  - unbatched (2-D) ``query``: there is no sample axis;
  - nested tensors;
  - JIT scripting / tracing;
  - malformed arguments (shapes, dtypes of masks, ``is_causal`` without ``attn_mask``,
    ``embed_dim`` mismatch, heads not dividing ``embed_dim``): PyTorch raises its own error.

Masks are merged exactly as PyTorch 2.13 merges them: boolean masks become additive float masks
(``-inf`` where True) of the query dtype; a 2-D ``attn_mask`` ``[T, S]`` or 3-D
``[N * H, T, S]`` ``attn_mask`` is added to the key padding mask expanded to ``[N * H, 1, S]``;
``is_causal`` requires ``attn_mask`` and is forwarded to SDPA (with the mask dropped) only when
there is no key padding mask and no weights are requested, otherwise the given mask is used.
"""
from __future__ import annotations

import math
import warnings

import torch

# The engine's caller reads the sample axis of every recorded F.linear input from here: each
# projection's input (and output) is [seq, batch, features], the PyTorch sequence-first layout
# that F.multi_head_attention_forward works in (nn.MultiheadAttention(batch_first=True)
# transposes before calling it), so the per-sample axis is axis 1.
sample_axis = 1

__all__ = ["multi_head_attention_forward", "sample_axis"]


# A batch-first module hands in [T, N, E] views of [N, T, E] tensors and takes back the output's
# gradient as such a view. F.linear's matmul copies either into [T * N, E] rows, and that copy is
# what its graph keeps, while a recorder of the sample-wise engine (or anything else) keeps the
# original: two copies of one activation per layer. Both helpers make the one copy up front, so
# F.linear works on a view of it (the small ViT's sample-wise evaluation: 2 MB less per layer).


def _sequence_major(x):
    """``x`` as a contiguous [T, N, E] tensor (a copy only where it was a transposed view)."""
    return x.contiguous()


class _SequenceMajorGradient(torch.autograd.Function):
    """The identity; its gradient leaves contiguous in the [T, N, E] layout (differentiably)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _sequence_major_gradient(out):
    if not out.requires_grad or torch._C._are_functorch_transforms_active():
        return out
    return _SequenceMajorGradient.apply(out)


def _additive_mask(mask, name, other_dtype, other_name, target_dtype, check_other=True):
    """PyTorch's mask canonicalisation: bool -> float (-inf where True), float unchanged.

    Only bool and floating masks reach here (other dtypes were answered with NotImplemented).
    """
    if mask is None:
        return None
    is_float = torch.is_floating_point(mask)
    if check_other and other_dtype is not None and mask.dtype != other_dtype:
        warnings.warn(
            f"Support for mismatched {name} and {other_name} is deprecated. "
            "Use same type for both instead.",
            stacklevel=3,
        )
    if not is_float:
        mask = torch.zeros_like(mask, dtype=target_dtype).masked_fill_(mask, float("-inf"))
    return mask


def multi_head_attention_forward(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
):
    """Drop-in for ``F.multi_head_attention_forward`` with batch-preserving projections.

    Returns ``(attn_output [T, N, E], attn_weights or None)`` as PyTorch does, or
    ``NotImplemented`` for an unsupported configuration (see the module docstring).
    """
    F = torch.nn.functional

    # ---- configurations not reproduced exactly: let PyTorch run them ----------------------
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return NotImplemented
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return NotImplemented
    if any(t.is_nested for t in tensors):
        return NotImplemented
    if bias_k is not None or bias_v is not None or add_zero_attn:
        return NotImplemented
    if static_k is not None or static_v is not None:
        return NotImplemented
    if training and dropout_p > 0.0:
        return NotImplemented
    if query.dim() != 3:  # unbatched (2-D) input has no sample axis; other ranks are errors
        return NotImplemented
    if key.dim() != 3 or value.dim() != 3:
        return NotImplemented
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        return NotImplemented
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        return NotImplemented
    if not isinstance(embed_dim_to_check, int) or not isinstance(num_heads, int):
        return NotImplemented
    if is_causal and attn_mask is None:
        return NotImplemented  # PyTorch raises

    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    if embed_dim != embed_dim_to_check or num_heads <= 0 or embed_dim % num_heads:
        return NotImplemented
    head_dim = embed_dim // num_heads
    if key.shape[1] != bsz:
        return NotImplemented

    if use_separate_proj_weight:
        if key.shape[:2] != value.shape[:2]:
            return NotImplemented
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            return NotImplemented
        if (
            q_proj_weight.shape != (embed_dim, embed_dim)
            or k_proj_weight.shape != (embed_dim, key.shape[-1])
            or v_proj_weight.shape != (embed_dim, value.shape[-1])
        ):
            return NotImplemented
        if in_proj_bias is not None and in_proj_bias.shape != (3 * embed_dim,):
            return NotImplemented
    else:
        if key.shape != value.shape or in_proj_weight is None:
            return NotImplemented
        if not (query is key and key is value):
            return NotImplemented  # packed weight on distinct inputs needs slices of the weight

    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
        return NotImplemented
    if attn_mask is not None:
        expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
        if tuple(attn_mask.shape) != expected:
            return NotImplemented
    for m in (key_padding_mask, attn_mask):
        if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
            return NotImplemented

    # ---- masks, as PyTorch merges them ---------------------------------------------------
    key_padding_mask = _additive_mask(
        key_padding_mask,
        "key_padding_mask",
        None if attn_mask is None else attn_mask.dtype,
        "attn_mask",
        query.dtype,
    )
    if is_causal and key_padding_mask is None and not need_weights:
        # SDPA applies the causal mask itself; the explicit mask is only a hint here.
        attn_mask = None
    else:
        attn_mask = _additive_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer purely causal

    # ---- in-projections: one F.linear per projection, batch axis kept at 1 ---------------
    if not use_separate_proj_weight:
        proj = F.linear(_sequence_major(query), in_proj_weight, in_proj_bias)  # [T, N, 3E]
        # q, k, v as contiguous [T, N, E] tensors, the values and layout PyTorch gives them (it copies
        # proj into one [3, T, N, E] tensor and selects). Unbinding the [T, N, 3, E] view and copying
        # each part makes the backward one stack straight into proj's layout, where PyTorch's route
        # stacks into [3, T, N, E] and copies that back into [T, N, 3E] (small ViT, NIO at D = 4:
        # 0.98x the iteration's time, 21 interleaved rounds; its proj[0], proj[1], proj[2] would
        # also make three select_backwards each write a zero tensor of proj's size).
        q, k, v = (part.contiguous() for part in proj.unflatten(-1, (3, embed_dim)).unbind(-2))
    else:
        if in_proj_bias is None:
            b_q = b_k = b_v = None
        else:
            # Views of in_proj_bias (not the parameter itself), exactly as PyTorch slices it.
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        query_rows = _sequence_major(query)
        key_rows = query_rows if key is query else _sequence_major(key)
        value_rows = key_rows if value is key else query_rows if value is query else _sequence_major(value)
        q = F.linear(query_rows, q_proj_weight, b_q)  # [T, N, E]
        k = F.linear(key_rows, k_proj_weight, b_k)  # [S, N, E]
        v = F.linear(value_rows, v_proj_weight, b_v)  # [S, N, E]

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)  # [1, T, S]

    # [L, N, E] -> [N*H, L, head_dim]
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    # Dropout: training with dropout_p > 0 was refused above, so no dropout remains.
    dropout_p = 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        del q_scaled, k
        weights = F.softmax(weights, dim=-1)
        attn = torch.bmm(weights, v)  # [N*H, T, head_dim]
        del v
        # [N*H, T, hd] -> [T, N*H, hd] -> [T, N, E]: same memory as PyTorch's [T*N, E].
        attn = attn.transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
        out = _sequence_major_gradient(F.linear(attn, out_proj_weight, out_proj_bias))  # [T, N, E]
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)  # [1, 1, T, S]
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    del q, k, v
    # [N, H, T, hd] -> [T, N, H, hd] -> [T, N, E]: same memory as PyTorch's [T*N, E].
    attn = attn.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(attn, out_proj_weight, out_proj_bias)  # [T, N, E]
    return _sequence_major_gradient(out), None
