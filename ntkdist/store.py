"""The kernel store: a Zarr v3 group holding X, the upper tiles of K and a done record.

Layout of ``PATH.zarr`` (also written into the group's attributes under ``ntkdist``):

* ``X``: the N×d input rows, float64, chunks of ``tile`` rows (row block I);
* ``K``: N×N, chunks ``tile``×``tile``, dtype float32 or float64, fill value NaN; only tiles
  I ≤ J are ever written (K is symmetric: K[J, I] = K[I, J]ᵀ);
* ``done/``: one small JSON file per finished piece, ``X.I`` for row block I and ``K.I.J``
  for tile (I, J), holding a BLAKE2b checksum of the piece's bytes as stored. A marker is
  written (atomically, by rename) only after its chunk is fully written; a tile without a
  marker is not done and reads as NaN, never as zeros;
* attributes ``ntkdist``: format, the spec (kernel, depth, normalisation, data source and
  its hash, N, d, tile, dtype, ntkdist version) and its SHA-256 ``spec_hash``;
* ``.lock``: present only while a process assembles or repairs the store, which holds an
  exclusive ``flock`` on it (released by the kernel when that process ends, however it
  ends) and writes its PID, host and start time into it; not a piece of the store;
* ``chain/``: limiting kernels of depth ≥ 2, where they take at most half a tile's bytes:
  ``K.I.J.npy``, the power sums of tile (I, J) that the bounds chain needs
  (:mod:`ntkdist.chain`), made with the tile and renamed into place before its chunk is
  written; the tile's marker also records their checksum (key ``chain``).

This module knows the layout only; it never computes kernel entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import NtkdistError, OutputError, os_reason
from .locks import LOCK_FILE, folder_lock, lock_holder
from .spec import StoreSpec, spec_differences
from .zarr_chunks import ChunkSizeError, read_block

FORMAT = "ntkdist-kernel-store"
FORMAT_VERSION = 1
DONE_DIR = "done"
#: The tiles' power sums for the bounds chain (see the module doc).
CHAIN_DIR = "chain"
#: Finite widths: each row block's features, made once by an assembly for its tiles and
#: removed when the store is complete (derived data, checked by a checksum beside each).
FEATURES_DIR = "features"
LAYOUT = ("X: N×d float64 rows, chunks (tile, d); K: N×N, chunks (tile, tile), fill NaN, "
          "only tiles I<=J written, K[J,I] = K[I,J]^T; done/X.I and done/K.I.J: JSON markers "
          "with a blake2b-128 checksum of the chunk's bytes, written after the chunk; "
          "chain/K.I.J.npy: the bounds chain's power sums of tile (I, J), their checksum "
          "under 'chain' in its marker")


class StoreError(NtkdistError):
    """A store is missing, foreign, of another spec, incomplete, damaged or in use."""


def repair_hint(path: str) -> str:
    """The command that recomputes a store's damaged pieces, for damage messages."""
    return f"run 'ntkdist verify --store {path} --repair' to recompute the damaged pieces"


