"""Run files: a TOML file with one table per spec, and the requests built from it and flags.

::

    out = "results/r1"
    [data]
    source = "gaussian"   # sphere | gaussian | a .npy or Zarr path
    n = 700
    d = 13
    seed = 4
    [kernel]
    kind = "ntk"
    depth = 3
    [solver]
    method = "lobpcg"
    tol = 1e-8
    [store]
    path = "kernel.zarr"
    [cluster]
    workers = 2

:func:`load_config` reads a file into the flat option names the command line uses
(``source`` → ``data``, ``kind`` → ``kernel``, ``path`` → ``store``); the command line's flags
override it. :func:`run_request` and friends build the typed specs from those options,
through the same validating constructors as the flags, so a file and the equivalent flags
give the same spec hash. A bad key or value is one line naming it.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .errors import SpecError
from .spec import (BATCH_OPTIONS, ClusterSpec, RunSpec, make_cluster_spec, make_data_spec,
                   make_kernel_spec, make_solver_spec)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: table → {key in the file: option name}
TABLES = {
    "data": {"source": "data", "n": "n", "d": "d", "seed": "seed", "dedupe": "dedupe"},
    "kernel": {"kind": "kernel", "depth": "depth", "normalization": "normalization",
               "widths": "widths", "weights_seed": "weights_seed", "layer": "layer"},
    "solver": {k: k for k in ("method", "k", "tol", "block", "precond", "operator",
                              "precision", "max_products", "certify",
                              "checkpoint_every")},
    "store": {"path": "store", "tile": "tile", "dtype": "dtype"},
    "cluster": {"kind": "cluster",
                **{k: k for k in ("scheduler", "scheduler_file", "workers", "memory_limit",
                                  "device", *BATCH_OPTIONS)}},
}
TOP_KEYS = {"out": "out"}
#: The ways of choosing a cluster: a flag giving one replaces all of them from the file.
CLUSTER_WAYS = ("cluster", "scheduler", "scheduler_file", "workers")
#: option name → (table, key) in the file, for messages
WHERE = {opt: (table, key) for table, keys in TABLES.items() for key, opt in keys.items()}
WHERE["out"] = (None, "out")


class Options(dict):
    """Option name → value, remembering which came from a file (for messages)."""

    def __init__(self, *args, source: str | None = None, from_file=(), **kw):
        super().__init__(*args, **kw)
        self.source = source
        self.from_file = set(from_file)

    @contextlib.contextmanager
    def blaming(self):
        """A context in which a SpecError is re-raised in the words of :meth:`blame`."""
        try:
            yield
        except SpecError as exc:
            raise self.blame(exc) from None

    def blame(self, exc: SpecError) -> SpecError:
        """The error in the words of where the value came from: ``FILE: [table] key …`` for a
        value of the file, ``--flag …`` for a flag's."""
        text = str(exc)
        head, _, rest = text.partition(" ")
        name = head.lstrip("-").replace("-", "_")
        if name == "synthetic" and "data" in self.from_file:
            return SpecError(f"{self.source}: [data] {text}")
        if name not in WHERE or name not in self:
            return exc
        if name in self.from_file:
            table, key = WHERE[name]
            where = f"[{table}] " if table else ""
            return SpecError(f"{self.source}: {where}{key} {rest}")
        return SpecError(f"--{name.replace('_', '-')} {rest}")


def read_toml(path: str, what: str = "config file") -> tuple[dict, str]:
    """(the document, the file's name) of a TOML file; one line for a file that is missing,
    unreadable or not TOML."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"{what} {path!r} is a directory") from None
    except OSError as exc:
        raise SpecError(f"cannot read {what} {path!r} ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    return doc, os.path.basename(path)


def load_config(path: str) -> Options:
    """The options a TOML run file sets; one line naming the key for anything unknown."""
    doc, name = read_toml(path)
    out = Options(source=name)
    for key, value in doc.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise SpecError(f"{name}: [{key}] must be a table, got {value!r}")
            for sub, item in value.items():
                if sub not in TABLES[key]:
                    raise SpecError(f"{name}: unknown key [{key}] {sub} (known: "
                                    f"{', '.join(TABLES[key])})")
                if isinstance(item, dict):
                    raise SpecError(f"{name}: [{key}] {sub} must be a value, not a table")
                out[TABLES[key][sub]] = item
        elif key in TOP_KEYS:
            out[TOP_KEYS[key]] = value
        else:
            known = ", ".join([*TOP_KEYS, *(f"[{t}]" for t in TABLES)])
            what = "table" if isinstance(value, dict) else "key"
            shown = f"[{key}]" if isinstance(value, dict) else key
            raise SpecError(f"{name}: unknown {what} {shown} (known: {known})")
    out.from_file = set(out)
    return out


def merge(file_options: Options | None, flags: dict) -> Options:
    """The file's options overridden by the flags given (None: not given)."""
    base = file_options if file_options is not None else Options()
    merged = Options(base, source=base.source, from_file=base.from_file)
    given = {k for k, v in flags.items() if v is not None}
    if given & set(CLUSTER_WAYS) and _kind(flags) != _kind(merged):
        # a cluster of another kind chosen by a flag replaces the file's cluster (its device
        # stays); flags of the same kind amend it
        for k in (*CLUSTER_WAYS, "memory_limit", *BATCH_OPTIONS):
            if k in merged.from_file:
                del merged[k]
                merged.from_file.discard(k)
    for k, v in flags.items():
        if v is not None:
            merged[k] = v
            merged.from_file.discard(k)
    return merged


