"""nio_fast: a better starting point for any PyTorch network, learned before training.

    report = nio_fast.initialize(model, loader)   # NIO: scales that align sub-batch gradients
    res = nio_fast.gradcosine(model, batch)       # measure GradCosine on one batch

Layout: ``kernels`` (Triton), the extension ``_C`` (C++/CUDA), ``ops`` (differentiable Gram and
cosine terms on top of both), ``algorithms`` (GradCosine, NIO, GradInit), ``init``
(handcrafted initializers), ``api`` (the two entry points), ``cli`` (the ``nio-fast`` command).
"""
import logging

from . import ops
from .algorithms import GradCosineResult, InitReport
from .api import gradcosine, initialize
from .availability import backends

__version__ = "0.1.0"

logging.getLogger("nio_fast").addHandler(logging.NullHandler())

__all__ = ["GradCosineResult", "InitReport", "backends", "gradcosine", "initialize", "ops", "__version__"]
