"""Differentiable ops behind GradCosine: the fused Gram, its cosine terms, per-tensor dots."""
from .cosine import CosineTerms, gradcosine_from_gram
from .dots import tensor_dots, tensor_dots_reference
from .gram import as_grad_table, gram, gram_reference

__all__ = ["CosineTerms", "as_grad_table", "gram", "gram_reference", "gradcosine_from_gram",
           "tensor_dots", "tensor_dots_reference"]
