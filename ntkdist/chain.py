"""The rigorous lower-bound chain of :func:`ntkdist.bounds.lambda_min_bounds` on Dask workers.

The chain needs, for each layer m it uses and each even order r in ``HERMITE_ORDERS``,
max_i Σ_{j≠i} |P^(m)_ij|^r over all N² pairs (at depth 1: min_i 2|XXᵀ|_ii − Σ_j |XXᵀ|_ij).
In memory that is O(N² L) on one core; here it is cut like the kernel assembly:

* the checked rows (unit rows and norms, or the raw rows at depth 1) are split into row
  blocks of side ``tile`` and scattered once to every worker;
* one task per upper tile (I, J), I ≤ J, runs the correlation recursion for the pair of
  blocks once, up to the deepest layer it is asked for, and at each wanted layer returns the
  per-row partial sums Σ_{j∈J} |P^(m)_ij|^r for the rows of I and, for I ≠ J, the column sums
  Σ_{i∈I} |P^(m)_ij|^r for the rows of J (P^(m) is symmetric, so the tile's transpose serves
  the lower tile); on a diagonal tile the diagonal is left out. The elementwise operations
  are those of ``bounds._max_row_power_sums``, so the values differ from it only by the order
  in which the N terms of each row are summed;
* the client adds each result into an (N, layers, orders) accumulator *in the fixed order of
  the tile list* (results are consumed in submission order through a bounded window of
  tasks in flight, so the sums do not depend on which task finishes first), takes the max
  over rows and forms the same dict as ``lambda_min_bounds``.

Memory. A worker holds O(tile²) per task (the recursion's state and two power arrays) plus
the scattered rows, O(N d). The client holds the accumulator, N · g · len(HERMITE_ORDERS)
floats for a group of g layers, plus one result at a time of 2 · tile · g · len(orders)
floats (the budget also counts the ``window`` results in flight). When all layers at once
would exceed ``CLIENT_BYTES`` (deep NTK chains at large N: N · (L − 1) · 10 · 8 bytes, e.g.
N = 10⁶ and L ≥ 14), the layers are taken in
consecutive groups of g, one pass over the tiles per group, each task running the recursion
once from layer 1 to its group's deepest layer. This trades recursion work (about
(L − 1)² / (2g) layer steps per tile instead of L − 1) for memory; the alternatives, keeping
every tile's recursion state between passes (the whole kernel, thrice) or returning only row
maxima (wrong: a row's sum is spread over many tiles), are worse. g never drops below one
layer, so above ~12 million rows the accumulator of a single layer (N · 80 bytes) is the
floor.

In a store. The same sums, tile by tile, are what an assembly keeps beside each tile
(:func:`stored_layers`, :func:`tile_with_sums`): the tile's entries and its layers' powers
come from one compiled pass (:func:`ntkdist.kernels.limiting.kernel_tile_sums`), so a solve
from the store gets the chain by adding each tile's (rows of I [+ rows of J]) · layers ·
orders numbers in the fixed order of the tiles (:func:`lambda_min_bounds_from_store`):
N · (blocks + 1) · layers · 10 float64 read, instead of the O(N² L) pass.

Errors: a failed task or a lost worker (including lost scattered rows, which Dask would wait
for for ever) is one line of :class:`ntkdist.errors.NtkdistError`, as in the operator.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from .bounds import (HERMITE_ORDERS, chain_layers, chain_result, chain_start,
                     gershgorin_result, power_sums)
from .errors import SpecError
from .kernels.limiting import RowBlock, _correlations, correlation_layers, kernel_tile_sums
from .operator.client import LOST_POLL, _lost_worker_errors, _one_line, _worker_lost
from .store import repair_hint

#: Default side of the row blocks (capped at N).
DEFAULT_TILE = 2048
#: Rows of I whose correlation layers :func:`chain_tile` builds at once: 128 rows of a 4096
#: tile are 4 MB a layer, against 128 MB for the whole tile, whose recursion and powers
#: would stream through memory (``python benchmarks/chain.py --n 100000 --workers 2``:
#: benchmarks/RESULTS.md).
CHAIN_ROWS = 128
#: Budget of the client's accumulators and buffered results, in bytes (see module doc).
CLIENT_BYTES = 2 ** 30
#: Tasks in flight per worker thread: enough to keep the workers busy while the client waits
#: for the oldest one, few enough to bound the buffered results.
TASKS_PER_THREAD = 2

_DURING = "while the bounds chain ran on the workers"
_FAILED = "a bounds-chain tile"


# ----------------------------------------------------------------------------- worker tasks

def chain_tile(A: RowBlock, B: RowBlock, same: bool, layers: tuple) -> tuple:
    """Task: partial power sums of tile (I, J) at each layer m in ``layers`` (ascending).

    Returns (rows, cols): ``rows[a, k, q]`` = Σ_b |P^(m_k)_ab|^r_q over the tile's columns,
    ``cols[b, k, q]`` = Σ_a |P^(m_k)_ab|^r_q over its rows (None when ``same``: a diagonal
    tile, whose diagonal is excluded). With numba, one compiled pass over the entries
    (:func:`ntkdist.kernels.limiting.kernel_tile_sums`: 0.7–0.9 s a 4096 tile at depth 3 on
    a core of the Intel Xeon, ``python benchmarks/chain.py --n 8192 --tile-cost``); else the
    array-module recursion on ``CHAIN_ROWS`` rows of I at a time, so that its layers stay in
    cache as :func:`bounds.power_sums` takes their powers (a row's correlations do not depend
    on the other rows of its block).
    """
    from .kernels.fused import available

    n_orders = len(HERMITE_ORDERS)
    if available():
        _, rows, cols = kernel_tile_sums(A, B, max(layers), "nngp", "paper", layers, n_orders,
                                         same, tile=False)
        return rows, cols
    height = A.unit.shape[0]
    rows = np.zeros((height, len(layers), n_orders))
    cols = None if same else np.zeros((B.unit.shape[0], len(layers), n_orders))
    index = {m: k for k, m in enumerate(layers)}
    for lo in range(0, height, CHAIN_ROWS):
        hi = min(height, lo + CHAIN_ROWS)
        part = RowBlock(unit=A.unit[lo:hi], norms=A.norms[lo:hi])
        for m, P in enumerate(correlation_layers(part, B, max(layers)), start=1):
            k = index.get(m)
            if k is not None:
                power_sums(P, lo if same else None, rows[lo:hi, k],
                           None if same else cols[:, k])
    return rows, cols


# ----------------------------------------------------------------------------- in a store

#: A store keeps its tiles' power sums only where they take at most this share of a tile's
#: bytes (2 · tile · (L − 1) · 10 float64 against tile² entries: deep NTKs on small tiles
#: are left to the chain on the workers).
STORED_SHARE = 0.5


def stored_layers(spec) -> tuple | None:
    """The layers m whose power sums an assembly of store spec ``spec`` keeps beside each
    tile (m = l − 1 for the chain's layers l), or None: finite widths and depth 1 have no
    such chain, sums over ``STORED_SHARE`` of a tile's bytes are not kept, and without
    numba the tiles come from the array-module path alone."""
    return kept_layers(spec.kernel, spec.tile, spec.dtype)


def kept_layers(kernel, tile: int, dtype: str) -> tuple | None:
    """:func:`stored_layers` of a store of ``kernel`` (a :class:`ntkdist.spec.KernelSpec`)
    with tiles of side ``tile`` in ``dtype``."""
    from .kernels.fused import available

    if kernel.finite or kernel.depth < 2 or not available():
        return None
    layers = tuple(layer - 1 for layer in chain_layers(kernel.depth, kernel.kind))
    sums = 2 * tile * len(layers) * len(HERMITE_ORDERS) * 8
    if sums > STORED_SHARE * tile ** 2 * np.dtype(dtype).itemsize:
        return None
    return layers


def tile_with_sums(kernel, A: RowBlock, B: RowBlock, layers: tuple, same: bool):
    """(tile, sums): ``kernel``'s tile (a :class:`ntkdist.spec.KernelSpec`, limiting), bit for
    bit its :meth:`tile`, and its power sums at ``layers`` packed as the store keeps them:
    the rows' sums over the tile's columns, then (off the diagonal) the columns' sums over
    its rows, shape (rows [+ cols], layers, orders)."""
    tile, rows, cols = kernel_tile_sums(A, B, kernel.depth, kernel.kind, kernel.normalization,
                                        layers, len(HERMITE_ORDERS), same)
    return tile, (rows if cols is None else np.concatenate([rows, cols]))


def read_tile_sums(store, i: int, j: int, layers: tuple):
    """Tile (I, J)'s power sums as the store keeps them, or None if its marker records none,
    or the file does not match that checksum or the shape of the tile's sums at
    ``layers``."""
    sums = store.read_chain_sums(store.tile_key(i, j))
    rows_i, rows_j = store.tile_slices(i, j)
    height = rows_i.stop - rows_i.start + (0 if i == j else rows_j.stop - rows_j.start)
    return sums if sums is not None and sums.shape == (height, len(layers),
                                                        len(HERMITE_ORDERS)) else None


def maxima_from_store(store, log=None) -> dict | None:
    """{m: max_i Σ_j≠i |P^(m)_ij|^r for r in HERMITE_ORDERS} from a complete store's power
    sums, added in the fixed order of its upper tiles; None (with a logged reason) where
    the store keeps none or one of them is missing or does not match its checksum."""
    layers = stored_layers(store.spec)
    n = store.spec.n
    if layers is None or n * len(layers) * len(HERMITE_ORDERS) * 8 > CLIENT_BYTES:
        return None  # (the chain on the workers takes the layers in groups)
    acc = np.zeros((n, len(layers), len(HERMITE_ORDERS)))
    for i, j in store.upper_tiles():
        sums = read_tile_sums(store, i, j, layers)
        if sums is None:
            key = store.tile_key(i, j)
            if log and store.recorded_checksum(key, "chain") is None:
                log(f"note: the store keeps no power sums for the bounds chain of tile {key} "
                    "(assembled by a version that did not keep them): the chain is computed "
                    "from the rows")
            elif log:
                log(f"note: the power sums of tile {key} for the bounds chain are damaged "
                    f"({repair_hint(store.path)}): the chain is computed from the rows")
            return None
        rows_i, rows_j = store.tile_slices(i, j)
        height = rows_i.stop - rows_i.start
        acc[rows_i] += sums[:height]
        if i != j:
            acc[rows_j] += sums[height:]
    top = acc.max(axis=0)
    return {m: top[k] for k, m in enumerate(layers)}


def lambda_min_bounds_from_store(store, X, log=None) -> dict | None:
    """:func:`ntkdist.bounds.lambda_min_bounds` of a complete store's rows ``X`` (as the
    store holds them, checked by the caller) from the power sums it keeps beside its tiles:
    N · (blocks + 1) · layers · 10 numbers read instead of the O(N² L) chain. None where it
    keeps none (or one is damaged)."""
    spec = store.spec
    if np.shape(X) != (spec.n, spec.data.d):
        raise SpecError(f"rows of shape {np.shape(X)} are not those of store {store.path!r} "
                        f"(N = {spec.n}, d = {spec.data.d})")
    kern = spec.kernel
    maxima = maxima_from_store(store, log)
    if maxima is None:
        return None
    X, rows, factor, min_sq, out = chain_start(X, kern.depth, kern.kind, kern.normalization)
    return chain_result(out, maxima, chain_layers(kern.depth, kern.kind), factor * min_sq)


def gershgorin_tile(XA: np.ndarray, XB: np.ndarray, same: bool) -> tuple:
    """Task, depth 1: (rows, cols) with rows[a] = (Σ_b |XXᵀ|_ab, |XXᵀ|_aa on a diagonal tile
    else 0) and cols[b] = (Σ_a |XXᵀ|_ab, 0) (None when ``same``)."""
    G = np.abs(_correlations(XA, XB, np))
    rows = np.zeros((XA.shape[0], 2))
    rows[:, 0] = G.sum(axis=1)
    if same:
        rows[:, 1] = np.diagonal(G)
        return rows, None
    cols = np.zeros((XB.shape[0], 2))
    cols[:, 0] = G.sum(axis=0)
    return rows, cols


# ----------------------------------------------------------------------------- client side

def _tile_side(tile, n: int) -> int:
    if tile is None:
        return max(1, min(DEFAULT_TILE, n))
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise SpecError(f"tile must be an integer >= 1, got {tile!r}")
    return max(1, min(int(tile), n))


def _threads(client) -> int:
    info = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads") or 1) for w in info.values()))


def _require_blocks(blocks) -> None:
    """A one-line error if a scattered row block went with a lost worker."""
    for f in blocks:
        if f.status in ("lost", "cancelled", "error"):
            raise _worker_lost(_DURING + ", with row blocks its tasks need")


def _result(future, blocks):
    """The future's result, checking every ``LOST_POLL`` s that the rows are still there."""
    from distributed import wait
    from distributed.utils import TimeoutError as DaskTimeout

    while True:
        try:
            wait([future], timeout=LOST_POLL)
            break
        except (TimeoutError, DaskTimeout):
            _require_blocks(blocks)
    return future.result()


