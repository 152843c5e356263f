"""Distributed, resumable assembly of the kernel's upper tiles into a store.

Row blocks of X are generated (or read from the user's file) on the workers and written to
the store; each upper tile (I, J) is then one task on a worker: read rows I and J, compute
the tile in float64 with :func:`ntkdist.kernels.kernel_tile`, cast to the storage dtype,
write its chunk, then write its done marker. The client holds only indices and checksums.
A worker holds O(tile² + tile·d) at a time. The client holds the store's lock throughout
(:meth:`KernelStore.lock`), so a second assembly or a repair of the same store is refused.

:func:`repair` recomputes the pieces :func:`verify` finds damaged (row blocks from the data
source, tiles from the checked rows) with the same tasks and write protocol.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time

import numpy as np

from .errors import NtkdistError, SpecError
from .kernels.limiting import row_block
from .spec import ClusterSpec, RunSpec, StoreSpec
from .store import FEATURES_DIR, KernelStore, StoreError, checksum, os_reason

class AssemblyError(NtkdistError):
    """A task failed; the store keeps what was done and can be resumed."""


def _source_rows(store: KernelStore, i: int) -> np.ndarray:
    """Row block ``i`` generated (synthetic data) or read from the input file, float64."""
    sl = store.tile_slices(i, i)[0]
    return np.ascontiguousarray(store.spec.data.rows(sl.start, sl.stop), dtype=np.float64)


def write_rows(path: str, i: int) -> str:
    """Task: generate or read row block ``i`` and store it in ``X``; returns its checksum."""
    store = KernelStore.open(path)
    return store.write_piece(store.rows_key(i), "X", (i, 0), _source_rows(store, i))


def repair_rows(path: str, i: int, recorded: str | None) -> str:
    """Task: row block ``i`` again from the data source, written only if it has the bytes
    recorded when the store was assembled (``recorded``: the marker's checksum, None if the
    marker is unreadable); returns its checksum."""
    store = KernelStore.open(path)
    rows = _source_rows(store, i)
    if recorded is not None and checksum(rows) != recorded:
        raise StoreError(f"row block {i} read again from {store.spec.data.source!r} does "
                         "not match its recorded checksum: the data source no longer gives "
                         "the rows the store was assembled from, so it cannot repair them")
    return store.write_piece(store.rows_key(i), "X", (i, 0), rows)


#: Feature files this process has checked against their checksums: (path, inode, size,
#: mtime) → True (a file is hashed once per process, not once per tile that reads it).
_checked_features: dict = {}


def _features_file(store: KernelStore, i: int) -> str:
    return os.path.join(store.path, FEATURES_DIR, f"{i}.npy")


def _cached_features(store: KernelStore, i: int):
    """Row block I's features from the store's feature cache, or None if they are not there
    or do not match their checksum."""
    file = _features_file(store, i)
    try:
        with open(file[:-4] + ".sum") as f:
            recorded = f.read().strip()
        st = os.stat(file)
        arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    rows = store.tile_slices(i, i)[0]
    if arr.ndim != 2 or arr.shape[0] != rows.stop - rows.start:
        return None
    key = (file, st.st_ino, st.st_size, st.st_mtime_ns, recorded)
    if key not in _checked_features:
        if checksum(arr) != recorded:
            return None
        _checked_features[key] = True
    kernel = store.spec.kernel
    d = store.spec.data.d
    from .kernels.finite import FiniteBlock, term_sizes

    try:
        return FiniteBlock.from_array(
            arr, term_sizes(d, kernel.widths, kernel.kind, kernel.layer), kernel.factor(d))
    except NtkdistError:
        return None


#: Finite widths: the features of consecutive row blocks are made together, up to this many
#: bytes, so that each group draws the weights once (the draws, 55–62 M normals/s on a core,
#: take 15–22 % of the features' time for 2048 rows at once, more for fewer rows:
#: ``python benchmarks/finite_tile.py``, benchmarks/RESULTS.md).
FEATURE_GROUP_BYTES = 2 * 2 ** 30


def feature_group(store: KernelStore, i: int) -> range:
    """The row blocks whose features are made with block I's: a fixed partition from the
    store's spec alone, so a block's bytes never depend on the cluster or on what was done."""
    spec = store.spec
    row_bytes = 8 * spec.kernel.feature_columns(spec.data.d)
    size = max(1, min(spec.blocks, FEATURE_GROUP_BYTES // (row_bytes * spec.tile)))
    start = i // size * size
    return range(start, min(start + size, spec.blocks))


def _save_features(store: KernelStore, i: int, arr) -> None:
    """Block I's features into the cache: the array, then its checksum, each renamed into
    place (a reader never takes a half-written file for a done one)."""
    file = _features_file(store, i)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(file[:-4] + ".sum")
    tmp = f"{file}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, file)
    tmp = f"{file[:-4]}.sum.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(checksum(arr))
    os.replace(tmp, file[:-4] + ".sum")


def _make_features(store: KernelStore, i: int, cache: bool = True) -> dict:
    """The features of row block I's :func:`feature_group`, made together from the checked
    rows, as {block: features}; with ``cache``, also written to the store's feature cache."""
    from .kernels.finite import FiniteBlock

    group = feature_group(store, i)
    rows = np.concatenate([store.row_block_checked(k) for k in group])
    block = store.spec.kernel.features(rows)
    arr = block.to_array()
    start = store.tile_slices(group[0], group[0])[0].start
    out = {}
    for k in group:
        sl = store.tile_slices(k, k)[0]
        part = np.ascontiguousarray(arr[sl.start - start:sl.stop - start])
        if cache:
            _save_features(store, k, part)
        out[k] = FiniteBlock.from_array(part, block.sizes, block.factor)
    return out