def checksum(array: np.ndarray) -> str:
    """BLAKE2b-128 of an array's bytes in C order (the store's dtype)."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # the bytes, no copy
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tile_bounds(i: int, tile: int, n: int) -> slice:
    return slice(i * tile, min(n, (i + 1) * tile))


@dataclass
class KernelStore:
    """An opened store: its path, spec and the Zarr arrays. Cheap to re-open on workers."""

    path: str
    spec: StoreSpec

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> "KernelStore":
        """Open an existing store read-only; refuse anything that is not one."""
        if not os.path.exists(path):
            raise StoreError(f"store {path!r} does not exist")
        attrs = _read_attrs(path)
        if attrs is None:
            raise StoreError(f"{path!r} is not an ntkdist kernel store")
        try:
            spec = StoreSpec.from_dict(attrs["spec"])
            recorded = attrs["spec_hash"]
            matches = spec.hash() == recorded
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path!r} has an unreadable ntkdist spec") from None
        if not matches:  # its tiles were computed for the spec that hash names, not this one
            raise StoreError(f"the spec recorded in {path!r} does not match its spec hash "
                             f"({str(recorded)[:12]}): its metadata was edited or damaged, so "
                             "its tiles cannot be trusted for it; assemble a new store")
        return cls(path=path, spec=spec)

    @classmethod
    def create_or_resume(cls, path: str, spec: StoreSpec) -> "KernelStore":
        """Create a store for ``spec`` or resume one made with the same spec.

        A path holding anything else (files, another spec's store) is refused untouched, with
        the fields in which another spec differs. Half-written pieces of a killed run are
        removed by :meth:`remove_partial_writes`, under the store's :meth:`lock`.
        """
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise StoreError(f"--store {path!r} exists and is not a folder")
            try:
                entries = os.listdir(path)
            except OSError as exc:
                raise OutputError(f"cannot read --store {path!r}: {os_reason(exc)}") from None
            if entries:
                attrs = _read_attrs(path)
                if attrs is None:
                    raise StoreError(f"--store {path!r} is not empty and is not an ntkdist "
                                     "store; choose a new path")
                if attrs.get("spec_hash") != spec.hash():
                    raise StoreError(f"--store {path!r} was made from another spec "
                                     f"({_spec_difference(attrs, spec)}); choose a new path")
                store = cls(path=path, spec=spec)
                store._ensure_arrays()
                return store
        import zarr

        attrs = {"ntkdist": {"format": FORMAT, "format_version": FORMAT_VERSION,
                             "layout": LAYOUT, "spec": spec.to_dict(), "spec_hash": spec.hash()}}
        try:
            zarr.create_group(path, attributes=attrs, overwrite=False)
        except OSError as exc:
            raise OutputError(f"cannot create store {path!r}: {os_reason(exc)}") from None
        except Exception as exc:
            raise OutputError(f"cannot create store {path!r}: {exc}") from None
        store = cls(path=path, spec=spec)
        store._ensure_arrays()
        return store

    def _ensure_arrays(self) -> None:
        import zarr

        try:
            group = zarr.open_group(self.path, mode="r+")
            n, d, t = self.spec.n, self.spec.data.d, self.spec.tile
            if "X" not in group:
                group.create_array("X", shape=(n, d), chunks=(t, d), dtype="float64",
                                   compressors=None, fill_value=np.nan)
            if "K" not in group:
                group.create_array("K", shape=(n, n), chunks=(t, t), dtype=self.spec.dtype,
                                   compressors=None, fill_value=np.nan)
            os.makedirs(os.path.join(self.path, DONE_DIR), exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write store {self.path!r}: {os_reason(exc)}") from None

    # --- the lock ------------------------------------------------------------------------
    def lock(self, action: str = "assembled"):
        """Hold the store's lock (``PATH/.lock``, :func:`ntkdist.locks.folder_lock`) for
        assembling or repairing it; a one-line StoreError naming the holder (PID, host, start
        time) if another process holds it. A killed run never leaves the store locked."""
        return folder_lock(self.path, f"store {self.path!r}", action, StoreError)

    def lock_holder(self) -> str | None:
        """Who holds the store's lock ("assembled by process … since …"), or None."""
        return lock_holder(self.path)

    def remove_partial_writes(self) -> None:
        """Delete what a killed run left half-written: markers are renamed into place when
        complete (``*.tmpPID``), and Zarr's local store does the same with chunks
        (``*.partial``). Only under the store's :meth:`lock` (a running assembly's are not
        half-written)."""
        for root, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".partial") or (
                        root.endswith((DONE_DIR, FEATURES_DIR, CHAIN_DIR)) and ".tmp" in name):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(root, name))

    # --- arrays --------------------------------------------------------------------------
    def array(self, name: str, mode: str = "r"):
        import zarr

        return zarr.open_array(os.path.join(self.path, name), mode=mode)

    def rows(self, i: int) -> np.ndarray:
        return self.array("X")[_tile_bounds(i, self.spec.tile, self.spec.n)]

    def tile_slices(self, i: int, j: int) -> tuple[slice, slice]:
        t, n = self.spec.tile, self.spec.n
        return _tile_bounds(i, t, n), _tile_bounds(j, t, n)

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (I, J) of K as stored (NaN where never written)."""
        try:  # the tile is chunk (I, J); a whole stored tile may be a read-only mapped view
            return read_block(self.array("K"), (i, j))
        except ChunkSizeError as exc:
            raise StoreError(f"{exc}: the store is damaged ({repair_hint(self.path)})") from None

    def read_tile_checked(self, i: int, j: int, copy: bool = False) -> np.ndarray:
        """Tile (I, J) as stored, after checking it against its recorded checksum; a
        one-line StoreError if it does not match (a chunk damaged after it was written).
        ``copy``: copied into memory first (a read may map the file) and the copy checked."""
        tile = self.read_tile(i, j)
        if copy:
            tile = np.array(tile)
        self._require_checksum(self.tile_key(i, j), tile)
        return tile

    def rows_checked(self) -> np.ndarray:
        """All of X, each row block checked against its recorded checksum."""
        return np.concatenate([self.row_block_checked(i) for i in range(self.spec.blocks)])

    def row_block_checked(self, i: int) -> np.ndarray:
        """Row block I, checked against its recorded checksum (a one-line StoreError if not)."""
        block = self.rows(i)
        self._require_checksum(self.rows_key(i), block)
        return block

    def checksum_ok(self, key: str, data: np.ndarray) -> bool:
        """Whether ``data`` matches the checksum recorded in piece ``key``'s done marker."""
        recorded = self.recorded_checksum(key)
        return recorded is not None and checksum(data) == recorded

    def _require_checksum(self, key: str, data: np.ndarray) -> None:
        if not self.checksum_ok(key, data):
            raise StoreError(f"{key} of store {self.path!r} does not match its recorded "
                             f"checksum: the store is damaged ({repair_hint(self.path)})")

    # --- done record ---------------------------------------------------------------------
    @staticmethod
    def tile_key(i: int, j: int) -> str:
        return f"K.{i}.{j}"

    @staticmethod
    def rows_key(i: int) -> str:
        return f"X.{i}"

    def write_piece(self, key: str, name: str, index: tuple[int, int], data: np.ndarray,
                    sums: np.ndarray | None = None) -> str:
        """Write one piece (row block or tile) and record it done; returns its checksum.

        The one write protocol of assembly and repair: the piece's marker is removed, then its
        chunk file (so that Zarr writes a fresh chunk, never merging into damaged bytes), the
        chunk is written (atomically, by Zarr's rename) and only then the marker. A process
        killed anywhere in between leaves the piece not done, never done with other bytes.
        ``sums``: a tile's power sums for the bounds chain, renamed into place before the
        chunk is written and recorded in the same marker.
        """
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.path, DONE_DIR, key))
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.chunk_file(name, *index))
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.chain_file(key))
        extra = {}
        if sums is not None:
            file = self.chain_file(key)
            os.makedirs(os.path.dirname(file), exist_ok=True)
            tmp = f"{file}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, sums)
            os.replace(tmp, file)
            extra["chain"] = checksum(sums)
        t, n = self.spec.tile, self.spec.n
        region = (_tile_bounds(index[0], t, n),
                  slice(None) if name == "X" else _tile_bounds(index[1], t, n))
        self.array(name, mode="r+")[region] = data
        digest = checksum(data)
        self.mark_done(key, digest, **extra)
        return digest

    def mark_done(self, key: str, digest: str, **extra: str) -> None:
        """Record a finished piece; call only after its chunk is fully written."""
        final = os.path.join(self.path, DONE_DIR, key)
        tmp = f"{final}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"checksum": digest, **extra}, f)
        os.replace(tmp, final)

    def chain_file(self, key: str) -> str:
        """Where tile ``key``'s power sums for the bounds chain are kept."""
        return os.path.join(self.path, CHAIN_DIR, f"{key}.npy")

    def read_chain_sums(self, key: str) -> np.ndarray | None:
        """Tile ``key``'s power sums, if its marker records some and the file matches their
        checksum; else None (never stored, or damaged)."""
        recorded = self.recorded_checksum(key, "chain")
        if recorded is None:
            return None
        try:
            sums = np.load(self.chain_file(key), allow_pickle=False)
        except Exception:  # a damaged file may fail to load in many ways
            return None
        if sums.dtype != np.float64 or checksum(sums) != recorded:
            return None
        return sums

    def recorded_checksum(self, key: str, field: str = "checksum") -> str | None:
        """The checksum in a marker (``field``: "chain" for the tile's power sums), or None if
        the piece is not done (or the marker is bad, or records none)."""
        try:
            with open(os.path.join(self.path, DONE_DIR, key)) as f:
                value = json.load(f).get(field)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def done_keys(self) -> set[str]:
        try:
            names = os.listdir(os.path.join(self.path, DONE_DIR))
        except OSError:
            return set()
        return {name for name in names if ".tmp" not in name}

    def upper_tiles(self) -> list[tuple[int, int]]:
        b = self.spec.blocks
        return [(i, j) for i in range(b) for j in range(i, b)]

    def chunk_file(self, name: str, *index: int) -> str:
        return os.path.join(self.path, name, "c", *map(str, index))

    def chunk_intact(self, name: str, *index: int) -> bool:
        """The chunk file exists with the size an uncompressed full chunk has."""
        arr_chunks = (self.spec.tile, self.spec.tile) if name == "K" else (
            self.spec.tile, self.spec.data.d)
        itemsize = np.dtype(self.spec.dtype if name == "K" else "float64").itemsize
        try:
            size = os.path.getsize(self.chunk_file(name, *index))
        except OSError:
            return False
        return size == int(np.prod(arr_chunks)) * itemsize

    def pending(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Row blocks and upper tiles still to do: no marker, an unreadable marker, or a chunk
        file that is missing or of the wrong size."""
        done = self.done_keys()

        def finished(key, name, *index):
            return (key in done and self.recorded_checksum(key) is not None
                    and self.chunk_intact(name, *index))

        rows = [i for i in range(self.spec.blocks) if not finished(self.rows_key(i), "X", i, 0)]
        tiles = [(i, j) for i, j in self.upper_tiles()
                 if not finished(self.tile_key(i, j), "K", i, j)]
        return rows, tiles

    def require_complete(self) -> "KernelStore":
        """This store, or a one-line StoreError if any row block or tile is not done."""
        rows, tiles = self.pending()
        if rows or tiles:
            raise StoreError(f"store {self.path!r} is incomplete ({len(tiles)} of "
                             f"{len(self.upper_tiles())} tiles missing); run 'ntkdist "
                             "assemble' with the same arguments to finish it")
        return self

    def bytes_on_disk(self) -> int:
        total = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                if root == self.path and name == LOCK_FILE:
                    continue
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
        return total


def _spec_difference(attrs: dict, spec: StoreSpec) -> str:
    """'it differs in depth (3 ≠ 4), seed (0 ≠ 1)': the fields of a store's recorded spec
    (first) that differ from ``spec`` (second); the hashes when no field tells."""
    diffs = spec_differences(attrs.get("spec"), spec.to_dict())
    if diffs:
        return "it differs in " + ", ".join(diffs)
    return f"spec hash {str(attrs.get('spec_hash'))[:12]} ≠ {spec.hash()[:12]}"


def _read_attrs(path: str) -> dict | None:
    """The ``ntkdist`` attributes of a Zarr group at ``path``, or None if there are none."""
    meta = os.path.join(path, "zarr.json")
    try:
        with open(meta) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    info = attrs.get("ntkdist") if isinstance(attrs, dict) else None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return None
    return info


def open_kernel(path: str):
    """The full symmetric kernel of a complete store as a lazy ``dask.array`` (N×N).

    Tiles I ≤ J are read from ``K``, each once and checked against its recorded checksum
    (a damaged chunk raises a one-line StoreError); tile (J, I) is the transpose of (I, J).
    An incomplete store is refused, so missing tiles can never be read.
    """
    import dask
    import dask.array as da

    store = KernelStore.open(path).require_complete()
    read = dask.delayed(store.read_tile_checked, pure=True)
    dtype = np.dtype(store.spec.dtype)
    upper = {}
    for i, j in store.upper_tiles():
        rows, cols = store.tile_slices(i, j)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        upper[i, j] = da.from_delayed(read(i, j), shape=shape, dtype=dtype)
    b = store.spec.blocks
    return da.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(b)]
                     for i in range(b)])
