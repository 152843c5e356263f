"""What a run is: four typed specs, and the content hash that names its result.

* :class:`DataSpec`: the rows (a synthetic generator with its seed, or a file with its
  SHA-256), N and d;
* :class:`KernelSpec`: which kernel of the rows (``ntk`` or ``nngp``, depth, normalisation);
* :class:`SolverSpec`: how its smallest eigenvalues are found and certified;
* :class:`ClusterSpec`: where the work runs (a local cluster, or a running scheduler by
  address or scheduler file), and on which device.

A :class:`RunSpec` is data + kernel + solver; the cluster does not change the numbers, so it
is not part of the hash. The hash is the SHA-256 of the spec's flat dict (:meth:`RunSpec.
to_dict`), the form result folders and stores have recorded since 0.1.0: their hashes are
unchanged. A :class:`StoreSpec` is data + kernel + the store's tiling and dtype.

Specs come from command-line flags or a TOML file (:mod:`ntkdist.config`); both go through
the constructors here (:func:`make_data_spec`, :func:`make_kernel_spec`,
:func:`make_solver_spec`, :func:`make_cluster_spec`), which refuse a bad value with one
line naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace

from .data import (SYNTHETIC, check_dtype, check_rows, distinct_rows, file_sha256, load_array,
                   synthetic_rows)
from .errors import SpecError
from .kernels.limiting import KERNELS, NORMALIZATIONS

#: Every kernel kind: the limits and the finite-width networks'.
ALL_KERNELS = (*KERNELS, "empirical", "features")

METHODS = ("dense", "lobpcg", "davidson", "lanczos")
OPERATORS = ("auto", "store", "memory", "recompute")
PRECISIONS = ("auto", "float64", "mixed")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "gpu")
BATCH_KINDS = ("slurm", "pbs")
CLUSTER_KINDS = ("local", *BATCH_KINDS, "address", "scheduler_file")
#: Fields of a run's flat dict that choose the solver, not the matrix.
SOLVER_FIELDS = ("method", "k", "tol", "block", "precond", "operator", "precision",
                 "max_products", "certify")
#: Proofs that may follow the solve: none, or a Cholesky factorisation of K − σI
#: (:mod:`ntkdist.solvers.cholesky`).
CERTIFY = ("none", "cholesky")
#: Deepest network accepted (the recursion and the lower-bound chain are O(L) per entry).
MAX_DEPTH = 100000
#: Local clusters: at most this many worker processes per core.
MAX_WORKERS_PER_CORE = 8
#: Smallest memory limit per worker (a Dask worker alone takes ~100 MB).
MIN_WORKER_MEMORY = 256 * 2 ** 20


def spec_differences(old: dict, new: dict) -> list[str]:
    """["depth (3 ≠ 4)", "seed (0 ≠ 1)"]: the fields in which two spec dicts differ (a nested
    ``problem`` dict, as in store specs, is compared field by field), old value first."""
    def flat(d):
        d = dict(d) if isinstance(d, dict) else {}
        problem = d.pop("problem", {})
        return {**(problem if isinstance(problem, dict) else {}), **d}

    def show(value):
        text = str(value)
        return text if len(text) <= 40 else "…" + text[-39:]

    old, new = flat(old), flat(new)
    return [f"{k} ({show(old.get(k))} ≠ {show(new.get(k))})"
            for k in list(new) + [k for k in old if k not in new] if old.get(k) != new.get(k)]


def content_hash(obj: dict) -> str:
    """SHA-256 of the canonical JSON form of a spec dict."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the four specs