def block_features(store: KernelStore, i: int, cache: bool = True, made: dict | None = None):
    """What row block I contributes to its tiles (:meth:`ntkdist.spec.KernelSpec.features`):
    for finite widths from the store's feature cache, else from ``made`` (blocks made
    before, by group), else made with its group (and, with ``cache``, kept); for the limits
    from the stored rows."""
    kernel = store.spec.kernel
    if not kernel.finite:
        return row_block(store.rows(i))
    made = {} if made is None else made
    if i not in made:
        block = _cached_features(store, i)
        if block is not None:
            return block
        made.update(_make_features(store, i, cache))
    return made[i]


def write_features(path: str, blocks) -> None:
    """Task: the features of ``blocks`` (of one :func:`feature_group`) into the store's
    feature cache, unless they are there (finite widths)."""
    store = KernelStore.open(path)
    if any(_cached_features(store, i) is None for i in blocks):
        _make_features(store, blocks[0])


def remove_features(store: KernelStore) -> None:
    """Drop the feature cache of a complete store."""
    import shutil

    shutil.rmtree(os.path.join(store.path, FEATURES_DIR), ignore_errors=True)


def compute_tile(store: KernelStore, i: int, j: int, cache: bool = True,
                 sums: bool = False):
    """Tile (I, J) in the storage dtype, from the stored rows (diagonal tiles exactly
    symmetric); finite widths from the blocks' features (``cache``: kept in the store).
    With ``sums``: (tile, its power sums for the bounds chain or None where the store keeps
    none, :func:`ntkdist.chain.stored_layers`), the tile's bytes the same either way."""
    from .chain import stored_layers, tile_with_sums

    made = {}  # a group made for block I serves block J too
    A, B = block_features(store, i, cache, made), block_features(store, j, cache, made)
    layers = stored_layers(store.spec) if sums else None
    if layers is None:
        tile, packed = store.spec.kernel.tile(A, B), None
    else:
        tile, packed = tile_with_sums(store.spec.kernel, A, B, layers, i == j)
    if i == j:
        tile = np.triu(tile) + np.triu(tile, 1).T
    tile = tile.astype(store.spec.dtype, copy=False)
    return (tile, packed) if sums else tile


def write_tile(path: str, i: int, j: int) -> str:
    """Task: compute tile (I, J) from rows I and J (checked against their checksums first),
    and with it its power sums for the bounds chain where the store keeps them; write them,
    its chunk, then its done marker; returns its checksum."""
    store = KernelStore.open(path)
    for k in {i, j}:
        store.row_block_checked(k)
    tile, sums = compute_tile(store, i, j, sums=True)
    return store.write_piece(store.tile_key(i, j), "K", (i, j), tile, sums=sums)


