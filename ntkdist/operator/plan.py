"""The one planning point: from a run's specs and the facts of its environment to what runs.

:func:`make_plan` is pure (no cluster, no I/O). It decides the method's default, whether the
kernel is formed densely in this process or applied by the distributed operator, the
operator's mode (``store``, ``memory``, ``recompute``), the products' precision, the device,
the tile and storage dtype, which tiles are kept in worker (or GPU) memory and which are
streamed from the store each pass, and which worker applies which tile. Every refusal of a
combination that cannot work lives here, once, in the command line's words.

It is called twice by a job: first with the facts known before anything starts (N, whether
a store is given, the rows' structure), which refuses what needs no cluster to refuse; then
with the cluster's facts (workers' memory, GPUs' free memory, the store's tile and dtype),
which completes the plan. The pipeline and the operator obey the plan and re-check nothing.

Mixed precision (``--precision mixed``, and ``auto`` where it applies) has two kinds of fast
(float32) products, the plan's ``fast``:

* ``deflated``: memory mode with room for a second copy of the tiles: each worker also keeps
  R = K − FFᵀ in float32 (F: the degree-0 and degree-1 part of the kernel's Taylor series);
* ``shifted``: every other mode that reads a store (tiles streamed, or kept without room for
  a copy): the stored tiles themselves, less a constant c, in float32 arithmetic, the client
  adding c·1(1ᵀV) in float64. No memory beyond the tiles; a noise floor about 5× higher than
  ``deflated`` (measured in benchmarks/RESULTS.md), still far below where it matters.

Operator modes (``--operator``):

* ``store``: each pass reads every stored upper tile once and applies it twice,
  Y_I += K_IJ V_J and Y_J += K_IJᵀ V_I;
* ``memory``: the same tiles, read once and kept in worker memory between passes;
* ``recompute``: tiles rebuilt from the rows every pass (no store);
* ``auto``: ``memory`` when the stored tiles fit in ``CACHE_FRACTION`` of the workers'
  memory, else ``store`` with as many tiles kept in worker memory as fit there (the others
  streamed each pass); ``recompute`` when there is no store. On GPUs (``--device gpu``)
  tiles are always built from the rows, and ``memory``/``auto`` keep them in GPU memory when
  every worker's share fits in ``GPU_MEMORY_FRACTION`` of its GPU's free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SpecError
from ..spec import ClusterSpec, SolverSpec

#: Largest N for the in-memory dense path (three N×N float64 copies must fit in RAM).
DENSE_MAX_N = 25000
#: The share of the workers' memory that tiles kept there may take.
CACHE_FRACTION = 0.4
#: GPU memory mode: the share of a GPU's free memory its kept tiles may take, and the tile
#: function's working space in tiles (its temporaries while one tile is built).
GPU_MEMORY_FRACTION = 0.8
GPU_TILE_WORKSPACE = 16
#: Largest default tile; smaller when worker memory is tight or N is small.
DEFAULT_TILE = 4096
#: Bytes a tile task needs per tile entry (float64 GEMM output, recursion output, cast, copy).
BYTES_PER_ENTRY = 40
ITERATIVE = ("lobpcg", "davidson", "lanczos")


def default_method(n: int, store: bool, device: str = "cpu") -> str:
    """Dense in memory up to ``DENSE_MAX_N`` rows without a store on the CPU, else Davidson
    (LOBPCG on a GPU).

    On the CPU block Davidson (GD+k) took no more passes than LOBPCG to the same certificate
    at every N measured (benchmarks/RESULTS.md, passes against N: e.g. 29 against 30 at
    N = 20000 with the shift-invert preconditioner, 46 against 54 with the harmonic model,
    and 259 against 297 at N = 100000 from a store), with less work between passes.
    The GPU's figures were measured with LOBPCG, which stays its default."""
    if device == "gpu":
        return "lobpcg"
    return "dense" if not store and n <= DENSE_MAX_N else "davidson"


