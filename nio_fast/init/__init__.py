"""Handcrafted initializers, in place like torch.nn.init."""

from nio_fast.init.fractional_moment import fractional_moment_, fractional_moment_std

__all__ = ["fractional_moment_", "fractional_moment_std"]
