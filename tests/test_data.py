import numpy as np
import pytest
import zarr

from ntkdist.data import (GENERATOR_CHUNK, MAX_NEAR_PAIRS, NEAR_PARALLEL_DISTANCE, check_rows,
                          load_array, near_parallel_pairs, synthetic_rows)
from ntkdist.errors import InputError


@pytest.mark.parametrize("kind", ["sphere", "gaussian"])
def test_blocks_are_the_same_whoever_generates_them(kind):
    d, seed, n = 7, 913, 3 * GENERATOR_CHUNK + 17
    whole = synthetic_rows(kind, d, seed, 0, n)
    cuts = [0, 5, 1000, 1030, 2048, 3000, n]
    pieces = np.vstack([synthetic_rows(kind, d, seed, a, b) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(synthetic_rows(kind, d, seed, 0, 100), whole[:100])
    assert not np.array_equal(synthetic_rows(kind, d, seed + 1, 0, 100), whole[:100])


def test_sphere_radius_and_gaussian_moments():
    X = synthetic_rows("sphere", 16, 5, 0, 4000)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 4.0, rtol=1e-14)
    assert abs(X.mean()) < 0.02
    G = synthetic_rows("gaussian", 16, 5, 0, 4000)
    assert abs(G.mean()) < 0.02 and abs(G.var() - 1) < 0.03


def test_npy_and_zarr_inputs_load(tmp_path):
    X = np.random.default_rng(77).standard_normal((9, 3))
    np.save(tmp_path / "x.npy", X)
    assert np.array_equal(np.asarray(load_array(str(tmp_path / "x.npy"))), X)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(4, 3), dtype="f8")
    z[:] = X
    assert np.array_equal(load_array(str(tmp_path / "x.zarr"))[:], X)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "pickle"),
    (lambda p: p.write_bytes(b"not an npy file at all"), "not a readable"),
])
def test_unreadable_files_refused(tmp_path, make, message):
    p = tmp_path / "bad.npy"
    make(p)
    with pytest.raises(InputError, match=message):
        load_array(str(p))


def test_missing_path_and_non_zarr_folder_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_array(str(tmp_path / "nope.npy"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="Zarr"):
        load_array(str(tmp_path / "folder"))


@pytest.mark.parametrize("X, message", [
    (np.ones(5), "2-D"),
    (np.ones((1, 3)), "at least 2"),
    (np.array([[1.0, np.nan], [1.0, 2.0]]), "non-finite"),
    (np.array([[1.0, 2.0], [1.0, np.inf]]), "non-finite"),
    (np.array([[1.0, 2.0], [0.0, 0.0]]), "all-zero"),
    (np.array([["a", "b"], ["c", "d"]]), "numeric"),
])
def test_invalid_rows_refused(X, message):
    with pytest.raises(InputError, match=message):
        check_rows(X)


def test_duplicates_and_parallel_rows_counted():
    X = np.random.default_rng(3).standard_normal((10, 4))
    X[5] = X[1]
    X[6] = 2.5 * X[2]
    check = check_rows(X)
    assert check.duplicate_rows == 1
    assert check.parallel_rows == 2
    assert check_rows(X[:5]).parallel_rows == 0


@pytest.mark.parametrize("d, noise", [(16, 1e-7), (64, 1e-6), (784, 1e-8)])
def test_every_nearly_parallel_pair_is_found(d, noise):
    """Copies moved by ``noise`` (unit distance ≤ 4e-6) are all found, whatever d, which
    rounding the unit rows found only in part; pairs beyond the distance are not."""
    rng = np.random.default_rng(3)
    B = rng.standard_normal((300, d))
    B *= 4 / np.linalg.norm(B, axis=1, keepdims=True)
    X = np.vstack([B, B + noise * rng.standard_normal(B.shape), B[:5] + 1e-3])
    pairs = check_rows(X).near_pairs
    assert sorted(pairs) == [(i, 300 + i) for i in range(300)]
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    dist = [np.linalg.norm(unit[i] - unit[j]) for i, j in pairs]
    assert dist == sorted(dist) and max(dist) <= NEAR_PARALLEL_DISTANCE


def test_nearly_parallel_pairs_skip_equal_rows_keep_multiples_and_are_capped():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((400, 8))
    X[5], X[9], X[11] = 3 * X[7], X[7], X[7] + 1e-9  # a multiple, a duplicate, a near copy
    c = check_rows(X)
    assert sorted(c.near_pairs) == [(5, 7), (5, 11), (7, 11)] and c.duplicate_rows == 1
    crowd = np.repeat(X[:1], 3000, axis=0) + 1e-8 * rng.standard_normal((3000, 8))
    pairs = near_parallel_pairs(crowd / np.linalg.norm(crowd, axis=1, keepdims=True))
    assert len(pairs) == MAX_NEAR_PAIRS and all(i < j for i, j in pairs)