@dataclass(frozen=True)
class DataSpec:
    """The rows: ``source`` is ``sphere``, ``gaussian`` or the input file's absolute path."""

    source: str
    n: int
    d: int
    seed: int | None = None  # synthetic data only
    input_sha256: str | None = None  # file data only
    #: ``dedupe``: the first ``n_input`` rows of the source with repeated rows dropped (first
    #: occurrences kept, in order); ``n`` is then the number of distinct rows.
    dedupe: bool = False
    n_input: int | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise SpecError(f"data must be sphere, gaussian or a path, got {self.source!r}")
        _positive_int(self.n, "n", 2)
        _positive_int(self.d, "d")

    @property
    def synthetic(self) -> bool:
        return self.source in SYNTHETIC

    def rows(self, start: int = 0, stop: int | None = None):
        """Rows [start, stop) of the input, float64."""
        import numpy as np

        stop = self.n if stop is None else stop
        if self.dedupe:
            X = self._source_rows(0, self.n_input)
            return np.ascontiguousarray(X[distinct_rows(X)[start:stop]])
        return self._source_rows(start, stop)

    def _source_rows(self, start: int, stop: int):
        import numpy as np

        if self.synthetic:
            return synthetic_rows(self.source, self.d, self.seed, start, stop)
        return np.asarray(load_array(self.source)[start:stop], dtype=np.float64)

    def fields(self) -> tuple[dict, dict]:
        """The data's part of a flat spec dict (0.1.0 names: the source is ``data``), as
        (source, n, d) and (seed, input hash, and the dedupe fields when set)."""
        out = {"data": self.source, "n": self.n, "d": self.d}
        extra = {"seed": self.seed, "input_sha256": self.input_sha256}
        if self.dedupe:  # specs (and stores) written without these fields keep their hash
            extra.update(dedupe=True, n_input=self.n_input)
        return out, extra


@dataclass(frozen=True)
class KernelSpec:
    """Which kernel matrix of the rows: a limiting kernel (``ntk``, ``nngp``) or a finite-width
    network's (``empirical``: the empirical NTK JJᵀ; ``features``: hidden layer ``layer``'s
    feature Gram) with hidden ``widths`` and weights from ``weights_seed``
    (:mod:`ntkdist.kernels.finite`). The finite-width fields are written to the spec dict only
    when set, so the hashes of the limiting kernels do not change."""

    kind: str = "ntk"
    depth: int = 1
    normalization: str = "paper"
    widths: tuple | None = None
    weights_seed: int | None = None
    layer: int | None = None

    def __post_init__(self):
        from .kernels.finite import FINITE_KERNELS, FINITE_NORMALIZATIONS, check_seed, check_widths

        _choice(self.kind, "kernel", ALL_KERNELS)
        _positive_int(self.depth, "depth")
        if self.depth > MAX_DEPTH:
            raise SpecError(f"depth must be at most {MAX_DEPTH}, got {self.depth}")
        if self.kind not in FINITE_KERNELS:
            for name in ("widths", "weights_seed", "layer"):
                if getattr(self, name) is not None:
                    raise SpecError(f"{name.replace('_', ' ')} applies to --kernel empirical "
                                    f"or features, not {self.kind}")
            _choice(self.normalization, "normalization", NORMALIZATIONS)
            return
        _choice(self.normalization, "normalization", FINITE_NORMALIZATIONS)
        if self.widths is None:
            raise SpecError(f"--kernel {self.kind} needs --widths n1,...,n_(L-1) (the hidden "
                            "layers' widths)")
        object.__setattr__(self, "widths", check_widths(self.widths))
        if self.depth != len(self.widths) + 1:
            raise SpecError(f"depth {self.depth} does not match the {len(self.widths)} hidden "
                            f"width(s) given (depth = number of widths + 1 = "
                            f"{len(self.widths) + 1}); leave --depth out")
        object.__setattr__(self, "weights_seed", check_seed(
            0 if self.weights_seed is None else self.weights_seed))
        if self.kind == "features":
            layer = self.depth - 1 if self.layer is None else self.layer
            if isinstance(layer, bool) or not isinstance(layer, int) or \
                    not 1 <= layer <= self.depth - 1:
                raise SpecError(f"layer must be an integer in 1..{self.depth - 1} (a hidden "
                                f"layer of the {len(self.widths)} given), got {layer!r}")
            object.__setattr__(self, "layer", layer)
        elif self.layer is not None:
            raise SpecError("layer applies to --kernel features")

    @property
    def finite(self) -> bool:
        return self.widths is not None

    def fields(self) -> dict:
        out = {"depth": self.depth, "kernel": self.kind, "normalization": self.normalization}
        if self.finite:
            out.update(widths=list(self.widths), weights_seed=self.weights_seed)
            if self.layer is not None:
                out["layer"] = self.layer
        return out

    def describe(self) -> str:
        """One line: kind, depth, widths, normalisation."""
        if not self.finite:
            return f"{self.kind} depth {self.depth} ({self.normalization} normalization)"
        what = "empirical NTK" if self.kind == "empirical" else f"layer {self.layer} features"
        return (f"{what}, widths {','.join(map(str, self.widths))} (depth {self.depth}), "
                f"weights seed {self.weights_seed} ({self.normalization} normalization)")

    def _weights(self, d: int):
        from .kernels.finite import SeededWeights

        return SeededWeights(d, self.widths, self.weights_seed)

    def factor(self, d: int) -> float:
        """Finite kinds: the normalisation factor of the raw matrix."""
        from .kernels.finite import normalization_factor

        return normalization_factor(self.widths, self.kind, self.normalization, d, self.layer)

    def features(self, rows, name: str = "rows"):
        """What a row block contributes to its tiles: unit rows and norms
        (:func:`ntkdist.kernels.row_block`) for the limiting kernels; for finite widths the
        block's features and backward vectors (:func:`ntkdist.kernels.finite.block_features`),
        computed from the seeded weights. NumPy or CuPy, as the rows."""
        if not self.finite:
            from .kernels.limiting import row_block

            return row_block(rows, name)
        from .kernels.finite import block_features

        d = int(rows.shape[1])
        return block_features(rows, self._weights(d), self.kind, self.layer, self.factor(d),
                              name)

    def feature_columns(self, d: int) -> int:
        """Finite widths: float64 values per row that :meth:`features` holds (what sizes
        their row blocks); 0 for the limits, whose row blocks are the rows."""
        if not self.finite:
            return 0
        from .kernels.finite import feature_columns

        return feature_columns(d, self.widths, self.kind, self.layer)

    def growth(self) -> float:
        """A bound on K_ii/‖x_i‖² up to fluctuations (L; for finite widths L·Π n_l, the raw
        matrix's scale), for refusing rows whose kernel would overflow."""
        if not self.finite:
            return float(self.depth)
        return float(self.depth) * math.prod(float(n) for n in self.widths)

    def gram(self, X, Y=None):
        """The dense kernel matrix K(X, Y) (K(X, X) without Y), float64."""
        if self.finite:
            from .kernels.limiting import array_module

            A = self.features(X, "X")
            if Y is None:
                K = self.tile(A, A)
                xp = array_module(K)
                return xp.triu(K) + xp.triu(K, 1).T
            return self.tile(A, self.features(Y, "Y"))
        from .kernels.limiting import nngp, ntk

        return (ntk if self.kind == "ntk" else nngp)(X, Y, depth=self.depth,
                                                    normalization=self.normalization)

    def tile(self, A, B):
        """K between two row blocks' :meth:`features`, NumPy or CuPy."""
        if self.finite:
            from .kernels.finite import finite_tile

            return finite_tile(A, B)
        from .kernels.limiting import kernel_tile

        return kernel_tile(A, B, self.depth, self.kind, self.normalization)

    def diagonal(self, A):
        """K_ii of a row block's :meth:`features` (finite widths), float64 on its module."""
        from .kernels.finite import finite_diagonal

        return finite_diagonal(A)


