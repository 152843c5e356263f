"""Scaling studies: a grid of runs from one TOML file, one cluster, one table, figures, fits.

A study file has the run file's tables (:mod:`ntkdist.config`: ``[data]``, ``[kernel]``,
``[solver]``, ``[store]``, ``[cluster]``) where any value of ``[data]``, ``[kernel]``,
``[solver]`` and ``[store]`` may be a list: each list is an axis of the grid, and the points
are the product of the axes. A ``[zip]`` table holds lists of equal length, taken element by
element (``n = [1000, 100000]`` with ``tol = [1e-8, 1e-6]``) and combined with the product.
``[study]`` names the storage policy and the crossover fraction::

    [study]
    storage = "none"            # keep | delete | none (no store: dense or recompute)
    crossover_fraction = 0.5    # N*: where λ_min/d falls below this share of its plateau
    [data]
    source = "sphere"
    n = [1000, 2000, 5000]
    d = [16, 32]
    seed = [0, 1, 2]
    [kernel]
    depth = [2, 3]

Each point is a full run (:func:`ntkdist.pipeline.run`) with its own result folder
``DIR/points/LABEL``; one cluster serves them all. After each point ``DIR/results.csv``
is rewritten from the result folders, so a rerun skips finished points (by spec hash),
resumes an interrupted one (its store resumes, its solve restarts from its checkpoint) and
ends with the same table. At the end: ``fits.csv`` and the figures (:mod:`ntkdist.figures`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

from .assemble import FEATURE_GROUP_BYTES
from .config import (TABLES, Options, cluster_request, merge, read_toml, run_request,
                     store_request)
from .errors import OutputError, SpecError
from .locks import LOCK_FILE, folder_lock
from .results import existing_parent, write_json
from .spec import BATCH_KINDS, ClusterSpec, RunSpec, content_hash

STORAGE = ("keep", "delete", "none")
STUDY_KEYS = {"storage": "keep | delete | none", "crossover_fraction": "a number in (0, 1)",
              "name": "a name"}
#: Tables whose values may be lists (axes); the cluster is one for the whole study.
AXIS_TABLES = ("data", "kernel", "solver", "store")
#: [cluster] keys whose one value may be a list (cli.md): the job script's lines, [MIN, MAX].
LIST_VALUED_CLUSTER_KEYS = ("job_prologue", "adapt")
RESULTS_CSV = "results.csv"
#: A study folder's mark: a sweep goes only into a new or empty folder, or one that holds it.
STUDY_FILE = "study.json"
FITS_CSV = "fits.csv"
COLUMNS = (
    "point", "n", "d", "depth", "kernel", "normalization", "widths", "width", "weights_seed",
    "layer", "data", "seed", "method", "k",
    "tol", "status", "lambda_min", "lambda_over_d", "residual_norm", "certified_rel_accuracy",
    "lambda_min_lower_certified", "lambda_min_upper_certified",
    "lower_bound", "upper_bound", "prediction", "measured_over_predicted", "passes",
    "iterations", "wall_seconds", "solver_seconds", "bytes_read", "store_bytes",
    "limit_lambda_min", "theorem_scale", "width_condition_holds", "spec_hash",
)


@dataclass(frozen=True)
class Point:
    """One run of the study: its specs, result folder and store (None: no store)."""

    label: str
    spec: RunSpec
    out: str
    store: str | None
    tile: int | None
    dtype: str | None


@dataclass(frozen=True)
class Study:
    name: str
    out: str
    storage: str
    crossover_fraction: float
    cluster: ClusterSpec
    points: tuple


def _axis_values(name: str, table: str, key: str, value):
    if isinstance(value, list):
        if not value:
            raise SpecError(f"{name}: [{table}] {key} is an empty list")
        if any(isinstance(v, (list, dict)) for v in value):
            raise SpecError(f"{name}: [{table}] {key} must be a value or a list of values")
        return value
    if isinstance(value, dict):
        raise SpecError(f"{name}: [{table}] {key} must be a value, not a table")
    return [value]


def _width_lists(value) -> bool:
    """Whether a ``widths`` value is an axis: a list of width lists (or of "n1,n2" texts)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (list, str)) for v in value)


def _width_axis(name: str, table: str, value) -> list:
    if not _width_lists(value):
        raise SpecError(f"{name}: [{table}] widths must be a list of width lists, e.g. "
                        "[[625, 625], [1250, 1250]]")
    return [tuple(v) if isinstance(v, list) else v for v in value]


def _limit_options(o: Options, spec: RunSpec) -> Options | None:
    """A finite-width point's limit, run beside it in the study (the line its figure draws):
    the limiting NTK of the same depth for the empirical NTK, the NNGP of depth k + 1 for
    layer k's features; none for the raw matrices, which have no limit."""
    k = spec.kernel
    if not k.finite or k.normalization == "raw":
        return None
    limit = Options(o, source=o.source, from_file=o.from_file)
    for key in ("widths", "weights_seed", "layer"):
        limit.pop(key, None)
    limit["kernel"] = "ntk" if k.kind == "empirical" else "nngp"
    limit["depth"] = k.depth if k.kind == "empirical" else k.layer + 1
    if limit.get("precond") in ("none", None):
        limit.pop("precond", None)  # the limits' own preconditioner
    return limit


