"""Fractional moment-preserving initialization (FMP).

Gaussian weights whose standard deviation keeps the fractional moment E|x|^s of the
pre-activations equal from one layer to the next (shared/spec/FMP.md; Gurbuzbalaban and
Hu, AISTATS 2021). At s = 2 it is He (ReLU) or LeCun (linear) initialization.

Derivation used throughout (inputs to a layer i.i.d. N(0, tau^2) given the layer below,
weights N(0, sigma^2), fan-in d): a pre-activation y = <w, h> with h = phi(x) is
N(0, sigma^2 ||h||^2) given h, so E|y|^s = sigma^s E|Z|^s E||h||^s, and E|y|^s = E|x|^s
exactly when

    sigma = (E[X^(s/2)])^(-1/s),   X = ||h||^2 / tau^2 = sum_i phi(z_i)^2, z_i ~ N(0, 1).

ReLU: X = chi^2 with Binomial(d, 1/2) degrees of freedom (the spec's lgamma sum);
linear: X = chi^2_d; leaky ReLU with negative slope a: each term is z^2 or a^2 z^2 with
probability 1/2, which has no finite-sum formula, so its moment is computed exactly from
the Laplace transform (see `_leaky_relu_moment`).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["fractional_moment_", "fractional_moment_std"]

NONLINEARITIES = ("relu", "linear", "leaky_relu")

# Quadrature for the leaky-ReLU moment: trapezoid rule in u = log t over the whole real
# line. The integrand is analytic in a strip around the real axis, so the error falls
# exponentially with 1 / step (measured: about 1e-12 relative at 0.05).
_QUAD_STEP = 0.05
# Grid points cover t in [exp(-30) / d, exp(90) / min(1, 2 a^2)]; beyond both ends the
# integrand is a pure power of t up to a relative error of about 1e-13.
_QUAD_LOW_MARGIN = 30.0
_QUAD_HIGH_MARGIN = 90.0


def _check_arguments(fan_in: int, s: float, nonlinearity: str, a: float) -> None:
    if isinstance(fan_in, bool) or not isinstance(fan_in, numbers.Integral) or fan_in < 1:
        raise ValueError(f"fan_in must be an integer >= 1, got {fan_in!r}")
    if not isinstance(s, numbers.Real) or not math.isfinite(s) or not 0.0 < s <= 2.0:
        raise ValueError(f"s must be a number in (0, 2], got {s!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {nonlinearity!r}"
        )
    if nonlinearity == "leaky_relu" and (
        not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0.0
    ):
        raise ValueError(f"a (the negative slope) must be a finite number >= 0, got {a!r}")


def _relu_log_moment(d: int, s: float) -> float:
    """log E[X^(s/2)] for X ~ chi^2 with N ~ Binomial(d, 1/2) degrees of freedom (N = 0: X = 0)."""
    n = torch.arange(1, d + 1, dtype=torch.float64)
    # log of C(d, n) 2^-d: the weights themselves underflow float64 for d > ~1070.
    log_weights = (
        math.lgamma(d + 1) - torch.lgamma(n + 1) - torch.lgamma(d - n + 1) - d * math.log(2.0)
    )
    log_ratio = torch.lgamma((n + s) / 2) - torch.lgamma(n / 2)
    return 0.5 * s * math.log(2.0) + torch.logsumexp(log_weights + log_ratio, dim=0).item()


def _linear_log_moment(d: int, s: float) -> float:
    """log E[X^(s/2)] for X ~ chi^2_d."""
    return 0.5 * s * math.log(2.0) + math.lgamma((d + s) / 2) - math.lgamma(d / 2)


def _leaky_relu_log_moment(d: int, s: float, a: float) -> float:
    """log E[X^q], q = s/2, for X = sum of d i.i.d. terms z^2 or a^2 z^2 (probability 1/2 each).

    Uses, for 0 < q < 1, x^q = q / Gamma(1 - q) * int_0^inf (1 - exp(-t x)) t^(-q-1) dt, so
    E[X^q] = q / Gamma(1 - q) * int_0^inf (1 - L(t)^d) t^(-q-1) dt with the Laplace transform
    of one term L(t) = ((1 + 2t)^(-1/2) + (1 + 2 a^2 t)^(-1/2)) / 2 (the binomial mixture over
    the active inputs collapses into the d-th power). At q = 1 the moment is the mean,
    d (1 + a^2) / 2. Exact up to quadrature error (about 1e-12 relative).
    """
    q = 0.5 * s
    mean_term = 0.5 * (1.0 + a * a)
    if q == 1.0:
        return math.log(d * mean_term)

    low = -math.log(d) - _QUAD_LOW_MARGIN
    high = _QUAD_HIGH_MARGIN
    if a > 0:  # the a^2 term only starts to decay once 2 a^2 t > 1
        high += max(0.0, -math.log(2.0 * a * a))
    h = _QUAD_STEP
    u = low + h * torch.arange(math.ceil((high - low) / h) + 1, dtype=torch.float64)

    def one_minus_inverse_sqrt(log_scale: float) -> torch.Tensor:
        # 1 - (1 + e^(u + log_scale))^(-1/2), accurate for tiny and huge t alike.
        log_one_plus = nn.functional.softplus(u + log_scale, threshold=30.0)
        return -torch.expm1(-0.5 * log_one_plus)

    one_minus_laplace = 0.5 * one_minus_inverse_sqrt(math.log(2.0))
    if a > 0:  # at a = 0 the second term is identically zero
        one_minus_laplace = one_minus_laplace + 0.5 * one_minus_inverse_sqrt(math.log(2.0 * a * a))
    one_minus_power = -torch.expm1(d * torch.log1p(-one_minus_laplace))
    integrand = one_minus_power * torch.exp(-q * u)  # dt / t^(q+1) = e^(-q u) du
    # Trapezoid rule over the whole real line: beyond both ends the integrand is a pure
    # exponential in u (e^((1-q) u) below, e^(-q u) above), so the points past the grid
    # sum as geometric series. Truncating to a finite interval instead costs O(step^2).
    ratio_low, ratio_high = math.exp(-(1.0 - q) * h), math.exp(-q * h)
    integral = h * (
        integrand.sum().item()
        + integrand[0].item() * ratio_low / (1.0 - ratio_low)
        + integrand[-1].item() * ratio_high / (1.0 - ratio_high)
    )
    return math.log(q) - math.lgamma(1.0 - q) + math.log(integral)


def _approximate_variance(d: int, s: float, nonlinearity: str, a: float) -> float:
    """The closed-form second-order approximations of shared/spec/FMP.md."""
    if nonlinearity == "relu":
        return 2.0 / d + 5.0 * (2.0 - s) / (2.0 * d * d)
    if nonlinearity == "linear":
        return 1.0 / d + (2.0 - s) / (2.0 * d * d)
    a2 = a * a
    return 2.0 / ((1.0 + a2) * d) + (2.0 - s) * ((5.0 * s - 24.0) * a2 + 10.0) / (
        (2.0 * (s + 2.0) * a2 + 4.0) * d * d
    )


def fractional_moment_std(
    fan_in: int,
    s: float = 1.0,
    nonlinearity: str = "relu",
    a: float = 0.01,
    exact: bool = True,
) -> float:
    """Standard deviation of Gaussian weights that preserves E|x|^s across a layer.

    Args:
        fan_in: number of inputs d of one output unit (in_features, or in_channels / groups
            times the kernel area), at least 1.
        s: the moment to preserve, in (0, 2]; s = 2 gives He (ReLU: 2/d) or LeCun (linear:
            1/d) variance. The published experiments use 0.8 for ReLU nets, 1 otherwise.
        nonlinearity: the activation applied to this layer's INPUTS: "relu", "linear" or
            "leaky_relu".
        a: negative slope of the leaky ReLU (used only for "leaky_relu"), >= 0.
        exact: True computes the exact variance: ReLU and linear by the log-gamma sums of
            FMP.md, evaluated in log space so that nothing underflows at large fan-in; leaky
            ReLU by a one-dimensional integral of its Laplace transform (exact up to about
            1e-12 relative quadrature error; it equals the ReLU sum at a = 0 and the linear
            formula at a = 1). False uses the closed-form approximations of FMP.md, accurate to
            about 1e-3 relative at d = 64; the leaky-ReLU one is meant for small slopes (it
            agrees with the exact moment to first order in a^2, not at a near 1).

    Returns:
        sigma, the standard deviation (a Python float).

    Raises:
        ValueError: naming the argument, for fan_in < 1, s outside (0, 2], an unknown
            nonlinearity or a negative or non-finite slope.
    """
    _check_arguments(fan_in, s, nonlinearity, a)
    fan_in, s = int(fan_in), float(s)
    if not exact:
        return math.sqrt(_approximate_variance(fan_in, s, nonlinearity, float(a)))
    if nonlinearity == "relu":
        log_moment = _relu_log_moment(fan_in, s)
    elif nonlinearity == "linear":
        log_moment = _linear_log_moment(fan_in, s)
    else:
        log_moment = _leaky_relu_log_moment(fan_in, s, float(a))
    return math.exp(-log_moment / s)


def _fan_in(weight: torch.Tensor) -> int:
    if weight.dim() < 2:
        raise ValueError(
            "module_or_tensor must be a weight with at least 2 dimensions "
            f"([out, in, *kernel]), got shape {tuple(weight.shape)}"
        )
    # [out, in / groups, *kernel]: everything after dim 0 feeds one output unit.
    return math.prod(weight.shape[1:])


def fractional_moment_(
    module_or_tensor: Union[nn.Module, torch.Tensor],
    s: float = 1.0,
    nonlinearity: str = "relu",
    a: float = 0.01,
    exact: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Union[nn.Module, torch.Tensor]:
    """Fill a weight in place with N(0, sigma^2), sigma from `fractional_moment_std`.

    Args:
        module_or_tensor: an nn.Linear or (non-transposed) nn.Conv1d/2d/3d, whose weight is
            drawn and whose bias, if any, is set to zero (FMP.md is silent on biases; the
            derivation has none, and a non-zero bias would break the preserved moment); or a
            weight tensor of shape [out, in / groups, *kernel], whose fan-in is
            in / groups times the kernel area.
        s, nonlinearity, a, exact: as in `fractional_moment_std`.
        generator: optional torch.Generator for the draw.

    Returns:
        The module or tensor that was passed in, like the torch.nn.init functions.

    Raises:
        TypeError: for a module that is not Linear or a non-transposed Conv, or another type.
        ValueError: as `fractional_moment_std`, or for a tensor with fewer than 2 dimensions.
    """
    if isinstance(module_or_tensor, nn.Module):
        module = module_or_tensor
        is_conv = isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
        if not (isinstance(module, nn.Linear) or is_conv):
            raise TypeError(
                "module_or_tensor must be nn.Linear, a non-transposed nn.Conv1d/2d/3d or a "
                f"weight tensor, got {type(module).__name__}"
            )
        fractional_moment_(module.weight, s, nonlinearity, a, exact, generator)
        if module.bias is not None:
            with torch.no_grad():
                module.bias.zero_()
        return module
    if not isinstance(module_or_tensor, torch.Tensor):
        raise TypeError(
            "module_or_tensor must be an nn.Module or a torch.Tensor, "
            f"got {type(module_or_tensor).__name__}"
        )
    weight = module_or_tensor
    std = fractional_moment_std(_fan_in(weight), s, nonlinearity, a, exact)
    with torch.no_grad():
        weight.normal_(0.0, std, generator=generator)
    return weight
