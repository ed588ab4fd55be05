"""Triton Gram kernels. Importing this package imports triton: only do so when it is installed."""

from .gram import gram_backward, gram_forward

__all__ = ["gram_backward", "gram_forward"]
