"""Sample-wise GradCosine: the per-sample gradient Gram from layer factors (shared/spec/GHOST.md).

``recorder`` notes how a forward uses each parameter, ``attention`` keeps the sample axis
through multi-head attention, ``factors`` turns a use and its output gradient into per-sample
gradient factors, and ``engine`` assembles the differentiable N x N Gram.
"""
from .engine import SampleGram, samplewise_gram

__all__ = ["SampleGram", "samplewise_gram"]
