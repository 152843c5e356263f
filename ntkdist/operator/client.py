"""The client-side operator: V ↦ K·V on the Dask workers, as the plan says.

A :class:`KernelOperator` is a ``scipy.sparse.linalg.LinearOperator``-like object (``shape``,
``dtype``, ``matmat``, ``matvec``) with pass, product and byte counters. It obeys a
:class:`ntkdist.operator.plan.Plan`: which tiles are kept in worker (or GPU) memory, which
are streamed from the store, which are rebuilt from the rows, and which worker applies each.
Each pass sends Vᵀ to every worker once and runs one task per worker, which sums its tiles'
products into one b×N block (:mod:`.tasks`, :mod:`.gpu`); so a pass moves 2·b·N floats per
worker whatever the number of tiles, and sums in a fixed order. Only N×b blocks travel
between the client and the workers (in float32 for the fast passes of mixed precision,
which multiply in float32 anyway).

:func:`cluster_facts` gathers what the plan needs to know about a running cluster, and
:func:`make_operator` plans and builds an operator in one call (tests, benchmarks).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import NtkdistError
from ..kernels.limiting import row_block
from ..kernels.taylor import deflation_factor
from ..store import KernelStore
from .gpu import _drop_gpu_tiles, _pass_on_gpu, gpu_info
from .plan import CACHE_FRACTION, Facts, Plan, make_plan
from .tasks import _load_tile, _pass_on_worker

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


class WorkerLostError(NtkdistError):
    """A Dask worker left with data a pass needed. On a batch cluster, whose jobs are replaced,
    the run resumes from its checkpoint by itself (:func:`ntkdist.pipeline.run`)."""


def _worker_lost(during: str, exc: BaseException | None = None) -> NtkdistError:
    """The one-line error of a lost worker: a WorkerLostError, but for a task whose workers
    kept dying (KilledWorker), which a rerun on new workers would repeat."""
    from distributed.scheduler import KilledWorker

    why = (" (" + " ".join(f"{type(exc).__name__}: {exc}".split()) + ")"
           if exc is not None else "")
    cls = NtkdistError if isinstance(exc, KilledWorker) else WorkerLostError
    return cls(f"a Dask worker was lost {during}{why} (killed, or out of its memory "
                        "limit); rerun the same command: an iterative solve resumes from its "
                        "last checkpoint")


#: Vᵀ goes inside each worker's task when all the copies together are at most this size,
#: else it is scattered to the workers first (round trips: benchmarks/solver.py strips).
INLINE_BYTES = 8 * 2 ** 20


def cluster_facts(client, device: str = "cpu") -> tuple[tuple, tuple | None, dict]:
    """(workers, gpus, names): ((address, memory limit or 0), …) of the client's workers;
    with ``device="gpu"`` ((address, free GPU bytes), …) and {address: GPU name}, each
    worker's GPU checked by a task on it (a one-line error if one has none)."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    workers = tuple(sorted((addr, int(w.get("memory_limit") or 0)) for addr, w in info.items()))
    if device != "gpu" or not workers:
        return workers, None, {}
    futs = {w: client.submit(gpu_info, workers=[w], allow_other_workers=False, pure=False)
            for w, _ in workers}
    out = {}
    for w, f in futs.items():
        try:
            out[w] = f.result()
        except NtkdistError:
            raise
        except Exception as exc:
            raise NtkdistError(f"--device gpu: checking worker {w} failed "
                               f"({type(exc).__name__}: {exc})") from None
    return workers, tuple((w, v[1]) for w, v in out.items()), {w: v[0] for w, v in out.items()}


