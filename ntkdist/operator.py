"""Y = K·V on Dask workers, from a store or recomputed from the data.

Modes (``--operator``):

* ``store``: each pass reads every stored upper tile once from Zarr and applies it twice,
  Y_I += K_IJ V_J and Y_J += K_IJᵀ V_I;
* ``memory``: the same tiles, read once and kept in worker memory (CPU RAM) between passes;
* ``recompute``: tiles rebuilt from the rows with the tile function every pass (no store);
* ``auto``: ``memory`` when the stored tiles fit in ``cache_fraction`` (0.4) of the workers'
  memory, else ``store`` with as many tiles kept in worker memory as fit there (the others
  streamed each pass); ``recompute`` when there is no store.

``device="gpu"`` (``--device gpu``), GPU workers (one GPU per worker, as dask-cuda starts
them) with CuPy: each worker builds its tiles on its GPU from the row blocks, with the same
array-module-agnostic tile function as the CPU, multiplies them there in float64 and returns
its b×N block to the host. ``memory`` keeps the built tiles in GPU memory between passes
(when a worker's share fits in ``GPU_MEMORY_FRACTION`` of its free GPU memory), ``recompute``
rebuilds them every pass, ``auto`` takes ``memory`` where it fits; a store's tiles are not
read (building them is faster).

Products accumulate in float64 whatever the storage dtype; only N×b blocks travel between
the client and the workers (in float32 for the fast passes of mixed precision below, which
multiply in float32 anyway).

Mixed precision (``precision="mixed"``, memory mode): each worker also keeps its tiles
*deflated* in float32, R = K − F Fᵀ, where F = √s·[√a₀·‖x‖, √a₁·‖x‖ x̂] (N × (1+d)) is the
degree-0 and degree-1 part of the kernel's Taylor series (K = s D κ(X̂X̂ᵀ) D, κ(ρ) = Σ a_r ρ^r).
:meth:`KernelOperator.matmat_fast` computes K·V = R·V + F(FᵀV) with R·V in float32 arithmetic
(half the bytes of float64 tiles) and F(FᵀV) in float64 on the client. The deflation removes
the large, smooth part of every entry (at N = 20000, d = 64, L = 3 the off-diagonal r.m.s.
falls from 45.2 to 1.07), so float32 rounding perturbs the product 33–37× less than plain
float32 tiles would, and a solve that finishes in float64 agreed with a float64-only one to
1.4e-12 relative (``python benchmarks/solver.py mixed``). The solvers use it for the bulk of
the iterations and finish with :meth:`KernelOperator.matmat` (float64), which alone
certifies the result.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .errors import NtkdistError
from .kernels.limiting import array_module, kernel_tile, row_block
from .spec import OPERATORS, PRECISIONS
from .store import KernelStore

MODES = OPERATORS
DEVICES = ("cpu", "gpu")
#: GPU memory mode: the share of a GPU's free memory its kept tiles may take, and the tile
#: function's working space in tiles (its temporaries while one tile is built).
GPU_MEMORY_FRACTION = 0.8
GPU_TILE_WORKSPACE = 16


#: Rows of a float32 tile widened to float64 at once, into a reused buffer (in cache, so the
#: tile is read from memory once).
STRIP = 256
#: Rows of a float32 tile multiplied at once by both blocks in a float32 pass: the strip
#: (1 MB) is still in cache for the second product (0.95-1.32× per tile, faster in 11 of 12
#: measurements). Float64 tiles lose by it in 9 of 12 (0.75-1.19×) and take two whole-tile
#: GEMMs (``python benchmarks/solver.py strips``, RESULTS.md).
FUSED_STRIP = 64


def _fused(tile, vi, vj, strip):
    """(vj·tileᵀ, vi·tile) reading the tile once, ``strip`` rows at a time.

    No temporaries inside the loop: Dask workers run with glibc's ``MALLOC_TRIM_THRESHOLD_``
    set, so every allocation over 128 kB is a fresh mmap with its page faults (a fresh
    product per strip made a first version slower than two GEMMs there; RESULTS.md)."""
    rows, cols = tile.shape
    dtype = np.result_type(tile, vj)
    yi = np.empty((rows, vj.shape[0]), dtype=dtype)  # (vj·tileᵀ)ᵀ = tile·vjᵀ, rows in order
    yj = np.zeros((vi.shape[0], cols), dtype=dtype)
    part = np.empty_like(yj)
    vjT = np.ascontiguousarray(vj.T)
    for a in range(0, rows, strip):
        s = tile[a:a + strip]
        np.matmul(s, vjT, out=yi[a:a + strip])
        np.matmul(vi[:, a:a + strip], s, out=part)
        yj += part
    return yi.T, yj


#: Seconds between checks, while a pass runs, that the workers and data it needs are there.
LOST_POLL = 2.0


def _lost_worker_errors() -> tuple:
    """What Dask raises for a result that a lost worker took with it: a task cancelled for
    lost dependencies, a task whose workers kept dying, a closed connection."""
    import asyncio
    import concurrent.futures

    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return (FutureCancelledError, asyncio.CancelledError, concurrent.futures.CancelledError,
            KilledWorker, CommClosedError)


@contextlib.contextmanager
def _one_line(during: str, failed: str):
    """Worker failures inside the block as one-line errors: a lost worker (``during`` says
    when) or a task's exception (``failed`` says what failed)."""
    try:
        yield
    except NtkdistError:
        raise
    except _lost_worker_errors() as exc:
        raise _worker_lost(during, exc) from None
    except Exception as exc:  # a worker's failure, reported as one line
        raise NtkdistError(" ".join(f"{failed} failed: {type(exc).__name__}: {exc}".split())) \
            from None