#: Finite widths: the smallest default tile side (a tile task holds two row blocks of
#: features besides the tile, so wide layers shrink the tile; below this its GEMMs slow).
MIN_FINITE_TILE = 64
#: Worker memory assumed where the cluster gives none, for sizing finite-width row blocks.
UNKNOWN_MEMORY = 4 * 2 ** 30


def feature_task_bytes(tile: int, columns: int) -> int:
    """Bytes a tile task of finite widths holds besides the tile: two row blocks' features
    and backward vectors (``columns`` float64 values a row) and the forward pass's temporaries
    while one is made."""
    return 3 * 8 * tile * columns


def default_tile(n: int, worker_memory: int | None, columns: int = 0) -> int:
    """Tile side from worker memory: a tile task uses at most a quarter of its worker's limit
    (finite widths: with its row blocks' features, ``columns`` values a row)."""
    tile = DEFAULT_TILE
    memory = worker_memory or (UNKNOWN_MEMORY if columns else None)
    floor = MIN_FINITE_TILE if columns else 256
    if memory:
        while tile > floor and (BYTES_PER_ENTRY * tile * tile
                                + feature_task_bytes(tile, columns)) > memory / 4:
            tile //= 2
    return min(tile, n)


def check_feature_memory(tile: int, columns: int, memories) -> None:
    """Refuse, in one line, a finite network whose tile task cannot fit in the smallest
    worker's memory limit (``columns``: float64 values a row of a block's features; 0: a
    limiting kernel, no check)."""
    smallest = _smallest(memories)  # workers without a memory limit: not refused
    need = BYTES_PER_ENTRY * tile * tile + feature_task_bytes(tile, columns)
    if columns and smallest and need > smallest:
        raise SpecError(f"a tile task of this network holds two row blocks of {tile} rows × "
                        f"{columns} features ({need / 1e9:.1f} GB with the tile), more than a "
                        f"worker's {smallest / 1e9:.1f} GB: give the workers more memory "
                        "(--memory-limit) or a smaller --tile, or narrower layers")


def default_dtype(n: int) -> str:
    """float64 while the dense path can still solve it, float32 storage above."""
    return "float64" if n <= DENSE_MAX_N else "float32"


def _smallest(memories) -> int | None:
    limits = [m for m in memories if m > 0]
    return min(limits) if limits else None


def store_layout(n: int, tile: int | None, dtype: str | None, had_tile: int | None,
                 had_dtype: str | None, memories, columns: int = 0) -> tuple[int, str]:
    """(tile, dtype) of a store to assemble: the user's, else those of a store of the same
    problem already there (``had_…``, so that a rerun resumes it), else the defaults (tile
    from the smallest of the workers' ``memories``, dtype from N)."""
    tile = tile or had_tile or default_tile(n, _smallest(memories), columns)
    return min(tile, n), dtype or had_dtype or default_dtype(n)


@dataclass(frozen=True)
class Facts:
    """What the plan needs to know about the run's environment.

    ``store``: None (no store), ``"assemble"`` (``run --store``: assembled first, then
    solved) or ``"complete"`` (``solve --store``). ``store_tile``/``store_dtype``: those of
    the complete store, or of an existing store of the same problem that a ``run --store``
    resumes. ``workers``: ((address, memory limit in bytes, 0 for none), …), None before the
    cluster is up. ``gpus``: ((address, free GPU bytes), …) of GPU workers. ``parallel_rows``:
    rows parallel to (or repeating) another row. ``feature_columns``: finite-width kernels'
    float64 values per row of a block's features (0 for the limiting kernels).
    """

    n: int
    store: str | None = None
    store_tile: int | None = None
    store_dtype: str | None = None
    workers: tuple | None = None
    gpus: tuple | None = None
    parallel_rows: int = 0
    feature_columns: int = 0


