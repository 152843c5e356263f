import numpy as np
import pytest
from reference import hard_rows, neural_tangents_stack, paper_kernel

import ntkdist
from ntkdist.kernels.limiting import kernel_tile, row_block

SEED = 31415


def _rel_err(K, R):
    scale = np.sqrt(np.outer(np.diag(R), np.diag(R)))
    return np.max(np.abs(K - R) / scale)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_hard_rows_match_50_digit_reference(depth, kernel):
    X = hard_rows(np.random.default_rng(SEED + depth))
    R = paper_kernel(X, depth, kernel)
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    assert _rel_err(gram(X, depth=depth), R) < 1e-12
    A = row_block(X)
    for fused in (False, True):
        assert _rel_err(kernel_tile(A, A, depth, kernel, fused=fused), R) < 1e-12


def test_plain_arccos_transcription_fails_the_same_check():
    """The accuracy check has teeth: the textbook float64 recursion misses it."""
    X = hard_rows(np.random.default_rng(SEED))
    G = X @ X.T
    n = np.sqrt(np.diag(G))
    K = G.copy()
    for _ in range(2, 4):
        theta = np.arccos(np.clip(G / np.outer(n, n), -1, 1))
        G = np.outer(n, n) * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / np.pi
        K = K * (np.pi - theta) / np.pi + G
    assert _rel_err(K, paper_kernel(X, 3)) > 1e-10


def test_random_rows_match_reference_with_y():
    rng = np.random.default_rng(SEED)
    X, Y = rng.standard_normal((7, 6)), rng.standard_normal((5, 6))
    R = paper_kernel(np.vstack([X, Y]), 3)
    K = ntkdist.ntk(X, Y, depth=3)
    assert K.shape == (7, 5)
    scale = np.sqrt(np.outer(np.diag(R)[:7], np.diag(R)[7:]))
    assert np.max(np.abs(K - R[:7, 7:]) / scale) < 1e-13


def test_depth_one_and_two_closed_forms():
    rng = np.random.default_rng(SEED + 1)
    X = rng.standard_normal((40, 5)) * rng.uniform(0.1, 10, (40, 1))
    G = X @ X.T
    np.testing.assert_allclose(ntkdist.ntk(X, depth=1), G, rtol=1e-13, atol=1e-13 * G.max())
    n = np.sqrt(np.diag(G))
    rho = np.clip(G / np.outer(n, n), -1, 1)
    theta = np.arccos(rho)
    G2 = np.outer(n, n) * (np.sin(theta) + (np.pi - theta) * rho) / np.pi
    K2 = G * (np.pi - theta) / np.pi + G2
    # arccos of a float ρ near 1 is the reference's own error; off-diagonal rows are generic.
    off = ~np.eye(40, dtype=bool)
    np.testing.assert_allclose(ntkdist.ntk(X, depth=2)[off], K2[off], rtol=1e-10)
    np.testing.assert_allclose(ntkdist.nngp(X, depth=2)[off], G2[off], rtol=1e-10)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_symmetric_psd_exact_diagonal(depth):
    rng = np.random.default_rng(SEED + 2)
    X = rng.standard_normal((300, 16)) * rng.uniform(0.5, 2.0, (300, 1))
    K = ntkdist.ntk(X, depth=depth)
    assert np.array_equal(K, K.T)
    sq = np.sum(X * X, axis=1)
    np.testing.assert_allclose(np.diag(K), depth * sq, rtol=1e-15)
    np.testing.assert_allclose(np.diag(ntkdist.nngp(X, depth=depth)), sq, rtol=1e-15)
    assert np.linalg.eigvalsh(K)[0] > -1e-12 * np.abs(K).max()


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_nt_normalization_matches_neural_tangents_formulas(kernel):
    X = hard_rows(np.random.default_rng(SEED + 3), d=7)[:9]
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    for depth in (1, 2, 3):
        R = neural_tangents_stack(X, depth, kernel)
        K = gram(X, depth=depth, normalization="nt")
        assert _rel_err(K, R) < 1e-12
        np.testing.assert_allclose(K, gram(X, depth=depth) * 2 / X.shape[1], rtol=1e-15)


def test_fused_equals_common_path_on_a_large_tile():
    rng = np.random.default_rng(SEED + 4)
    X = rng.standard_normal((700, 32))
    X[100] = X[3]
    X[101] = -X[4] + 1e-11
    X[102] = X[5] * (1 + 1e-7)
    A, B = row_block(X[:400]), row_block(X)
    for depth in (2, 3, 6):
        for kernel in ("ntk", "nngp"):
            K0 = kernel_tile(A, B, depth, kernel, fused=False)
            K1 = kernel_tile(A, B, depth, kernel, fused=True)
            scale = depth * np.max(np.sum(X * X, axis=1))
            assert np.max(np.abs(K0 - K1)) < 1e-14 * scale


def test_zero_row_gives_zero_kernel_row():
    rng = np.random.default_rng(SEED + 5)
    X = rng.standard_normal((6, 4))
    X[2] = 0.0
    K = ntkdist.ntk(X, depth=3)
    assert np.all(K[2] == 0) and np.all(K[:, 2] == 0)
    assert np.all(np.isfinite(K))


def test_bad_arguments_raise():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="depth"):
        ntkdist.ntk(X, depth=0)
    with pytest.raises(ValueError, match="normalization"):
        ntkdist.ntk(X, depth=2, normalization="other")
    with pytest.raises(ValueError, match="dimensions"):
        ntkdist.ntk(X, np.ones((2, 3)), depth=2)