def _worker_lost(during: str, exc: BaseException | None = None) -> NtkdistError:
    why = (" (" + " ".join(f"{type(exc).__name__}: {exc}".split()) + ")"
           if exc is not None else "")
    return NtkdistError(f"a Dask worker was lost {during}{why} (killed, or out of its memory "
                        "limit); rerun the same command: an iterative solve resumes from its "
                        "last checkpoint")


#: Vᵀ goes inside each worker's task when all the copies together are at most this size,
#: else it is scattered to the workers first (round trips: benchmarks/solver.py strips).
INLINE_BYTES = 8 * 2 ** 20


def _build_tile(bi, bj, problem, diagonal: bool):
    """Tile (I, J) from its row blocks with the tile function, on their array module (NumPy
    or CuPy); a diagonal tile made exactly symmetric from its upper triangle."""
    tile = kernel_tile(bi, bj, problem["depth"], problem["kernel"], problem["normalization"])
    if diagonal:
        xp = array_module(tile)
        tile = xp.triu(tile) + xp.triu(tile, 1).T
    return tile


def _products(tile, VT, i, j, t, buf=None):
    """((K_IJ V_J)ᵀ, (K_IJᵀ V_I)ᵀ) in float64; the second is None on the diagonal. With a
    float32 ``VT`` (deflated tiles of a mixed-precision pass), in float32 arithmetic.

    The vectors travel transposed (b×N): Vᵀ·K and Vᵀ·Kᵀ with a C-ordered tile run at ~1.6× the
    speed of K·V with a thin V on one core (OpenBLAS, measured in benchmarks/RESULTS.md).
    """
    rows, cols = tile.shape
    vi = np.ascontiguousarray(VT[:, i * t:i * t + rows])
    vj = np.ascontiguousarray(VT[:, j * t:j * t + cols])
    if tile.dtype == np.float64 or VT.dtype == np.float32:
        if i == j:
            return vj @ tile.T, None
        if tile.dtype == np.float32:
            return _fused(tile, vi, vj, FUSED_STRIP)
        return vj @ tile.T, vi @ tile
    if buf is None or buf.shape[1] < cols:
        buf = np.empty((STRIP, cols))
    b = VT.shape[0]
    yi = np.empty((rows, b))  # (vj·tileᵀ)ᵀ, rows in order
    yj = None if i == j else np.zeros((b, cols))
    part = None if i == j else np.empty((b, cols))  # no temporaries in the loop (_fused)
    vjT = np.ascontiguousarray(vj.T)
    for a in range(0, rows, STRIP):
        strip = buf[:min(STRIP, rows - a), :cols]
        np.copyto(strip, tile[a:a + STRIP])
        np.matmul(strip, vjT, out=yi[a:a + STRIP])
        if yj is not None:
            np.matmul(vi[:, a:a + STRIP], strip, out=part)
            yj += part
    return yi.T, yj