def _run_pass(client, func, blocks, bounds, width: tuple, extra: tuple, window: int, log,
              label: str):
    """One pass over the upper tiles: ``func(block_I, block_J, I == J, *extra)`` per tile,
    results added into an (N, width…) accumulator in the fixed order of the tile list."""
    nb = len(blocks)
    pairs = [(i, j) for i in range(nb) for j in range(i, nb)]
    n = bounds[-1]
    acc = np.zeros((n, *width))
    step = max(1, math.ceil(len(pairs) / 10))
    inflight = collections.deque()
    submitted = done = 0
    try:
        while done < len(pairs):
            while submitted < len(pairs) and len(inflight) < window:
                i, j = pairs[submitted]
                inflight.append(client.submit(func, blocks[i], blocks[j], i == j, *extra,
                                              pure=False))
                submitted += 1
            fut = inflight.popleft()
            rows, cols = _result(fut, blocks)
            fut.release()
            i, j = pairs[done]
            acc[bounds[i]:bounds[i + 1]] += rows
            if cols is not None:
                acc[bounds[j]:bounds[j + 1]] += cols
            done += 1
            if log and (done % step == 0 or done == len(pairs)):
                log(f"bounds chain{label}: {done} of {len(pairs)} tiles "
                    f"({100 * done // len(pairs)} %)")
    finally:
        for f in inflight:
            f.cancel()
    return acc


