"""The run description: what data, which kernel, how it is solved, and its content hash."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from .data import (SYNTHETIC, check_dtype, check_rows, distinct_rows, file_sha256, load_array,
                   synthetic_rows)
from .errors import SpecError
from .kernels.limiting import KERNELS, NORMALIZATIONS

METHODS = ("dense", "lobpcg", "davidson", "lanczos")
OPERATORS = ("auto", "store", "memory", "recompute")
#: Fields of RunSpec that choose the solver, not the matrix.
SOLVER_FIELDS = ("method", "k", "tol", "block", "precond", "operator", "precision",
                 "max_products")
PRECISIONS = ("auto", "float64", "mixed")
DTYPES = ("float32", "float64")


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


@dataclass(frozen=True)
class RunSpec:
    """Everything a result depends on. Two runs with equal specs give the same numbers."""

    data: str  # "sphere", "gaussian" or the input file's absolute path
    n: int
    d: int
    depth: int
    kernel: str = "ntk"
    normalization: str = "paper"
    seed: int | None = None  # synthetic data only
    input_sha256: str | None = None  # file data only
    method: str = "dense"
    k: int = 1
    tol: float = 1e-8
    block: int | None = None
    precond: str = "auto"
    operator: str = "auto"
    precision: str = "auto"
    max_products: int = 600
    #: ``--dedupe``: the first ``n_input`` rows of the source with repeated rows dropped (first
    #: occurrences kept, in order); ``n`` is then the number of distinct rows.
    dedupe: bool = False
    n_input: int | None = None

    @property
    def synthetic(self) -> bool:
        return self.data in SYNTHETIC

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.dedupe:  # specs (and stores) written without these fields keep their hash
            del out["dedupe"], out["n_input"]
        return out

    def hash(self) -> str:
        return content_hash(self.to_dict())

    def problem(self) -> dict:
        """The fields that define the kernel matrix (everything but the solver)."""
        out = self.to_dict()
        for name in SOLVER_FIELDS:
            del out[name]
        return out

    def with_solver(self, **options) -> "RunSpec":
        """This problem with other (validated) solver options."""
        from dataclasses import replace

        spec = replace(self, **options)
        check_solver(spec)
        return spec

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
            return synthetic_rows(self.data, self.d, self.seed, start, stop)
        return np.asarray(load_array(self.data)[start:stop], dtype=np.float64)


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_solver(spec: RunSpec) -> None:
    """Refuse solver options that cannot work, with one line."""
    if spec.method not in METHODS:
        raise SpecError(f"method must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if isinstance(spec.k, bool) or not isinstance(spec.k, int) or not 1 <= spec.k < spec.n:
        raise SpecError(f"k must be an integer in [1, N-1] = [1, {spec.n - 1}], got {spec.k!r}")
    if not (isinstance(spec.tol, (int, float)) and 0 < spec.tol < 1):
        raise SpecError(f"tol must be in (0, 1), got {spec.tol!r}")
    if spec.block is not None:  # a block below k + 1 is raised by the solvers, and said so
        _positive_int(spec.block, "block")
    base, _, arg = spec.precond.partition(":")
    if base not in ("auto", "harmonic", "nystrom", "none") or (arg and base != "nystrom") or (
            arg and not (arg.isdigit() and int(arg) >= 1)):
        raise SpecError(f"precond must be auto, harmonic, nystrom[:RANK] or none, "
                        f"got {spec.precond!r}")
    if spec.operator not in OPERATORS:
        raise SpecError(f"operator must be one of {', '.join(OPERATORS)}, got {spec.operator!r}")
    if spec.precision not in PRECISIONS:
        raise SpecError(f"precision must be one of {', '.join(PRECISIONS)}, "
                        f"got {spec.precision!r}")
    if spec.precision == "mixed" and spec.method not in ("lobpcg", "davidson"):
        raise SpecError(f"--precision mixed applies to --method lobpcg or davidson, "
                        f"not {spec.method}")
    if spec.precision == "mixed" and spec.operator in ("store", "recompute"):
        raise SpecError(f"--precision mixed needs the memory operator (tiles kept in worker "
                        f"memory), not --operator {spec.operator}")
    _positive_int(spec.max_products, "max_products")


def make_spec(*, data: str = "sphere", n: int | None = None, d: int | None = None,
              depth: int, kernel: str = "ntk", normalization: str = "paper",
              seed: int | None = None, method: str = "dense", dedupe: bool = False) -> RunSpec:
    """Validate user choices and build a :class:`RunSpec` (reads a file input's shape and hash).

    ``dedupe``: drop repeated rows (keeping first occurrences), so that λ_min is that of the
    distinct rows; the rows are read once here to count them."""
    spec = _make_spec(data=data, n=n, d=d, depth=depth, kernel=kernel,
                      normalization=normalization, seed=seed, method=method)
    if not dedupe:
        return spec
    from dataclasses import replace

    X = spec.rows()
    check_rows(X, name=spec.data, depth=depth)
    kept = len(distinct_rows(X))
    if kept < 2:
        raise SpecError(f"{spec.data!r} has {kept} distinct row(s) among its first {spec.n}; "
                        "at least 2 are needed (N < 2)")
    return replace(spec, n=kept, dedupe=True, n_input=spec.n)


def _make_spec(*, data, n, d, depth, kernel, normalization, seed, method) -> RunSpec:
    depth = _positive_int(depth, "depth")
    if kernel not in KERNELS:
        raise SpecError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if normalization not in NORMALIZATIONS:
        raise SpecError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                        f"got {normalization!r}")
    if method not in METHODS:
        raise SpecError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if data in SYNTHETIC:
        if n is None or d is None:
            raise SpecError(f"synthetic data {data!r} needs --n and --d")
        n = _positive_int(n, "n", 2)
        d = _positive_int(d, "d")
        seed = 0 if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SpecError(f"seed must be an integer >= 0, got {seed!r}")
        return RunSpec(data=data, n=n, d=d, depth=depth, kernel=kernel,
                       normalization=normalization, seed=seed, method=method)
    if seed is not None:
        raise SpecError("--seed applies to synthetic data only, not to an input file")
    path = os.path.abspath(data)
    arr = load_array(path)
    shape = getattr(arr, "shape", ())
    if len(shape) != 2:
        check_rows(arr, name=data)  # raises the one-line shape error
    check_dtype(arr, data)
    rows, cols = (int(v) for v in shape)
    if rows < 2:
        raise SpecError(f"{data!r} has {rows} row(s); at least 2 are needed (N < 2)")
    if d is not None and d != cols:
        raise SpecError(f"--d {d} does not match the {cols} columns of {data!r}")
    if n is not None:
        n = _positive_int(n, "n", 2)
        if n > rows:
            raise SpecError(f"--n {n} exceeds the {rows} rows of {data!r}")
    n = rows if n is None else n
    return RunSpec(data=path, n=n, d=cols, depth=depth, kernel=kernel,
                   normalization=normalization, input_sha256=file_sha256(path), method=method)


@dataclass(frozen=True)
class StoreSpec:
    """What a kernel store holds: the matrix (``problem``), its tiling and storage dtype.

    Tiles depend only on this spec and their indices, so a store is resumable exactly when
    the spec hash of the command matches the one recorded in the store.
    """

    problem: dict
    tile: int
    dtype: str
    ntkdist_version: str

    @property
    def n(self) -> int:
        return int(self.problem["n"])

    @property
    def blocks(self) -> int:
        return -(-self.n // self.tile)

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return content_hash(self.to_dict())

    def run_spec(self) -> RunSpec:
        """The problem of this store, with default solver options."""
        return RunSpec(**self.problem)


def make_store_spec(run_spec: RunSpec, tile: int, dtype: str) -> StoreSpec:
    from . import __version__

    tile = _positive_int(tile, "tile")
    if dtype not in DTYPES:
        raise SpecError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return StoreSpec(problem=run_spec.problem(), tile=min(tile, run_spec.n), dtype=dtype,
                     ntkdist_version=__version__)
