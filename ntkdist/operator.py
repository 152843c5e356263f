"""Y = K·V on Dask workers, from a store or recomputed from the data.

Modes (``--operator``):

* ``store``: each pass reads every stored upper tile once from Zarr and applies it twice,
  Y_I += K_IJ V_J and Y_J += K_IJᵀ V_I;
* ``memory``: the same tiles, read once and kept in worker memory (CPU RAM) between passes;
* ``recompute``: tiles rebuilt from the rows with the tile function every pass (no store);
* ``auto``: ``memory`` when the stored tiles fit in ``cache_fraction`` (0.4) of the workers'
  memory, else ``store`` with as many tiles kept in worker memory as fit there (the others
  streamed each pass); ``recompute`` when there is no store.

Products accumulate in float64 whatever the storage dtype; only N×b blocks travel between
the client and the workers.
"""

from __future__ import annotations

import numpy as np

from .errors import NtkdistError
from .kernels.limiting import kernel_tile, row_block
from .store import KernelStore

MODES = ("auto", "store", "memory", "recompute")


#: Rows of a float32 tile widened to float64 at once, into a reused buffer (in cache, so the
#: tile is read from memory once).
STRIP = 256


def _products(tile, VT, i, j, t, buf=None):
    """((K_IJ V_J)ᵀ, (K_IJᵀ V_I)ᵀ) in float64; the second is None on the diagonal.

    The vectors travel transposed (b×N): Vᵀ·K and Vᵀ·Kᵀ with a C-ordered tile run at ~1.6× the
    speed of K·V with a thin V on one core (OpenBLAS, measured in benchmarks/RESULTS.md).
    """
    rows, cols = tile.shape
    vi = np.ascontiguousarray(VT[:, i * t:i * t + rows])
    vj = np.ascontiguousarray(VT[:, j * t:j * t + cols])
    if tile.dtype == np.float64:
        yi = vj @ tile.T
        yj = None if i == j else vi @ tile
        return yi, yj
    if buf is None or buf.shape[1] < cols:
        buf = np.empty((STRIP, cols))
    yi = np.empty((VT.shape[0], rows))
    yj = None if i == j else np.zeros((VT.shape[0], cols))
    for a in range(0, rows, STRIP):
        strip = buf[:min(STRIP, rows - a), :cols]
        np.copyto(strip, tile[a:a + STRIP])
        yi[:, a:a + STRIP] = vj @ strip.T
        if yj is not None:
            yj += vi[:, a:a + STRIP] @ strip
    return yi, yj


def _pass_on_worker(VT, n, t, cached, streamed, path, recompute, blocks, problem,
                    check=False):
    """One worker's share of a pass, summed into one b×N block.

    ``cached``: (i, j, tile) held in this worker's memory; ``streamed``: (i, j) read from the
    store at ``path``, the next tile read on a second thread while this one is multiplied
    (file reads release the GIL), and checked against its recorded checksum if ``check``
    (the first pass); ``recompute``: (i, j) rebuilt from ``blocks`` (row blocks by index)
    with the tile function.
    """
    from concurrent.futures import ThreadPoolExecutor

    YT = np.zeros((VT.shape[0], n))
    buf = np.empty((STRIP, t))

    def add(i, j, tile):
        yi, yj = _products(tile, VT, i, j, t, buf)
        YT[:, i * t:i * t + yi.shape[1]] += yi
        if yj is not None:
            YT[:, j * t:j * t + yj.shape[1]] += yj

    store = KernelStore.open(path) if streamed else None
    read = (store.read_tile_checked if check else store.read_tile) if streamed else None
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, *streamed[0]) if streamed else None
        for i, j, tile in cached:
            add(i, j, tile)
        for k, (i, j) in enumerate(streamed):
            tile = pending.result()
            if k + 1 < len(streamed):
                pending = reader.submit(read, *streamed[k + 1])
            add(i, j, tile)
            del tile
    for i, j in recompute:
        tile = kernel_tile(blocks[i], blocks[j], problem["depth"], problem["kernel"],
                           problem["normalization"])
        if i == j:
            tile = np.triu(tile) + np.triu(tile, 1).T
        add(i, j, tile)
    return YT


