"""The algorithms: one GradCosine evaluation, NIO, GradInit, and the scale optimizer they share."""
from .gradcosine import GradCosineResult, evaluate_gradcosine
from .report import InitReport
from .scale_optimizer import ScaleAdam

__all__ = ["GradCosineResult", "InitReport", "ScaleAdam", "evaluate_gradcosine"]
