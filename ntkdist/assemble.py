"""Distributed, resumable assembly of the kernel's upper tiles into a store.

Row blocks of X are generated (or read from the user's file) on the workers and written to
the store; each upper tile (I, J) is then one task on a worker: read rows I and J, compute
the tile in float64 with :func:`ntkdist.kernels.kernel_tile`, cast to the storage dtype,
write its chunk, then write its done marker. The client holds only indices and checksums.
A worker holds O(tile² + tile·d) at a time.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .errors import NtkdistError
from .kernels.limiting import kernel_tile, row_block
from .spec import RunSpec, StoreSpec
from .store import KernelStore, checksum

#: Largest default tile (CPU); smaller when worker memory is tight or N is small.
DEFAULT_TILE = 4096
#: Bytes a tile task needs per tile entry (float64 GEMM output, recursion output, cast, copy).
BYTES_PER_ENTRY = 40


class AssemblyError(NtkdistError):
    """A task failed; the store keeps what was done and can be resumed."""


def default_tile(n: int, worker_memory: int | None) -> int:
    """Tile side from worker memory: a task uses at most a quarter of its worker's limit."""
    tile = DEFAULT_TILE
    if worker_memory:
        while tile > 256 and BYTES_PER_ENTRY * tile * tile > worker_memory / 4:
            tile //= 2
    return min(tile, n)


def default_dtype(n: int) -> str:
    """float64 while the dense path can still solve it, float32 storage above."""
    return "float64" if n <= 25000 else "float32"


def write_rows(path: str, i: int) -> str:
    """Task: generate or read row block ``i`` and store it in ``X``; returns its checksum."""
    store = KernelStore.open(path)
    sl = store.tile_slices(i, i)[0]
    rows = np.ascontiguousarray(store.spec.run_spec().rows(sl.start, sl.stop), dtype=np.float64)
    store.array("X", mode="r+")[sl] = rows
    digest = checksum(rows)
    store.mark_done(store.rows_key(i), digest)
    return digest


def compute_tile(store: KernelStore, i: int, j: int) -> np.ndarray:
    """Tile (I, J) in the storage dtype, from the stored rows (diagonal tiles exactly symmetric)."""
    p = store.spec.problem
    tile = kernel_tile(row_block(store.rows(i)), row_block(store.rows(j)), p["depth"],
                       p["kernel"], p["normalization"])
    if i == j:
        tile = np.triu(tile) + np.triu(tile, 1).T
    return tile.astype(store.spec.dtype, copy=False)


def write_tile(path: str, i: int, j: int) -> str:
    """Task: compute tile (I, J), write its chunk, then its done marker; returns its checksum."""
    store = KernelStore.open(path)
    tile = compute_tile(store, i, j)
    store.array("K", mode="r+")[store.tile_slices(i, j)] = tile
    digest = checksum(tile)
    store.mark_done(store.tile_key(i, j), digest)
    return digest


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


def assemble(spec: StoreSpec, path: str, client, progress: bool = True) -> dict:
    """Assemble (or finish) the store at ``path`` for ``spec`` on ``client``'s workers."""
    store = KernelStore.create_or_resume(path, spec)
    t0 = time.perf_counter()
    rows, tiles = store.pending()
    total = len(store.upper_tiles())
    _run({client.submit(write_rows, path, i, retries=2, pure=False): f"row block {i}"
          for i in rows})
    bar = Progress(total, total - len(tiles), spec.tile ** 2) if progress else None
    futures = {client.submit(write_tile, path, i, j, retries=2, pure=False): f"tile ({i}, {j})"
               for i, j in tiles}
    _run(futures, bar)
    if bar:
        bar.update(0, final=True)
    return {"tiles_total": total, "tiles_computed": len(tiles), "rows_computed": len(rows),
            "seconds": time.perf_counter() - t0}


def _run(futures: dict, bar: Progress | None = None) -> None:
    """Wait for ``futures`` (future → label); on the first failure cancel the rest and raise."""
    from distributed import as_completed

    try:
        for future in as_completed(list(futures)):
            if future.status == "error":
                exc = future.exception()
                raise AssemblyError(f"{futures[future]} failed: {type(exc).__name__}: {exc}; "
                                    "done tiles are kept, rerun the same command to resume")
            if bar:
                bar.update()
    finally:
        for f in futures:
            f.cancel()


def resolve_store_spec(run_spec: RunSpec, path: str, client, tile: int | None,
                       dtype: str | None) -> StoreSpec:
    """The store spec, defaults filled in: from an existing store of the same problem at
    ``path`` (so that a rerun resumes it), else tile from worker memory and dtype from N."""
    from .cluster import worker_memory_limit
    from .spec import make_store_spec
    from .store import StoreError

    try:
        existing = KernelStore.open(path).spec
    except StoreError:
        existing = None
    if existing is not None and existing.problem == run_spec.problem():
        tile = existing.tile if tile is None else tile
        dtype = existing.dtype if dtype is None else dtype
    if tile is None:
        tile = default_tile(run_spec.n, worker_memory_limit(client))
    return make_store_spec(run_spec, tile, default_dtype(run_spec.n) if dtype is None else dtype)


def verify(path: str, recompute: int = 0, seed: int | None = None, log=None) -> dict:
    """Re-read every done piece of a store and check it against its recorded checksum.

    With ``recompute`` > 0, also recompute that many random done tiles from the stored rows
    and compare them with the stored bytes. Returns the bad pieces, the missing ones and
    counts; a sound store has no bad pieces.
    """
    store = KernelStore.open(path)
    done = store.done_keys()
    bad, missing, checked = [], [], 0
    pieces = [(store.rows_key(i), "X", (i, 0)) for i in range(store.spec.blocks)]
    pieces += [(store.tile_key(i, j), "K", (i, j)) for i, j in store.upper_tiles()]
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
        if log and checked % 50 == 0:
            log(f"checked {checked} pieces")
    recomputed = []
    tiles_done = [(i, j) for i, j in store.upper_tiles()
                  if store.tile_key(i, j) in done and store.tile_key(i, j) not in bad]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(tiles_done), size=min(recompute, len(tiles_done)), replace=False)
    for idx in sorted(int(k) for k in picks):
        i, j = tiles_done[idx]
        fresh = compute_tile(store, i, j)
        stored = store.read_tile(i, j)
        scale = float(np.max(np.abs(fresh))) or 1.0
        diff = float(np.max(np.abs(fresh.astype(np.float64) - stored)))
        tol = 4 * np.finfo(store.spec.dtype).eps * scale
        recomputed.append({"tile": [i, j], "max_abs_diff": diff})
        if not diff <= tol:
            bad.append(store.tile_key(i, j) + " (recomputed)")
    return {"bad": bad, "missing": missing, "checked": checked, "recomputed": recomputed}
