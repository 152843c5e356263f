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


def _per_layer_maxima(X, layer, block, fused):
    """max_i Σ_{j≠i} |P^(layer)_ij|^r built from layer 1 with kernel_tile, as a reference."""
    from ntkdist.bounds import HERMITE_ORDERS
    from ntkdist.kernels.limiting import RowBlock, kernel_tile, row_block

    unit = row_block(X).unit
    ones = np.ones(unit.shape[0])
    full = RowBlock(unit=unit, norms=ones)
    n = unit.shape[0]
    sums = np.zeros((len(HERMITE_ORDERS), n))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        part = RowBlock(unit=unit[lo:hi], norms=ones[lo:hi])
        P = np.abs(kernel_tile(part, full, layer, "nngp", fused=fused))
        P[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
        P2 = P * P
        power = P2.copy()
        for idx, _ in enumerate(HERMITE_ORDERS):
            if idx:
                power *= P2
            sums[idx, lo:hi] = power.sum(axis=1)
    return sums.max(axis=1)


def _chain_rows():
    from reference import hard_rows

    rng = np.random.default_rng(77)
    X = np.vstack([hard_rows(rng), rng.standard_normal((25, 9)), np.zeros((1, 9))])
    return X[rng.permutation(len(X))]


@pytest.mark.parametrize("fused", [False, None])
def test_one_pass_chain_matches_per_layer_correlations(fused):
    """Every layer's power sums from the one-pass recursion equal those of P^(m) rebuilt from
    layer 1 (duplicates, antipodes and a zero row included, row blocks of 7 rows)."""
    from ntkdist.bounds import _max_row_power_sums
    from ntkdist.kernels.limiting import row_block

    X = _chain_rows()
    got = _max_row_power_sums(row_block(X), 6, range(1, 7), block=7)
    for m in range(1, 7):
        np.testing.assert_allclose(got[m], _per_layer_maxima(X, m, 7, fused), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_lower_bound_terms_match_the_layer_by_layer_chain(depth, kernel):
    from ntkdist.bounds import HERMITE_ORDERS

    X = synthetic_rows("gaussian", 40, 3, 0, 30)  # no close pairs: most terms are not clipped
    b = lambda_min_bounds(X, depth, kernel, block=7)
    if depth == 1:  # Gershgorin on XXᵀ, which needs d ≫ N to be positive
        X = synthetic_rows("gaussian", 400, 3, 0, 10)
        G = np.abs(X @ X.T)
        expected = np.min(2 * np.diag(G) - G.sum(axis=1))
        assert lambda_min_bounds(X, 1, kernel, block=3)["lower"] == pytest.approx(expected, rel=1e-14)
        assert expected > 0
        return
    mu2 = np.array([ntkdist.relu_hermite_coefficient(r) ** 2 for r in HERMITE_ORDERS])
    scale = 2.0 * float(np.min(np.einsum("ij,ij->i", X, X)))
    layers = range(2, depth + 1) if kernel == "ntk" else [depth]
    assert set(b["lower_hermite_gershgorin_terms"]) == {f"G{layer}" for layer in layers}
    for layer in layers:
        maxima = _per_layer_maxima(X, layer - 1, 7, None)
        expected = scale * mu2 * np.clip(1.0 - maxima, 0.0, None)
        got = [b["lower_hermite_gershgorin_terms"][f"G{layer}"][f"r={r}"] for r in HERMITE_ORDERS]
        assert np.count_nonzero(expected) >= 3
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15 * scale)


def test_deep_chain_is_linear_in_depth():
    """Depth 1000 at N = 200 took minutes when each layer's correlations were rebuilt from
    layer 1; one recursion pass per row block makes it seconds."""
    import time

    X = synthetic_rows("sphere", 8, 5, 0, 200)
    t0 = time.perf_counter()
    b = lambda_min_bounds(X, 1000, "ntk")
    assert time.perf_counter() - t0 < 30
    assert len(b["lower_hermite_gershgorin_terms"]) == 999
    assert 0 < b["lower"] <= b["upper_min_diagonal"]


def test_bounds_refuse_bad_arguments_and_rows():
    X = synthetic_rows("sphere", 8, 5, 0, 20)
    with pytest.raises(ntkdist.SpecError, match="depth"):
        lambda_min_bounds(X, 0)
    with pytest.raises(ntkdist.SpecError, match="kernel"):
        lambda_min_bounds(X, 2, "rbf")
    X[4, 2] = np.nan
    with pytest.raises(ntkdist.InputError, match="row 4"):
        lambda_min_bounds(X, 2)
