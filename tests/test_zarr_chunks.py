"""The fast whole-chunk path of ntkdist/zarr_chunks.py against zarr's public API.

If the first test fails after a zarr upgrade, zarr moved a private name the fast path uses:
update ntkdist/zarr_chunks.py (and the zarr range in pyproject.toml). Until then reads fall
back to the public API, which the degradation test below checks.
"""

import os

import numpy as np
import pytest
import zarr

from ntkdist import zarr_chunks
from ntkdist.store import StoreError
from ntkdist.zarr_chunks import ChunkSizeError, private_api_problems, read_block

SHAPE, CHUNKS = (13, 11), (5, 4)  # edge chunks of 3 rows and 3 columns
MISSING = (1, 2)  # never written: reads as the fill value
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent fallback


def _array(path, dtype="float32", store=None, **kw):
    A = zarr.create_array(store=store if store is not None else str(path), shape=SHAPE,
                          chunks=CHUNKS, dtype=dtype, fill_value=np.nan, **kw)
    rng = np.random.default_rng(0)
    data = rng.standard_normal(SHAPE).astype(dtype)
    data[0, 0], data[4, 3] = -0.0, np.inf
    for i in range(3):
        for j in range(3):
            if (i, j) != MISSING:
                A.set_block_selection((i, j), data[i * 5:(i + 1) * 5, j * 4:(j + 1) * 4])
    return A


def _blocks(A):
    return [(i, j) for i in range(A.cdata_shape[0]) for j in range(A.cdata_shape[1])]


def _same_bits(fast, public):
    assert fast.dtype == public.dtype and fast.shape == public.shape
    assert fast.flags.c_contiguous
    assert fast.tobytes() == public.tobytes()  # bitwise: NaN payloads, -0.0 and all


def test_private_zarr_chunk_api_is_there(tmp_path):
    problems = private_api_problems(_array(tmp_path / "a.zarr"))
    assert not problems, (
        f"zarr {zarr.__version__} changed its internal chunk API ({'; '.join(problems)}): "
        "update ntkdist/zarr_chunks.py (and the zarr range pinned in pyproject.toml)")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fast_path_is_bitwise_the_public_api(tmp_path, dtype):
    A = _array(tmp_path / "a.zarr", dtype, compressors=None)
    for coords in _blocks(A):
        fast = read_block(A, coords)
        _same_bits(fast, A.get_block_selection(coords))
        _same_bits(fast, read_block(A, coords, fast=False))
        if coords == (0, 0):
            assert not fast.flags.writeable  # a whole chunk: the mapped file, no copy
    assert np.isnan(read_block(A, MISSING)).all()
    assert read_block(A, (2, 2)).shape == (3, 3)


@pytest.mark.parametrize("kind", ["big-endian", "memory store", "compressed"])
def test_other_layouts_agree(tmp_path, kind):
    kw = {"compressors": None}
    store = None
    if kind == "big-endian":
        kw["serializer"] = zarr.codecs.BytesCodec(endian="big")
    elif kind == "memory store":
        store = zarr.storage.MemoryStore()
    else:
        kw = {}  # zarr's default compressor: read through the public API
    A = _array(tmp_path / "a.zarr", "float64", store=store, **kw)
    for coords in _blocks(A):
        fast = read_block(A, coords)
        assert fast.dtype.isnative
        _same_bits(fast, A.get_block_selection(coords))


def test_wrong_sized_chunk_is_an_error(tmp_path):
    A = _array(tmp_path / "a.zarr", compressors=None)
    with open(os.path.join(str(tmp_path / "a.zarr"), "c", "0", "1"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ChunkSizeError, match=r"'c/0/1' .* has 10 bytes, expected 80"):
        read_block(A, (0, 1))


def test_a_moved_private_name_degrades_to_the_public_api(tmp_path, monkeypatch):
    A = _array(tmp_path / "a.zarr", compressors=None)
    expected = {c: A.get_block_selection(c) for c in _blocks(A)}

    def moved(A):
        raise AttributeError("'ArrayV3Metadata' object has no attribute 'encode_chunk_key'")

    probes = [(n, moved if n == "Array.metadata.encode_chunk_key" else get)
              for n, get in zarr_chunks._PROBES]
    monkeypatch.setattr(zarr_chunks, "_PROBES", tuple(probes))
    monkeypatch.setattr(zarr_chunks, "_warned", False)
    assert any("encode_chunk_key" in p for p in private_api_problems(A))
    with pytest.warns(RuntimeWarning, match=r"changed its internal chunk API .* update "
                                            r"ntkdist/zarr_chunks.py"):
        got = {c: read_block(A, c) for c in _blocks(A)}
    for c in expected:
        _same_bits(got[c], expected[c])


def test_store_reports_a_damaged_tile_in_one_line(tmp_path):
    """KernelStore.read_tile turns a wrong-sized chunk into its damage message."""
    from ntkdist.store import KernelStore

    A = _array(tmp_path / "K", compressors=None)
    store = KernelStore.__new__(KernelStore)
    store.path = str(tmp_path)
    store.array = lambda name, mode="r": A
    _same_bits(store.read_tile(2, 2), A.get_block_selection((2, 2)))
    with open(os.path.join(str(tmp_path / "K"), "c", "2", "0"), "r+b") as f:
        f.truncate(0)
    with pytest.raises(StoreError, match="the store is damaged .*ntkdist verify"):
        store.read_tile(2, 0)
