"""Finite-width kernels: the empirical NTK and feature Grams against explicit per-sample
gradients and dense features, their convergence to the limits, and the seeded weights."""

import numpy as np
import pytest

import ntkdist
from ntkdist.errors import InputError, SpecError
from ntkdist.kernels.finite import (
    WEIGHT_CHUNK,
    SeededWeights,
    block_features,
    finite_tile,
    normalization_factor,
)


def relu(z):
    return np.maximum(z, 0.0)


def per_sample_jacobian(X, weights):
    """J (N × #params) row by row: an explicit backward pass per sample, with the gradient
    of W_l as the outer product δ_l f_{l−1}ᵀ flattened (the reference; no Hadamard formula)."""
    rows = []
    for x in X:
        fs, gs = [x], []
        for W in weights[:-1]:
            gs.append(W @ fs[-1])
            fs.append(relu(gs[-1]))
        grads = [None] * len(weights)
        delta = np.ones(1)
        for l in range(len(weights) - 1, -1, -1):
            grads[l] = np.outer(delta, fs[l]).ravel()
            if l:
                delta = (weights[l].T @ delta) * (gs[l - 1] > 0)
        rows.append(np.concatenate(grads))
    return np.array(rows)


def network_output(X, weights):
    f = X.T
    for W in weights[:-1]:
        f = relu(W @ f)
    return (weights[-1] @ f)[0]


def sphere(n, d, seed):
    X = np.random.default_rng(seed).standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True) * np.sqrt(d)


def test_reference_jacobian_matches_finite_differences():
    """The reference itself: f is piecewise linear in each weight, so central differences
    are exact up to rounding away from activation flips."""
    X = sphere(3, 4, 0)
    weights = ntkdist.random_weights(4, [5, 3], seed=1)
    J = per_sample_jacobian(X, weights)
    flat = np.concatenate([W.ravel() for W in weights])
    h = 1e-6
    for p in range(0, flat.size, 3):
        pert = []
        for s in (h, -h):
            v = flat.copy()
            v[p] += s
            ws, c = [], 0
            for W in weights:
                ws.append(v[c:c + W.size].reshape(W.shape))
                c += W.size
            pert.append(network_output(X, ws))
        np.testing.assert_allclose((pert[0] - pert[1]) / (2 * h), J[:, p], atol=1e-7)


@pytest.mark.parametrize("widths", [[7], [6, 9], [5, 1, 12], [40, 3, 25]])
def test_empirical_ntk_matches_per_sample_gradients(widths):
    """Depths 2–4, unequal widths, width 1 and width > N."""
    X = sphere(11, 6, 2)
    X[3] *= 7.5  # off the sphere too
    weights = ntkdist.random_weights(6, widths, seed=3)
    J = per_sample_jacobian(X, weights)
    ref = J @ J.T
    K = ntkdist.empirical_ntk(X, weights=weights)
    assert np.array_equal(K, K.T)
    assert np.max(np.abs(K - ref)) <= 1e-12 * np.max(np.abs(ref))
    Y = sphere(4, 6, 9)
    cross = ntkdist.empirical_ntk(X, Y, weights=weights)
    ref = J @ per_sample_jacobian(Y, weights).T
    assert np.max(np.abs(cross - ref)) <= 1e-12 * np.max(np.abs(ref))