@dataclass(frozen=True)
class Plan:
    """What runs. ``in_process``: the dense kernel formed in this process (no cluster).
    ``kept``: tiles (i, j) kept in worker memory, and on the GPUs when ``kept_on_gpu``;
    ``streamed``: read from the store every pass; the other tiles are rebuilt from the rows
    every pass. ``assignment``: ((worker, ((i, j), …)), …), which worker applies which tile
    (kept tiles are loaded where they are assigned). ``complete`` is False for a plan made
    before the cluster's facts were known."""

    method: str
    in_process: bool
    device: str
    precision: str
    operator: str | None = None
    tile: int | None = None
    dtype: str | None = None
    kept: tuple = ()
    streamed: tuple = ()
    kept_on_gpu: bool = False
    assignment: tuple = ()
    tile_bytes: int = 0
    cached_bytes: int = 0
    deflated_bytes: int = 0
    streamed_bytes_per_pass: int = 0
    fast: str = ""  # mixed precision: "deflated" or "shifted" (the module's docstring)
    complete: bool = False
    notes: tuple = field(default=())

    @property
    def mixed(self) -> bool:
        return self.precision == "mixed"

    def memory(self) -> dict:
        """Bytes: stored tiles, kept in worker (or GPU) memory, float32 copies, streamed."""
        return {"tile_bytes": self.tile_bytes, "cached_bytes": self.cached_bytes,
                "deflated_bytes": self.deflated_bytes,
                "streamed_bytes_per_pass": self.streamed_bytes_per_pass}