@dataclass(frozen=True)
class SolverSpec:
    """How the smallest eigenvalues are found. ``checkpoint_every`` (seconds between saves
    of the Ritz block) does not change the numbers and is not part of the hash."""

    method: str = "dense"
    k: int = 1
    tol: float = 1e-8
    block: int | None = None
    precond: str = "auto"
    operator: str = "auto"
    precision: str = "auto"
    max_products: int = 600
    certify: str = "none"
    checkpoint_every: float = field(default=60.0, compare=False)

    def fields(self) -> dict:
        """The fields that are part of the spec (``certify`` only when asked for, so that
        the hashes of specs without it stay what they were)."""
        return {name: getattr(self, name) for name in SOLVER_FIELDS
                if not (name == "certify" and self.certify == "none")}


@dataclass(frozen=True)
class ClusterSpec:
    """Where the work runs.

    ``kind``: ``local`` (a LocalCluster of ``workers`` processes with ``memory_limit`` each),
    ``slurm`` or ``pbs`` (workers started as batch jobs through dask-jobqueue: ``jobs`` jobs of
    ``cores`` cores and ``memory`` each, ``processes`` workers a job), ``address`` (a running
    scheduler) or ``scheduler_file``; and the device the products run on. The batch fields are
    described in :mod:`ntkdist.batch`."""

    kind: str = "local"  # local | slurm | pbs | address | scheduler_file
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    memory_limit: str | None = None
    device: str = "cpu"
    # batch jobs (kind slurm or pbs)
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    cores: int | None = None
    memory: str | None = None
    jobs: int | None = None
    processes: int | None = None
    gpus_per_job: int | None = None
    interface: str | None = None
    local_directory: str | None = None
    job_prologue: tuple = ()
    adapt: tuple | None = None
    worker_timeout: float | None = None
    job_logs: str | None = None

    def __post_init__(self):
        _choice(self.kind, "cluster kind", CLUSTER_KINDS)
        _choice(self.device, "device", DEVICES)
        if self.workers is not None:
            _positive_int(self.workers, "workers")

    def connect(self, log=None):
        """A context manager yielding a ``distributed.Client`` (:func:`ntkdist.cluster.
        connect`; batch kinds: :func:`ntkdist.batch.connect_batch`, which reports the workers
        it waits for through ``log``)."""
        if self.kind in BATCH_KINDS:
            from .batch import connect_batch

            return connect_batch(self, log=log)
        from .cluster import connect

        return connect(scheduler=self.scheduler, scheduler_file=self.scheduler_file,
                       workers=self.workers, memory_limit=self.memory_limit,
                       device=self.device)

    @property
    def explicit(self) -> bool:
        """Whether the user chose a cluster (an address, a scheduler file, a batch system or a
        worker count)."""
        return self.kind != "local" or self.workers is not None

    @property
    def min_workers(self) -> int:
        """Workers a batch cluster waits for before work starts: its jobs' (with adapt, its
        minimum's, at least one job's)."""
        jobs = max(1, self.adapt[0]) if self.adapt else (self.jobs or 1)
        return jobs * (self.processes or 1)

    @property
    def expected_workers(self) -> int | None:
        """Workers the cluster will have, where known: a local cluster's count (None: one per
        core), a batch cluster's jobs × processes (with adapt, its maximum)."""
        if self.kind in BATCH_KINDS:
            jobs = self.adapt[1] if self.adapt else (self.jobs or 1)
            return jobs * (self.processes or 1)
        return self.workers


