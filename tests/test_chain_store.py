"""The bounds chain's power sums made with the tiles: the compiled pass against the
array-module layers, kept in a store, read back, damaged, repaired, and used by runs."""

import json
import os

import numpy as np
import pytest

from ntkdist import chain
from ntkdist.bounds import HERMITE_ORDERS, lambda_min_bounds
from ntkdist.chain import lambda_min_bounds_from_store, stored_layers
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.kernels.limiting import (RowBlock, correlation_layers, kernel_tile,
                                      kernel_tile_sums)
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore, checksum
from test_chain import assert_same


def _hard_rows():
    """Gaussian rows with a duplicate, an antipodal pair, a nearly parallel pair, a
    multiple, a zero row and a tiny one: close pairs in and across the blocks below."""
    X = synthetic_rows("gaussian", 7, 3, 0, 90)
    X[5] = X[60]
    X[10] = -X[70]
    X[20] = X[21] + 1e-9
    X[30] = 3.0 * X[80]
    X[40] = 0.0
    X[50] *= 1e-150
    return X


def _block(X, s):
    norms = np.linalg.norm(X[s], axis=1)
    unit = np.divide(X[s], norms[:, None], out=np.zeros_like(X[s]), where=norms[:, None] > 0)
    return RowBlock(unit=unit, norms=norms)


def _direct(A, B, same, layers):
    """The power sums from the array-module layers of the whole tile."""
    P = list(correlation_layers(A, B, max(layers)))
    rows = np.zeros((A.unit.shape[0], len(layers), len(HERMITE_ORDERS)))
    cols = np.zeros((B.unit.shape[0], len(layers), len(HERMITE_ORDERS)))
    for k, m in enumerate(layers):
        Q = np.abs(P[m - 1])
        if same:
            np.fill_diagonal(Q, 0.0)
        for q, r in enumerate(HERMITE_ORDERS):
            rows[:, k, q] = (Q ** r).sum(axis=1)
            cols[:, k, q] = (Q ** r).sum(axis=0)
    return rows, cols


@pytest.mark.parametrize("depth,kernel,layers", [(3, "ntk", (1, 2)), (4, "nngp", (3,)),
                                                 (5, "ntk", (1, 2, 3, 4)), (2, "ntk", (1,))])
def test_tile_with_sums_is_the_tile_bit_for_bit_and_the_layers_powers(depth, kernel, layers):
    X = _hard_rows()
    blocks = {"tall": (slice(0, 64), slice(55, 90)), "wide": (slice(60, 90), slice(0, 64)),
              "diagonal": (slice(0, 90), slice(0, 90))}
    for name, (si, sj) in blocks.items():
        A, B = _block(X, si), _block(X, sj)
        same = name == "diagonal"
        tile, rows, cols = kernel_tile_sums(A, B, depth, kernel, "nt", layers,
                                            len(HERMITE_ORDERS), same)
        assert np.array_equal(tile, kernel_tile(A, B, depth, kernel, "nt", fused=True)), name
        ref_rows, ref_cols = _direct(A, B, same, layers)
        np.testing.assert_allclose(rows, ref_rows, rtol=1e-12, atol=1e-300, err_msg=name)
        if same:
            assert cols is None
        else:
            np.testing.assert_allclose(cols, ref_cols, rtol=1e-12, atol=1e-300, err_msg=name)
        none, rows_only, _ = kernel_tile_sums(A, B, depth, kernel, "nt", layers,
                                              len(HERMITE_ORDERS), same, tile=False)
        assert none is None and np.array_equal(rows_only, rows)


def test_the_workers_chain_without_numba_gives_the_same_sums(monkeypatch):
    from ntkdist.kernels import fused

    X = _hard_rows()
    A, B = _block(X, slice(0, 64)), _block(X, slice(40, 90))
    fast = chain.chain_tile(A, B, False, (1, 2))
    monkeypatch.setattr(fused, "available", lambda: False)
    slow = chain.chain_tile(A, B, False, (1, 2))
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


def test_which_stores_keep_sums():
    run = make_spec(data="sphere", n=1000, d=8, depth=3, seed=0)
    assert stored_layers(make_store_spec(run, 256, "float32")) == (1, 2)
    assert stored_layers(make_store_spec(run, 32, "float32")) is None  # over half a tile
    nngp = make_spec(data="sphere", n=1000, d=8, depth=4, seed=0, kernel="nngp")
    assert stored_layers(make_store_spec(nngp, 256, "float64")) == (3,)
    one = make_spec(data="sphere", n=1000, d=8, depth=1, seed=0)
    assert stored_layers(make_store_spec(one, 256, "float64")) is None
    finite = make_spec(data="sphere", n=1000, d=8, depth=2, seed=0, kernel="empirical",
                       widths=(16,))
    assert stored_layers(make_store_spec(finite, 256, "float64")) is None


