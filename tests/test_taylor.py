import mpmath
import numpy as np
import pytest

import ntkdist
from ntkdist import kernel_coefficients, relu_hermite_coefficient


def _kappa_mp(rho, depth, kernel):
    """κ(ρ) of unit vectors by the paper's recursion at high precision."""
    g = k = mpmath.mpf(rho)
    for _ in range(2, depth + 1):
        theta = mpmath.acos(g)
        gdot = (mpmath.pi - theta) / mpmath.pi
        g = (mpmath.sin(theta) + (mpmath.pi - theta) * mpmath.cos(theta)) / mpmath.pi
        k = k * gdot + g
    return k if kernel == "ntk" else g


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_against_high_precision_differentiation(depth, kernel):
    mpmath.mp.dps = 60
    ref = mpmath.taylor(lambda r: _kappa_mp(r, depth, kernel), 0, 12)
    a = kernel_coefficients(depth, kernel, 12)
    np.testing.assert_allclose(a, [float(v) for v in ref], rtol=1e-12, atol=1e-15)
    assert np.all(a >= -1e-16)


def test_theory_values_and_hermite_relation():
    a = kernel_coefficients(3, "ntk", 3)
    np.testing.assert_allclose(a, [0.6857, 0.9581, 0.6156, 0.1840], atol=5e-5)
    # One ReLU layer: κ₁(ρ) = 2 Σ_r μ_r² ρ^r.
    b = kernel_coefficients(2, "nngp", 30)
    mu2 = [2 * relu_hermite_coefficient(r) ** 2 for r in range(31)]
    np.testing.assert_allclose(b, mu2, rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_series_sums_to_the_kernel(depth):
    a = kernel_coefficients(depth, "ntk", 400)
    x = np.array([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)]])
    assert np.polyval(a[::-1], 0.9) == pytest.approx(ntkdist.ntk(x, depth=depth)[0, 1], rel=1e-12)
    partial = np.cumsum(a)
    assert np.all(np.diff(partial) >= 0) and depth - 0.25 < partial[-1] <= depth


def test_bad_arguments():
    with pytest.raises(ValueError):
        kernel_coefficients(0)
    with pytest.raises(ValueError):
        kernel_coefficients(2, "rbf")
    with pytest.raises(ValueError):
        kernel_coefficients(2, "ntk", -1)
