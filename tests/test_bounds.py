import numpy as np
import pytest

import ntkdist
from ntkdist.bounds import lambda_min_bounds
from ntkdist.data import synthetic_rows


@pytest.mark.parametrize("kind, n, d, depth, kernel", [
    ("sphere", 300, 64, 3, "ntk"),
    ("sphere", 200, 32, 2, "ntk"),
    ("gaussian", 250, 48, 4, "ntk"),
    ("sphere", 300, 64, 3, "nngp"),
    ("gaussian", 10, 400, 1, "ntk"),
])
def test_bounds_bracket_the_dense_lambda_min(kind, n, d, depth, kernel):
    X = synthetic_rows(kind, d, 4242 + n, 0, n)
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    lam = np.linalg.eigvalsh(gram(X, depth=depth))[0]
    b = lambda_min_bounds(X, depth, kernel, block=64)
    assert 0 < b["lower"] <= lam <= b["upper_min_diagonal"] <= b["upper_trace_over_n"] * 1.5
    bnt = lambda_min_bounds(X, depth, kernel, normalization="nt")
    assert bnt["lower"] == pytest.approx(b["lower"] * 2 / d, rel=1e-12)


def test_hermite_gershgorin_term_by_hand():
    """Depth-2 NTK, orders beyond r = 2 vanish for this data: check the r = 2 term."""
    rng = np.random.default_rng(99)
    X = rng.standard_normal((3, 200))
    b = lambda_min_bounds(X, 2, "ntk")
    U = X / np.linalg.norm(X, axis=1)[:, None]
    P = np.abs(U @ U.T)
    np.fill_diagonal(P, 0)
    expected = 2 / (4 * np.pi) * np.min(np.sum(X * X, 1)) * (1 - np.max(np.sum(P ** 2, 1)))
    assert b["lower_hermite_gershgorin_terms"]["G2"]["r=2"] == pytest.approx(expected, rel=1e-12)


def test_duplicate_rows_give_zero_lower_bound():
    X = synthetic_rows("sphere", 16, 1, 0, 30)
    X[7] = X[3]
    assert lambda_min_bounds(X, 3)["lower"] == 0.0


def test_staircase_prediction_matches_theory_md():
    from ntkdist.bounds import staircase_prediction

    values = [staircase_prediction(n, 64, 3)["value"] for n in (5000, 10000, 20000)]
    np.testing.assert_allclose(values, [40.90, 38.96, 36.98], atol=0.006)
    p = staircase_prediction(5000, 64, 3)
    assert p["degree"] == 2 and p["D_next"] == 45760
    assert staircase_prediction(5000, 64, 3, normalization="nt")["value"] == pytest.approx(
        values[0] * 2 / 64)