@dataclass(frozen=True)
class RunSpec:
    """Everything a result depends on. Two runs with equal specs give the same numbers."""

    data: DataSpec
    kernel: KernelSpec
    solver: SolverSpec = SolverSpec()

    @property
    def n(self) -> int:
        return self.data.n

    @property
    def d(self) -> int:
        return self.data.d

    def to_dict(self) -> dict:
        """The flat spec dict (the names and order result.json has had since 0.1.0)."""
        head, extra = self.data.fields()
        return {**head, **self.kernel.fields(), "seed": extra.pop("seed"),
                "input_sha256": extra.pop("input_sha256"), **self.solver.fields(), **extra}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """The inverse of :meth:`to_dict` (a result's or a store's recorded spec)."""
        known = {"data", "n", "d", "depth", "kernel", "normalization", "seed", "input_sha256",
                 "dedupe", "n_input", "widths", "weights_seed", "layer", *SOLVER_FIELDS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s) {', '.join(unknown)}")
        data = DataSpec(source=d["data"], n=d["n"], d=d["d"], seed=d.get("seed"),
                        input_sha256=d.get("input_sha256"), dedupe=d.get("dedupe", False),
                        n_input=d.get("n_input"))
        widths = d.get("widths")
        kernel = KernelSpec(kind=d.get("kernel", "ntk"), depth=d["depth"],
                            normalization=d.get("normalization", "paper"),
                            widths=None if widths is None else tuple(widths),
                            weights_seed=d.get("weights_seed"), layer=d.get("layer"))
        solver = SolverSpec(**{k: d[k] for k in SOLVER_FIELDS if k in d})
        return cls(data, kernel, solver)

    def hash(self) -> str:
        return content_hash(self.to_dict())

    def problem(self) -> dict:
        """The fields that define the kernel matrix (everything but the solver)."""
        out = self.to_dict()
        for name in SOLVER_FIELDS:
            out.pop(name, None)
        return out

    def with_solver(self, solver: SolverSpec | None = None, **options) -> "RunSpec":
        """This problem with another (validated) solver: a SolverSpec, or options changed."""
        solver = replace(solver or self.solver, **options)
        check_solver(solver, self.n)
        return replace(self, solver=solver)

    def rows(self, start: int = 0, stop: int | None = None):
        return self.data.rows(start, stop)