def tile_sizes(n: int, tile: int) -> dict:
    """(i, j) → (rows, cols) of every upper tile."""
    nb = -(-n // tile)
    return {(i, j): (min(tile, n - i * tile), min(tile, n - j * tile))
            for i in range(nb) for j in range(i, nb)}


def tile_cost(pair, size) -> int:
    """Products a tile takes in a pass: the off-diagonal tiles are applied twice."""
    return size[0] * size[1] * (1 if pair[0] == pair[1] else 2)


def balance(pairs, sizes: dict, workers, load: dict | None = None) -> dict:
    """Assign ``pairs`` greedily, largest first, to the least-loaded of ``workers``
    (``load``: work already assigned, updated); worker → sorted list of pairs."""
    load = {w: 0.0 for w in workers} if load is None else load
    out = {w: [] for w in load}
    for p in sorted(pairs, key=lambda p: -tile_cost(p, sizes[p])):
        w = min(load, key=load.get)
        out[w].append(p)
        load[w] += tile_cost(p, sizes[p])
    return {w: sorted(v) for w, v in out.items()}


def make_plan(solver: SolverSpec, cluster: ClusterSpec, facts: Facts, tile: int | None = None,
              dtype: str | None = None, cache_fraction: float = CACHE_FRACTION) -> Plan:
    """The plan for ``solver`` on ``cluster`` with ``facts``; ``tile``/``dtype``: the user's
    choice for a store to assemble (or the recompute operator's tile), None for the default;
    ``cache_fraction``: the share of the workers' memory kept tiles may take.
    Raises SpecError (one line, the CLI's words) for a combination that cannot work."""
    s, n, device = solver, facts.n, cluster.device
    store = facts.store
    _refuse(s, n, device, store)
    if facts.feature_columns and s.precision == "mixed":
        raise SpecError("--precision mixed serves the limiting kernels (ntk, nngp); for "
                        "--kernel empirical or features use --precision float64 (or auto)")
    notes = []
    in_process = store is None and s.method == "dense"
    if in_process and cluster.explicit:
        notes.append("the dense path runs in this process; the cluster options are not used "
                     "(--method lobpcg or davidson solves on the cluster)")
    if s.method in ("dense", "lanczos") and s.precond != "auto":
        notes.append(f"--precond {s.precond} serves LOBPCG and Davidson only; --method "
                     f"{s.method} does not use it")
    base = dict(method=s.method, in_process=in_process, device=device, notes=tuple(notes))
    if in_process:
        return Plan(precision="float64", complete=True, **base)
    if facts.workers is None:
        return Plan(precision=_requested_precision(s, facts), **base)
    workers = dict(facts.workers)
    if not workers:
        raise SpecError("the Dask cluster has no workers")
    if store == "complete":
        tile, dtype = facts.store_tile, facts.store_dtype
    elif store == "assemble":
        tile, dtype = store_layout(n, tile, dtype, facts.store_tile, facts.store_dtype,
                                   workers.values(), facts.feature_columns)
    else:
        tile = min(tile or default_tile(n, _smallest(workers.values()), facts.feature_columns),
                   n)
    check_feature_memory(tile, facts.feature_columns, workers.values())
    sizes = tile_sizes(n, tile)
    if device == "gpu":
        return _gpu_plan(s, facts, base, workers, sizes, tile, dtype)
    return _cpu_plan(s, facts, base, workers, sizes, tile, dtype, cache_fraction)


def _refuse(s: SolverSpec, n: int, device: str, store: str | None) -> None:
    """The refusals that need no cluster."""
    if s.precision == "mixed" and s.method not in ("lobpcg", "davidson"):
        raise SpecError(f"--precision mixed applies to --method lobpcg or davidson, "
                        f"not {s.method}")
    if s.precision == "mixed" and s.operator == "recompute":
        raise SpecError("--precision mixed needs stored tiles (--store, with --operator "
                        "memory, store or auto), not --operator recompute")
    if s.method == "dense" and n > DENSE_MAX_N:
        raise SpecError(f"N = {n} is above the dense path's limit of {DENSE_MAX_N}; "
                        "use --method lobpcg")
    if device == "gpu" and s.precision == "mixed":
        raise SpecError("--precision mixed is for the CPU operator over a store; on GPUs use "
                        "--precision float64 (or auto)")
    if store is None and (s.operator == "store" or (s.operator == "memory"
                                                    and device != "gpu")):
        raise SpecError(f"--operator {s.operator} needs --store")
    if store is None and s.precision == "mixed":
        raise SpecError("--precision mixed needs --store (the float32 products use its "
                        "tiles)")
    if device == "gpu" and store == "assemble":
        raise SpecError("--device gpu rebuilds the tiles on the GPUs and needs no store: leave "
                        "out --store (or solve a store's kernel with 'ntkdist solve --store S "
                        "--device gpu')")
    if device == "gpu" and s.method not in ITERATIVE:
        raise SpecError(f"--device gpu runs the iterative solvers' products; --method "
                        f"{s.method} runs on the CPU (use lobpcg, davidson or lanczos)")
    if device == "gpu" and s.operator == "store":
        raise SpecError("--device gpu builds the tiles on the GPUs from the rows (faster than "
                        "reading them): use --operator memory, recompute or auto, not store")


def _requested_precision(s: SolverSpec, facts: Facts) -> str:
    """Mixed precision only serves LOBPCG and Davidson (two phases, see
    :mod:`ntkdist.solvers.mixed`). ``auto`` stays in float64 when rows repeat or are
    parallel: λ_min ≈ 0 then needs an absolute accuracy far below float32 products' noise
    floor (measured: N = 1500 with two such rows, 85 passes mixed against 57 in float64)."""
    if s.method not in ("lobpcg", "davidson") or facts.store is None or facts.feature_columns:
        return "float64"
    if s.precision == "auto" and facts.parallel_rows > 0:
        return "float64"
    return s.precision


def _cpu_plan(s, facts, base, workers, sizes, tile, dtype, cache_fraction) -> Plan:
    itemsize = {"float32": 4, "float64": 8}.get(dtype, 0) if facts.store else 0
    nbytes = {p: r * c * itemsize for p, (r, c) in sizes.items()}
    tile_bytes = sum(nbytes.values())
    budget = (cache_fraction * sum(workers.values()) if all(workers.values())
              else float("inf"))
    mode = s.operator
    if facts.store is None or mode == "recompute":
        mode = "recompute"
    elif mode == "auto":
        mode = "memory" if tile_bytes <= budget else "store"
    elif mode == "memory" and tile_bytes > budget:
        raise SpecError(
            f"--operator memory: the stored tiles ({tile_bytes / 1e9:.1f} GB) do not fit in "
            f"{cache_fraction:.0%} of the workers' memory ({budget / 1e9:.1f} GB); use "
            "--operator auto (caches what fits, streams the rest) or store")
    precision = _requested_precision(s, facts)
    deflated = sum(r * c * 4 for r, c in sizes.values())
    fast = ""  # mixed with no stored tiles (recompute) was refused before the cluster started
    if precision != "float64" and mode != "recompute":
        fast = "deflated" if mode == "memory" and tile_bytes + deflated <= budget else "shifted"
        precision = "mixed"
    else:
        precision = "float64"
    kept = []
    if mode == "memory":
        kept = list(sizes)
    elif mode == "store" and s.operator == "auto":  # keep the largest tiles that fit
        used = 0
        for p in sorted(sizes, key=lambda p: -nbytes[p]):
            if used + nbytes[p] <= budget:
                kept.append(p)
                used += nbytes[p]
    load = {w: 0.0 for w in workers}
    first = balance(kept, sizes, workers, load)
    rest = balance([p for p in sizes if p not in set(kept)], sizes, workers, load)
    streamed = tuple(sorted(p for p in sizes if p not in set(kept))) if mode == "store" else ()
    return Plan(
        **base, precision=precision, operator=mode, tile=tile, dtype=dtype, kept=tuple(kept),
        streamed=streamed,
        assignment=tuple((w, tuple(first[w] + rest[w])) for w in sorted(workers)),
        tile_bytes=tile_bytes, cached_bytes=sum(nbytes[p] for p in kept),
        deflated_bytes=deflated if fast == "deflated" else 0, fast=fast,
        streamed_bytes_per_pass=sum(nbytes[p] for p in streamed), complete=True)


def _gpu_plan(s, facts, base, workers, sizes, tile, dtype) -> Plan:
    """GPU workers build their tiles from the rows: ``memory`` (built in the first pass and
    kept on the GPU) when every worker's share of the float64 tiles fits in
    ``GPU_MEMORY_FRACTION`` of its free GPU memory with room left for building a tile; else
    ``recompute``, which with ``auto`` keeps on each GPU the tiles that fit there and rebuilds
    the others every pass (``memory`` asked for and not fitting: a one-line error)."""
    requested = s.operator
    free = dict(facts.gpus or ())
    assign = balance(list(sizes), sizes, workers)
    nbytes = {p: 8 * r * c for p, (r, c) in sizes.items()}  # float64 tiles
    need = {w: sum(nbytes[p] for p in assign[w]) for w in assign}
    work = GPU_TILE_WORKSPACE * 8 * tile ** 2
    short = [w for w in need if need[w] + work > GPU_MEMORY_FRACTION * free.get(w, 0)]
    if requested == "memory" and short:
        w = short[0]
        raise SpecError(
            f"--device gpu --operator memory: a worker's share of the float64 tiles and room "
            f"to build one ({(need[w] + work) / 1e9:.1f} GB) do not fit in "
            f"{GPU_MEMORY_FRACTION:.0%} of its GPU's free memory ({free.get(w, 0) / 1e9:.1f} "
            "GB); use --operator recompute (or auto)")
    on_gpu = requested in ("memory", "auto") and not short
    if on_gpu:
        kept = tuple(sorted(sizes))
    elif requested == "auto":  # keep what fits on each GPU, rebuild the rest every pass
        kept = []
        for w in sorted(assign):
            room = GPU_MEMORY_FRACTION * free.get(w, 0) - work
            for p in assign[w]:
                if nbytes[p] <= room:
                    kept.append(p)
                    room -= nbytes[p]
        kept = tuple(sorted(kept))
    else:
        kept = ()
    itemsize = {"float32": 4, "float64": 8}.get(dtype, 0) if facts.store else 0
    return Plan(**base, precision="float64", operator="memory" if on_gpu else "recompute",
                tile=tile, dtype=dtype, kept=kept,
                tile_bytes=sum(r * c * itemsize for r, c in sizes.values()),
                kept_on_gpu=bool(kept),
                assignment=tuple((w, tuple(assign[w])) for w in sorted(workers)),
                cached_bytes=sum(nbytes[p] for p in kept),
                complete=True)
