"""Differentiable ops behind GradCosine: the fused Gram, its cosine terms, per-tensor dots, the
per-sample Grams of layer factors and their chunk reductions, GroupNorm, BatchNorm and LayerNorm
with fused double backwards, attention with a recomputing one."""
from .attention import attention, attention_reference
from .cosine import CosineTerms, gradcosine_from_gram
from .dots import tensor_dots, tensor_dots_reference
from .chunk_reduce import (ChunkWeighting, chunk_gram, chunk_gram_reference, chunk_sums, chunk_sums_reference,
                           chunk_weights)
from .factor_gram import (OuterGramCost, embedding_gram, embedding_gram_reference, gram_values_unused,
                          gram_values_wanted, outer_gram, outer_gram_cost, outer_gram_reference, outer_gram_route)
from .pixel_gram import conv_pixel_gram, pixel_gram_cost
from .gram import as_grad_table, gram, gram_reference
from .batch_norm import batch_norm, batch_norm_backward_reference, batch_norm_double_backward_reference
from .fused_calls import fused_calls
from .group_norm import (group_norm, group_norm_backward_reference, group_norm_double_backward_reference,
                         group_norm_weight_per_sample)
from .layer_norm import (layer_norm, layer_norm_backward_reference, layer_norm_double_backward_reference,
                         layer_norm_weight_per_sample)

__all__ = ["attention", "attention_reference", "CosineTerms", "as_grad_table", "gram", "gram_reference",
           "gradcosine_from_gram",
           "tensor_dots", "tensor_dots_reference",
           "ChunkWeighting", "chunk_gram", "chunk_gram_reference", "chunk_sums", "chunk_sums_reference",
           "chunk_weights", "OuterGramCost", "embedding_gram", "embedding_gram_reference",
           "gram_values_unused", "gram_values_wanted",
           "outer_gram", "outer_gram_cost", "outer_gram_reference", "outer_gram_route",
           "conv_pixel_gram", "pixel_gram_cost",
           "fused_calls", "group_norm", "group_norm_backward_reference", "group_norm_double_backward_reference",
           "group_norm_weight_per_sample",
           "batch_norm", "batch_norm_backward_reference", "batch_norm_double_backward_reference",
           "layer_norm", "layer_norm_backward_reference", "layer_norm_double_backward_reference",
           "layer_norm_weight_per_sample"]