class Progress:
    """Tiles done / total, rate and ETA on stderr (one updating line on a terminal)."""

    def __init__(self, total: int, done: int, entries_per_tile: float, stream=None):
        self.total, self.done, self.stream = total, done, stream or sys.stderr
        self.start_done = done
        self.entries = entries_per_tile
        self.t0 = time.perf_counter()
        self.last = time.perf_counter()
        self.shown = done
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, step: int = 1, final: bool = False) -> None:
        self.done += step
        now = time.perf_counter()
        if (not final and now - self.last < (0.5 if self.tty else 10.0)) or (
                final and self.shown == self.done and not self.tty and self.done > self.start_done):
            return
        self.last, self.shown = now, self.done
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"tiles {self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%), "
                f"{rate:.2f} tiles/s, {rate * self.entries / 1e6:.1f} M entries/s, "
                f"elapsed {elapsed:.0f} s, eta {eta:.0f} s")
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def assemble(spec: StoreSpec, path: str, client, progress: bool = True, log=None) -> dict:
    """Assemble (or finish) the store at ``path`` for ``spec`` on ``client``'s workers.

    Holds the store's lock while anything is written (a one-line StoreError naming the holder
    if another process assembles or repairs it); a complete store is only checked, without
    the lock (so a complete store on a read-only file system still serves ``run --store``).
    ``log``: called with "resuming: D of T tiles already done" when resuming. The report's
    ``tiles_done_before`` is that D.
    """
    store = KernelStore.create_or_resume(path, spec)
    t0 = time.perf_counter()
    total = len(store.upper_tiles())
    rows, tiles = store.pending()
    with contextlib.ExitStack() as held:
        if rows or tiles:
            held.enter_context(store.lock("assembled"))
            store.remove_partial_writes()
            rows, tiles = store.pending()  # again, now that no other process writes
        done_before = total - len(tiles)
        if done_before and log:
            log(f"resuming: {done_before} of {total} tiles already done")
        _run({client.submit(write_rows, path, i, retries=2, pure=False): f"row block {i}"
              for i in rows}, path=path)
        if spec.kernel.finite and tiles:
            groups = {}
            for k in sorted({k for pair in tiles for k in pair}):
                groups.setdefault(feature_group(store, k)[0], []).append(k)
            if log:
                log(f"features of {sum(map(len, groups.values()))} row block(s) in "
                    f"{len(groups)} task(s) on the workers "
                    f"({spec.kernel.feature_columns(spec.data.d)} values a row)")
            _run({client.submit(write_features, path, blocks, retries=2, pure=False):
                  f"features of row blocks {blocks[0]}-{blocks[-1]}"
                  for blocks in groups.values()}, path=path)
        bar = Progress(total, done_before, spec.tile ** 2) if progress else None
        futures = {client.submit(write_tile, path, i, j, retries=2, pure=False):
                   f"tile ({i}, {j})" for i, j in tiles}
        _run(futures, bar, path=path)
        if bar:
            bar.update(0, final=True)
        if spec.kernel.finite and (rows or tiles):
            remove_features(store)
    return {"tiles_total": total, "tiles_computed": len(tiles), "rows_computed": len(rows),
            "tiles_done_before": done_before, "seconds": time.perf_counter() - t0}


#: Errors of a store that cannot be written, and what to do about them.
_WRITE_ADVICE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
                 errno.EROFS: "make the store writable", errno.EACCES: "make the store writable",
                 errno.EPERM: "make the store writable"}