def test_depth_one_is_the_gram_of_the_rows():
    X = sphere(5, 3, 0)
    K = ntkdist.empirical_ntk(X, weights=[np.ones((1, 3))])
    np.testing.assert_allclose(K, X @ X.T, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_feature_gram_matches_dense_features(layer):
    X = sphere(9, 5, 4)
    weights = ntkdist.random_weights(5, [8, 1, 30], seed=5)
    f = X.T
    for W in weights[:layer]:
        f = relu(W @ f)
    ref = f.T @ f
    G = ntkdist.feature_gram(X, weights=weights, layer=layer)
    assert np.max(np.abs(G - ref)) <= 1e-13 * max(np.max(np.abs(ref)), 1e-300)
    norm = ntkdist.feature_gram(X, weights=weights, layer=layer, normalize=True)
    factor = np.prod([2.0 / n for n in [8, 1, 30][:layer]])
    np.testing.assert_allclose(norm, factor * G, rtol=1e-15)


def _relative_error(n, seed, X, kernel):
    weights = ntkdist.random_weights(X.shape[1], [n, n], seed=seed)
    if kernel == "ntk":
        got = ntkdist.empirical_ntk(X, weights=weights, normalize=True)
        limit = ntkdist.ntk(X, depth=3)
    else:
        got = ntkdist.feature_gram(X, weights=weights, layer=2, normalize=True)
        limit = ntkdist.nngp(X, depth=3)
    return np.linalg.norm(got - limit) / np.linalg.norm(limit)


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_normalized_kernels_converge_to_the_limits_at_rate_one_over_sqrt_width(kernel):
    X = sphere(12, 8, 6)
    widths = [32, 128, 512, 2048]
    errors = [np.mean([_relative_error(n, s, X, kernel) for s in range(6)]) for n in widths]
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.65 < slope < -0.35, (errors, slope)
    assert errors[-1] < 0.1


def test_nt_normalization_is_two_over_d_of_paper():
    X = sphere(6, 4, 1)
    weights = ntkdist.random_weights(4, [10, 20], seed=2)
    paper = ntkdist.empirical_ntk(X, weights=weights, normalize="paper")
    nt = ntkdist.empirical_ntk(X, weights=weights, normalize="nt")
    np.testing.assert_allclose(nt, paper * 2 / 4, rtol=1e-15)
    assert normalization_factor((10, 20), "empirical", "raw", 4) == 1.0
    assert normalization_factor((10, 20), "features", "paper", 4, layer=1) == 0.2


def test_random_weights_shapes_and_law():
    ws = ntkdist.random_weights(7, [300, 5], seed=11)
    assert [W.shape for W in ws] == [(300, 7), (5, 300), (1, 5)]
    flat = ws[0].ravel()
    assert abs(flat.mean()) < 0.1 and abs(flat.std() - 1) < 0.05
    again = ntkdist.random_weights(7, [300, 5], seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(ws, again))
    other = ntkdist.random_weights(7, [300, 5], seed=12)
    assert not np.array_equal(ws[0], other[0])


def test_weights_rows_are_the_same_whatever_the_split():
    """Any rows of any W_l regenerate alone, bitwise (chunk boundaries and spans crossed)."""
    w = SeededWeights(9, [3 * WEIGHT_CHUNK + 5, 17], seed=4)
    full = w.rows(1, 0, 3 * WEIGHT_CHUNK + 5)
    for a, b in [(0, 1), (WEIGHT_CHUNK - 1, WEIGHT_CHUNK + 2), (70, 200), (190, 197)]:
        assert np.array_equal(w.rows(1, a, b), full[a:b])
    assert np.array_equal(w.rows(2, 3, 9), ntkdist.random_weights(9, w.widths, 4)[1][3:9])


def test_block_split_changes_entries_only_by_rounding():
    """Row blocks of another split give the same entries to rounding (GEMM kernels may sum in
    another order at other shapes); the same block gives the same bytes."""
    X = sphere(30, 5, 3)
    w = SeededWeights(5, [20, 11], seed=0)
    whole = block_features(X, w)
    full = finite_tile(whole, whole)
    A, B = block_features(X[:13], w), block_features(X[13:], w)
    scale = np.max(np.abs(full))
    assert np.max(np.abs(finite_tile(A, B) - full[:13, 13:])) <= 1e-13 * scale
    assert np.max(np.abs(finite_tile(B, B) - full[13:, 13:])) <= 1e-13 * scale
    again = block_features(X[13:], SeededWeights(5, [20, 11], seed=0))
    assert np.array_equal(finite_tile(A, again), finite_tile(A, B))


def test_bad_inputs_are_refused_in_one_line():
    X = sphere(4, 3, 0)
    with pytest.raises(InputError, match="W_2 must have shape"):
        ntkdist.empirical_ntk(X, weights=[np.ones((5, 3)), np.ones((1, 4))])
    with pytest.raises(InputError, match="one row"):
        ntkdist.empirical_ntk(X, weights=[np.ones((5, 3)), np.ones((2, 5))])
    with pytest.raises(InputError, match="weights"):
        ntkdist.empirical_ntk(X)
    bad = X.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        ntkdist.empirical_ntk(bad, weights=ntkdist.random_weights(3, [4], 0))
    with pytest.raises(SpecError, match="layer"):
        ntkdist.feature_gram(X, weights=ntkdist.random_weights(3, [4], 0), layer=2)
    with pytest.raises(SpecError, match="widths"):
        ntkdist.random_weights(3, [4, 0], 0)
    with pytest.raises(SpecError, match="seed"):
        ntkdist.random_weights(3, [4], -1)


def test_finite_diagonal_is_the_tile_diagonal():
    from ntkdist.kernels.finite import finite_diagonal

    X = sphere(7, 4, 1)
    for kind, layer in (("empirical", None), ("features", 1)):
        A = block_features(X, SeededWeights(4, [9, 6], 2), kind, layer, factor=0.3)
        np.testing.assert_allclose(finite_diagonal(A), np.diagonal(finite_tile(A, A)),
                                   rtol=1e-14)


def test_python_api_refuses_what_is_not_real_rows_in_one_line():
    W = ntkdist.random_weights(3, [4], 0)
    for bad in (np.ones((4, 3), complex), np.ones((4, 3), bool),
                np.array([["a", "b", "c"]] * 4), np.array([[object()] * 3] * 4)):
        with pytest.raises(InputError, match="real numbers"):
            ntkdist.empirical_ntk(bad, weights=W)
        with pytest.raises(InputError, match="real numbers"):
            ntkdist.feature_gram(bad, weights=W, layer=1)
    with pytest.raises(InputError, match="real numbers"):
        ntkdist.ntk(np.ones((4, 3), complex), depth=2)
    with pytest.raises(SpecError, match="GB"):
        ntkdist.random_weights(4, [10 ** 12], 0)
    for text in ("5,,5", "5,5,", ",5"):
        with pytest.raises(SpecError, match="separated by commas"):
            ntkdist.random_weights(4, text, 0)