def _load_tile(path, i, j):
    """A tile copied into this worker's memory (a read may map the file's pages), checked
    against its recorded checksum."""
    return np.array(KernelStore.open(path).read_tile_checked(i, j))


def _cost(i, j, rows, cols):
    return rows * cols * (1 if i == j else 2)


class KernelOperator:
    """A distributed symmetric operator V ↦ K·V with pass, product and byte counters.

    Each pass sends Vᵀ to every worker once and runs one task per worker, which sums its
    tiles' products into one b×N block; tiles are assigned to workers once (cached tiles
    where they live, the others by cost, largest first), so a pass moves 2·b·N floats per
    worker whatever the number of tiles, and sums in a fixed order.
    """

    def __init__(self, client, mode: str = "auto", store: str | None = None, rows=None,
                 problem: dict | None = None, tile: int = 4096, cache_fraction: float = 0.4):
        if mode not in MODES:
            raise NtkdistError(f"operator must be one of {', '.join(MODES)}, got {mode!r}")
        self.client = client
        requested = mode
        self.passes = self.matvecs = self.bytes_read = 0
        self._cache = {}
        self.cached_bytes = 0
        workers = self._workers()
        if not workers:
            raise NtkdistError("the Dask cluster has no workers")
        if store is not None:
            s = KernelStore.open(store).require_complete()
            self.store, self.problem, self.tile = s, s.spec.problem, s.spec.tile
            self.n = s.spec.n
            itemsize = np.dtype(s.spec.dtype).itemsize
        else:
            if mode in ("store", "memory"):
                raise NtkdistError(f"operator {mode!r} needs a store")
            self.store, self.problem, self.tile = None, problem, min(tile, len(rows))
            self.n = len(rows)
            itemsize = 0
        t, n = self.tile, self.n
        nb = -(-n // t)
        self.pairs = [(i, j) for i in range(nb) for j in range(i, nb)]
        size = {(i, j): (min(t, n - i * t), min(t, n - j * t)) for i, j in self.pairs}
        self._tile_bytes = {p: size[p][0] * size[p][1] * itemsize for p in self.pairs}
        self.tile_bytes = sum(self._tile_bytes.values())
        budget = cache_fraction * sum(workers.values()) if all(workers.values()) else np.inf
        if store is None:
            mode = "recompute"
        elif mode == "auto":
            mode = "memory" if self.tile_bytes <= budget else "store"
        elif mode == "memory" and self.tile_bytes > budget:
            raise NtkdistError(
                f"--operator memory: the stored tiles ({self.tile_bytes / 1e9:.1f} GB) do not fit "
                f"in {cache_fraction:.0%} of the workers' memory ({budget / 1e9:.1f} GB); use "
                "--operator auto (caches what fits, streams the rest) or store")
        self.mode = mode
        # Tiles kept in worker memory: all for memory; for auto → store, as many as fit.
        cache = []
        if mode == "memory":
            cache = list(self.pairs)
        elif mode == "store" and requested == "auto":
            used = 0
            for p in sorted(self.pairs, key=lambda p: -self._tile_bytes[p]):
                if used + self._tile_bytes[p] <= budget:
                    cache.append(p)
                    used += self._tile_bytes[p]
        if cache:
            load = {w: 0.0 for w in workers}  # spread the cached work evenly, largest first
            futs = {}
            for p in sorted(cache, key=lambda p: -_cost(*p, *size[p])):
                w = min(load, key=load.get)
                load[w] += _cost(*p, *size[p])
                futs[p] = client.submit(_load_tile, self.store.path, *p, workers=[w],
                                        allow_other_workers=True, pure=False)
            from distributed import wait

            wait(list(futs.values()))
            self._check_failed(futs.values())
            self._cache = futs
            self.cached_bytes = sum(self._tile_bytes[p] for p in cache)
            self.bytes_read += self.cached_bytes
        self._plan(workers, size)
        self._blocks = None
        if mode == "recompute":
            X = np.asarray(rows if rows is not None else self.store.rows_checked(), dtype=np.float64)
            blocks = {i: row_block(X[i * t:(i + 1) * t]) for i in range(nb)}
            self._blocks = client.scatter(blocks, broadcast=True)

    def _workers(self) -> dict:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {addr: (w.get("memory_limit") or 0) for addr, w in info.items()}

    @staticmethod
    def _check_failed(futures):
        for f in futures:
            if f.status == "error":
                f.result()  # raises the worker's exception

    def _plan(self, workers, size):
        """Assign every tile to one worker: cached ones where they live, the rest greedily
        to the least-loaded worker, largest first."""
        load = {w: 0.0 for w in workers}
        self._assign = {w: {"cached": [], "other": []} for w in workers}
        if self._cache:
            where = self.client.who_has(list(self._cache.values()))
            for p, f in self._cache.items():
                w = (where.get(f.key) or [None])[0]
                if w not in load:
                    w = min(load, key=load.get)
                self._assign[w]["cached"].append(p)
                load[w] += _cost(*p, *size[p])
        rest = [p for p in self.pairs if p not in self._cache]
        for p in sorted(rest, key=lambda p: -_cost(*p, *size[p])):
            w = min(load, key=load.get)
            self._assign[w]["other"].append(p)
            load[w] += _cost(*p, *size[p])
        for a in self._assign.values():
            a["cached"].sort()
            a["other"].sort()
        streamed = rest if self.mode == "store" else []
        self.streamed_bytes_per_pass = sum(self._tile_bytes[p] for p in streamed)

    @property
    def shape(self):
        return (self.n, self.n)

    def matmat(self, V: np.ndarray) -> np.ndarray:
        V = np.asarray(V, dtype=np.float64)
        squeeze = V.ndim == 1
        if squeeze:
            V = V[:, None]
        b = V.shape[1]
        Vf = self.client.scatter(np.ascontiguousarray(V.T), broadcast=True, hash=False)
        path = self.store.path if self.store is not None else None
        futures = []
        for w, a in sorted(self._assign.items()):
            if not a["cached"] and not a["other"]:
                continue
            cached = [(i, j, self._cache[(i, j)]) for i, j in a["cached"]]
            streamed = a["other"] if self.mode != "recompute" else []
            recompute = a["other"] if self.mode == "recompute" else []
            blocks = ({i: self._blocks[i] for p in recompute for i in p}
                      if recompute else None)
            futures.append(self.client.submit(
                _pass_on_worker, Vf, self.n, self.tile, cached, streamed, path, recompute,
                blocks, self.problem, self.passes == 0, workers=[w], allow_other_workers=True,
                pure=False))
        YT = np.zeros((b, self.n))
        try:
            for f in futures:  # a fixed order: the sum does not depend on timing
                YT += f.result()
        except NtkdistError:
            raise
        except Exception as exc:  # a worker's failure, reported as one line
            raise NtkdistError(f"product over the kernel failed ({self.mode} operator): "
                               f"{type(exc).__name__}: {exc}") from None
        finally:
            for f in futures:
                f.cancel()
            del Vf
        self.passes += 1
        self.matvecs += b
        self.bytes_read += self.streamed_bytes_per_pass
        return YT[0].copy() if squeeze else np.ascontiguousarray(YT.T)

    def describe(self) -> dict:
        return {"mode": self.mode, "tile_bytes": self.tile_bytes,
                "cached_bytes": self.cached_bytes,
                "streamed_bytes_per_pass": self.streamed_bytes_per_pass}

    def close(self) -> None:
        for f in self._cache.values():
            f.release()
        self._cache = {}