def _pass_on_worker(VT, n, t, cached, streamed, path, recompute, blocks, problem,
                    check=False, single=False):
    """One worker's share of a pass, summed into one b×N block.

    ``cached``: (i, j, tile) held in this worker's memory (or (i, j, (tile, deflated tile))
    with mixed precision); ``streamed``: (i, j) read from the
    store at ``path``, the next tile read on a second thread while this one is multiplied
    (file reads release the GIL), and checked against its recorded checksum if ``check``
    (the first pass); ``recompute``: (i, j) rebuilt from ``blocks`` (row blocks by index)
    with the tile function. ``single``: use the float32 deflated copies of the cached tiles,
    in float32 arithmetic (summed over tiles in float64, returned rounded to float32: that
    rounding, 6e-8 of |R·V|, is far below the float32 products' own error).
    """
    from concurrent.futures import ThreadPoolExecutor

    if single:
        VT = VT.astype(np.float32, copy=False)

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
            if isinstance(tile, tuple):  # mixed precision: (float64 tile, deflated float32)
                tile = tile[1] if single else tile[0]
            add(i, j, tile)
        for k, (i, j) in enumerate(streamed):
            tile = pending.result()
            if k + 1 < len(streamed):
                pending = reader.submit(read, *streamed[k + 1])
            add(i, j, tile)
            del tile
    for i, j in recompute:
        add(i, j, _build_tile(blocks[i], blocks[j], problem, i == j))
    return YT.astype(np.float32) if single else YT


#: GPU memory mode: tiles built on this worker's GPU, kept between passes, by operator token.
_GPU_TILES: dict = {}


def _pass_on_gpu(VT, n, t, pairs, blocks, problem, token=None):
    """One GPU worker's share of a pass: tiles built on its GPU with CuPy (and, with a
    ``token``, kept there for the next passes) and applied there in float64; only the b×N
    result returns to the host."""
    import cupy as cp

    from .kernels.limiting import RowBlock

    V = cp.asarray(VT, dtype=cp.float64)
    Y = cp.zeros((VT.shape[0], n), dtype=cp.float64)
    kept = _GPU_TILES.setdefault(token, {}) if token is not None else {}
    gpu = {}

    def block(i):
        if i not in gpu:
            gpu[i] = RowBlock(unit=cp.asarray(blocks[i].unit), norms=cp.asarray(blocks[i].norms))
        return gpu[i]

    for i, j in pairs:
        tile = kept.get((i, j))
        if tile is None:
            tile = _build_tile(block(i), block(j), problem, i == j)
            if token is not None:
                kept[(i, j)] = tile
        rows, cols = tile.shape
        Y[:, i * t:i * t + rows] += V[:, j * t:j * t + cols] @ tile.T
        if i != j:
            Y[:, j * t:j * t + cols] += V[:, i * t:i * t + rows] @ tile
        del tile
    return cp.asnumpy(Y)


def _drop_gpu_tiles(token) -> None:
    """Forget an operator's kept tiles and hand CuPy's pooled blocks back to the device
    (the pool would otherwise keep them, hidden from the next operator's free-memory check
    and from other processes)."""
    if _GPU_TILES.pop(token, None) is not None:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()