def load_study(path: str, out: str, cluster_flags: dict | None = None) -> Study:
    """Read and validate a study file: every point is checked (data, kernel, solver) before
    anything runs; one line naming the key for anything wrong."""
    doc, name = read_toml(path, "study file")
    known = ("study", "zip", *TABLES)
    for key, value in doc.items():
        if key not in known:
            raise SpecError(f"{name}: unknown key {key} (known: "
                            f"{', '.join(f'[{k}]' for k in known)})")
        if not isinstance(value, dict):
            raise SpecError(f"{name}: [{key}] must be a table, got {value!r}")
    study = doc.get("study", {})
    for key in study:
        if key not in STUDY_KEYS:
            raise SpecError(f"{name}: unknown key [study] {key} (known: {', '.join(STUDY_KEYS)})")
    storage = study.get("storage", "keep")
    if storage not in STORAGE:
        raise SpecError(f"{name}: [study] storage must be one of {', '.join(STORAGE)}, "
                        f"got {storage!r}")
    fraction = study.get("crossover_fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0 < fraction < 1):
        raise SpecError(f"{name}: [study] crossover_fraction must be in (0, 1), "
                        f"got {fraction!r}")
    label = study.get("name", os.path.splitext(name)[0])
    if not isinstance(label, str) or not label:
        raise SpecError(f"{name}: [study] name must be a non-empty string")
    fixed, axes = Options(source=name), []
    for table, keys in TABLES.items():
        for key, value in doc.get(table, {}).items():
            if key not in keys:
                raise SpecError(f"{name}: unknown key [{table}] {key} (known: "
                                f"{', '.join(keys)})")
            opt = keys[key]
            if table == "store" and key == "path":
                raise SpecError(f"{name}: [store] path is chosen by the study (DIR/stores); "
                                "set [study] storage instead")
            if table == "kernel" and key == "widths":
                if _width_lists(value):
                    axes.append((opt, _width_axis(name, "kernel", value)))
                else:
                    fixed[opt] = value
                continue
            if table == "cluster" and key in LIST_VALUED_CLUSTER_KEYS and isinstance(value,
                                                                                   list):
                fixed[opt] = value  # a value that is a list (lines, MIN and MAX), not an axis
                continue
            if table == "cluster" or not isinstance(value, list):
                if isinstance(value, (list, dict)):
                    raise SpecError(f"{name}: [{table}] {key} must be one value (one cluster "
                                    "serves the whole study)")
                fixed[opt] = value
            else:
                axes.append((opt, _axis_values(name, table, key, value)))
    zipped = doc.get("zip", {})
    flat = {opt: (table, key) for table, keys in TABLES.items() if table in AXIS_TABLES
            for key, opt in keys.items() if not (table == "store" and key == "path")}
    by_key = {key: opt for table, keys in TABLES.items() if table in AXIS_TABLES
              for key, opt in keys.items() if not (table == "store" and key == "path")}
    zip_axes = []
    for key, value in zipped.items():
        opt = key if key in flat else by_key.get(key)
        if opt is None:
            raise SpecError(f"{name}: unknown key [zip] {key} (known: {', '.join(flat)})")
        if opt in fixed or any(opt == a for a, _ in axes):
            raise SpecError(f"{name}: [zip] {key} is also set in [{flat[opt][0]}]")
        if not isinstance(value, list):
            raise SpecError(f"{name}: [zip] {key} must be a list")
        zip_axes.append((opt, _width_axis(name, "zip", value) if opt == "widths"
                         else _axis_values(name, "zip", key, value)))
    lengths = {len(v) for _, v in zip_axes}
    if len(lengths) > 1:
        raise SpecError(f"{name}: the [zip] lists must have equal lengths, got "
                        + ", ".join(f"{k} {len(v)}" for k, v in zip_axes))
    fixed.from_file = set(fixed)
    fixed = merge(fixed, cluster_flags or {})  # the command's cluster flags win
    cluster = cluster_request(fixed)
    if storage == "none" and any(k in fixed for k in ("tile", "dtype")) or storage == "none" \
            and any(a in ("tile", "dtype") for a, _ in axes + zip_axes):
        raise SpecError(f"{name}: [store] tile and dtype need [study] storage keep or delete")
    combos = list(itertools.product(*[v for _, v in axes])) or [()]
    rows = list(zip(*[v for _, v in zip_axes])) if zip_axes else [()]
    points, seen, limits = [], {}, {}
    for zrow in rows:
        for combo in combos:
            o = Options(fixed, source=name, from_file=fixed.from_file | {
                a for a, _ in axes + zip_axes})
            o.update({a: v for (a, _), v in zip(axes, combo)})
            o.update({a: v for (a, _), v in zip(zip_axes, zrow)})
            point = _point(o, out, storage, cluster)
            points.append(point)
            limit = _limit_options(o, point.spec)
            if limit is not None:
                lp = _point(limit, out, storage, cluster)
                limits.setdefault(lp.label, lp)
    labels = {p.label for p in points}
    points += [p for label, p in limits.items() if label not in labels]
    for p in points:
        if p.label in seen:
            raise SpecError(f"{name}: two points of the grid are the same run ({p.label})")
        seen[p.label] = p
    return Study(label, out, storage, float(fraction), cluster, tuple(points))


def _point(o: Options, out: str, storage: str, cluster: ClusterSpec) -> Point:
    if storage != "none":
        o["store"] = "(study)"  # the method's default is that of a run with a store
    spec, _ = run_request(o)
    _, tile, dtype = store_request(o)
    from .operator.plan import Facts, make_plan

    try:  # the refusals that need no cluster, for every point before any runs
        make_plan(spec.solver, cluster, Facts(
            n=spec.n, store="assemble" if storage != "none" else None,
            feature_columns=spec.kernel.feature_columns(spec.d)),
            tile, dtype)
    except SpecError as exc:
        raise SpecError(f"{o.source}: point n={spec.n} d={spec.d} depth={spec.kernel.depth}: "
                        f"{exc}") from None
    source = spec.data.source if spec.data.synthetic else os.path.splitext(
        os.path.basename(spec.data.source))[0]
    k = spec.kernel
    label = (f"{source}-n{spec.n}-d{spec.d}-L{k.depth}-{k.kind}"
             + (f"-w{'x'.join(map(str, k.widths))}-ws{k.weights_seed}" if k.finite else "")
             + (f"-s{spec.data.seed}" if spec.data.seed is not None else "")
             + f"-{spec.hash()[:8]}")
    store = None
    if storage != "none":
        problem = content_hash({**spec.problem(), "tile": tile, "dtype": dtype})
        store = os.path.join(out, "stores", f"{problem[:16]}.zarr")
    return Point(label, spec, os.path.join(out, "points", label), store, tile, dtype)


# ------------------------------------------------------------------------------- the plan

#: The time model's constants, fitted on an Intel Xeon of 2 cores (benchmarks/RESULTS.md,
#: "Scaling studies"): LOBPCG's passes to a certified 1e-8 (63 at N = 8000, growing like
#: N^0.75: 137 at N = 20000, 199 at 40000), a pass's fixed cost (Dask's round trip and the
#: client's Rayleigh–Ritz), the GEMM efficiency of a pass's thin products, and the dense
#: solver's N³ factor.
PASSES_AT_8000 = 63.0
PASSES_GROWTH = 0.75
PASS_OVERHEAD = 0.35
PASS_EFFICIENCY = 1.0
EIGH_FLOPS_PER_N3 = 7.0
#: Distributed assembly's entries/s, and the bound's chain's entry-layers/s, as shares of the
#: tile function's in-process rate at depth 3 (22 M/s against 35 M/s measured; the chain on
#: 2 workers at N = 100000 in 151 s, ``python benchmarks/chain.py --n 100000 --workers 2``:
#: 132 M entry-layers/s against 31 M/s).
ASSEMBLY_SHARE = 0.65
CHAIN_SHARE = 4.3
#: The chain's power sums made with a store's tiles, upper entry-layers/s as a share of the
#: same rate: 0.41–0.50 s a 4096 tile for two layers on one core (``python
#: benchmarks/chain.py --n 8192 --tile-cost``), about 75 s on 2 workers at N = 100000.
SUMS_SHARE = 4.4
#: Finite widths: normal draws a second per core (NumPy's Philox; 55–62 M/s measured by
#: benchmarks/finite_tile.py).
WEIGHTS_PER_S = 6e7


def estimate(point: Point, cluster: ClusterSpec, rates: dict) -> dict:
    """Disk (bytes of its store), memory (bytes at its peak) and time (seconds) of a point,
    from the machine's ``rates`` (:func:`machine_rates`) and the constants above."""
    from .chain import kept_layers
    from .operator.plan import default_dtype, default_tile
    from .pipeline import BOUNDS_MAX_N, RECOMPUTE_BLOCK
    from .solvers.cholesky import memory_needed

    spec, n = point.spec, point.spec.n
    s = spec.solver
    workers = cluster.expected_workers or rates["cores"]
    # The rates were measured with all of this machine's cores; a remote cluster's workers
    # (a batch cluster's cores) are taken as cores of the same speed.
    cores = (min(workers, rates["cores"]) if cluster.kind == "local" else workers
             if cluster.kind not in BATCH_KINDS else workers // cluster.processes * cluster.cores)
    share = cores / rates["cores"]
    depth = spec.kernel.depth
    entries_s = ASSEMBLY_SHARE * rates["entries_per_s"] * share * 6.0 / (depth + 3)
    chain_s = CHAIN_SHARE * rates["entries_per_s"] * share
    gemm = rates["gemm_flops_per_s"] * share
    dtype = point.dtype or default_dtype(n)
    disk = n * n * (4 if dtype == "float32" else 8) // 2 if point.store else 0
    build_s, pass_s = n * n / 2 / entries_s, n * n / 2 / entries_s  # all tiles; a pass's
    columns = 0
    if spec.kernel.finite:  # GEMMs: the features once (forward and backward), then the tiles
        k = spec.kernel
        columns = k.feature_columns(spec.d)
        dims = (spec.d, *k.widths, 1)[:(k.layer + 1) if k.kind == "features" else None]
        weights = sum(a * b for a, b in zip(dims, dims[1:]))
        pass_s = n * n * columns / gemm
        groups = max(1.0, 8.0 * n * columns / FEATURE_GROUP_BYTES)
        build_s = (2 * (2 if k.kind == "empirical" else 1) * n * weights / gemm + pass_s
                   + groups * 2 * weights / WEIGHTS_PER_S / share)
        disk += 8 * n * columns if point.store else 0  # the feature cache while assembling
    chain = n * n * max(depth - 1, 1) / chain_s
    if n <= BOUNDS_MAX_N:  # in the solving process: all N² pairs, one core
        chain *= 2 * share * rates["cores"]
    kept = (kept_layers(spec.kernel, point.tile or default_tile(n, rates["worker_memory"]),
                        point.dtype or default_dtype(n)) if point.store else None)
    if kept:  # made with the tiles, read back in seconds
        build_s += n * n / 2 * len(kept) / (SUMS_SHARE * rates["entries_per_s"] * share)
        chain = 0.0
    # --certify cholesky: K formed and factorised in this process (one attempt, n³/3 flops)
    certify = (n * n / 2 / (entries_s / share) + n ** 3 / 3 / rates["gemm_flops_per_s"]
               if s.certify == "cholesky" else 0.0)
    client = (memory_needed(n, spec.kernel.feature_columns(spec.d))
              if s.certify == "cholesky" else 0)
    if spec.kernel.finite:
        chain = 0.0  # no proof chain for a finite network
    if s.method == "dense" and point.store is None:
        memory = 3 * 8 * n * n + 3 * 8 * n * columns
        # in this process, the finite networks' GEMMs on one BLAS thread
        build = build_s * share * rates["cores"] if columns else n * n / entries_s
        seconds = build + EIGH_FLOPS_PER_N3 * n ** 3 / gemm + chain + certify
        return {"disk": disk, "memory": memory, "seconds": seconds, "client_memory": client}
    tile = point.tile or default_tile(n, rates["worker_memory"])
    shift = _uses_shift(spec, cluster.device, recompute=not point.store)
    passes = min(s.max_products,
                 _base_passes(spec, shift) * s.k ** 0.5 * _passes_factor(spec, cluster.device,
                                                                         shift))
    block = s.block or (32 if point.store else RECOMPUTE_BLOCK)  # recompute: wider
    products = 2.0 * block * n * n / (gemm * PASS_EFFICIENCY)
    precond, factor_disk = 1e-8 * n * spec.d ** 2, 0.0
    if shift:
        # on the client's cores: K − σI's n²/2 entries and its float32 factor (n³/3), two n²
        # triangular solves an iteration; 4n² bytes on the client, or beyond memory (CPU) its
        # tiles on disk, read twice an iteration, and one column panel on the client
        from .solvers.diskfactor import disk_bytes, panel_bytes
        from .solvers.shift import shift_fits

        f32 = 2.0 * rates["gemm_flops_per_s"]
        precond += n ** 3 / 3 / f32 + n * n / 2 / (entries_s / share)
        products += 2.0 * block * n * n / f32
        if cluster.device == "cpu" and shift_fits(n) is not None:
            client = max(client, panel_bytes(n, tile))
            factor_disk = disk_bytes(n, tile)
            products += 2.0 * factor_disk / rates["disk_bytes_per_s"]
        else:
            client = max(client, 4 * n * n)
    elif _harmonic_plan(spec, cluster.device)[1] == "gram":
        # float32 on the client's cores: set-up n³/3 and 2n²·(1 + d), two n² triangular
        # solves an iteration
        f32 = 2.0 * rates["gemm_flops_per_s"]
        precond += (n ** 3 / 3 + 2 * n * n * (1 + spec.d)) / f32
        products += 2.0 * block * n * n / f32
    if point.store:
        assemble = build_s
        cached = disk <= 0.4 * rates["worker_memory"] * workers
        per_pass = PASS_OVERHEAD + products + (0 if cached else disk / rates["disk_bytes_per_s"])
        memory = min(disk, 0.4 * rates["worker_memory"] * workers) + 40 * tile * tile
        seconds = assemble + passes * per_pass + chain + precond + 2.0
    else:  # the recompute operator
        per_pass = PASS_OVERHEAD + pass_s + products
        memory = 40 * tile * tile * workers
        seconds = passes * per_pass + chain + precond + 2.0
    return {"disk": disk + factor_disk, "memory": memory, "seconds": seconds + certify,
            "client_memory": client}


def _harmonic_plan(spec: RunSpec, device: str = "cpu") -> tuple:
    """The harmonic preconditioner's (degree kept, degree-3 form) for the point, or
    (None, None) where it is not used."""
    from .solvers.precond import harmonic_plan, harmonic_request

    asked = harmonic_request(spec.solver.precond, spec.kernel.depth, spec.kernel.finite,
                             device)
    return (None, None) if asked is None else harmonic_plan(spec.n, spec.d, **asked)


def _uses_shift(spec: RunSpec, device: str = "cpu", recompute: bool = False) -> bool:
    """Whether the point's solve runs shift-invert (:func:`ntkdist.solvers.shift.uses_shift`;
    ``recompute``: the point has no store)."""
    from .solvers.shift import uses_shift

    return spec.solver.method in ("lobpcg", "davidson") and uses_shift(
        spec.solver.precond, spec.n, spec.kernel.depth, spec.kernel.finite, device, recompute)


#: Passes of a shift-invert solve against the degree ≤ 2 harmonic model's (its estimate
#: stage included), measured with the defaults at d = 64 (benchmarks/RESULTS.md): with σ
#: from the estimate alone 22/65 at N = 10000, 30/125 at 20000, 36/200 at 40000.
SHIFT_PASSES = 0.25
#: With σ from the prediction (the NTK on sphere rows, d ≥ 64, depth ≥ 3, N ≥ 1000) the
#: passes to a certified 1e-8 themselves (`ntkdist run --store`, d = 64, seed 31;
#: benchmarks/RESULTS.md): 13, 16, 18, 12 and 21 at N = 10000, 20000, 40000, 50000 and
#: 100000 (at 50000 the prediction lay 0.33 % above λ_1, so σ closer), about
#: 13·(N/10000)^0.21.
SHIFT_PREDICTED_AT_10000 = 13.0
SHIFT_PREDICTED_GROWTH = 0.21


def _shift_predicted(spec: RunSpec, shift: bool) -> bool:
    from .solvers.shift import in_prediction_domain

    k = spec.kernel
    return shift and in_prediction_domain(spec.data.source, spec.d, k.depth, k.kind, spec.n)


def _base_passes(spec: RunSpec, shift: bool) -> float:
    """Passes to a certified 1e-8 before :func:`_passes_factor`: the shift-invert solve's
    (``shift``) own model where the prediction places σ, else the degree ≤ 2 harmonic
    model's."""
    n = spec.n
    if _shift_predicted(spec, shift):
        return SHIFT_PREDICTED_AT_10000 * (n / 10000.0) ** SHIFT_PREDICTED_GROWTH
    return max(20.0, PASSES_AT_8000 * (n / 8000.0) ** PASSES_GROWTH)


def _passes_factor(spec: RunSpec, device: str = "cpu", shift: bool = False) -> float:
    """The passes of :data:`PASSES_AT_8000` (tol 1e-8, the degree ≤ 2 harmonic
    preconditioner) scaled to the point's tol (linear convergence: passes ∝ log(1/tol)) and
    halved where the preconditioner keeps the degree-3 block (measured at d = 16: 57 → 29
    passes at N = 4000, 93 → 45 at 16000; at d = 64, N = 20000: 104 → 46)."""
    factor = min(max(math.log10(1.0 / spec.solver.tol) / 8.0, 0.25), 2.0)
    if shift and not _shift_predicted(spec, shift):
        factor *= SHIFT_PASSES
    elif not shift and _harmonic_plan(spec, device)[0] == 3:
        factor *= 0.5
    return factor


def machine_rates(cluster: ClusterSpec) -> dict:
    """This machine's rates, measured in about a second with all its cores: the tile
    function's entries per second (depth 3, a 1024² tile) and float64 GEMM flops per second
    (1024²); the disk rate is taken as 1 GB/s (0.5–1.7 GB/s measured on these machines)."""
    import numpy as np

    from .bench import best_of
    from .cluster import _cpu_count
    from .kernels.limiting import kernel_tile, row_block

    def best(f, repeats=3):
        return max(best_of(f, repeats)["seconds"], 1e-6)

    rng = np.random.default_rng(0)
    block = row_block(rng.standard_normal((1024, 64)))
    entries = 1024 * 1024 / best(lambda: kernel_tile(block, block, 3))
    A = rng.standard_normal((1024, 1024))
    gemm = 2 * 1024 ** 3 / best(lambda: A @ A)
    cores = _cpu_count()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    worker_memory, cluster_memory = total / (cluster.workers or cores), total
    if cluster.kind in BATCH_KINDS:  # the jobs' memory, not this machine's
        from dask.utils import parse_bytes

        worker_memory = parse_bytes(cluster.memory) / cluster.processes
        cluster_memory = worker_memory * cluster.expected_workers
    return {"entries_per_s": entries, "gemm_flops_per_s": gemm, "cores": cores,
            "worker_memory": worker_memory, "memory": total, "cluster_memory": cluster_memory,
            "disk_bytes_per_s": 1.0e9}


def check_fits(study: Study, estimates: list, rates: dict) -> None:
    """Refuse, before anything starts, a point that cannot fit the disk or memory it has."""
    from .solvers.cholesky import MEMORY_SHARE

    free = shutil.disk_usage(existing_parent(study.out)).free
    held = 0
    stores_done = set()
    for p, e in zip(study.points, estimates):
        here = p.store is None and p.spec.solver.method == "dense"  # in this process
        has = rates["memory"] if here else rates.get("cluster_memory", rates["memory"])
        if e["memory"] > has:
            where = "this machine has" if here or study.cluster.kind not in BATCH_KINDS else \
                "the batch cluster's jobs have"
            raise SpecError(f"point {p.label} needs about {e['memory'] / 1e9:.1f} GB of memory; "
                            f"{where} {has / 1e9:.1f} GB (use a store: "
                            "[study] storage keep or delete, or a smaller n)")
        if e.get("client_memory", 0) > MEMORY_SHARE * rates["memory"]:
            raise SpecError(f"point {p.label}: --certify cholesky holds K in float64 in this "
                            f"process, {e['client_memory'] / 1e9:.1f} GB; this machine has "
                            f"{rates['memory'] / 1e9:.1f} GB (certify smaller n only)")
        if p.store and p.store not in stores_done and not os.path.exists(p.store):
            need = e["disk"] if study.storage == "delete" else held + e["disk"]
            if need > free:
                raise SpecError(f"point {p.label} needs {need / 1e9:.1f} GB of disk for its "
                                f"store{'s' if study.storage == 'keep' else ''}; "
                                f"{existing_parent(study.out)} has {free / 1e9:.1f} GB free")
            if study.storage == "keep":
                held += e["disk"]
            stores_done.add(p.store)


def plan_text(study: Study, estimates: list) -> str:
    lines = [f"study {study.name}: {len(study.points)} point(s), storage {study.storage}, "
             f"results in {study.out}"]
    lines.append(f"{'point':<48} {'method':<9} {'disk GB':>8} {'memory GB':>10} {'time s':>9}"
                 "  state")
    for p, e in zip(study.points, estimates):
        state = "done" if _finished(p) else "resumes" if os.path.exists(p.out) else "to run"
        lines.append(f"{p.label:<48} {p.spec.solver.method:<9} {e['disk'] / 1e9:>8.2f} "
                     f"{e['memory'] / 1e9:>10.2f} {e['seconds']:>9.1f}  {state}")
    todo = [e for p, e in zip(study.points, estimates) if not _finished(p)]
    lines.append(f"to run: {len(todo)} point(s), about {sum(e['seconds'] for e in todo):.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the sweep

def _finished(p: Point) -> dict | None:
    """The point's result if it is complete for this spec, else None."""
    try:
        with open(os.path.join(p.out, "result.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if result.get("spec_hash") == p.spec.hash() else None


def sweep(study: Study, log=print, dry_run: bool = False, report_only: bool = False) -> dict:
    """Run every point not yet finished, rewriting results.csv after each; then the fits
    and figures. ``dry_run``: print the plan and refuse what cannot fit, run nothing;
    ``report_only``: the table, fits and figures of the points finished so far, nothing run."""
    from .pipeline import run

    if report_only:
        if not os.path.isdir(os.path.join(study.out, "points")):
            raise SpecError(f"{study.out!r} holds no points of a sweep yet")
        rows = write_results(study)
        fits = write_fits(study, rows)
        return {"points": len(study.points), "finished": len(rows), "ran": 0,
                "results": os.path.join(study.out, RESULTS_CSV),
                "fits": os.path.join(study.out, FITS_CSV),
                "figures": _figures(study, rows, fits, log)}
    check_study_out(study.out)
    rates = machine_rates(study.cluster)
    estimates = [estimate(p, study.cluster, rates) for p in study.points]
    check_fits(study, estimates, rates)
    if dry_run:
        log(plan_text(study, estimates))
        if study.cluster.kind in BATCH_KINDS:
            from .batch import job_script

            log(f"each worker job of the {study.cluster.kind} cluster runs:\n"
                f"{job_script(study.cluster)}")
        return {"points": len(study.points), "ran": 0}
    os.makedirs(study.out, exist_ok=True)
    ran, t0 = 0, time.perf_counter()
    needs_cluster = any(not (p.spec.solver.method == "dense" and p.store is None)
                        and not _finished(p) for p in study.points)
    with folder_lock(study.out, f"--out {study.out!r}", "swept", OutputError), \
            study.cluster.connect(log) if needs_cluster else contextlib.nullcontext() as client:
        check_study_out(study.out)  # again, by the lock's holder
        _mark_study_out(study)
        os.makedirs(os.path.join(study.out, "points"), exist_ok=True)
        _note_other_points(study, log)
        for i, p in enumerate(study.points):
            if _finished(p):
                continue
            log(f"[{i + 1}/{len(study.points)}] {p.label}")
            run(p.spec, p.out, study.cluster, store=p.store, tile=p.tile, dtype=p.dtype,
                log=lambda msg: log(f"    {msg}"), client=client)
            ran += 1
            if study.storage == "delete" and p.store and not any(
                    q.store == p.store and not _finished(q) for q in study.points[i + 1:]):
                shutil.rmtree(p.store, ignore_errors=True)
            write_results(study)
            r = _finished(p)
            log(f"    λ_min = {r['lambda_min']}, {r['status']}, {r['wall_seconds']:.1f} s")
    rows = write_results(study)
    fits = write_fits(study, rows)
    return {"points": len(study.points), "ran": ran, "seconds": time.perf_counter() - t0,
            "results": os.path.join(study.out, RESULTS_CSV),
            "fits": os.path.join(study.out, FITS_CSV),
            "figures": _figures(study, rows, fits, log)}


def check_study_out(out: str) -> None:
    """Refuse (one line) an ``--out`` that is a file, or a folder with content but neither a
    study's mark nor its points (a run's result folder, a home folder): a sweep writes its
    table, fits, figures and points there."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out!r} exists and is not a folder"
                          + (" (a broken symbolic link)" if os.path.islink(out) else ""))
    try:
        held = set(os.listdir(out)) - {LOCK_FILE} if os.path.isdir(out) else set()
    except OSError as exc:
        raise OutputError(f"cannot read --out {out!r}: {exc.strerror or exc}") from None
    if held and not held & {STUDY_FILE, "points"}:
        what = "a run's results" if "result.json" in held or "spec.json" in held else \
            "no ntkdist study"
        raise OutputError(f"--out {out!r} is not empty and holds {what}; a sweep goes into "
                          "a new or empty folder, or one that holds a study")
    for name, kind, ok in ((STUDY_FILE, "file", os.path.isfile), ("points", "folder",
                                                                    os.path.isdir)):
        path = os.path.join(out, name)
        if name in held and (os.path.islink(path) or not ok(path)):
            raise OutputError(f"--out {out!r} holds {name} that is not a plain {kind}; "
                              "choose another folder")


def _mark_study_out(study: Study) -> None:
    path = os.path.join(study.out, STUDY_FILE)
    if os.path.exists(path):
        return
    try:
        write_json(path, {"ntkdist_study": study.name, "created": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as exc:
        raise OutputError(f"cannot write --out {study.out!r}: {exc.strerror or exc}") from None


def _note_other_points(study: Study, log) -> None:
    """Say so where the folder holds finished points that this study has not: the table,
    fits and figures are this study's alone, and those points stay where they are."""
    mine = {os.path.basename(p.out) for p in study.points}
    root = os.path.join(study.out, "points")
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise OutputError(f"cannot read {root!r}: {exc.strerror or exc}") from None
    other = sorted(name for name in names if name not in mine
                   and os.path.exists(os.path.join(root, name, "result.json")))
    if other:
        log(f"note: {len(other)} finished point(s) in {root} are not in this study (first: "
            f"{other[0]}): kept there, left out of {RESULTS_CSV}, fits and figures")


def _figures(study: Study, rows: list[dict], fits: list[dict], log) -> list[str]:
    try:
        from .figures import study_figures

        return study_figures(study, rows, fits)
    except ImportError:
        log("note: matplotlib is not installed; no figures (pip install matplotlib)")
        return []


def _row(p: Point, r: dict) -> dict:
    b = r.get("bounds") or {}
    prediction = b.get("prediction") or b.get("prediction_staircase")
    pred = prediction.get("value") if isinstance(prediction, dict) else None
    lam = r.get("lambda_min")
    store_bytes = None
    if p.store and r.get("operator_memory"):
        store_bytes = r["operator_memory"].get("tile_bytes")
    k = p.spec.kernel
    return {
        "point": p.label, "n": r["n"], "d": r["d"], "depth": r["depth"], "kernel": r["kernel"],
        "normalization": r["normalization"],
        "widths": ",".join(map(str, k.widths)) if k.finite else None,
        "width": max(k.widths) if k.finite else None,
        "weights_seed": k.weights_seed, "layer": k.layer,
        "data": r["data"] if p.spec.data.synthetic else p.spec.data.source,
        "seed": r["seed"], "method": r["spec"]["method"], "k": r["k"], "tol": r["spec"]["tol"],
        "status": r["status"], "lambda_min": lam,
        "lambda_over_d": None if lam is None else lam / r["d"],
        "residual_norm": r["residual_norm"],
        "certified_rel_accuracy": r["relative_accuracy"] if r["status"] in (
            "certified", "exact") else None,
        "lambda_min_lower_certified": r.get("lambda_min_lower_certified"),
        "lambda_min_upper_certified": r.get("lambda_min_upper_certified"),
        "lower_bound": b.get("lower"), "upper_bound": b.get("upper_min_diagonal"),
        "prediction": pred,
        "measured_over_predicted": None if lam is None or not pred else lam / pred,
        "passes": r.get("passes_total") if r.get("passes_total") is not None else r.get("passes"),
        "iterations": r.get("iterations"), "wall_seconds": r["wall_seconds"],
        "solver_seconds": r["solver_seconds"], "bytes_read": r.get("bytes_read"),
        "store_bytes": store_bytes, "limit_lambda_min": None,
        "theorem_scale": b.get("theorem_scale"),
        "width_condition_holds": b.get("assumptions_hold"), "spec_hash": r["spec_hash"],
    }


def collect(study: Study) -> list[dict]:
    """The finished points' rows, in the study's order; a finite-width row gets the λ_min of
    its limit (:func:`_limit_options`) where the study has it."""
    rows = []
    for p in study.points:
        r = _finished(p)
        if r is not None:
            rows.append(_row(p, r))
    limits = {(r["data"], r["seed"], r["n"], r["d"], r["normalization"], r["method"],
               r["kernel"], r["depth"]): r["lambda_min"]
              for r in rows if r["kernel"] in ("ntk", "nngp")}
    for r in rows:
        if r["width"] is not None:
            kind, depth = (("ntk", r["depth"]) if r["kernel"] == "empirical"
                           else ("nngp", r["layer"] + 1))
            r["limit_lambda_min"] = limits.get((r["data"], r["seed"], r["n"], r["d"],
                                                r["normalization"], r["method"], kind, depth))
    return rows


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(path: str, columns, rows) -> None:
    from .results import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_format(row.get(c)) for c in columns])
    write_text(path, buf.getvalue())


def write_results(study: Study) -> list[dict]:
    rows = collect(study)
    _write_csv(os.path.join(study.out, RESULTS_CSV), COLUMNS, rows)
    return rows


# ---------------------------------------------------------------------------------- fits

FIT_COLUMNS = ("kind", "kernel", "data", "depth", "d", "value", "ci_low", "ci_high",
               "points", "seeds", "note")


def _groups(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _t_quantile(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def fit_rows(rows: list[dict], fraction: float) -> list[dict]:
    """Per (kernel, data, depth, d): the exponent of λ_min in N (least squares on log-log per
    seed; mean over seeds with a 95 % t-interval, or the regression's own interval with one
    seed) and the crossover N* where the mean λ_min/d first falls below ``fraction`` of its
    value at the smallest N (log-linear interpolation); per (kernel, data, depth): the
    growth exponent of N* in d. Only certified values enter (``certified``, ``exact``): a
    value stopped at float64's rounding floor says nothing about the exponent."""
    import numpy as np

    ok = [r for r in certified_rows(rows) if r["lambda_min"] > 0]
    out = []
    from .figures import sort_key

    for (kernel, data, depth, d), group in sorted(_groups(
            ok, ("kernel", "data", "depth", "d")).items(), key=lambda kv: sort_key(kv[0])):
        by_seed = _groups(group, ("seed",))
        slopes, lone = [], None
        for seed_rows in by_seed.values():
            ns = np.log([r["n"] for r in seed_rows])
            if len(set(ns)) < 2:
                continue
            lam = np.log([r["lambda_min"] for r in seed_rows])
            A = np.vstack([ns, np.ones_like(ns)]).T
            coef, res, *_ = np.linalg.lstsq(A, lam, rcond=None)
            slopes.append(float(coef[0]))
            if len(ns) > 2:
                sigma2 = float(np.sum((A @ coef - lam) ** 2)) / (len(ns) - 2)
                lone = math.sqrt(sigma2 / float(np.sum((ns - ns.mean()) ** 2)))
                lone *= _t_quantile(len(ns) - 2)
        if slopes:
            mean = float(np.mean(slopes))
            if len(slopes) > 1:
                half = _t_quantile(len(slopes) - 1) * float(np.std(slopes, ddof=1)) / math.sqrt(
                    len(slopes))
                note = "mean over seeds, 95 % t-interval"
            else:
                half = lone if lone is not None else float("nan")
                note = "one seed: the regression's 95 % interval" if lone is not None else \
                    "one seed, two N: no interval"
            out.append({"kind": "exponent", "kernel": kernel, "data": data, "depth": depth,
                        "d": d, "value": mean, "ci_low": mean - half, "ci_high": mean + half,
                        "points": len(group), "seeds": len(slopes), "note": note})
        star = crossover(group, fraction)
        if star is not None:
            out.append({"kind": "crossover", "kernel": kernel, "data": data, "depth": depth,
                        "d": d, "value": star, "ci_low": None, "ci_high": None,
                        "points": len(group), "seeds": len(by_seed),
                        "note": f"N* where mean λ_min/d < {fraction:g} × its value at the "
                                "smallest N"})
    crossings = [r for r in out if r["kind"] == "crossover"]
    for (kernel, data, depth), group in _groups(crossings, ("kernel", "data", "depth")).items():
        if len({r["d"] for r in group}) < 2:
            continue
        x = np.log([r["d"] for r in group])
        y = np.log([r["value"] for r in group])
        slope = float(np.polyfit(x, y, 1)[0])
        out.append({"kind": "crossover_growth", "kernel": kernel, "data": data, "depth": depth,
                    "d": None, "value": slope, "ci_low": None, "ci_high": None,
                    "points": len(group), "seeds": None,
                    "note": "exponent of N* in d (log-log least squares over d)"})
    return out


def certified_rows(rows: list[dict]) -> list[dict]:
    """The rows whose λ_min is certified (or exactly 0): what fits and figures use."""
    return [r for r in rows if r["status"] in ("certified", "exact")
            and r["lambda_min"] not in (None, "")]


def crossover(group: list[dict], fraction: float) -> float | None:
    """N* at which the mean over seeds of λ_min/d first falls below ``fraction`` of its value
    at the smallest N, interpolated in log N and log λ; None if it never does."""
    import numpy as np

    by_n = _groups(group, ("n",))
    ns = sorted(k[0] for k in by_n)
    means = [float(np.mean([r["lambda_min"] / r["d"] for r in by_n[(n,)]])) for n in ns]
    if len(ns) < 2:
        return None
    target = fraction * means[0]
    for i in range(1, len(ns)):
        if means[i] < target:
            a, b = math.log(means[i - 1]), math.log(means[i])
            w = (math.log(target) - a) / (b - a) if b != a else 1.0
            return float(math.exp(math.log(ns[i - 1]) + w * (math.log(ns[i]) - math.log(ns[i - 1]))))
    return None


def write_fits(study: Study, rows: list[dict]) -> list[dict]:
    fits = fit_rows(rows, study.crossover_fraction)
    _write_csv(os.path.join(study.out, FITS_CSV), FIT_COLUMNS, fits)
    return fits