@dataclass(frozen=True)
class StoreSpec:
    """What a kernel store holds: the matrix (data and kernel), its tiling and storage dtype.

    Tiles depend only on this spec and their indices, so a store is resumable exactly when
    the spec hash of the command matches the one recorded in the store. On disk (the store's
    attributes) it is ``{"problem": {…}, "tile", "dtype", "ntkdist_version"}`` with the flat
    problem dict of :meth:`RunSpec.problem`, as written since 0.1.0.
    """

    data: DataSpec
    kernel: KernelSpec
    tile: int
    dtype: str
    ntkdist_version: str

    @property
    def n(self) -> int:
        return self.data.n

    @property
    def blocks(self) -> int:
        return -(-self.n // self.tile)

    @property
    def problem(self) -> dict:
        return self.run_spec().problem()

    def to_dict(self) -> dict:
        return {"problem": self.problem, "tile": self.tile, "dtype": self.dtype,
                "ntkdist_version": self.ntkdist_version}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreSpec":
        run = RunSpec.from_dict(d["problem"])
        return cls(run.data, run.kernel, d["tile"], d["dtype"], d["ntkdist_version"])

    def hash(self) -> str:
        return content_hash(self.to_dict())

    def run_spec(self, solver: SolverSpec | None = None) -> RunSpec:
        """The problem of this store, with default (or the given) solver options."""
        return RunSpec(self.data, self.kernel, solver or SolverSpec())


# ----------------------------------------------------------------------------- validation

def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(value, name: str, choices) -> str:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_solver(solver: SolverSpec, n: int) -> None:
    """Refuse solver values that cannot work, with one line. Whether they fit together with
    the data, the store, the cluster and the device is the plan's to say
    (:func:`ntkdist.operator.plan.make_plan`)."""
    _choice(solver.method, "method", METHODS)
    _choice(solver.certify, "certify", CERTIFY)
    k = solver.k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise SpecError(f"k must be an integer in [1, N-1] = [1, {n - 1}], got {k!r}")
    tol = solver.tol
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise SpecError(f"tol must be in (0, 1), got {tol!r}")
    if solver.block is not None:  # a block below k + 1 is raised by the solvers, and said so
        _positive_int(solver.block, "block")
    base, _, arg = str(solver.precond).partition(":")
    if not isinstance(solver.precond, str) or base not in (
            "auto", "harmonic", "nystrom", "none", "shift") or (
            arg and base not in ("nystrom", "harmonic")) or (
            arg and not (arg.isdigit() and int(arg) >= 1)) or (
            base == "harmonic" and arg and int(arg) not in (1, 2, 3)):
        raise SpecError("precond must be auto, harmonic[:DEGREE 1-3], nystrom[:RANK], shift "
                        f"or none, got {solver.precond!r}")
    _choice(solver.operator, "operator", OPERATORS)
    _choice(solver.precision, "precision", PRECISIONS)
    _positive_int(solver.max_products, "max_products")
    every = solver.checkpoint_every
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not (
            every >= 0 and math.isfinite(every)):
        raise SpecError(f"checkpoint_every must be a finite number of seconds >= 0, "
                        f"got {every!r}")


def make_solver_spec(n: int, **options) -> SolverSpec:
    """A validated SolverSpec; options left out (or None) take their defaults."""
    solver = SolverSpec(**{k: v for k, v in options.items() if v is not None})
    check_solver(solver, n)
    return solver


def make_kernel_spec(kind: str = "ntk", depth: int | None = None,
                     normalization: str | None = None, widths=None, weights_seed=None,
                     layer=None) -> KernelSpec:
    """A validated KernelSpec. Finite widths: the depth follows from ``widths`` (a given one
    must agree), the weights seed defaults to 0, the layer of ``features`` to the last hidden
    one."""
    if kind in ("empirical", "features") and widths is not None:
        from .kernels.finite import check_widths

        widths = check_widths(widths)
        depth = len(widths) + 1 if depth is None else depth
    if depth is None:
        if kind in ("empirical", "features"):
            raise SpecError(f"--kernel {kind} needs --widths n1,...,n_(L-1) (the hidden "
                            "layers' widths)")
        raise SpecError("depth is required (the network depth L >= 1)")
    return KernelSpec(kind=kind, depth=depth, normalization=normalization or "paper",
                      widths=widths, weights_seed=weights_seed, layer=layer)


#: Options of a batch cluster (kind slurm or pbs), as ClusterSpec fields.
BATCH_OPTIONS = ("queue", "account", "walltime", "cores", "memory", "jobs", "processes",
                 "gpus_per_job", "interface", "local_directory", "job_prologue", "adapt",
                 "worker_timeout", "job_logs")


def make_cluster_spec(scheduler: str | None = None, scheduler_file: str | None = None,
                      workers: int | None = None, memory_limit: str | None = None,
                      device: str = "cpu", kind: str | None = None, **batch) -> ClusterSpec:
    """A validated ClusterSpec. ``kind`` (local, slurm, pbs) may be left out: it follows from
    what is given (an address, a scheduler file, else local). ``batch``: the
    :data:`BATCH_OPTIONS` of a slurm or pbs cluster (None: not given)."""
    unknown = set(batch) - set(BATCH_OPTIONS)
    if unknown:
        raise SpecError(f"unknown cluster option {sorted(unknown)[0]}")
    batch = {k: v for k, v in batch.items() if v is not None and v != [] and v != ()}
    if scheduler and scheduler_file:
        raise SpecError("give either scheduler (--scheduler) or scheduler_file "
                        "(--scheduler-file), not both")
    if kind is not None:
        _choice(kind, "cluster", ("local", *BATCH_KINDS))
        if scheduler or scheduler_file:
            which = "scheduler" if scheduler else "scheduler_file"
            raise SpecError(f"cluster {kind} starts its own scheduler; {which} attaches to a "
                            "running one: give one of them")
    for name, value in (("scheduler", scheduler), ("scheduler_file", scheduler_file),
                        ("memory_limit", memory_limit)):
        if value is not None and (not isinstance(value, str) or not value):
            raise SpecError(f"{name} must be a non-empty string, got {value!r}")
    kind = kind or ("address" if scheduler else "scheduler_file" if scheduler_file else "local")
    device = _choice(device, "device", DEVICES)
    if kind in BATCH_KINDS:
        for name, value in (("workers", workers), ("memory_limit", memory_limit)):
            if value is not None:
                raise SpecError(f"{name} is for a local cluster; a {kind} cluster takes jobs, "
                                "cores, memory and processes (per job)")
        from .batch import check_batch_options

        return ClusterSpec(kind=kind, device=device, **check_batch_options(kind, device, batch))
    if batch:
        name = sorted(batch, key=BATCH_OPTIONS.index)[0]
        raise SpecError(f"{name} applies to a batch cluster (cluster slurm or pbs), not to a "
                        f"{'local cluster' if kind == 'local' else 'running scheduler'}")
    if workers is not None:
        from .cluster import _cpu_count

        _positive_int(workers, "workers")
        if not (scheduler or scheduler_file) and workers > MAX_WORKERS_PER_CORE * _cpu_count():
            raise SpecError(f"workers must be at most {MAX_WORKERS_PER_CORE} per core for a "
                            f"local cluster ({MAX_WORKERS_PER_CORE * _cpu_count()} here), got "
                            f"{workers}")
    if memory_limit not in (None, "auto"):
        parse_size(memory_limit, "memory_limit")
        from dask.utils import parse_bytes

        if parse_bytes(memory_limit) < MIN_WORKER_MEMORY:
            raise SpecError(f"memory_limit must be at least 256MiB (a Dask worker alone takes "
                            f"about 100 MB), got {memory_limit!r}")
    return ClusterSpec(kind=kind, scheduler=scheduler, scheduler_file=scheduler_file,
                       workers=workers, memory_limit=memory_limit, device=device)


def parse_size(value, name: str) -> int:
    """Bytes of a size such as 4GB or 500MiB; a SpecError naming ``name`` otherwise."""
    from dask.utils import parse_bytes

    try:
        if not isinstance(value, str) or parse_bytes(value) <= 0:
            raise ValueError
        return int(parse_bytes(value))
    except (ValueError, TypeError, OverflowError):
        raise SpecError(f"{name} must be a size such as 4GB or 500MiB, got {value!r}") from None


def make_data_spec(source: str = "sphere", n: int | None = None, d: int | None = None,
                   seed: int | None = None, dedupe: bool = False,
                   growth: float = 1) -> DataSpec:
    """Validate the data choices (reads a file input's shape and hash).

    ``dedupe``: drop repeated rows (keeping first occurrences), so that λ_min is that of the
    distinct rows; the rows are read once here to count them (checked for the kernel's ``growth``,
    :meth:`KernelSpec.growth`)."""
    if not isinstance(source, str) or not source:
        raise SpecError(f"data must be sphere, gaussian or a path, got {source!r}")
    if source in SYNTHETIC:
        if n is None or d is None:
            raise SpecError(f"synthetic data {source!r} needs --n and --d")
        n = _positive_int(n, "n", 2)
        d = _positive_int(d, "d")
        seed = 0 if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"seed must be an integer >= 0, got {seed!r}")
        spec = DataSpec(source=source, n=n, d=d, seed=seed)
        _check_client_memory(n, d)
    else:
        spec = _file_data(source, n, d, seed)
    if not isinstance(dedupe, bool):
        raise SpecError(f"dedupe must be true or false, got {dedupe!r}")
    if not dedupe:
        return spec
    X = spec.rows()
    check_rows(X, name=spec.source, growth=growth)
    kept = len(distinct_rows(X))
    if kept < 2:
        raise SpecError(f"{spec.source!r} has {kept} distinct row(s) among its first {spec.n}; "
                        "at least 2 are needed (N < 2)")
    return replace(spec, n=kept, dedupe=True, n_input=spec.n)