def _kind(o) -> str:
    """The cluster kind options choose: a batch system, a scheduler, or local."""
    get = o.get
    return (get("cluster") or ("address" if get("scheduler") else "scheduler_file"
                               if get("scheduler_file") else "local"))


def _checked(options: Options, build):
    try:
        return build()
    except SpecError as exc:
        raise options.blame(exc) from None


def problem_request(o: Options) -> RunSpec:
    """The data and kernel of the options (the solver with its defaults)."""
    if o.get("depth") is None and o.get("widths") is None:
        raise SpecError("the following arguments are required: --depth (or [kernel] depth in "
                        "the --config file; --widths for --kernel empirical or features)")

    def build():
        kernel = make_kernel_spec(o.get("kernel", "ntk"), o.get("depth"),
                                  o.get("normalization", "paper"), o.get("widths"),
                                  o.get("weights_seed"), o.get("layer"))
        data = make_data_spec(o.get("data", "sphere"), o.get("n"), o.get("d"), o.get("seed"),
                              o.get("dedupe", False), growth=kernel.growth())
        return RunSpec(data, kernel)

    return _checked(o, build)


def cluster_request(o: Options) -> ClusterSpec:
    return _checked(o, lambda: make_cluster_spec(
        o.get("scheduler"), o.get("scheduler_file"), o.get("workers"), o.get("memory_limit"),
        o.get("device", "cpu"), o.get("cluster"), **{k: o.get(k) for k in BATCH_OPTIONS}))


def store_request(o: Options) -> tuple[str | None, int | None, str | None]:
    """(store path, tile, dtype), checked; None where not given."""
    from .spec import check_layout

    store, tile, dtype = o.get("store"), o.get("tile"), o.get("dtype")
    if store is not None and (not isinstance(store, str) or not store):
        raise o.blame(SpecError(f"store must be a path, got {store!r}"))
    if store is None and dtype is not None:
        raise o.blame(SpecError(f"dtype {dtype} applies to a store: give --store (or [store] "
                                "path)"))
    store = None if store is None else os.path.expanduser(store)
    _checked(o, lambda: check_layout(tile, dtype))
    return store, tile, dtype


SOLVER_OPTIONS = TABLES["solver"].values()


def solver_options(o: Options) -> dict:
    """The solver options given (method None: the default for the run)."""
    return {k: o.get(k) for k in SOLVER_OPTIONS}


def run_request(o: Options) -> tuple[RunSpec, ClusterSpec]:
    """The run's specs: data, kernel and solver (method default from N, store and device),
    and the cluster."""
    from .operator.plan import default_method

    spec = problem_request(o)
    cluster = cluster_request(o)

    def build():
        opts = solver_options(o)
        if opts["method"] is None:
            opts["method"] = default_method(spec.n, o.get("store") is not None, cluster.device)
        return spec.with_solver(make_solver_spec(spec.n, **opts))

    return _checked(o, build), cluster


def required(o: Options, name: str, flag: str) -> str:
    """A required option (``out``, ``store``) as a non-empty string."""
    value = o.get(name)
    if value is None:
        table, key = WHERE.get(name, (None, name))
        where = f"[{table}] {key}" if table else key
        raise SpecError(f"the following arguments are required: {flag} (or {where} in "
                        "the --config file)")
    if not isinstance(value, str) or not value:
        raise o.blame(SpecError(f"{name} must be a path, got {value!r}"))
    return os.path.expanduser(value)
