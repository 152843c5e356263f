"""Hermite coefficients of ReLU in the normalised probabilists' Hermite basis.

relu(g) = Σ_r μ_r h_r(g) with h_r = He_r/√(r!), g ~ N(0, 1). Closed forms (docs/theory.md, "Hermite coefficients", from
Nguyen, Mondelli, Montúfar 2021, Sec. 3): μ_0 = 1/√(2π), μ_1 = 1/2, μ_r = 0 for odd r ≥ 3, and
for even r ≥ 2

    μ_r = (−1)^((r−2)/2) (r−3)!! / √(2π r!)      with (−1)!! = 1.

Since E[relu(g)²] = 1/2, Σ_r μ_r² = 1/2.
"""

import math
from fractions import Fraction

from ..errors import SpecError

#: Above this order μ_r is evaluated through log-gamma instead of exact integers.
_EXACT_MAX_ORDER = 300


def _log_double_factorial_odd(m: int) -> float:
    """log m!! for odd m ≥ 1: m!! = m! / (2^((m−1)/2) ((m−1)/2)!)."""
    h = (m - 1) // 2
    return math.lgamma(m + 1) - h * math.log(2.0) - math.lgamma(h + 1)


def relu_hermite_coefficient(r: int) -> float:
    """μ_r, the r-th normalised Hermite coefficient of ReLU."""
    if r < 0:
        raise SpecError(f"Hermite index must be >= 0, got {r}")
    if r == 0:
        return 1.0 / math.sqrt(2.0 * math.pi)
    if r == 1:
        return 0.5
    if r % 2 == 1:
        return 0.0
    sign = -1.0 if ((r - 2) // 2) % 2 else 1.0
    if r <= _EXACT_MAX_ORDER:
        ratio = Fraction(math.prod(range(r - 3, 0, -2)) ** 2, math.factorial(r))
        return sign * math.sqrt(float(ratio) / (2.0 * math.pi))
    log_mag = (_log_double_factorial_odd(r - 3)
               - 0.5 * (math.log(2.0 * math.pi) + math.lgamma(r + 1)))
    return sign * math.exp(log_mag)
