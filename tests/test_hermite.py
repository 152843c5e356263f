import math

import mpmath
import pytest

from ntkdist import relu_hermite_coefficient as mu


def test_closed_forms():
    assert mu(0) ** 2 == pytest.approx(1 / (2 * math.pi), rel=1e-15)
    assert mu(1) ** 2 == pytest.approx(0.25, rel=1e-15)
    assert mu(2) ** 2 == pytest.approx(1 / (4 * math.pi), rel=1e-15)
    assert mu(4) ** 2 == pytest.approx(1 / (48 * math.pi), rel=1e-15)
    assert all(mu(r) == 0 for r in (3, 5, 7, 101))


def test_squares_sum_to_half():
    even = sum(mu(r) ** 2 for r in range(2, 200001, 2))
    # The tail beyond R decays like R^(-3/2): ~1e-9 here.
    assert even == pytest.approx(0.25 - 1 / (2 * math.pi), abs=1e-7)


@pytest.mark.parametrize("r", range(0, 9))
def test_against_gaussian_quadrature(r):
    mpmath.mp.dps = 30
    he = lambda g: mpmath.hermite(r, g / mpmath.sqrt(2)) * mpmath.mpf(2) ** (-mpmath.mpf(r) / 2)
    integrand = lambda g: g * he(g) * mpmath.exp(-g * g / 2) / mpmath.sqrt(2 * mpmath.pi)
    value = mpmath.quad(integrand, [0, mpmath.inf]) / mpmath.sqrt(mpmath.factorial(r))
    assert mu(r) == pytest.approx(float(value), abs=1e-14)


def test_negative_index_refused():
    with pytest.raises(ValueError):
        mu(-1)