def _check_client_memory(n: int, d: int) -> None:
    """The rows are held in this process (float64): refuse more than half its memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = 8 * n * d
    if need > total / 2:
        raise SpecError(f"n must fit in memory: {n} rows of d = {d} take {need / 1e9:.3g} GB "
                        f"in this process, more than half of its {total / 1e9:.3g} GB")


def _file_data(source, n, d, seed) -> DataSpec:
    if seed is not None:
        raise SpecError("--seed applies to synthetic data only, not to an input file")
    path = os.path.abspath(os.path.expanduser(source))
    arr = load_array(path)
    shape = getattr(arr, "shape", ())
    if len(shape) != 2:
        check_rows(arr, name=source)  # raises the one-line shape error
    check_dtype(arr, source)
    rows, cols = (int(v) for v in shape)
    if rows < 2:
        raise SpecError(f"{source!r} has {rows} row(s); at least 2 are needed (N < 2)")
    if d is not None and _positive_int(d, "d") != cols:
        raise SpecError(f"--d {d} does not match the {cols} columns of {source!r}")
    if n is not None:
        n = _positive_int(n, "n", 2)
        if n > rows:
            raise SpecError(f"--n {n} exceeds the {rows} rows of {source!r}")
    n = rows if n is None else n
    _check_client_memory(n, cols)
    return DataSpec(source=path, n=n, d=cols, input_sha256=file_sha256(path))


def make_spec(*, data: str = "sphere", n: int | None = None, d: int | None = None,
              depth: int | None = None, kernel: str = "ntk", normalization: str = "paper",
              seed: int | None = None, method: str = "dense", dedupe: bool = False,
              widths=None, weights_seed: int | None = None,
              layer: int | None = None) -> RunSpec:
    """A validated :class:`RunSpec` from plain values (the solver with its defaults and
    ``method``); finite widths: ``widths`` (the depth follows), ``weights_seed``, ``layer``."""
    kernel_spec = make_kernel_spec(kernel, depth, normalization, widths, weights_seed, layer)
    data_spec = make_data_spec(data, n, d, seed, dedupe, growth=kernel_spec.growth())
    return RunSpec(data_spec, kernel_spec, make_solver_spec(data_spec.n, method=method))


def check_layout(tile: int | None, dtype: str | None) -> None:
    """A store's tile side and dtype, where given."""
    if tile is not None:
        _positive_int(tile, "tile")
    if dtype is not None:
        _choice(dtype, "dtype", DTYPES)


def make_store_spec(run_spec: RunSpec, tile: int, dtype: str) -> StoreSpec:
    from . import __version__

    check_layout(tile, dtype)
    return StoreSpec(run_spec.data, run_spec.kernel, tile=min(tile, run_spec.n), dtype=dtype,
                     ntkdist_version=__version__)