def _failure(label: str, exc: BaseException, path: str | None) -> str:
    """One line for a failed task: the OS's reason for a store that cannot be written (a full
    disk, a read-only file system), else the error; what was done is kept."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ADVICE:
        where = f" writing store {path!r}" if path else ""
        return (f"{label} failed: {os_reason(exc)}{where}; the pieces done are kept: "
                f"{_WRITE_ADVICE[exc.errno]}, then rerun the same command to resume")
    text = str(exc) if isinstance(exc, NtkdistError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())  # one line, whatever the error's text
    return f"{label} failed: {text}; the pieces done are kept, rerun the same command to resume"


def _run(futures: dict, bar: Progress | None = None, path: str | None = None,
         results: bool = False) -> list | None:
    """Wait for ``futures`` (future → label); on the first failure cancel the rest and raise
    one line. ``results``: return the results, in the order of ``futures``."""
    from distributed import as_completed

    try:
        for future in as_completed(list(futures)):
            if future.status == "error":
                raise AssemblyError(_failure(futures[future], future.exception(), path))
            if future.status != "finished":  # cancelled: the cluster lost it
                raise AssemblyError(f"{futures[future]} was {future.status} by the Dask "
                                    "cluster (a worker or the scheduler was lost); the pieces "
                                    "done are kept, rerun the same command to resume")
            if bar:
                bar.update()
        if results and futures:
            return next(iter(futures)).client.gather(list(futures))
        return [] if results else None
    finally:
        for f in futures:
            f.cancel()


def existing_layout(path: str, run_spec: RunSpec) -> tuple[int | None, str | None]:
    """(tile, dtype) of a store of the same problem already at ``path`` (so that a rerun
    resumes it with the same tiling), else (None, None)."""
    from .store import StoreError

    try:
        existing = KernelStore.open(path).spec
    except StoreError:
        return None, None
    if existing.problem == run_spec.problem():
        return existing.tile, existing.dtype
    return None, None


def verify(path: str, recompute: int = 0, seed: int | None = None, log=None,
           keys=None) -> dict:
    """Re-read every done piece of a store and check it against its recorded checksum (a
    tile's power sums for the bounds chain too, where its marker records them).

    With ``recompute`` > 0, also recompute that many random done tiles from the stored rows
    and compare them with the stored bytes (and their power sums with the stored ones, to
    1e-12 relative). ``keys``: check only these pieces. Returns the
    bad pieces, the missing ones and counts; a sound store has no bad pieces.
    """
    if isinstance(recompute, bool) or not isinstance(recompute, int) or recompute < 0:
        raise SpecError(f"--recompute must be an integer >= 0 (tiles to recompute), "
                        f"got {recompute!r}")
    from .chain import read_tile_sums, stored_layers

    store = KernelStore.open(path)
    layers = stored_layers(store.spec)
    done = store.done_keys()
    bad, missing, checked = [], [], 0
    pieces = [(store.rows_key(i), "X", (i, 0)) for i in range(store.spec.blocks)]
    pieces += [(store.tile_key(i, j), "K", (i, j)) for i, j in store.upper_tiles()]
    if keys is not None:
        keys = set(keys)
        pieces = [p for p in pieces if p[0] in keys]
    for key, name, (i, j) in pieces:
        if key not in done:
            missing.append(key)
            continue
        try:
            data = store.rows(i) if name == "X" else store.read_tile(i, j)
            ok = store.checksum_ok(key, data)
        except Exception:  # a damaged chunk may fail to decode in many ways
            ok = False
        checked += 1
        if not ok:
            bad.append(key)
        elif name == "K" and store.recorded_checksum(key, "chain") is not None and (
                layers is None or read_tile_sums(store, i, j, layers) is None):
            bad.append(f"{key} (its power sums)")
        if log and checked % 50 == 0:
            log(f"checked {checked} pieces")
    recomputed = []
    tiles_done = [(i, j) for i, j in store.upper_tiles()
                  if store.tile_key(i, j) in done and store.tile_key(i, j) not in bad]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(tiles_done), size=min(recompute, len(tiles_done)), replace=False)
    for idx in sorted(int(k) for k in picks):
        i, j = tiles_done[idx]
        fresh, sums = compute_tile(store, i, j, cache=False, sums=True)
        stored = store.read_tile(i, j)
        scale = float(np.max(np.abs(fresh))) or 1.0
        diff = float(np.max(np.abs(fresh.astype(np.float64) - stored)))
        tol = 4 * np.finfo(store.spec.dtype).eps * scale
        recomputed.append({"tile": [i, j], "max_abs_diff": diff})
        if not diff <= tol:
            bad.append(store.tile_key(i, j) + " (recomputed)")
        kept = None if sums is None else read_tile_sums(store, i, j, layers)
        if kept is not None and not np.allclose(kept, sums, rtol=1e-12, atol=0.0):
            bad.append(store.tile_key(i, j) + " (its power sums, recomputed)")
    return {"bad": bad, "missing": missing, "checked": checked, "recomputed": recomputed}


def repair(path: str, client=None, cluster=None, recompute: int = 0,
           seed: int | None = None, log=None) -> dict:
    """Verify a store, recompute exactly its bad pieces on Dask workers, verify them again.

    Row blocks come again from the data source (a file input must still have the SHA-256
    recorded in the spec, and every block the bytes its marker records); tiles from the
    stored rows, checked first. Each is written as assembly writes it (marker removed, chunk
    rewritten, marker last). ``client``: a ``distributed.Client``; else a cluster is started
    from ``cluster`` (a :class:`ntkdist.spec.ClusterSpec`; default: a local one), only when
    there is something to repair. Holds the store's lock throughout.

    Returns ``verify``'s report of the store before (``bad``, ``missing``, ``checked``,
    ``recomputed``), ``repaired`` (the keys rewritten), ``changed`` (tiles whose new bytes
    differ from the recorded checksum: a damaged marker, or a tile that failed
    recomputation), ``bad_after`` (pieces still bad) and ``seconds``.
    """

    t0 = time.perf_counter()
    store = KernelStore.open(path)
    with store.lock("repaired"):
        store.remove_partial_writes()
        report = verify(path, recompute=recompute, seed=seed)
        bad = list(dict.fromkeys(key.split(" ")[0] for key in report["bad"]))
        rows = sorted(int(k.split(".")[1]) for k in bad if k.startswith("X."))
        tiles = [(int(k.split(".")[1]), int(k.split(".")[2])) for k in bad if k.startswith("K.")]
        changed = []
        if bad:
            if rows:
                _check_source(store, [store.rows_key(i) for i in rows])
            if log:
                log(f"found {len(bad)} bad piece(s): {', '.join(bad)}; recomputing them on "
                    "the Dask workers")
            recorded = {k: store.recorded_checksum(k) for k in bad}
            use = contextlib.nullcontext(client) if client is not None else (
                cluster or ClusterSpec()).connect()
            with use as c:
                _run({c.submit(repair_rows, path, i, recorded[store.rows_key(i)], pure=False):
                      f"row block {i}" for i in rows}, path=path)
                keys = [store.tile_key(i, j) for i, j in tiles]
                digests = _run({c.submit(write_tile, path, i, j, pure=False): f"tile ({i}, {j})"
                                for i, j in tiles}, path=path, results=True)
                changed = [k for k, d in zip(keys, digests) if d != recorded[k]]
                if store.spec.kernel.finite:
                    remove_features(store)
        after = verify(path, keys=bad) if bad else {"bad": []}
    return {**report, "repaired": bad, "changed": changed, "bad_after": after["bad"],
            "seconds": time.perf_counter() - t0}


def _check_source(store: KernelStore, keys: list) -> None:
    """Refuse, in one line, to repair row blocks from an input file that is gone or changed."""
    from .data import file_sha256

    data_spec = store.spec.data
    if data_spec.input_sha256 is None:  # synthetic: the generator's rows are checked per block
        return
    data, what = data_spec.source, f"{', '.join(keys)} of store {store.path!r} cannot be repaired"
    if not os.path.exists(data):
        raise StoreError(f"{what}: its input file {data!r} no longer exists; restore it (the "
                         f"file with sha256 {data_spec.input_sha256[:12]}…) and rerun")
    try:
        now = file_sha256(data)
    except OSError as exc:
        raise StoreError(f"{what}: its input file {data!r} cannot be read "
                         f"({os_reason(exc)})") from None
    if now != data_spec.input_sha256:
        raise StoreError(f"{what}: its input file {data!r} has changed since the store was "
                         f"assembled (sha256 {now[:12]}… ≠ {data_spec.input_sha256[:12]}… recorded); "
                         "restore the original file and rerun")
