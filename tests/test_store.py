"""Kernel store: layout, refusal of foreign stores, done record, open_kernel, verify."""

import json
import os

import numpy as np
import pytest

import ntkdist
from conftest import file_tree
from ntkdist.assemble import assemble, verify
from ntkdist.spec import make_spec, make_store_spec
from ntkdist import open_kernel
from ntkdist.store import KernelStore, StoreError


def _spec(n=40, d=6, depth=3, kernel="ntk", tile=9, dtype="float64", seed=5, data="gaussian"):
    run = make_spec(data=data, n=n, d=d, depth=depth, kernel=kernel, seed=seed)
    return run, make_store_spec(run, tile, dtype)


@pytest.mark.parametrize("n, tile, depth, kernel", [
    (37, 10, 3, "ntk"), (50, 7, 2, "nngp"), (5, 1, 3, "ntk"), (64, 64, 1, "ntk"),
    (33, 32, 4, "ntk"), (2, 1, 2, "nngp"),
])
def test_store_matches_dense_kernel(client, tmp_path, n, tile, depth, kernel):
    run, spec = _spec(n=n, tile=tile, depth=depth, kernel=kernel)
    path = str(tmp_path / "k.zarr")
    report = assemble(spec, path, client, progress=False)
    assert report["tiles_computed"] == len(KernelStore.open(path).upper_tiles())
    K = open_kernel(path).compute()
    X = run.rows()
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    R = gram(X, depth=depth)
    scale = np.sqrt(np.outer(np.diag(R), np.diag(R)))
    assert np.max(np.abs(K - R) / scale) < 1e-14
    assert np.array_equal(K, K.T)
    assert np.array_equal(KernelStore.open(path).array("X")[:], X)


def test_float32_storage(client, tmp_path):
    run, spec = _spec(n=30, tile=8, dtype="float32")
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    K = open_kernel(path).compute()
    assert K.dtype == np.float32
    np.testing.assert_array_equal(K, ntkdist.ntk(run.rows(), depth=3).astype(np.float32))


def test_layout_is_documented_in_attributes(client, tmp_path):
    _, spec = _spec()
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    attrs = json.load(open(os.path.join(path, "zarr.json")))["attributes"]["ntkdist"]
    assert attrs["spec_hash"] == spec.hash() and "layout" in attrs
    assert attrs["spec"]["problem"]["depth"] == 3 and attrs["spec"]["tile"] == 9


def test_missing_tiles_are_nan_and_incomplete_store_is_refused(client, tmp_path):
    _, spec = _spec(n=30, tile=10)
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    store = KernelStore.open(path)
    os.remove(os.path.join(path, "done", "K.0.2"))
    raw = store.array("K")[:]
    assert np.all(np.isnan(raw[10:20, 0:10]))  # lower tiles are never written
    with pytest.raises(StoreError, match="incomplete"):
        open_kernel(path)
    assert store.pending()[1] == [(0, 2)]
    os.remove(store.chunk_file("K", 1, 2))
    assert store.pending()[1] == [(0, 2), (1, 2)]
    assert np.all(np.isnan(store.read_tile(1, 2)))
    report = assemble(spec, path, client, progress=False)
    assert report["tiles_computed"] == 2
    assert open_kernel(path).compute().shape == (30, 30)


def test_truncated_chunk_with_marker_is_redone(client, tmp_path):
    _, spec = _spec(n=30, tile=10)
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    before = file_tree(path)
    chunk = KernelStore.open(path).chunk_file("K", 0, 1)
    with open(chunk, "r+b") as f:
        f.truncate(100)
    assert assemble(spec, path, client, progress=False)["tiles_computed"] == 1
    assert file_tree(path) == before
    with open(os.path.join(path, "done", "K.1.2"), "w") as f:
        f.write("{not json")
    with open(os.path.join(path, "done", "K.2.2.tmp4242"), "w") as f:
        f.write("{")
    with open(chunk + ".0123abcd.partial", "wb") as f:
        f.write(b"half a chunk")
    assert KernelStore.open(path).pending()[1] == [(1, 2)]
    assert assemble(spec, path, client, progress=False)["tiles_computed"] == 1
    assert file_tree(path) == before


