"""ntkdist.predict: the free-convolution prediction of λ_min for sphere rows (docs/theory.md,
"Staircase prediction")."""

import math
import time

import numpy as np
import pytest

from ntkdist.errors import SpecError
from ntkdist.predict import (
    free_edge,
    gegenbauer_weights,
    harmonic_multiplicity,
    predict_lambda_min,
)

KEYS = {"lambda_min", "degree", "D_next", "tail", "edge", "staircase", "weights",
        "multiplicities", "method", "note"}

# Dense λ_min (scipy.linalg.eigh, float64) of ntk(X, depth) / nngp(X, depth) for
# X = synthetic_rows("sphere", d, seed, 0, N): (kernel, N, d, depth, seed) -> λ_min.
MEASURED = {
    ("ntk", 500, 64, 3, 0): 57.39161,
    ("ntk", 600, 64, 3, 0): 55.15079,
    ("ntk", 1000, 64, 3, 0): 50.06202,
    ("ntk", 1000, 64, 3, 1): 50.14436,
    ("ntk", 1000, 64, 3, 2): 50.11656,
    ("ntk", 1500, 64, 3, 0): 46.65781,
    ("ntk", 1000, 64, 2, 0): 15.90735,
    ("nngp", 1000, 64, 3, 0): 4.99611,
    ("ntk", 200, 32, 3, 0): 25.98276,
    ("ntk", 500, 32, 3, 0): 21.40088,
    ("ntk", 1000, 32, 3, 0): 19.18403,
    ("ntk", 500, 32, 2, 0): 6.16889,
    ("nngp", 1500, 32, 2, 0): 0.52441,
    # the case, N = 5000, d = 64, L = 3, three seeds (about a minute each)
    ("ntk", 5000, 64, 3, 0): 40.84939,
    ("ntk", 5000, 64, 3, 1): 40.86685,
    ("ntk", 5000, 64, 3, 2): 40.80640,
}


def test_keys_and_types():
    p = predict_lambda_min(5000, 64, 3)
    assert set(p) == KEYS
    assert p["method"] == "free" and p["degree"] == 2 and p["D_next"] == 45760
    assert p["multiplicities"] == [1, 64, 2079, 45696, 764400]
    assert len(p["weights"]) == 5
    for key in ("lambda_min", "tail", "edge", "staircase"):
        assert isinstance(p[key], float) and math.isfinite(p[key])
    assert p["lambda_min"] == pytest.approx(p["tail"] + p["edge"])
    assert "heuristic" in p["note"]


@pytest.mark.parametrize("args", [(5000, 64, 3, "ntk", "paper"), (20000, 64, 3, "ntk", "paper"),
                                  (300, 16, 2, "nngp", "paper"), (1000, 32, 4, "ntk", "nt"),
                                  (10, 64, 1, "ntk", "paper")])
def test_old_staircase_reproduced(args):
    from ntkdist.bounds import staircase_prediction

    old = staircase_prediction(*args)["value"]
    assert predict_lambda_min(*args)["staircase"] == pytest.approx(old, rel=1e-12)
    p = predict_lambda_min(*args, method="staircase")
    assert p["method"] == "staircase"
    assert p["lambda_min"] == pytest.approx(old, rel=1e-12)
    assert p["tail"] + p["edge"] == pytest.approx(old, rel=1e-12)


def test_measured_n5000_d64_depth3_within_5_percent():
    for seed in range(3):
        measured = MEASURED[("ntk", 5000, 64, 3, seed)]
        predicted = predict_lambda_min(5000, 64, 3)["lambda_min"]
        assert abs(predicted / measured - 1) < 0.05
        assert abs(predicted / measured - 1) < 0.005  # what it does: +0.09 … +0.24 %


def test_measured_small_cases():
    errors_new, errors_old = [], []
    for (kernel, n, d, depth, _), measured in MEASURED.items():
        p = predict_lambda_min(n, d, depth, kernel)
        tol = 0.01 if d == 64 else 0.045
        assert abs(p["lambda_min"] / measured - 1) < tol, (kernel, n, d, depth)
        errors_new.append(abs(p["lambda_min"] / measured - 1))
        errors_old.append(abs(p["staircase"] / measured - 1))
    assert max(errors_new) < 0.045 and max(errors_old) > 0.1
    assert np.mean(errors_new) < np.mean(errors_old) / 3


def test_live_small_dense():
    import scipy.linalg

    import ntkdist
    from ntkdist.data import synthetic_rows

    X = synthetic_rows("sphere", 64, 0, 0, 600)
    lam = scipy.linalg.eigh(ntkdist.ntk(X, depth=3), subset_by_index=[0, 0], eigvals_only=True)[0]
    assert lam == pytest.approx(MEASURED[("ntk", 600, 64, 3, 0)], rel=1e-6)
    assert predict_lambda_min(600, 64, 3)["lambda_min"] == pytest.approx(lam, rel=0.015)