ARGS = ["--data", "sphere", "--n", "300", "--d", "6", "--depth", "3", "--seed", "3",
        "--tile", "128"]


def test_a_store_keeps_the_chains_sums_and_runs_read_them(client, tmp_path, capsys):
    addr = client.scheduler.address
    path = str(tmp_path / "k.zarr")
    assert main(["assemble", *ARGS, "--store", path, "--scheduler", addr]) == 0
    store = KernelStore.open(path)
    X = store.rows_checked()
    expected = lambda_min_bounds(X, 3)
    assert_same(expected, lambda_min_bounds_from_store(store, X))

    res = str(tmp_path / "r")
    assert main(["run", *ARGS, "--store", path, "--scheduler", addr, "--out", res]) == 0
    assert "lower-bound chain from the store's power sums of its 6 tiles" in \
        capsys.readouterr().out
    got = json.load(open(os.path.join(res, "result.json")))["bounds"]
    assert got["lower"] == pytest.approx(expected["lower"], rel=1e-12)

    # Damaged sums: verify names them, a solve falls back to the chain (in process here),
    # repair makes them again, bit for bit.
    file = store.chain_file(store.tile_key(0, 1))
    good = open(file, "rb").read()
    with open(file, "r+b") as f:
        f.seek(len(good) - 8)
        f.write(np.float64(0.0).tobytes())
    notes = []
    assert lambda_min_bounds_from_store(store, X, notes.append) is None
    assert "tile K.0.1" in notes[0] and "damaged" in notes[0] and "--repair" in notes[0]
    assert main(["verify", "--store", path]) == 1
    assert "K.0.1 (its power sums)" in capsys.readouterr().err
    res2 = str(tmp_path / "r2")
    assert main(["solve", "--store", path, "--scheduler", addr, "--out", res2]) == 0
    out = capsys.readouterr().out
    assert "power sums of tile K.0.1 for the bounds chain are damaged" in out
    got = json.load(open(os.path.join(res2, "result.json")))["bounds"]
    assert got["lower"] == pytest.approx(expected["lower"], rel=1e-12)
    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 0
    assert open(file, "rb").read() == good
    assert_same(expected, lambda_min_bounds_from_store(store, X))

    os.remove(file)  # missing: verify does not miss it either
    assert main(["verify", "--store", path]) == 1
    assert "K.0.1 (its power sums)" in capsys.readouterr().err

    # A store assembled before the sums were kept: its markers record none.
    for key in store.done_keys():
        if key.startswith("K."):
            store.mark_done(key, store.recorded_checksum(key))
    assert main(["verify", "--store", path]) == 0
    assert lambda_min_bounds_from_store(store, X, notes.append) is None
    assert "by a version that did not keep them" in notes[-1]


@pytest.mark.parametrize("depth", [3, 4])
def test_a_larger_tile_is_bit_for_bit_the_parallel_kernels(depth):
    """The serial compiled pass against the parallel one of kernel_tile, on a tile whose
    loops run long enough for either to vectorise or split them."""
    X = synthetic_rows("sphere", 64, 5, 0, 557)
    A, B = _block(X, slice(0, 300)), _block(X, slice(300, 557))
    tile, _, _ = kernel_tile_sums(A, B, depth, "ntk", "paper", (1, 2), len(HERMITE_ORDERS),
                                  False)
    assert np.array_equal(tile, kernel_tile(A, B, depth, "ntk", "paper", fused=True))


def _store_bounds(client, tmp_path, args, name="k.zarr"):
    path = str(tmp_path / name)
    assert main(["assemble", *args, "--store", path, "--scheduler",
                 client.scheduler.address]) == 0
    store = KernelStore.open(path)
    return path, store, store.rows_checked()


def test_nngp_and_deeper_kernels_through_a_store(client, tmp_path):
    for kernel, depth, n, tile in (("nngp", 4, 150, 64), ("ntk", 5, 400, 256)):
        args = ["--data", "gaussian", "--n", str(n), "--d", "5", "--depth", str(depth),
                "--kernel", kernel, "--seed", "4", "--tile", str(tile), "--dtype", "float64"]
        _, store, X = _store_bounds(client, tmp_path, args, f"{kernel}{depth}.zarr")
        assert stored_layers(store.spec) is not None
        assert_same(lambda_min_bounds(X, depth, kernel), lambda_min_bounds_from_store(store, X))
    with pytest.raises(Exception, match="not those of store"):
        lambda_min_bounds_from_store(store, X[:-1])