class KernelOperator:
    """A distributed symmetric operator V ↦ K·V that carries out ``plan``.

    ``store``: the path of a complete store (its kernel and rows), else ``kernel`` (a
    :class:`ntkdist.spec.KernelSpec`) and ``rows`` (the checked rows X) for tiles rebuilt
    from the rows. ``gpus``: {worker address: GPU name} of a GPU plan (:func:`cluster_facts`).
    """

    def __init__(self, client, plan: Plan, kernel=None, rows=None, store: str | None = None,
                 gpus: dict | None = None):
        if not plan.complete:
            raise ValueError("KernelOperator needs a plan made with the cluster's facts")
        self.client, self.plan = client, plan
        self.mode, self.precision, self.device = plan.operator, plan.precision, plan.device
        self.gpus = dict(gpus or {})
        self._gpu_token = None  # GPU memory mode: names the tiles kept on the workers' GPUs
        self._closed = False
        self.passes = self.matvecs = self.bytes_read = 0
        self.passes_fast = 0  # of the passes, those in float32 (matmat_fast)
        self._F = None  # mixed precision, deflated: the low-rank factor taken off the tiles
        self._shift = None  # mixed precision, shifted: the constant c taken off the tiles
        self._cache, self._blocks = {}, None
        if store is not None:
            self.store = KernelStore.open(store).require_complete()
            self.kernel, self.n = self.store.spec.kernel, self.store.spec.n
            shape = (self.n, self.store.spec.data.d)
            if rows is not None and np.shape(rows) != shape:
                raise NtkdistError(f"rows of shape {np.shape(rows)} given for a store of "
                                   f"rows {shape}")
        else:
            self.store, self.kernel, self.n = None, kernel, len(rows)
        self.tile = plan.tile
        self._assign = {w: list(pairs) for w, pairs in plan.assignment}
        if plan.fast == "shifted":
            self._shift = self._mean_entry()
        if plan.kept and self.device == "cpu":
            with _one_line("while the tiles were loaded into worker memory",
                           "loading the tiles into worker memory"):
                self._load(rows)
            self.bytes_read += self.cached_bytes
        self._gpu_keep = frozenset(plan.kept) if plan.kept_on_gpu else frozenset()
        if plan.kept_on_gpu:
            import uuid

            self._gpu_token = uuid.uuid4().hex
        if self.mode == "recompute" or self.device == "gpu":
            t = self.tile
            X = self._rows(rows)
            try:  # a list, as the low-rank parts in _load; fresh keys (hash=False): the
                # same rows scattered again by a later operator (a resumed solve, the next
                # point of a sweep) must not race with the release of this one's
                if self.kernel.finite:  # features made on the workers, block by block
                    futs = self._finite_blocks(X, t)
                else:
                    futs = client.scatter([row_block(X[i:i + t]) for i in range(0, self.n, t)],
                                          broadcast=True, hash=False)
            except _lost_worker_errors() as exc:
                raise _worker_lost("while the rows were sent to the workers", exc) from None
            self._blocks = dict(enumerate(futs))

    def _finite_blocks(self, X, t) -> list:
        """Finite widths: each row block's features and backward vectors computed once, on
        a worker (from the seeded weights, never sent), and kept there for every pass."""
        from distributed import wait

        parts = self.client.scatter([X[i:i + t] for i in range(0, self.n, t)], hash=False)
        futs = [self.client.submit(self.kernel.features, p, pure=False) for p in parts]
        with _one_line("while the features were computed",
                       "computing the row blocks' features"):
            wait(futs)
            self._check_failed(futs)
        return futs

    def _load(self, rows) -> None:
        """Read the kept tiles into the memory of the workers the plan assigns them to (with
        mixed precision, their float32 deflated copies too); a tile Dask placed elsewhere is
        applied where it lives."""
        from distributed import wait

        client, t, kept = self.client, self.tile, set(self.plan.kept)
        parts = {}
        if self.plan.fast == "deflated":  # the low-rank part, by row block, on every worker
            k = self.kernel
            self._F = deflation_factor(self._rows(rows), k.depth, k.kind, k.normalization)
            # A list, not a dict: a dict's keys would name the data on the cluster, and a
            # second operator's blocks under the same names would not replace the first's.
            parts = client.scatter([self._F[i:i + t] for i in range(0, self.n, t)],
                                   broadcast=True, hash=False)
        futs = {}
        for w, pairs in self._assign.items():
            for p in pairs:
                if p in kept:
                    low = (parts[p[0]], parts[p[1]]) if parts else ()
                    futs[p] = client.submit(_load_tile, self.store.path, *p, *low, workers=[w],
                                            allow_other_workers=True, pure=False)
        wait(list(futs.values()))
        self._check_failed(futs.values())
        self._cache = futs
        where = client.who_has(list(futs.values()))
        for w, pairs in self._assign.items():
            for p in list(pairs):
                there = (where.get(futs[p].key) or [w])[0] if p in futs else w
                if there != w and there in self._assign:
                    pairs.remove(p)
                    self._assign[there].append(p)
        for pairs in self._assign.values():
            pairs.sort()

    def _mean_entry(self) -> np.float32:
        """c of the shifted fast products: the mean entry of the last tile of the first row
        of tiles (read checked), rounded to float32. Any c gives K·V; this one takes off
        the mean level of the entries, which is what makes plain float32 products noisy."""
        last = self.store.spec.blocks - 1
        with _one_line("while a tile was read", "reading a tile"):
            tile = self.store.read_tile_checked(0, last)
        c = float(np.mean(tile, dtype=np.float64))
        return np.float32(c if abs(c) < 1e38 else 0.0)  # inf and NaN too

    def _rows(self, rows) -> np.ndarray:
        """The rows X: as given (the caller's, already checked), else the store's, checked."""
        return np.asarray(rows if rows is not None else self.store.rows_checked(),
                          dtype=np.float64)

    def diagonal(self) -> np.ndarray:
        """K_ii in float64: from the store's diagonal tiles (checked), else from the row
        blocks' features on the workers (finite widths)."""
        if self.store is not None:
            return np.concatenate([
                np.diagonal(self.store.read_tile_checked(i, i)).astype(np.float64)
                for i in range(self.store.spec.blocks)])
        futs = [self.client.submit(self.kernel.diagonal, self._blocks[i], pure=False)
                for i in sorted(self._blocks)]
        with _one_line("while the diagonal was computed", "computing the kernel's diagonal"):
            return np.concatenate([np.asarray(f.result(), dtype=np.float64) for f in futs])

    @staticmethod
    def _check_failed(futures):
        for f in futures:
            if f.status == "error":
                f.result()  # raises the worker's exception

    # The plan's byte counts (stored tiles, kept in memory, float32 copies, streamed a pass).
    tile_bytes = property(lambda self: self.plan.tile_bytes)
    cached_bytes = property(lambda self: self.plan.cached_bytes)
    deflated_bytes = property(lambda self: self.plan.deflated_bytes)
    streamed_bytes_per_pass = property(lambda self: self.plan.streamed_bytes_per_pass)

    @property
    def dtype(self):
        return np.dtype(np.float64)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        return self._apply(np.asarray(v).reshape(-1), fast=False)

    @property
    def shape(self):
        return (self.n, self.n)

    @property
    def mixed(self) -> bool:
        """Whether :meth:`matmat_fast` (float32 deflated or shifted products) is available."""
        return (self._F is not None and bool(self._cache)) or self._shift is not None

    @property
    def fast_kind(self) -> str:
        """"deflated" or "shifted": how :meth:`matmat_fast` forms its float32 products (the
        plan's ``fast``); "" without them."""
        return self.plan.fast if self.mixed else ""

    def matmat(self, V: np.ndarray) -> np.ndarray:
        """K·V, accumulated in float64 (float64 arithmetic on the stored values)."""
        return self._apply(V, fast=False)

    def matmat_fast(self, V: np.ndarray) -> np.ndarray:
        """K·V as R·V (float32 arithmetic) + the part taken off R in float64: R = K − FFᵀ
        (deflated copies kept in memory) or K − c11ᵀ (the stored tiles, shifted); only with
        mixed precision. Not exact to float64: for the bulk of an iteration only."""
        if not self.mixed:
            raise NtkdistError("this operator has no float32 products "
                               "(mixed precision needs stored tiles)")
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
        streaming = set(self.plan.streamed)
        for w, pairs in sorted(self._assign.items()):
            if not pairs:
                continue
            other = [p for p in pairs if p not in self._cache]
            # Row blocks for the tiles built from the rows (recompute, and every GPU mode).
            blocks = ({i: self._blocks[i] for p in other for i in p} if self._blocks else None)
            if self.device == "gpu":  # pinned: the task needs this worker's GPU (and tiles)
                keep = None if self.mode == "memory" else self._gpu_keep
                futures.append(self.client.submit(
                    _pass_on_gpu, Vf, self.n, self.tile, other, blocks, self.kernel,
                    self._gpu_token, keep, workers=[w], allow_other_workers=False,
                    pure=False))
                continue
            cached = [(i, j, self._cache[(i, j)]) for i, j in pairs if (i, j) in self._cache]
            streamed = [p for p in other if p in streaming]
            recompute = [p for p in other if p not in streaming]
            futures.append(self.client.submit(
                _pass_on_worker, Vf, self.n, self.tile, cached, streamed, path, recompute,
                blocks, self.kernel, self.passes == 0, fast, self._shift, workers=[w],
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
        if fast and self._shift is not None:
            Y += np.float64(self._shift) * V.sum(axis=0)
        elif fast and self._F.shape[1]:
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
                    raise WorkerLostError(
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
        return self.plan.memory()

    def describe(self) -> dict:
        return {"mode": self.mode, "precision": self.precision, "fast": self.fast_kind,
                "device": self.device,
                "gpus": sorted(set(self.gpus.values())), **self.memory()}

    def close(self) -> None:
        for f in [*self._cache.values(), *(self._blocks or {}).values()]:
            f.release()
        self._cache, self._blocks = {}, None
        if self.device == "gpu" and not self._closed:
            self._closed = True
            token, self._gpu_token = self._gpu_token, None
            alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
            self.client.run(_drop_gpu_tiles, token, on_error="ignore",
                            workers=[w for w in self.gpus if w in alive])


def make_operator(client, mode: str = "auto", store: str | None = None, rows=None, kernel=None,
                  tile: int | None = None, cache_fraction: float = CACHE_FRACTION,
                  precision: str = "float64", device: str = "cpu") -> KernelOperator:
    """Plan and build an operator in one call: ``mode`` (``--operator``), ``precision`` and
    ``device`` as on the command line; ``store`` (a complete store's path), or ``kernel`` (a
    :class:`ntkdist.spec.KernelSpec`) and ``rows`` with the recompute ``tile`` (default from
    the workers' memory). The refusals are the plan's (:func:`.plan.make_plan`)."""
    from ..spec import make_cluster_spec, make_solver_spec

    if store is not None:
        s = KernelStore.open(store).require_complete().spec
        n, facts_store = s.n, {"store": "complete", "store_tile": s.tile,
                               "store_dtype": s.dtype}
    else:
        n, facts_store = len(rows), {}
    solver = make_solver_spec(n, method="lobpcg", operator=mode, precision=precision)
    cluster = make_cluster_spec(device=device)
    workers, gpus, names = cluster_facts(client, device)
    plan = make_plan(solver, cluster, Facts(n=n, workers=workers, gpus=gpus, **facts_store),
                     tile=tile, cache_fraction=cache_fraction)
    return KernelOperator(client, plan, kernel=kernel, rows=rows, store=store, gpus=names)