def gpu_info() -> tuple:
    """(name, free bytes, total bytes) of this process's GPU (CuPy's current device), or a
    NtkdistError saying why there is none; run on every worker before a GPU operator uses it."""
    try:
        import cupy as cp
    except ImportError:
        raise NtkdistError("--device gpu needs CuPy on every worker "
                           "(pip install 'ntkdist[gpu]')") from None
    try:
        count = cp.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device")
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        free, total = cp.cuda.runtime.memGetInfo()
        free += cp.get_default_memory_pool().free_bytes()  # pooled by CuPy, reusable here
    except Exception as exc:  # CUDA's errors come in several types
        raise NtkdistError(f"--device gpu: a worker sees no usable GPU "
                           f"({type(exc).__name__}: {exc})") from None
    return (name.decode() if isinstance(name, bytes) else str(name)), int(free), int(total)


def _load_tile(path, i, j, FI=None, FJ=None):
    """A tile copied into this worker's memory (a read may map the file's pages), checked
    against its recorded checksum; with the low-rank parts FI, FJ (mixed precision), the pair
    (tile, its float32 deflated copy)."""
    tile = KernelStore.open(path).read_tile_checked(i, j, copy=True)
    return tile if FI is None else (tile, _deflate_tile(tile, FI, FJ))


def _deflate_tile(tile, FI, FJ):
    """float32(K_IJ − F_I F_Jᵀ): the tile less its low-rank part (see the module's notes),
    made STRIP rows at a time (no float64 temporary of the tile's size)."""
    out = np.empty(tile.shape, dtype=np.float32)
    FJT = np.ascontiguousarray(FJ.T)
    buf = np.empty((STRIP, tile.shape[1]))  # one buffer: no fresh mmap per strip (_fused)
    for a in range(0, tile.shape[0], STRIP):
        low = buf[:min(STRIP, tile.shape[0] - a)]
        np.matmul(FI[a:a + STRIP], FJT, out=low)
        np.subtract(tile[a:a + STRIP], low, out=low)
        out[a:a + STRIP] = low
    return out