def test_monotone_smooth_and_bounded():
    ns = np.unique(np.geomspace(2, 1e7, 120).astype(int))
    values = np.array([predict_lambda_min(int(n), 64, 3)["lambda_min"] for n in ns])
    assert np.all(np.diff(values) <= 1e-9 * values[:-1])
    assert np.all(values > 0) and np.all(values <= 64 * 3)
    # no jump where N crosses D_3 = 45760, unlike the Taylor staircase
    below, above = (predict_lambda_min(n, 64, 3) for n in (45759, 45760))
    assert above["degree"] == below["degree"] + 1
    assert abs(above["lambda_min"] / below["lambda_min"] - 1) < 1e-3
    assert below["staircase"] / above["staircase"] - 1 > 0.05
    # λ_min/d falls in steps: flat in N/d far from the harmonic dimensions
    assert predict_lambda_min(10**7, 512, 3)["lambda_min"] / 512 > 0.5


def test_normalization_and_depth_one():
    p = predict_lambda_min(3000, 32, 3)["lambda_min"]
    assert predict_lambda_min(3000, 32, 3, normalization="nt")["lambda_min"] == pytest.approx(
        p * 2 / 32)
    # depth 1: K = XXᵀ, a Wishart of ratio N/d: d(1 − √(N/d))² below d, 0 above
    assert predict_lambda_min(16, 64, 1)["lambda_min"] == pytest.approx(64 * 0.25, rel=1e-9)
    assert predict_lambda_min(100, 64, 1)["lambda_min"] == pytest.approx(0.0, abs=1e-9)


def test_free_edge_special_cases():
    # one Marchenko–Pastur law, with and without a shift
    assert free_edge([2.0], [0.25]) == pytest.approx(2.0 * 0.25, rel=1e-10)
    assert free_edge([2.0], [0.25], rest=1.0) == pytest.approx(1.5, rel=1e-10)
    # strong low-rank blocks remove their rank: ratio (N − R)/p
    n, rank, p, sigma, c = 10000, 1000, 40000, 3.0, 1.0
    spikes = free_edge([1e6, sigma], [n / rank, n / p], rest=c)
    assert spikes == pytest.approx(c + sigma * (1 - math.sqrt((n - rank) / p)) ** 2, rel=1e-4)
    # ranks that add up to less than N leave a null space
    assert free_edge([1.0, 1.0], [4.0, 4.0], rest=0.5) == 0.5


def test_gegenbauer_weights_against_quad():
    from scipy.integrate import quad
    from scipy.special import eval_gegenbauer

    d, lam = 5, 1.5

    def kappa(t):  # the depth-2 NNGP: κ₁
        return (math.sqrt(1 - t * t) + (math.pi - math.acos(t)) * t) / math.pi

    def weight(t):
        return (1 - t * t) ** ((d - 3) / 2)

    z = quad(weight, -1, 1)[0]
    c = gegenbauer_weights(2, "nngp", d, 6)
    for k in range(7):
        ref = harmonic_multiplicity(k, d) * quad(
            lambda t: kappa(t) * eval_gegenbauer(k, lam, t) / eval_gegenbauer(k, lam, 1.0)
            * weight(t), -1, 1, epsabs=1e-13, limit=200)[0] / z
        assert c[k] == pytest.approx(ref, abs=1e-7)


def test_gegenbauer_weights_structure():
    assert [harmonic_multiplicity(k, 3) for k in range(5)] == [1, 3, 5, 7, 9]
    assert [harmonic_multiplicity(k, 64) for k in range(4)] == [1, 64, 2079, 45696]
    np.testing.assert_allclose(gegenbauer_weights(1, "ntk", 16, 4), [0, 1, 0, 0, 0], atol=1e-13)
    # Σ_k c_k P_k(t) = κ(t) inside (−1, 1); Σ_k c_k → κ(1) = L slowly (c_k ~ k^−2)
    from ntkdist.predict import _kappa

    c = gegenbauer_weights(3, "ntk", 8, 100)
    assert np.all(c >= 0) and 2.98 < c.sum() < 3.0
    for t in (-0.5, 0.0, 0.5):
        p_prev, p, total = 1.0, t, c[0]
        for k in range(1, 101):
            total += c[k] * p
            p_prev, p = p, ((2 * k + 6) * t * p - k * p_prev) / (k + 6)
        assert total == pytest.approx(_kappa(np.array([t]), 3, "ntk")[0], abs=1e-8)
    with pytest.raises(SpecError):
        gegenbauer_weights(3, "ntk", 16, 300)  # 4e24 harmonics: rounding noise
    # as d grows they tend to the Taylor coefficients (degrees stop mixing)
    from ntkdist.kernels.taylor import kernel_coefficients

    a = kernel_coefficients(3, "ntk", 3)
    np.testing.assert_allclose(gegenbauer_weights(3, "ntk", 4096, 3), a, atol=2e-3)
    assert np.max(np.abs(gegenbauer_weights(3, "ntk", 64, 3) - a)) > 5e-3


def test_fast():
    predict_lambda_min(10**7, 512, 3)  # warm the caches (quadrature nodes, Taylor series)
    start = time.perf_counter()
    for d in (8, 64, 512):
        predict_lambda_min(10**7, d, 3)
    assert time.perf_counter() - start < 1.0


def test_refusals():
    for kwargs in ({"method": "exact"}, {"kernel": "relu"}, {"normalization": "x"}):
        with pytest.raises(SpecError):
            predict_lambda_min(100, 16, 3, **kwargs)
    for n, d, depth in ((0, 16, 3), (100, 1, 3), (100, 16, 0), (True, 16, 3)):
        with pytest.raises(SpecError):
            predict_lambda_min(n, d, depth)