def test_other_spec_and_foreign_paths_are_refused_untouched(client, tmp_path):
    _, spec = _spec()
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    before = file_tree(path)
    _, other = _spec(depth=4)
    with pytest.raises(StoreError, match=r"another spec \(it differs in depth \(3 ≠ 4\)\)"):
        assemble(other, path, client, progress=False)
    assert file_tree(path) == before
    _, other = _spec(depth=2, seed=6, tile=10, dtype="float32")
    with pytest.raises(StoreError, match=r"differs in depth \(3 ≠ 2\), seed \(5 ≠ 6\), "
                                         r"tile \(9 ≠ 10\), dtype \(float64 ≠ float32\)\)"):
        assemble(other, path, client, progress=False)
    from dataclasses import replace

    with pytest.raises(StoreError, match=r"differs in ntkdist_version \(.* ≠ 0\.0\.1\)"):
        assemble(replace(spec, ntkdist_version="0.0.1"), path, client, progress=False)
    assert file_tree(path) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    with pytest.raises(StoreError, match="not an ntkdist store"):
        assemble(spec, str(foreign), client, progress=False)
    assert (foreign / "a.txt").read_text() == "keep" and len(os.listdir(foreign)) == 1
    with pytest.raises(StoreError, match="not an ntkdist"):
        KernelStore.open(str(foreign))


def test_verify_finds_corrupted_and_truncated_chunks(client, tmp_path):
    _, spec = _spec(n=40, tile=9)
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    clean = verify(path, recompute=3, seed=1)
    assert clean["bad"] == [] and clean["missing"] == [] and len(clean["recomputed"]) == 3
    assert all(r["max_abs_diff"] == 0 for r in clean["recomputed"])
    store = KernelStore.open(path)
    with open(store.chunk_file("K", 1, 3), "r+b") as f:
        f.seek(64)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with open(store.chunk_file("K", 0, 4), "r+b") as f:
        f.truncate(10)
    with open(store.chunk_file("X", 2, 0), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 8)
    report = verify(path)
    assert sorted(report["bad"]) == ["K.0.4", "K.1.3", "X.2"]


def test_verify_recompute_catches_a_consistent_but_wrong_tile(client, tmp_path):
    """A tile rewritten with its checksum updated passes the checksum but not recomputation."""
    _, spec = _spec(n=20, tile=10)
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    store = KernelStore.open(path)
    K = store.array("K", mode="r+")
    wrong = store.read_tile(0, 1) * 1.001
    K[0:10, 10:20] = wrong
    from ntkdist.store import checksum

    store.mark_done("K.0.1", checksum(wrong))
    assert verify(path)["bad"] == []
    assert "K.0.1 (recomputed)" in verify(path, recompute=3)["bad"]


def test_open_kernel_refuses_a_tile_damaged_in_place(client, tmp_path):
    _, spec = _spec(n=30, tile=10)
    path = str(tmp_path / "k.zarr")
    assemble(spec, path, client, progress=False)
    with open(KernelStore.open(path).chunk_file("K", 1, 2), "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 16)
    with pytest.raises(StoreError, match="K.1.2 .*checksum"):
        open_kernel(path).compute()


def test_checksum_is_blake2b_of_the_c_order_bytes():
    import hashlib

    from ntkdist.store import checksum

    rng = np.random.default_rng(31)
    for a in (np.zeros((0, 3)), rng.standard_normal(9)[::2], np.float32(3.5),
              rng.standard_normal((4, 5)).astype(">f8"), rng.standard_normal((6, 7)).T,
              rng.standard_normal((50, 7)).astype(np.float32)):
        want = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()
        assert checksum(a) == want