def test_a_store_without_sums_falls_back_without_a_note(client, tmp_path):
    args = ["--data", "sphere", "--n", "100", "--d", "5", "--depth", "3", "--seed", "1",
            "--tile", "16", "--dtype", "float64"]  # sums over half a tile's bytes
    _, store, X = _store_bounds(client, tmp_path, args)
    assert stored_layers(store.spec) is None
    notes = []
    assert lambda_min_bounds_from_store(store, X, notes.append) is None and not notes
    assert not os.path.exists(os.path.join(store.path, "chain"))


def test_stale_or_wrong_sums_never_serve(client, tmp_path, capsys):
    path, store, X = _store_bounds(client, tmp_path, ARGS)
    expected = lambda_min_bounds(X, 3)
    key = store.tile_key(0, 1)
    file = store.chain_file(key)
    good = open(file, "rb").read()

    # A killed rewrite: the marker gone, stale sums left; the resumed assembly makes both.
    os.remove(os.path.join(path, "done", key))
    np.save(file, np.zeros((256, 2, 10)))
    assert main(["assemble", *ARGS, "--store", path, "--scheduler",
                 client.scheduler.address]) == 0
    assert open(file, "rb").read() == good
    assert_same(expected, lambda_min_bounds_from_store(store, X))

    # Values changed with their checksum: only a recomputation tells.
    sums = np.load(file)
    sums[3, 0, 0] *= 1.5
    np.save(file, sums)
    store.mark_done(key, store.recorded_checksum(key), chain=checksum(sums))
    assert main(["verify", "--store", path]) == 0
    capsys.readouterr()
    assert main(["verify", "--store", path, "--recompute", "6"]) == 1
    assert f"{key} (its power sums, recomputed)" in capsys.readouterr().err

    # The right checksum on the wrong shape.
    wrong = np.zeros((10, 2, 10))
    np.save(file, wrong)
    store.mark_done(key, store.recorded_checksum(key), chain=checksum(wrong))
    assert main(["verify", "--store", path]) == 1
    assert f"{key} (its power sums)" in capsys.readouterr().err
    assert lambda_min_bounds_from_store(store, X) is None

    # A tile written again without sums loses the old ones with its marker's record.
    store.write_piece(key, "K", (0, 1), store.read_tile(0, 1).copy())
    assert not os.path.exists(file) and store.recorded_checksum(key, "chain") is None
    notes = []
    assert lambda_min_bounds_from_store(store, X, notes.append) is None
    assert "did not keep them" in notes[0]


@pytest.mark.parametrize("depth", [2, 3, 6])
def test_the_in_process_chain_with_and_without_numba(monkeypatch, depth):
    """lambda_min_bounds' row blocks through the compiled pass (the diagonal at the block's
    offset) against the array-module layers, on rows with close pairs."""
    from ntkdist import bounds
    from ntkdist.kernels import fused

    X = _hard_rows()
    rows = _block(X, slice(None))
    wanted = tuple(range(1, depth))
    fast = bounds._max_row_power_sums(rows, depth - 1, wanted, 32)
    monkeypatch.setattr(fused, "available", lambda: False)
    slow = bounds._max_row_power_sums(rows, depth - 1, wanted, 32)
    for m in wanted:
        np.testing.assert_allclose(fast[m], slow[m], rtol=1e-12)


_SUMS_BYTES = """
import hashlib
from ntkdist.chain import tile_with_sums
from ntkdist.kernels.limiting import row_block
from ntkdist.spec import make_spec
run = make_spec(data="sphere", n=700, d=16, depth=3, seed=77)
X = run.rows()
tile, sums = tile_with_sums(run.kernel, row_block(X[:300]), row_block(X[300:]), (1, 2), False)
print(hashlib.sha256(tile.tobytes()).hexdigest(), hashlib.sha256(sums.tobytes()).hexdigest())
"""


def test_sums_are_the_same_bits_freshly_compiled_and_from_numbas_cache(tmp_path):
    """A store resumed by other processes must equal a clean one: the first process below
    compiles the pass (an empty numba cache), the second loads it from that cache."""
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", _SUMS_BYTES], env=env, capture_output=True,
                           text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].split()) == 2
