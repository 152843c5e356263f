"""Y = K·V on Dask workers, from a store or recomputed from the data.

Modes (``--operator``):

* ``store``: each pass reads every stored upper tile once from Zarr and applies it twice,
  Y_I += K_IJ V_J and Y_J += K_IJᵀ V_I;
* ``memory``: the same tiles, read once and kept in worker memory (CPU RAM) between passes;
* ``recompute``: tiles rebuilt from the rows with the tile function every pass (no store);
* ``auto``: ``memory`` when the stored tiles fit in half the workers' memory, else ``store``;
  ``recompute`` when there is no store.

Products accumulate in float64 whatever the storage dtype; only N×b blocks travel between
the client and the workers.
"""

from __future__ import annotations

import numpy as np

from .errors import NtkdistError
from .kernels.limiting import kernel_tile, row_block
from .store import KernelStore

MODES = ("auto", "store", "memory", "recompute")


#: Rows of a float32 tile widened to float64 at once (in cache, so the tile is read once).
STRIP = 512


def _products(tile, VT, i, j, t):
    """(i, j, (K_IJ V_J)ᵀ, (K_IJᵀ V_I)ᵀ) in float64; the second is None on the diagonal.

    The vectors travel transposed (b×N): Vᵀ·K and Vᵀ·Kᵀ with a C-ordered tile run at ~1.6× the
    speed of K·V with a thin V on one core (OpenBLAS, measured in benchmarks/RESULTS.md).
    """
    rows, cols = tile.shape
    vi, vj = VT[:, i * t:i * t + rows], VT[:, j * t:j * t + cols]
    if tile.dtype == np.float64:
        yi = vj @ tile.T
        yj = None if i == j else vi @ tile
        return i, j, yi, yj
    yi = np.empty((VT.shape[0], rows))
    yj = None if i == j else np.zeros((VT.shape[0], cols))
    for a in range(0, rows, STRIP):
        strip = tile[a:a + STRIP].astype(np.float64)
        yi[:, a:a + STRIP] = vj @ strip.T
        if yj is not None:
            yj += vi[:, a:a + STRIP] @ strip
    return i, j, yi, yj


def _store_product(path, i, j, V):
    store = KernelStore.open(path)
    return _products(store.read_tile(i, j), V, i, j, store.spec.tile)


def _load_tile(path, i, j):
    return KernelStore.open(path).read_tile(i, j)


def _recompute_product(A, B, V, i, j, t, depth, kernel, normalization):
    tile = kernel_tile(A, B, depth, kernel, normalization)
    if i == j:
        tile = np.triu(tile) + np.triu(tile, 1).T
    return _products(tile, V, i, j, t)


class KernelOperator:
    """A distributed symmetric operator V ↦ K·V with pass, product and byte counters."""

    def __init__(self, client, mode: str = "auto", store: str | None = None, rows=None,
                 problem: dict | None = None, tile: int = 4096):
        if mode not in MODES:
            raise NtkdistError(f"operator must be one of {', '.join(MODES)}, got {mode!r}")
        self.client = client
        self.passes = self.matvecs = self.bytes_read = 0
        self._tiles = None
        if store is not None:
            s = KernelStore.open(store).require_complete()
            self.store, self.problem, self.tile = s, s.spec.problem, s.spec.tile
            self.n = s.spec.n
            self.pairs = s.upper_tiles()
            itemsize = np.dtype(s.spec.dtype).itemsize
            self.tile_bytes = sum((min(self.tile, self.n - i * self.tile)
                                   * min(self.tile, self.n - j * self.tile) * itemsize)
                                  for i, j in self.pairs)
            if mode == "auto":
                mode = "memory" if self.tile_bytes < 0.5 * self._worker_memory() else "store"
        else:
            if mode in ("store", "memory"):
                raise NtkdistError(f"operator {mode!r} needs a store")
            mode = "recompute"
            self.store, self.problem, self.tile = None, problem, min(tile, len(rows))
            self.n = len(rows)
            b = -(-self.n // self.tile)
            self.pairs = [(i, j) for i in range(b) for j in range(i, b)]
            self.tile_bytes = 0
        self.mode = mode
        if mode == "recompute":
            X = np.asarray(rows if rows is not None else self.store.array("X")[:], dtype=np.float64)
            t = self.tile
            blocks = [row_block(X[a:a + t]) for a in range(0, self.n, t)]
            self._blocks = client.scatter(blocks, broadcast=True)
        if mode == "memory":
            self._tiles = {(i, j): client.submit(_load_tile, self.store.path, i, j, pure=False)
                           for i, j in self.pairs}
            self.bytes_read += self.tile_bytes

    def _worker_memory(self) -> int:
        info = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return sum(w.get("memory_limit") or 0 for w in info)

    @property
    def shape(self):
        return (self.n, self.n)

    def matmat(self, V: np.ndarray) -> np.ndarray:
        from distributed import as_completed

        V = np.asarray(V, dtype=np.float64)
        squeeze = V.ndim == 1
        if squeeze:
            V = V[:, None]
        b = V.shape[1]
        Vf = self.client.scatter(np.ascontiguousarray(V.T), broadcast=True, hash=False)
        t, p = self.tile, self.problem
        if self.mode == "store":
            futures = [self.client.submit(_store_product, self.store.path, i, j, Vf, pure=False)
                       for i, j in self.pairs]
            self.bytes_read += self.tile_bytes
        elif self.mode == "memory":
            futures = [self.client.submit(_products, self._tiles[(i, j)], Vf, i, j, t,
                                          pure=False) for i, j in self.pairs]
        else:
            futures = [self.client.submit(_recompute_product, self._blocks[i], self._blocks[j], Vf,
                                          i, j, t, p["depth"], p["kernel"], p["normalization"],
                                          pure=False) for i, j in self.pairs]
        YT = np.zeros((b, self.n))
        try:
            for _, (i, j, yi, yj) in as_completed(futures, with_results=True):
                YT[:, i * t:i * t + yi.shape[1]] += yi
                if yj is not None:
                    YT[:, j * t:j * t + yj.shape[1]] += yj
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
        return YT[0].copy() if squeeze else np.ascontiguousarray(YT.T)

    def close(self) -> None:
        if self._tiles:
            for f in self._tiles.values():
                f.release()
            self._tiles = None