def _layer_groups(layers: list, n: int, tile: int, window: int) -> list:
    """Consecutive groups of layers whose accumulator and buffered results fit CLIENT_BYTES."""
    per_layer = (n + 2 * tile * window) * len(HERMITE_ORDERS) * 8
    g = max(1, min(len(layers), CLIENT_BYTES // per_layer))
    return [tuple(layers[k:k + g]) for k in range(0, len(layers), g)]


def _scatter(client, pieces):
    try:
        return client.scatter(pieces, broadcast=True, hash=False)
    except _lost_worker_errors() as exc:
        raise _worker_lost("while the rows were sent to the workers", exc) from None


def _release(futures) -> None:
    for f in futures:
        f.release()


def lambda_min_bounds_distributed(client, X, depth: int, kernel: str = "ntk",
                                  normalization: str = "paper", tile=None, log=None) -> dict:
    """:func:`ntkdist.bounds.lambda_min_bounds` computed tile by tile on ``client``'s workers.

    Returns the same dict (keys, notes, values up to the order of summation). ``tile``: the
    side of the row blocks (default 2048, at most N). ``log``: called with a progress line
    about every 10 % of the tiles. See the module docstring for the memory bounds and the
    layer groups.
    """
    X, rows, factor, min_sq, out = chain_start(X, depth, kernel, normalization)
    n = X.shape[0]
    t = _tile_side(tile, n)
    bounds = list(range(0, n, t)) + [n]
    slices = [slice(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]

    if depth == 1:
        with _one_line(_DURING, _FAILED):
            window = TASKS_PER_THREAD * _threads(client)
            blocks = _scatter(client, [np.ascontiguousarray(X[s]) for s in slices])
            try:
                acc = _run_pass(client, gershgorin_tile, blocks, bounds, (2,), (), window, log,
                                "")
            finally:
                _release(blocks)
        return gershgorin_result(out, factor, float(np.min(2.0 * acc[:, 1] - acc[:, 0])))

    layers = chain_layers(depth, kernel)
    wanted = [layer - 1 for layer in layers]
    maxima = {}
    with _one_line(_DURING, _FAILED):
        window = TASKS_PER_THREAD * _threads(client)
        groups = _layer_groups(wanted, n, t, window)
        blocks = _scatter(client, [RowBlock(unit=rows.unit[s], norms=rows.norms[s])
                                   for s in slices])
        try:
            for p, group in enumerate(groups, start=1):
                label = f" (layers {group[0]}–{group[-1]}, pass {p}/{len(groups)})" \
                    if len(groups) > 1 else ""
                acc = _run_pass(client, chain_tile, blocks, bounds,
                                (len(group), len(HERMITE_ORDERS)), (group,), window, log,
                                label)
                top = acc.max(axis=0)
                del acc
                for k, m in enumerate(group):
                    maxima[m] = top[k]
        finally:
            _release(blocks)
    return chain_result(out, maxima, layers, factor * min_sq)
