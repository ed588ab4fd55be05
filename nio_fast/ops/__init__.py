"""Differentiable ops behind GradCosine: the fused Gram, its cosine terms, per-tensor dots."""
from .cosine import CosineTerms, gradcosine_from_gram
from .dots import tensor_dots, tensor_dots_reference
from .factor_gram import (OuterGramCost, chunk_gram, chunk_weights, embedding_gram, embedding_gram_reference,
                          outer_gram, outer_gram_cost, outer_gram_reference, outer_gram_route)
from .gram import as_grad_table, gram, gram_reference

__all__ = ["CosineTerms", "as_grad_table", "gram", "gram_reference", "gradcosine_from_gram",
           "tensor_dots", "tensor_dots_reference",
           "OuterGramCost", "chunk_gram", "chunk_weights", "embedding_gram", "embedding_gram_reference",
           "outer_gram", "outer_gram_cost", "outer_gram_reference", "outer_gram_route"]