def deflation_factor(X: np.ndarray, problem: dict) -> np.ndarray:
    """F (N × (1+d)) with F Fᵀ the degree-0 and degree-1 terms of the kernel's Taylor series
    on the rows X (zero columns for a kernel without known coefficients)."""
    from .kernels.limiting import normalization_factor
    from .kernels.taylor import kernel_coefficients

    if problem.get("kernel") not in ("ntk", "nngp"):
        return np.zeros((len(X), 0))
    a = kernel_coefficients(problem["depth"], problem["kernel"], 1)
    block = row_block(np.asarray(X, dtype=np.float64))
    s = normalization_factor(problem["normalization"], X.shape[1])
    norms = block.norms[:, None]
    return np.hstack([np.sqrt(s * a[0]) * norms, np.sqrt(s * a[1]) * norms * block.unit])


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
                 problem: dict | None = None, tile: int = 4096, cache_fraction: float = 0.4,
                 precision: str = "float64", device: str = "cpu"):
        if mode not in MODES:
            raise NtkdistError(f"operator must be one of {', '.join(MODES)}, got {mode!r}")
        if precision not in PRECISIONS:
            raise NtkdistError(f"precision must be one of {', '.join(PRECISIONS)}, "
                               f"got {precision!r}")
        if device not in DEVICES:
            raise NtkdistError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        gpu_mode = None  # device "gpu": the mode asked for (auto, memory or recompute)
        if device == "gpu":
            if mode == "store":
                raise NtkdistError("--device gpu builds the tiles on the GPUs from the rows "
                                   "(faster than reading them): use --operator memory, "
                                   "recompute or auto, not store")
            if precision == "mixed":
                raise NtkdistError("--precision mixed is for the CPU memory operator; on GPUs "
                                   "use --precision float64 (or auto)")
            gpu_mode, mode, precision = mode, "recompute", "float64"
        self.device = device
        self.gpus = {}  # worker address -> GPU name (device "gpu")
        self._gpu_token = None  # GPU memory mode: names the tiles kept on the workers' GPUs
        self.client = client
        requested = mode
        self.passes = self.matvecs = self.bytes_read = 0
        self.passes_fast = 0  # of the passes, those in float32 (matmat_fast)
        self._F = None  # mixed precision: the deflated low-rank factor
        self.deflated_bytes = 0  # mixed precision: worker memory of the float32 copies
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
            shape = (s.spec.n, int(s.spec.problem["d"]))
            if rows is not None and np.shape(rows) != shape:
                raise NtkdistError(f"rows of shape {np.shape(rows)} given for a store of "
                                   f"rows {shape}")
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
        if store is None or mode == "recompute":
            mode = "recompute"
        elif mode == "auto":
            mode = "memory" if self.tile_bytes <= budget else "store"
        elif mode == "memory" and self.tile_bytes > budget:
            raise NtkdistError(
                f"--operator memory: the stored tiles ({self.tile_bytes / 1e9:.1f} GB) do not fit "
                f"in {cache_fraction:.0%} of the workers' memory ({budget / 1e9:.1f} GB); use "
                "--operator auto (caches what fits, streams the rest) or store")
        self.mode = mode
        # Mixed precision: float32 deflated copies of all the tiles beside them (memory mode).
        deflated_bytes = sum(size[p][0] * size[p][1] * 4 for p in self.pairs)
        if precision == "mixed" and mode != "memory":
            raise NtkdistError(f"--precision mixed needs the memory operator (tiles kept in "
                               f"worker memory), not {mode!r}; use --precision float64")
        if precision == "mixed" and self.tile_bytes + deflated_bytes > budget:
            raise NtkdistError(
                f"--precision mixed: the stored tiles and their float32 copies "
                f"({(self.tile_bytes + deflated_bytes) / 1e9:.1f} GB) do not fit in "
                f"{cache_fraction:.0%} of the workers' memory ({budget / 1e9:.1f} GB); use "
                "--precision float64")
        if precision == "auto":
            precision = ("mixed" if mode == "memory"
                         and self.tile_bytes + deflated_bytes <= budget else "float64")
        self.precision = precision
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
            with _one_line("while the tiles were loaded into worker memory",
                           "loading the tiles into worker memory"):
                self._cache = self._load(cache, rows, workers, size, nb)
            self.cached_bytes = sum(self._tile_bytes[p] for p in cache)
            self.bytes_read += self.cached_bytes
            if self.precision == "mixed":  # mixed is memory mode: every tile is cached
                self.deflated_bytes = deflated_bytes
        self._plan(workers, size)
        self._blocks = None
        if mode == "recompute":
            if device == "gpu":
                self._gpu_plan(gpu_mode, size)
            X = self._rows(rows)
            blocks = {i: row_block(X[i * t:(i + 1) * t]) for i in range(nb)}
            try:  # a list, as the low-rank parts in _load
                futs = client.scatter([blocks[i] for i in range(nb)], broadcast=True)
            except _lost_worker_errors() as exc:
                raise _worker_lost("while the rows were sent to the workers", exc) from None
            self._blocks = dict(enumerate(futs))

    def _load(self, cache, rows, workers, size, nb) -> dict:
        """Read the ``cache`` tiles into worker memory (with mixed precision, their float32
        deflated copies too), spread evenly over the workers; (i, j) → future."""
        from distributed import wait

        client, t = self.client, self.tile
        parts = {}
        if self.precision == "mixed":  # the low-rank part, by row block, on every worker
            self._F = deflation_factor(self._rows(rows), self.problem)
            # A list, not a dict: a dict's keys would name the data on the cluster, and a
            # second operator's blocks under the same names would not replace the first's.
            parts = client.scatter([self._F[i * t:(i + 1) * t] for i in range(nb)],
                                   broadcast=True)
        load = {w: 0.0 for w in workers}  # spread the cached work evenly, largest first
        futs = {}
        for p in sorted(cache, key=lambda p: -_cost(*p, *size[p])):
            w = min(load, key=load.get)
            load[w] += _cost(*p, *size[p])
            low = (parts[p[0]], parts[p[1]]) if parts else ()
            futs[p] = client.submit(_load_tile, self.store.path, *p, *low, workers=[w],
                                    allow_other_workers=True, pure=False)
        wait(list(futs.values()))
        self._check_failed(futs.values())
        return futs

    def _gpu_plan(self, requested: str, size: dict) -> None:
        """GPU workers: ``memory`` (tiles built on each GPU in the first pass and kept there)
        when every worker's share of the float64 tiles fits in ``GPU_MEMORY_FRACTION`` of its
        free GPU memory with room left for building a tile; else ``recompute`` (``memory``
        asked for and not fitting: a one-line error)."""
        info = self._check_gpus()
        self.gpus = {w: v[0] for w, v in info.items()}
        need = {w: sum(8 * size[p][0] * size[p][1] for p in a["other"])
                for w, a in self._assign.items()}
        work = GPU_TILE_WORKSPACE * 8 * self.tile ** 2
        short = [w for w in need if need[w] + work > GPU_MEMORY_FRACTION * info[w][1]]
        if requested == "memory" and short:
            w = short[0]
            raise NtkdistError(
                f"--device gpu --operator memory: a worker's share of the float64 tiles and "
                f"room to build one ({(need[w] + work) / 1e9:.1f} GB) do not fit in "
                f"{GPU_MEMORY_FRACTION:.0%} of its GPU's free memory "
                f"({info[w][1] / 1e9:.1f} GB); use --operator recompute (or auto)")
        if requested in ("memory", "auto") and not short:
            import uuid

            self.mode = "memory"
            self._gpu_token = uuid.uuid4().hex
            self.cached_bytes = sum(need.values())

    def _check_gpus(self) -> dict:
        """Every worker's GPU (name, free and total bytes); a one-line error if one has none."""
        futs = {w: self.client.submit(gpu_info, workers=[w], allow_other_workers=False,
                                      pure=False) for w in self._assign}
        out = {}
        for w, f in futs.items():
            try:
                out[w] = f.result()
            except NtkdistError:
                raise
            except Exception as exc:
                raise NtkdistError(f"--device gpu: checking worker {w} failed "
                                   f"({type(exc).__name__}: {exc})") from None
        return out

    def _rows(self, rows) -> np.ndarray:
        """The rows X: as given (the caller's, already checked), else the store's, checked."""
        return np.asarray(rows if rows is not None else self.store.rows_checked(),
                          dtype=np.float64)

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

    @property
    def mixed(self) -> bool:
        """Whether :meth:`matmat_fast` (float32 deflated products) is available."""
        return self._F is not None and bool(self._cache)

    def matmat(self, V: np.ndarray) -> np.ndarray:
        """K·V, accumulated in float64 (float64 arithmetic on the stored values)."""
        return self._apply(V, fast=False)

    def matmat_fast(self, V: np.ndarray) -> np.ndarray:
        """K·V as R·V (float32 deflated tiles, float32 arithmetic) + F(FᵀV) (float64); only
        with mixed precision. Not exact to float64: for the bulk of an iteration only."""
        if not self.mixed:
            raise NtkdistError("this operator has no float32 copy of its tiles "
                               "(mixed precision needs the memory operator)")
        return self._apply(V, fast=True)

    def _apply(self, V: np.ndarray, fast: bool) -> np.ndarray:
        V = np.asarray(V, dtype=np.float64)
        squeeze = V.ndim == 1
        if squeeze:
            V = V[:, None]
        b = V.shape[1]
        # A fast pass sends Vᵀ and gets its b×N blocks back in float32 (the workers multiply
        # in float32 anyway): half the bytes. Small blocks travel inside the tasks (one step
        # fewer than a scatter). Dask's round trip at N = 20000, b = 16: 31-42 ms → 20-26 ms.
        VT = np.ascontiguousarray(V.T, dtype=np.float32 if fast else np.float64)
        self._require_data()
        if VT.nbytes * len(self._assign) <= INLINE_BYTES:
            Vf = VT
        else:
            Vf = self.client.scatter(VT, broadcast=True, hash=False)
        path = self.store.path if self.store is not None else None
        futures = []
        for w, a in sorted(self._assign.items()):
            if not a["cached"] and not a["other"]:
                continue
            # Row blocks for the tiles built from the rows (recompute, and every GPU mode).
            blocks = ({i: self._blocks[i] for p in a["other"] for i in p}
                      if self._blocks else None)
            if self.device == "gpu":  # pinned: the task needs this worker's GPU (and tiles)
                futures.append(self.client.submit(
                    _pass_on_gpu, Vf, self.n, self.tile, a["other"], blocks, self.problem,
                    self._gpu_token, workers=[w], allow_other_workers=False, pure=False))
                continue
            cached = [(i, j, self._cache[(i, j)]) for i, j in a["cached"]]
            streamed = a["other"] if self.mode != "recompute" else []
            recompute = a["other"] if self.mode == "recompute" else []
            futures.append(self.client.submit(
                _pass_on_worker, Vf, self.n, self.tile, cached, streamed, path, recompute,
                blocks, self.problem, self.passes == 0, fast, workers=[w],
                allow_other_workers=True, pure=False))
        YT = np.zeros((b, self.n))
        try:
            with _one_line("during a pass over the kernel",
                           f"product over the kernel ({self.mode} operator)"):
                self._wait_pinned(futures)
                for f in futures:  # a fixed order: the sum does not depend on timing
                    YT += f.result()
        finally:
            for f in futures:
                f.cancel()
            del Vf
        self.passes += 1
        self.passes_fast += int(fast)
        self.matvecs += b
        self.bytes_read += self.streamed_bytes_per_pass
        Y = np.ascontiguousarray(YT.T)
        if fast and self._F.shape[1]:
            Y += self._F @ (self._F.T @ V)
        return Y[:, 0].copy() if squeeze else Y

    def _wait_pinned(self, futures, poll: float = LOST_POLL) -> None:
        """Wait for a pass's tasks; a one-line error, instead of waiting for ever, if a GPU
        worker they are pinned to has left the cluster, or data they need (tiles kept in
        worker memory, scattered row blocks) went with a lost worker."""
        from distributed import wait
        from distributed.utils import TimeoutError as DaskTimeout

        while True:
            try:
                wait(futures, timeout=poll)
                return
            except (TimeoutError, DaskTimeout):
                self._require_data()
                if not self.gpus:
                    continue
                alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
                gone = sorted(set(self.gpus) - alive)
                if gone:
                    raise NtkdistError(
                        f"GPU worker {gone[0]} left the cluster during a pass (its tiles and "
                        f"GPU with it); rerun the same command to resume from the checkpoint")

    def _require_data(self) -> None:
        """A one-line error if data a pass needs is gone with a lost worker: a kept tile or
        a scattered row block that the cluster reports lost (Dask would wait for it for
        ever when no worker was left to recompute it)."""
        for f in [*self._cache.values(), *(self._blocks or {}).values()]:
            if f.status in ("lost", "cancelled", "error"):
                raise _worker_lost("during a pass over the kernel, with tiles or row blocks "
                                   "the pass needs")

    def memory(self) -> dict:
        """Bytes: stored tiles, kept in worker (or GPU) memory, float32 copies, streamed."""
        return {"tile_bytes": self.tile_bytes, "cached_bytes": self.cached_bytes,
                "deflated_bytes": self.deflated_bytes,
                "streamed_bytes_per_pass": self.streamed_bytes_per_pass}

    def describe(self) -> dict:
        return {"mode": self.mode, "precision": self.precision, "device": self.device,
                "gpus": sorted(set(self.gpus.values())), **self.memory()}

    def close(self) -> None:
        for f in [*self._cache.values(), *(self._blocks or {}).values()]:
            f.release()
        self._cache, self._blocks = {}, None
        if self._gpu_token is not None:
            token, self._gpu_token = self._gpu_token, None
            alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
            self.client.run(_drop_gpu_tiles, token, on_error="ignore",
                            workers=[w for w in self.gpus if w in alive])
