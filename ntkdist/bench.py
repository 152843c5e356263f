"""``ntkdist bench``: a Dask cluster measured for ntkdist's own workload, the way HPL and
STREAM measure machines; and ``ntkdist bench compare A B``, two reports side by side.

One figure leads the report: the time to a certified λ_min of a reference problem whose
answer ships with the package (:data:`REFERENCE_LAMBDA`), solved end to end on the cluster
(rows → store → distributed LOBPCG → certificate). A cluster that computes it wrong, or
cannot certify it, fails the benchmark. The rest is that figure's breakdown:

* per worker: the kernel tile function's throughput (entries/s) against the arccos floor,
  and the GEMM rate of a pass's thin products (a T×T tile times a T×32 block, float64 and
  float32) against a square GEMM measured on the same worker;
* the store: write and read bandwidth through a real assembly, beside ``dd``'s;
* one pass (an N×32 ``matmat``) of each operator (memory, store, recompute), and Dask's
  round trip;
* strong and weak scaling of the recompute pass over 1, 2, 4, … workers.

Everything measured goes into ``DIR/report.json``; ``DIR/report.md`` and the PNGs show it.
docs/bench.md says what each number is and how it is measured.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

from .cluster import _cpu_count
from .errors import InputError, NtkdistError, OutputError, SpecError

FORMAT = "ntkdist-bench"
FORMAT_VERSION = 1
REPORT_JSON, REPORT_MD = "report.json", "report.md"
FIGURES = ("scaling.png", "throughput.png")
#: The default --store-dir, under --out.
STORE_SUBDIR = "bench-store"
#: What a previous bench leaves in its --out; a folder holding anything else is refused.
BENCH_ENTRIES = frozenset({REPORT_JSON, REPORT_MD, *FIGURES, STORE_SUBDIR})
#: A run's scratch folder in the store directory (removed at its end): PREFIX<pid>-<random>.
SCRATCH_PREFIX = "ntkdist-bench-"

# ----------------------------------------------------------------- the reference problem
#: Sphere rows (make_spec(data="sphere", n=N, d=16, depth=3, seed=0)), the NTK of depth 3,
#: paper normalization.
REFERENCE_D, REFERENCE_DEPTH, REFERENCE_SEED = 16, 3, 0
REFERENCE_QUICK_N, REFERENCE_FULL_N = 2000, 10000
#: λ_min of the float64 matrix ``ntkdist.ntk(X, depth=3)`` by N (recomputed by
#: :func:`reference_value`, ``python benchmarks/reference_lambda.py``): the
#: Rayleigh quotient of the eigenvector of ``scipy.linalg.eigh(K, subset_by_index=[0, 1],
#: driver="evr")``, evaluated in extended precision (x86 long double; at N = 2000 also in
#: mpmath at 40 digits, agreeing to 1e-18), whose residual (2.2e-13, 1.1e-12) and gap to
#: λ_2 (Kato–Temple) bound its distance to an eigenvalue of K by 3e-25 and 6e-23. Dense
#: ``numpy.linalg.eigvalsh`` (LAPACK syevd, OpenBLAS) gives 5.689322518609664 and
#: 4.302663603959234 (7.5e-15 and 2.4e-14 relative below); evr's eigenvalues are 9e-14 and
#: 1.6e-12 below. λ_2 = 5.847676426266 and 4.323242836254: gaps of 2.8% and 0.48% of λ_1.
REFERENCE_LAMBDA = {2000: 5.689322518609707, 10000: 4.302663603959335}


def reference_value(n: int) -> dict:
    """Recompute :data:`REFERENCE_LAMBDA` [n] (``python benchmarks/reference_lambda.py``): the
    long-double Rayleigh quotient of evr's lowest eigenvector of the float64 K, its residual,
    and the Kato–Temple bound on its distance to an eigenvalue (gap to evr's λ_2)."""
    import numpy as np
    import scipy.linalg

    from .spec import make_spec

    spec = make_spec(data="sphere", n=n, d=REFERENCE_D, depth=REFERENCE_DEPTH,
                     seed=REFERENCE_SEED)
    K = spec.kernel.gram(spec.rows())
    w, V = scipy.linalg.eigh(K, subset_by_index=[0, 1], driver="evr")
    v = V[:, 0].astype(np.longdouble)
    Kv = K.astype(np.longdouble) @ v
    rho = (v @ Kv) / (v @ v)
    residual = float(np.sqrt(np.sum((Kv - rho * v) ** 2) / (v @ v)))
    return {"lambda_min": float(rho), "residual": residual, "lambda_2": float(w[1]),
            "kato_temple": residual ** 2 / (float(w[1]) - float(rho))}
#: The reference solve's tolerance; a result within ref·(certified accuracy + this) passes.
REFERENCE_TOL = 1e-10

# ------------------------------------------------------------------ the workload measured
#: The rows of the passes, the store and the scaling runs (sphere, seed 0) and the kernel.
BENCH_D, BENCH_DEPTH = 64, 3
#: Columns of the block a pass multiplies (the solvers' blocks are 32 or so).
BLOCK = 32
QUICK_N, DEFAULT_N, MIN_N, MAX_N = 4096, 20000, 1024, 1_000_000
#: Timed repeats (after one untimed warm-up) and Dask round trips.
QUICK_REPEATS, REPEATS, ROUND_TRIPS = 3, 5, 20
#: np.arccos over this many elements gives a worker's arccos rate.
ARCCOS_ELEMENTS = 10 ** 7
#: Side of the square GEMM that measures a worker's peak: CPU (quick, full), GPU.
PEAK_SIDE_QUICK, PEAK_SIDE, PEAK_SIDE_GPU = 1024, 2048, 8192
#: A worker-side sample repeats a call until it lasts this long (short calls, e.g. a thin
#: product of a small tile, are timed over several calls).
MIN_SAMPLE_SECONDS = 0.02
#: dd's block size (GNU dd: 16M = 16 MiB).
DD_BLOCK = 16 * 2 ** 20
#: Seconds to wait for a first worker when attaching to a running scheduler.
WORKER_WAIT = 60.0


class BenchError(NtkdistError):
    """The bench cannot run, or a report cannot be read."""


@dataclass(frozen=True)
class Sizes:
    """What a bench run measures: ``n`` (passes, store, scaling), ``reference_n``, the timed
    ``repeats``, the peak GEMM's side and the largest worker count of the scaling runs."""

    quick: bool
    n: int
    reference_n: int
    repeats: int
    peak_side: int
    max_scaling_workers: int | None


def make_sizes(quick: bool = False, n: int | None = None) -> Sizes:
    """The sizes of a quick or a full run; ``n`` overrides the passes' N (one line if out of
    [MIN_N, MAX_N])."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                          or not MIN_N <= n <= MAX_N):
        raise SpecError(f"--n must be an integer in [{MIN_N}, {MAX_N}], got {n!r}")
    if quick:
        return Sizes(True, n or QUICK_N, REFERENCE_QUICK_N, QUICK_REPEATS, PEAK_SIDE_QUICK, 2)
    return Sizes(False, n or DEFAULT_N, REFERENCE_FULL_N, REPEATS, PEAK_SIDE, None)


def bench_tile(n: int, workers: int, memories) -> int:
    """Tile side of the passes: enough tiles to spread over the workers (at least 4 row
    blocks, and about 4 upper tiles a worker), at most the default tile for the workers'
    memory (:func:`ntkdist.operator.default_tile`)."""
    from .operator.plan import _smallest, default_tile

    blocks = max(4, math.ceil(math.sqrt(8 * workers)))
    return min(default_tile(n, _smallest(memories)), -(-n // blocks))


def scaling_counts(workers: int, cap: int | None = None) -> list[int]:
    """1, 2, 4, … up to ``workers`` (and ``workers`` itself), at most ``cap``."""
    top = min(workers, cap) if cap else workers
    counts = [1]
    while counts[-1] * 2 <= top:
        counts.append(counts[-1] * 2)
    if counts[-1] != top:
        counts.append(top)
    return counts


# ------------------------------------------------------------------ timing on the workers

def _nothing() -> None:
    """A task that does nothing (Dask's round trip)."""
    return None


def _best(fn, repeats: int, sync=lambda: None) -> dict:
    """Seconds a call of ``fn`` takes: one untimed warm-up call, a second to size the
    samples, then ``repeats`` samples, each of as many calls as last
    :data:`MIN_SAMPLE_SECONDS` (``sync``: wait for the device)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-9)
    calls = max(1, min(1000, math.ceil(MIN_SAMPLE_SECONDS / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / calls)
    return {"seconds": min(samples), "median_seconds": statistics.median(samples),
            "samples": samples, "calls_per_sample": calls}


def _device_module(device: str):
    """(array module, sync, GPU name or None) of this worker for ``device``."""
    import numpy as np

    if device != "gpu":
        return np, (lambda: None), None
    from .operator.gpu import gpu_info

    name = gpu_info()[0]  # a one-line NtkdistError without CuPy or a GPU
    import cupy as cp

    return cp, cp.cuda.Device().synchronize, name


def _tile_path(xp) -> str:
    """Which implementation of the tile function ran: the fused one of the device, or why
    the array-module path."""
    import numpy as np

    if xp is np:
        from .kernels.fused import available

        return "fused (numba)" if available() else "array-module (numba not installed)"
    from .kernels import fused_cuda

    line = fused_cuda.status(xp)
    return "fused (CUDA)" if line == "in use" else f"array-module (fused CUDA kernel {line})"


def worker_rates(device: str, tile: int, depth: int, d: int, block: int, peak_side: int,
                 arccos_elements: int, repeats: int) -> dict:
    """Task: this worker's rates on ``device`` (cpu: NumPy, gpu: CuPy): the tile function on
    a T×T tile of sphere rows, the thin products of a pass (b×T block times a T×T tile,
    float64 and float32), a square GEMM of side ``peak_side`` (the measured peak, float64
    and float32) and np.arccos over ``arccos_elements`` elements."""
    import numpy as np

    from .data import synthetic_rows
    from .kernels.limiting import kernel_tile, row_block

    xp, sync, gpu = _device_module(device)
    rng = np.random.default_rng(0)
    X = synthetic_rows("sphere", d, 0, 0, 2 * tile)
    A, B = row_block(xp.asarray(X[:tile])), row_block(xp.asarray(X[tile:]))
    out = {"device": device, "gpu": gpu}
    built = {}

    def build():
        built["K"] = kernel_tile(A, B, depth, "ntk")

    t = _best(build, repeats, sync)
    out["tile"] = {"side": tile, "d": d, "depth": depth, "path": _tile_path(xp),
                   "entries_per_s": tile * tile / t["seconds"], **t}
    K = built.pop("K")
    out["thin"], out["peak"] = {}, {}
    for dtype in ("float64", "float32"):
        T = K.astype(dtype)
        VT = xp.asarray(rng.standard_normal((block, tile)).astype(dtype))
        t = _best(partial(xp.matmul, VT, T), repeats, sync)
        out["thin"][dtype] = {"gflops": 2.0 * block * tile * tile / t["seconds"] / 1e9,
                              "tile": tile, "block": block, **t}
        del T, VT
        P = xp.asarray(rng.standard_normal((peak_side, peak_side)).astype(dtype))
        Q = xp.asarray(rng.standard_normal((peak_side, peak_side)).astype(dtype))
        t = _best(partial(xp.matmul, P, Q), repeats, sync)
        out["peak"][dtype] = {"gflops": 2.0 * peak_side ** 3 / t["seconds"] / 1e9,
                              "side": peak_side, **t}
        del P, Q
    del K
    x = xp.asarray(rng.uniform(-0.9, 0.9, arccos_elements))
    t = _best(partial(xp.arccos, x), repeats, sync)
    out["arccos"] = {"per_s": arccos_elements / t["seconds"], "elements": arccos_elements, **t}
    del x
    if device == "gpu":
        xp.get_default_memory_pool().free_all_blocks()
    return out


def worker_fingerprint() -> dict:
    """Task (``client.run``): this worker's host, CPU, cores and BLAS."""
    return {"host": platform.node(), "cpu": cpu_model(), "cores": _cpu_count(),
            "blas": blas_info()}


def read_tiles(path: str, pairs) -> int:
    """Task: read tiles (i, j) of the store at ``path`` into memory (a copy, so every byte is
    read, not just mapped); returns the bytes read."""
    import numpy as np

    from .store import KernelStore

    store, total = KernelStore.open(path), 0
    for i, j in pairs:
        tile = np.array(store.read_tile(i, j))
        total += tile.nbytes
        del tile
    return total


def flush_files(paths) -> int:
    """Task (``client.run``): fsync every file under ``paths`` (what this host wrote reaches
    the disk); returns the files flushed."""
    count = 0
    for path in _files(paths):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                count += 1
            finally:
                os.close(fd)
    return count


def evict_files(paths, system: bool) -> dict:
    """Task (``client.run``): this host's page cache rid of the files under ``paths``: with
    ``system``, the whole page cache dropped (/proc/sys/vm/drop_caches, needs root); and
    every file's pages evicted with posix_fadvise(DONTNEED) (its own files, any user)."""
    evicted, files = hasattr(os, "posix_fadvise"), 0
    for path in _files(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                files += 1
            finally:
                os.close(fd)
        except OSError:
            evicted = False
    evicted = evicted and files > 0  # a host that sees none of the files evicted nothing
    if not system:
        return {"dropped": False, "reason": "--no-drop-cache", "evicted": evicted}
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return {"dropped": False, "reason": "not root", "evicted": evicted}
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")  # 1: the page cache only
    except OSError as exc:
        return {"dropped": False, "reason": f"drop_caches: {exc.strerror or exc}",
                "evicted": evicted}
    return {"dropped": True, "reason": None, "evicted": evicted}


def run_dd(args: list) -> dict:
    """Task: ``dd ARGS`` (LC_ALL=C), timed; {"seconds", "output": its last line} or
    {"error": why}."""
    import subprocess

    if shutil.which("dd") is None:
        return {"error": "dd not found on the worker"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(["dd", *args], capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C"})
    except OSError as exc:
        return {"error": f"dd: {exc.strerror or exc}"}
    seconds = time.perf_counter() - t0
    lines = done.stderr.strip().splitlines()
    if done.returncode:
        return {"error": lines[-1] if lines else f"dd exited with {done.returncode}"}
    return {"seconds": seconds, "output": lines[-1] if lines else ""}


def _files(paths):
    for top in paths:
        if os.path.isfile(top):
            yield top
        for root, _, names in os.walk(top):
            for name in names:
                yield os.path.join(root, name)


# ----------------------------------------------------------------------- the fingerprint

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    return platform.processor() or platform.machine()


def blas_info() -> list:
    """The BLAS libraries loaded (threadpoolctl): API, implementation, version, threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: lib.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                      "threading_layer", "architecture")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def gpus_here() -> list | str:
    """[name, …] of the GPUs CuPy sees here, or "no GPU" (and why)."""
    try:
        import cupy as cp
    except ImportError:
        return "no GPU (CuPy not installed)"
    try:
        count = cp.cuda.runtime.getDeviceCount()
        names = [cp.cuda.runtime.getDeviceProperties(i)["name"] for i in range(count)]
    except Exception as exc:  # CUDA's errors come in several types
        return f"no GPU ({type(exc).__name__})"
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return names or "no GPU"


def fingerprint(client, cluster) -> dict:
    """The machine (this process's host), its software, and the cluster's workers."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    info = client.scheduler_info(n_workers=-1)["workers"]
    hosts = client.run(worker_fingerprint)
    workers = [{"address": a, "host": hosts.get(a, {}).get("host"),
                "threads": info[a].get("nthreads"), "memory_limit": info[a].get("memory_limit"),
                "cpu": hosts.get(a, {}).get("cpu"), "cores": hosts.get(a, {}).get("cores"),
                "blas": hosts.get(a, {}).get("blas")} for a in sorted(info)]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": cpu_model(), "cores": _cpu_count(),
        "cpu_count": os.cpu_count(), "memory_bytes": memory, "gpus": gpus_here(),
        "os": platform.platform(), "blas": blas_info(),
        "versions": {"python": platform.python_version(), "ntkdist": __version__,
                     **{name: ver(name) for name in ("numpy", "scipy", "dask", "distributed",
                                                     "zarr", "numba", "cupy")}},
        "cluster": {"kind": cluster.kind, "device": cluster.device, "workers": len(workers),
                    "threads": sum(w["threads"] or 0 for w in workers),
                    "hosts": len({w["host"] for w in workers})},
        "workers": workers,
    }


# ------------------------------------------------------------------- the report's folder

def _is_bench_report(path: str) -> bool:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _only_scratch(path: str) -> bool:
    """Whether ``path`` is a folder holding only bench scratch folders (or nothing)."""
    try:
        return all(e.startswith(SCRATCH_PREFIX) for e in os.listdir(path))
    except OSError:
        return False


def prepare_out(out: str) -> None:
    """Create ``out``, or accept it if empty or a previous bench's (its files are replaced);
    refuse anything else, touching nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out!r} exists and is not a folder")
    if os.path.isdir(out):
        entries = set(os.listdir(out))
        ours = entries <= BENCH_ENTRIES and (
            _is_bench_report(os.path.join(out, REPORT_JSON)) if REPORT_JSON in entries
            else entries <= {STORE_SUBDIR} and _only_scratch(os.path.join(out, STORE_SUBDIR)))
        if entries and not ours:
            raise OutputError(f"--out {out!r} is not empty and holds no bench report; choose "
                              "an empty or new folder (a previous bench's is replaced)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {out!r}: {exc.strerror or exc}") from None


def _remove_stale_scratch(store_dir: str) -> None:
    """Scratch folders of benches killed before their clean-up (their PID gone)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(store_dir):
            pid = name[len(SCRATCH_PREFIX):].split("-")[0]
            if name.startswith(SCRATCH_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(store_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def scratch_folder(out: str, store_dir: str | None):
    """A fresh folder in ``store_dir`` (default ``out/bench-store``) for the bench's stores
    and dd's file, removed at the end however the run ends (and the default store
    directory with it, once empty)."""
    default = store_dir is None
    store_dir = os.path.abspath(os.path.join(out, STORE_SUBDIR) if default else
                                os.path.expanduser(store_dir))  # the workers see this path
    if os.path.exists(store_dir) and not os.path.isdir(store_dir):
        raise OutputError(f"--store-dir {store_dir!r} exists and is not a folder")
    try:
        os.makedirs(store_dir, exist_ok=True)
        if default:
            _remove_stale_scratch(store_dir)
        path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=store_dir)
    except OSError as exc:
        raise OutputError(f"cannot write the store directory {store_dir!r}: "
                          f"{exc.strerror or exc}") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if default:
            with contextlib.suppress(OSError):
                os.rmdir(store_dir)


# ------------------------------------------------------------------------ the measurements

class _Bench:
    """One bench run on a connected client: the measurements, in the order they run."""

    def __init__(self, client, cluster, sizes: Sizes, scratch: str, drop_cache: bool, log):
        from .operator import cluster_facts

        self.client, self.cluster, self.sizes = client, cluster, sizes
        self.scratch, self.drop_cache, self.log = scratch, drop_cache, log
        self.device = cluster.device
        self.workers, self.gpus, self.names = cluster_facts(client, self.device)
        if not self.workers:
            raise BenchError("the Dask cluster has no workers")
        self.addresses = [w for w, _ in self.workers]
        self.memories = [m for _, m in self.workers]
        self.tile = bench_tile(sizes.n, len(self.workers), self.memories)

    # -- checks before anything is written
    def check_room(self) -> None:
        """One line if the passes' tiles do not fit in the workers' memory (on CPUs: GPU
        workers keep them on their GPUs, whose room the GPU plan checks), or the stores and
        dd's file on the store's disk."""
        from .operator.plan import CACHE_FRACTION, tile_sizes

        n = self.sizes.n
        kept = sum(4 * r * c for r, c in tile_sizes(n, self.tile).values())
        if self.device != "gpu" and all(self.memories) and \
                kept > CACHE_FRACTION * sum(self.memories):
            raise SpecError(
                f"--n {n}: the float32 tiles of the memory pass ({kept / 1e9:.2f} GB) do not "
                f"fit in {CACHE_FRACTION:.0%} of the workers' memory "
                f"({sum(self.memories) / 1e9:.2f} GB); use a smaller --n")
        m = self.sizes.reference_n
        need = 2.2 * kept + 8 * m * m  # the store and dd's file; the reference's float64
        free = shutil.disk_usage(self.scratch).free
        if need > free:
            raise SpecError(f"--n {n}: the bench writes about {need / 1e9:.2f} GB to the store "
                            f"directory, which has {free / 1e9:.2f} GB free; use a smaller --n "
                            "or another --store-dir")

    def pinned(self, fn, *args, address=None):
        """``fn(*args)`` on every worker (or on ``address``) as a task pinned there; their
        results by address, a worker's failure as one line."""
        from .operator.client import _one_line

        addresses = [address] if address else self.addresses
        futures = {w: self.client.submit(fn, *args, workers=[w], allow_other_workers=False,
                                         pure=False) for w in addresses}
        with _one_line("during the bench", f"bench task {fn.__name__}"):
            return {w: self._result(w, f) for w, f in futures.items()}

    def _result(self, worker: str, future):
        """A pinned task's result; a one-line error, not a wait for ever, if its worker
        leaves the cluster (Dask keeps a task pinned to a lost worker waiting)."""
        from distributed.utils import TimeoutError as DaskTimeout

        while True:
            try:
                return future.result(timeout=2.0)
            except (TimeoutError, DaskTimeout):
                if worker not in self.client.scheduler_info(n_workers=-1)["workers"]:
                    raise BenchError(f"worker {worker} left the cluster during the bench "
                                     "(killed, out of memory, or its job ended)") from None

    # -- Dask's round trip
    def round_trip(self) -> dict:
        self.client.submit(_nothing, pure=False).result()
        samples = []
        for _ in range(ROUND_TRIPS):
            t0 = time.perf_counter()
            self.client.submit(_nothing, pure=False).result()
            samples.append(time.perf_counter() - t0)
        out = {"median_seconds": statistics.median(samples), "samples": samples}
        self.log(f"bench: Dask round trip {1e3 * out['median_seconds']:.2f} ms (median of "
                 f"{ROUND_TRIPS})")
        return out

    # -- per worker
    def worker_rates(self) -> list:
        s = self.sizes
        self.log(f"bench: per-worker rates on {len(self.addresses)} worker(s) ({self.device}): "
                 f"tile {self.tile}, thin products b = {BLOCK}, square GEMM, arccos")
        peak = PEAK_SIDE_GPU if self.device == "gpu" else s.peak_side
        rates = self.pinned(worker_rates, self.device, self.tile, BENCH_DEPTH, BENCH_D, BLOCK,
                            peak, ARCCOS_ELEMENTS, s.repeats)
        out = []
        for w in self.addresses:
            r = rates[w]
            floor = (r["arccos"]["per_s"] / (BENCH_DEPTH - 1)) if BENCH_DEPTH > 1 else None
            r["address"] = w
            r["arccos_floor_entries_per_s"] = floor
            r["tile_fraction_of_floor"] = (r["tile"]["entries_per_s"] / floor) if floor else None
            r["thin_fraction_of_peak"] = {dt: r["thin"][dt]["gflops"] / r["peak"][dt]["gflops"]
                                          for dt in r["thin"]}
            out.append(r)
            if len(self.addresses) > 8 and w != self.addresses[0]:
                continue  # one worker's line stands for the others'; all are in the report
            self.log(f"bench:   {w}: tile {r['tile']['entries_per_s'] / 1e6:.1f} M entries/s "
                     f"({r['tile']['path']}; {r['tile_fraction_of_floor']:.2f} of the arccos "
                     "floor); thin GEMM "
                     f"{r['thin']['float64']['gflops']:.1f}/{r['thin']['float32']['gflops']:.1f}"
                     f" GFLOP/s (f64/f32), peak {r['peak']['float64']['gflops']:.1f}/"
                     f"{r['peak']['float32']['gflops']:.1f}")
        return out

    # -- the store
    def evict(self, paths) -> str:
        """The page cache rid of ``paths`` on every worker's host; how, in words."""
        done = self.client.run(evict_files, list(paths), self.drop_cache)
        if done and all(v["dropped"] for v in done.values()):
            return "page cache dropped (/proc/sys/vm/drop_caches on every worker's host)"
        reasons = sorted({v["reason"] for v in done.values() if not v["dropped"]})
        words = f"page cache not dropped ({', '.join(reasons)})"
        if done and all(v["evicted"] for v in done.values()):
            return words + "; the benchmark's files evicted with posix_fadvise(DONTNEED)"
        return words + "; reads may come from memory"

    def store(self) -> tuple[dict, str]:
        """Write and read bandwidth of a real assembly (depth 1: the tiles are cheap to
        compute, so the store's bytes set the pace) and of dd; (report, the store's path)."""
        from .assemble import assemble
        from .operator.plan import balance, tile_sizes
        from .spec import make_spec, make_store_spec
        from .store import KernelStore

        n, t = self.sizes.n, self.tile
        path = os.path.join(self.scratch, "store.zarr")
        spec = make_store_spec(make_spec(data="sphere", n=n, d=BENCH_D, depth=1, seed=0),
                               t, "float32")
        self.log(f"bench: store write: assembling N = {n} (tile {t}, float32) into {path}")
        t0 = time.perf_counter()
        assemble(spec, path, self.client, progress=False)
        t_asm = time.perf_counter() - t0
        self.client.run(flush_files, [path])
        t_write = time.perf_counter() - t0
        nbytes = KernelStore.open(path).bytes_on_disk()
        cache = self.evict([path])
        sizes = tile_sizes(n, t)
        share = balance(list(sizes), sizes, self.addresses)
        self.log("bench: store read: every tile, by the workers")
        t0 = time.perf_counter()
        got = self.pinned_each(read_tiles, path, share)
        t_read = time.perf_counter() - t0
        read_bytes = sum(got.values())
        out = {"store_dir": os.path.dirname(self.scratch), "n": n, "tile": t,
               "dtype": "float32", "bytes": nbytes,
               "page_cache": cache,
               "write": {"seconds": t_write, "assembly_seconds": t_asm,
                         "flush_seconds": t_write - t_asm, "gb_per_s": nbytes / t_write / 1e9},
               "read": {"seconds": t_read, "bytes": read_bytes,
                        "gb_per_s": read_bytes / t_read / 1e9}}
        out["dd"] = self.dd(nbytes)
        for way in ("write", "read"):
            dd = out["dd"].get(way) or {}
            out[way]["vs_dd"] = (out[way]["gb_per_s"] / dd["gb_per_s"]
                                 if dd.get("gb_per_s") else None)
        dd_w, dd_r = out["dd"].get("write") or {}, out["dd"].get("read") or {}
        self.log(f"bench:   {nbytes / 1e6:.0f} MB: write {out['write']['gb_per_s']:.2f} GB/s "
                 f"(dd {_num(dd_w.get('gb_per_s'), '.2f')}), read "
                 f"{out['read']['gb_per_s']:.2f} GB/s (dd {_num(dd_r.get('gb_per_s'), '.2f')}); "
                 f"before the reads: {cache}")
        return out, path

    def pinned_each(self, fn, path, share: dict) -> dict:
        """``fn(path, share[w])`` on each worker w with a share, pinned there."""
        from .operator.client import _one_line

        futures = {w: self.client.submit(fn, path, pairs, workers=[w],
                                         allow_other_workers=False, pure=False)
                   for w, pairs in share.items() if pairs}
        with _one_line("during the bench", f"bench task {fn.__name__}"):
            return {w: self._result(w, f) for w, f in futures.items()}

    def dd(self, nbytes: int) -> dict:
        """dd's write (conv=fdatasync) and read of about ``nbytes`` on the first worker, the
        page cache dropped in between."""
        count = max(1, round(nbytes / DD_BLOCK))
        file = os.path.join(self.scratch, "dd.bin")
        first = self.addresses[0]
        self.log(f"bench: dd: {count} × 16 MiB to {file} on {first}")
        out = {"block": DD_BLOCK, "count": count, "bytes": count * DD_BLOCK, "file": file}
        w = self.pinned(run_dd, ["if=/dev/zero", f"of={file}", "bs=16M", f"count={count}",
                                 "conv=fdatasync"], address=first)[first]
        if "error" in w:
            out["error"] = w["error"]
            return out
        out["write"] = {**w, "gb_per_s": count * DD_BLOCK / w["seconds"] / 1e9}
        out["page_cache"] = self.evict([file])
        r = self.pinned(run_dd, [f"if={file}", "of=/dev/null", "bs=16M"], address=first)[first]
        if "error" in r:
            out["error"] = r["error"]
        else:
            out["read"] = {**r, "gb_per_s": count * DD_BLOCK / r["seconds"] / 1e9}
        with contextlib.suppress(OSError):
            os.remove(file)
        return out

    # -- one pass of each operator
    def passes(self, store_path: str) -> dict:
        """Seconds per pass of an N×32 block through each operator (best of the repeats after
        a warm-up pass), and the bytes each reads, keeps and moves."""
        import numpy as np

        from .operator import make_operator
        from .spec import KernelSpec, make_spec

        n = self.sizes.n
        X = make_spec(data="sphere", n=n, d=BENCH_D, depth=BENCH_DEPTH, seed=0).data.rows()
        kernel = KernelSpec(kind="ntk", depth=BENCH_DEPTH)
        V = np.random.default_rng(1).standard_normal((n, BLOCK))
        gpu = self.device == "gpu"
        ways = {"memory": dict(mode="memory", rows=X, kernel=kernel, tile=self.tile)
                if gpu else dict(mode="memory", store=store_path),
                "store": None if gpu else dict(mode="store", store=store_path),
                "recompute": dict(mode="recompute", rows=X, kernel=kernel, tile=self.tile)}
        out = {}
        for name, kw in ways.items():
            if kw is None:
                out[name] = {"skipped": "the store operator does not run on GPUs"}
                continue
            self.log(f"bench: one pass, {name} operator (N = {n}, block {BLOCK})")
            t0 = time.perf_counter()
            try:
                op = make_operator(self.client, device=self.device, **kw)
            except SpecError as exc:  # the memory operator's tiles do not fit, say
                out[name] = {"skipped": str(exc)}
                continue
            setup = time.perf_counter() - t0
            try:
                t = best_of(lambda: op.matmat(V), self.sizes.repeats)
                used = sum(1 for _, pairs in op.plan.assignment if pairs)
                out[name] = {
                    **t, "setup_seconds": setup, "mode": op.mode, "tile": op.tile,
                    "store_bytes_read": op.streamed_bytes_per_pass,
                    "bytes_kept_in_memory": op.cached_bytes,
                    "bytes_moved": 2 * BLOCK * n * 8 * used,
                    # N² a second: the full symmetric matrix applied (its upper tiles built)
                    "matrix_entries_per_s": (n * n / t["seconds"]) if name == "recompute"
                    else None}
            finally:
                op.close()
            self.log(f"bench:   {t['seconds']:.3f} s a pass")
        return out

    # -- scaling
    def subset_operator(self, addresses, n: int, X, kernel):
        """The recompute operator at N = ``n`` that runs on ``addresses`` only: the plan made
        with the cluster's facts restricted to those workers."""
        from .operator import Facts, KernelOperator, make_plan
        from .spec import make_cluster_spec, make_solver_spec

        keep = set(addresses)
        workers = tuple(w for w in self.workers if w[0] in keep)
        gpus = tuple(g for g in self.gpus if g[0] in keep) if self.gpus else None
        solver = make_solver_spec(n, method="lobpcg", operator="recompute", precision="float64")
        plan = make_plan(solver, make_cluster_spec(device=self.device),
                         Facts(n=n, workers=workers, gpus=gpus), tile=self.tile)
        return KernelOperator(self.client, plan, kernel=kernel, rows=X,
                              gpus={w: self.names[w] for w in keep if w in self.names})

    def scaling(self, full: dict | None = None) -> dict:
        """Strong scaling (N fixed) and weak scaling (N ∝ √k, so N²/k is fixed) of the
        recompute pass on the first k workers, k = 1, 2, 4, …; each (k, N) timed once, and
        ``full`` (the recompute pass of :meth:`passes`, on every worker at N) reused."""
        import numpy as np

        from .spec import KernelSpec, make_spec

        n = self.sizes.n
        counts = scaling_counts(len(self.addresses), self.sizes.max_scaling_workers)
        kernel = KernelSpec(kind="ntk", depth=BENCH_DEPTH)
        X = make_spec(data="sphere", n=n, d=BENCH_D, depth=BENCH_DEPTH, seed=0).data.rows()
        n1 = max(2, round(n / math.sqrt(counts[-1])))
        out = {"operator": "recompute", "tile": self.tile, "workers": counts,
               "strong": [], "weak": []}
        timed = {}
        if full and "seconds" in full and full.get("tile") == self.tile:
            timed[(len(self.addresses), n)] = {k: full[k] for k in BEST_OF_KEYS}
        for kind in ("strong", "weak"):
            for k in counts:
                m = n if kind == "strong" else min(n, round(n1 * math.sqrt(k)))
                if (k, m) not in timed:
                    self.log(f"bench: {kind} scaling: {k} worker(s), N = {m}")
                    op = self.subset_operator(self.addresses[:k], m, X[:m], kernel)
                    try:
                        V = np.random.default_rng(2).standard_normal((m, BLOCK))
                        timed[(k, m)] = best_of(lambda: op.matmat(V), self.sizes.repeats)
                    finally:
                        op.close()
                out[kind].append({"workers": k, "n": m, **timed[(k, m)]})
            t1 = out[kind][0]["seconds"]
            for row in out[kind]:
                if kind == "strong":
                    row["speedup"] = t1 / row["seconds"]
                    row["efficiency"] = t1 / (row["workers"] * row["seconds"])
                else:
                    row["efficiency"] = t1 / row["seconds"]
            last = out[kind][-1]
            self.log(f"bench:   {kind} efficiency at {last['workers']} worker(s): "
                     f"{last['efficiency']:.2f}")
        return out

    # -- the reference problem
    def reference(self) -> dict:
        """The reference problem solved end to end on the cluster (store + distributed LOBPCG
        at tol 1e-10; on GPUs without a store), checked against :data:`REFERENCE_LAMBDA`."""
        from .pipeline import run
        from .spec import make_spec

        m = self.sizes.reference_n
        expected = REFERENCE_LAMBDA[m]
        spec = make_spec(data="sphere", n=m, d=REFERENCE_D, depth=REFERENCE_DEPTH,
                         seed=REFERENCE_SEED, method="lobpcg").with_solver(tol=REFERENCE_TOL)
        store = None if self.device == "gpu" else os.path.join(self.scratch, "reference.zarr")
        tile = bench_tile(m, len(self.addresses), self.memories)
        self.log(f"bench: reference problem: sphere N = {m}, d = {REFERENCE_D}, depth "
                 f"{REFERENCE_DEPTH}, seed {REFERENCE_SEED}; lobpcg to tol {REFERENCE_TOL:g}"
                 + (f" through a store (tile {tile})" if store else ""))
        say = lambda msg: self.log(f"bench:   reference: {msg}")  # noqa: E731
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(_LinesTo(say)):  # the assembly's progress line
            result = run(spec, os.path.join(self.scratch, "reference"), self.cluster,
                         store=store, tile=tile, dtype="float64" if store else None, log=say,
                         client=self.client)
        seconds = time.perf_counter() - t0
        lam, acc = result.lambda_min, result.relative_accuracy
        out = {"n": m, "d": REFERENCE_D, "depth": REFERENCE_DEPTH, "seed": REFERENCE_SEED,
               "kernel": "ntk", "data": "sphere", "tol": REFERENCE_TOL, "expected": expected,
               "lambda_min": lam, "status": result.status, "relative_accuracy": acc,
               "seconds": seconds, "passes": result.passes, "operator": result.operator,
               "precision": result.precision, "method": result.method,
               "store": bool(store), "tile": tile}
        out.update(judge_reference(lam, result.status, acc, expected))
        self.log(f"bench:   reference {out['verdict']}: λ_min = {lam!r} (expected "
                 f"{expected!r}), {seconds:.1f} s, {result.passes} passes")
        return out


class _LinesTo:
    """A text stream that hands each line written to it to ``log``: what the pipeline writes
    to stderr (the assembly's progress) becomes the bench's progress lines, and stderr keeps
    only errors."""

    def __init__(self, log):
        self.log, self.pending = log, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text.replace("\r", "\n")).split("\n")
        for line in lines:
            if line.strip():
                self.log(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def judge_reference(lam, status: str, accuracy, expected: float) -> dict:
    """PASS when certified and |λ − ref| ≤ ref·(certified relative accuracy + 1e-10); the
    verdict, the numbers and, on FAIL, one line saying why."""
    allowed = abs(expected) * ((accuracy or 0.0) + REFERENCE_TOL)
    diff = None if lam is None else abs(lam - expected)
    if status != "certified" or lam is None:
        message = (f"reference λ_min not certified: status {status}, computed "
                   f"{lam!r}, expected {expected!r}")
    elif not (math.isfinite(lam) and math.isfinite(allowed) and diff <= allowed):
        message = (f"reference λ_min wrong: got {lam!r}, expected {expected!r} "
                   f"(|difference| {diff:.3e} > allowed {allowed:.3e})")
    else:
        message = None
    return {"abs_difference": diff, "allowed": allowed,
            "relative_difference": None if diff is None else diff / abs(expected),
            "pass": message is None, "verdict": "PASS" if message is None else "FAIL",
            "message": message}


#: What :func:`best_of` returns.
BEST_OF_KEYS = ("seconds", "median_seconds", "samples")


def best_of(fn, repeats: int) -> dict:
    """Seconds of ``fn()`` measured here: one warm-up call, then the best of ``repeats``
    (with their median and samples). The dry run's machine rates use it too."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"seconds": min(samples), "median_seconds": statistics.median(samples),
            "samples": samples}


def _num(value, fmt: str = ".3g", missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


# ------------------------------------------------------------------------------- the job

def bench(out: str, cluster=None, quick: bool = False, n: int | None = None,
          store_dir: str | None = None, drop_cache: bool = True, log=print) -> dict:
    """Measure the cluster (``cluster``, a :class:`ntkdist.spec.ClusterSpec`) and write
    ``out/report.json``, ``out/report.md`` and the figures. Returns the report; its ``status`` is FAIL when the
    reference problem came out wrong or uncertified."""
    from .spec import ClusterSpec

    cluster = cluster or ClusterSpec()
    sizes = make_sizes(quick, n)
    if sizes.reference_n not in REFERENCE_LAMBDA:
        raise BenchError(f"no reference value for N = {sizes.reference_n}")
    created = not os.path.exists(out)
    prepare_out(out)
    t0 = time.perf_counter()
    try:
        with scratch_folder(out, store_dir) as scratch:
            with cluster.connect(log=log) as c:
                _wait_for_a_worker(c, cluster)
                report = _measure(c, cluster, sizes, scratch, drop_cache, log)
    except BaseException:
        if created:  # a run that failed before its report leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    report["wall_seconds"] = time.perf_counter() - t0
    write_report(out, report, log)
    return report


def _wait_for_a_worker(client, cluster) -> None:
    if cluster.kind in ("address", "scheduler_file"):
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except (TimeoutError, OSError):
            raise BenchError(f"the Dask cluster has no workers (none connected within "
                             f"{WORKER_WAIT:.0f} s)") from None


def _measure(client, cluster, sizes: Sizes, scratch: str, drop_cache: bool, log) -> dict:
    b = _Bench(client, cluster, sizes, scratch, drop_cache, log)
    return _measure_with(b, client, cluster, sizes, log)


def _measure_with(b, client, cluster, sizes: Sizes, log) -> dict:
    from . import __version__

    b.check_room()
    log(f"bench: {'quick, ' if sizes.quick else ''}{len(b.addresses)} worker(s) "
        f"({cluster.kind}, {cluster.device}); N = {sizes.n}, tile {b.tile}, block {BLOCK}, "
        f"best of {sizes.repeats}; reference N = {sizes.reference_n}")
    report = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "ntkdist_version": __version__, "quick": sizes.quick,
              "sizes": {"n": sizes.n, "tile": b.tile, "block": BLOCK, "d": BENCH_D,
                        "depth": BENCH_DEPTH, "repeats": sizes.repeats,
                        "reference_n": sizes.reference_n},
              "fingerprint": fingerprint(client, cluster)}
    report["round_trip"] = b.round_trip()
    report["workers"] = b.worker_rates()
    report["store"], path = b.store()
    report["passes"] = b.passes(path)
    shutil.rmtree(path, ignore_errors=True)  # room for the reference's store
    report["scaling"] = b.scaling(report["passes"].get("recompute"))
    report["reference"] = b.reference()
    ref = report["reference"]
    report["status"] = ref["verdict"]
    report["headline"] = headline(ref)
    report["metrics"] = metrics(report)
    return report


def headline(ref: dict) -> str:
    """The report's first line: the reference problem's time to a certified λ_min."""
    if ref["pass"]:
        return f"time to a certified λ_min at N = {ref['n']}: {ref['seconds']:.1f} s"
    return f"time to a certified λ_min at N = {ref['n']}: FAIL ({ref['message']})"


# ---------------------------------------------------------------------- report and compare

def metrics(report: dict) -> list:
    """The report's figures as rows [name, value, unit], in a fixed order (what ``bench
    compare`` sets side by side)."""
    ref, w, st = report["reference"], report["workers"], report["store"]
    mean = lambda xs: (sum(xs) / len(xs)) if xs and None not in xs else None  # noqa: E731
    rows = [[f"time to a certified λ_min (N = {ref['n']})",
             ref["seconds"] if ref["pass"] else None, "s"],
            ["reference check", ref["verdict"], ""],
            ["reference passes over the kernel", ref["passes"], ""],
            ["workers", report["fingerprint"]["cluster"]["workers"], ""],
            ["N (passes, store, scaling)", report["sizes"]["n"], ""],
            ["Dask round trip (median)", 1e3 * report["round_trip"]["median_seconds"], "ms"],
            ["tile throughput, all workers", sum(r["tile"]["entries_per_s"] for r in w) / 1e6,
             "M entries/s"],
            ["tile throughput a worker (mean)",
             mean([r["tile"]["entries_per_s"] / 1e6 for r in w]), "M entries/s"],
            ["tile / arccos floor (mean)", mean([r["tile_fraction_of_floor"] for r in w]), ""]]
    for dt in ("float64", "float32"):
        rows += [[f"thin GEMM {dt} a worker (mean)", mean([r["thin"][dt]["gflops"] for r in w]),
                  "GFLOP/s"],
                 [f"square GEMM {dt} a worker (mean)",
                  mean([r["peak"][dt]["gflops"] for r in w]), "GFLOP/s"],
                 [f"thin / square GEMM {dt} (mean)",
                  mean([r["thin_fraction_of_peak"][dt] for r in w]), ""]]
    dd = st["dd"]
    rows += [["store write, ntkdist", st["write"]["gb_per_s"], "GB/s"],
             ["store write, dd", (dd.get("write") or {}).get("gb_per_s"), "GB/s"],
             ["store read, ntkdist", st["read"]["gb_per_s"], "GB/s"],
             ["store read, dd", (dd.get("read") or {}).get("gb_per_s"), "GB/s"]]
    for name, p in report["passes"].items():
        rows.append([f"pass, {name} operator", p.get("seconds"), "s"])
    for kind in ("strong", "weak"):
        last = report["scaling"][kind][-1]
        rows.append([f"{kind} scaling efficiency at {last['workers']} worker(s)",
                     last["efficiency"], ""])
    return rows


def write_report(out: str, report: dict, log=None) -> None:
    """report.json first (it marks the folder as a bench's), then report.md and the
    figures; figures a previous bench left and this one did not draw are removed."""
    from .results import write_json, write_text

    report["figures"] = list(FIGURES)  # what the figures will be, if they are drawn
    write_json(os.path.join(out, REPORT_JSON), report)
    drawn = []
    try:
        from .bench_figures import draw

        drawn = draw(report, out)
    except Exception as exc:  # noqa: BLE001 - a figure is not worth the measurements
        if log:
            log(f"bench: figures not drawn ({type(exc).__name__}: {exc})")
    report["figures"] = [os.path.basename(p) for p in drawn]
    write_json(os.path.join(out, REPORT_JSON), report)
    write_text(os.path.join(out, REPORT_MD), markdown(report))
    for name in set(FIGURES) - set(report["figures"]):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def _worker_line(w: dict) -> str:
    """A worker's host, CPU, Dask threads, BLAS threads and memory limit, in words."""
    blas = "/".join(sorted({str(b["num_threads"]) for b in w.get("blas") or []})) or "?"
    memory = _num(w["memory_limit"] / 2 ** 30 if w["memory_limit"] else None, ".1f", "no")
    return (f"{w['host']}: {w['cpu']}, {w['threads']} Dask thread(s), {blas} BLAS thread(s), "
            f"{memory} GiB memory limit")


def _table(head: list, rows: list) -> list:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(report: dict) -> str:
    """report.md: the headline, then its breakdown."""
    ref, fp, s = report["reference"], report["fingerprint"], report["sizes"]
    c = fp["cluster"]
    lines = ["# ntkdist bench", "", f"**{report['headline']}**", ""]
    if ref["pass"]:
        lines.append(f"PASS: λ_min = {ref['lambda_min']!r} (reference {ref['expected']!r}, "
                     f"|difference| {ref['abs_difference']:.2e} ≤ allowed "
                     f"{ref['allowed']:.2e}; certified relative accuracy "
                     f"{ref['relative_accuracy']:.1e}).")
    else:
        lines.append(f"FAIL: {ref['message']}.")
    lines += ["", f"{'Quick run' if report['quick'] else 'Full run'} on {c['workers']} "
              f"worker(s) ({c['kind']} cluster, {c['device']}, {c['hosts']} host(s)), "
              f"{fp['date']}. N = {s['n']} for the passes, the store and strong scaling; tile "
              f"{s['tile']}; block {s['block']}; rows on the sphere, d = {s['d']}, NTK depth "
              f"{s['depth']}. Times are the best of {s['repeats']} after a warm-up (medians "
              "and samples in report.json).", "", "## Machine", ""]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['num_threads']} threads)"
                     for b in fp["blas"]) or "unknown"
    gpus = fp["gpus"] if isinstance(fp["gpus"], str) else ", ".join(fp["gpus"])
    v = fp["versions"]
    lines += _table(["", ""], [
        ["CPU", f"{fp['cpu']}, {fp['cores']} core(s) ({fp['host']})"],
        ["memory", f"{_num(fp['memory_bytes'] and fp['memory_bytes'] / 2 ** 30, '.1f')} GiB"],
        ["GPUs", gpus], ["BLAS", blas], ["OS", fp["os"]],
        ["software", ", ".join(f"{k} {val}" for k, val in v.items() if val)],
        ["workers", "; ".join(sorted({_worker_line(w) for w in fp["workers"]}))]])
    lines += ["", "## Reference problem", "",
              f"Sphere rows N = {ref['n']}, d = {ref['d']}, seed {ref['seed']}, NTK depth "
              f"{ref['depth']}; LOBPCG to tol {ref['tol']:g}"
              + (" through a kernel store" if ref["store"] else "")
              + f", operator {ref['operator']}, {ref['precision']} products: {ref['passes']} "
              f"passes, {ref['seconds']:.2f} s end to end (rows, store, solve, certificate, "
              f"bounds). Status {ref['status']}.", ""]
    lines += ["## Workers", ""]
    rows = []
    for r in report["workers"]:
        rows.append([r["address"] + (f" ({r['gpu']})" if r.get("gpu") else ""),
                     f"{r['tile']['entries_per_s'] / 1e6:.1f}",
                     _num(r["arccos_floor_entries_per_s"] and
                          r["arccos_floor_entries_per_s"] / 1e6, ".1f"),
                     _num(r["tile_fraction_of_floor"], ".2f"),
                     f"{r['thin']['float64']['gflops']:.1f}",
                     f"{r['peak']['float64']['gflops']:.1f}",
                     f"{r['thin_fraction_of_peak']['float64']:.2f}",
                     f"{r['thin']['float32']['gflops']:.1f}",
                     f"{r['peak']['float32']['gflops']:.1f}",
                     f"{r['thin_fraction_of_peak']['float32']:.2f}"])
    lines += _table(["worker", "tile M entries/s", "arccos floor M entries/s", "of floor",
                     "thin f64 GFLOP/s", "square f64", "thin/square", "thin f32 GFLOP/s",
                     "square f32", "thin/square"], rows)
    st, dd = report["store"], report["store"]["dd"]
    ddw, ddr = dd.get("write") or {}, dd.get("read") or {}
    lines += ["", "## Store", "",
              f"{st['bytes'] / 1e6:.1f} MB (N = {st['n']}, tile {st['tile']}, {st['dtype']}) "
              f"in {st['store_dir']}; dd: {dd['count']} × 16 MiB"
              + (f" ({dd['error']})" if dd.get("error") else "") + ".", ""]
    lines += _table(["", "ntkdist GB/s", "dd GB/s", "ntkdist / dd"], [
        ["write", f"{st['write']['gb_per_s']:.3f}", _num(ddw.get("gb_per_s"), ".3f"),
         _num(st["write"]["vs_dd"], ".2f")],
        ["read", f"{st['read']['gb_per_s']:.3f}", _num(ddr.get("gb_per_s"), ".3f"),
         _num(st["read"]["vs_dd"], ".2f")]])
    lines += ["", f"Page cache before the reads: {st['page_cache']}.", "",
              "## One pass", "",
              f"A `matmat` of an N×{s['block']} block, N = {s['n']}. Dask round trip: "
              f"{1e3 * report['round_trip']['median_seconds']:.2f} ms (median of "
              f"{len(report['round_trip']['samples'])}).", ""]
    rows = []
    for name, p in report["passes"].items():
        if "skipped" in p:
            rows.append([name, "skipped: " + p["skipped"], "", "", "", ""])
            continue
        rows.append([name, f"{p['seconds']:.3f}", f"{p['setup_seconds']:.2f}",
                     f"{p['store_bytes_read'] / 1e6:.1f}",
                     f"{p['bytes_kept_in_memory'] / 1e6:.1f}", f"{p['bytes_moved'] / 1e6:.2f}"])
    lines += _table(["operator", "s a pass", "set-up s", "MB read from the store",
                     "MB kept in memory", "MB moved"], rows)
    sc = report["scaling"]
    lines += ["", "## Scaling", "",
              f"One recompute pass on the first k workers (tile {sc['tile']}). Strong: N fixed, "
              "efficiency T₁/(k·T_k). Weak: N_k = N₁·√k (the same work a worker), efficiency "
              "T₁/T_k.", ""]
    lines += _table(["workers", "strong N", "s", "speed-up", "efficiency", "weak N", "s",
                     "efficiency"],
                    [[a["workers"], a["n"], f"{a['seconds']:.3f}", f"{a['speedup']:.2f}",
                      f"{a['efficiency']:.2f}", b["n"], f"{b['seconds']:.3f}",
                      f"{b['efficiency']:.2f}"] for a, b in zip(sc["strong"], sc["weak"])])
    if report.get("figures"):
        lines += [""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def load_report(path: str) -> dict:
    """A bench report from its folder or its report.json; one line if it is not one."""
    file = os.path.join(path, REPORT_JSON) if os.path.isdir(path) else path
    try:
        with open(file) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(f"bench compare: {path!r} holds no bench report ({REPORT_JSON})") \
            from None
    except OSError as exc:
        raise InputError(f"bench compare: cannot read {file!r}: {exc.strerror or exc}") from None
    except ValueError:
        raise InputError(f"bench compare: {file!r} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(
            doc.get("metrics"), list):
        raise InputError(f"bench compare: {file!r} is not an ntkdist bench report")
    if doc.get("format_version") != FORMAT_VERSION:
        raise InputError(f"bench compare: {file!r} is a bench report of format version "
                         f"{doc.get('format_version')!r}; this ntkdist reads version "
                         f"{FORMAT_VERSION}")
    fp = doc.get("fingerprint")
    good = isinstance(fp, dict) and isinstance(fp.get("cluster", {}), dict) and all(
        isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)
        and isinstance(m[2], str) and (m[1] is None or isinstance(m[1], (str, int, float)))
        for m in doc["metrics"])
    if not good:
        raise InputError(f"bench compare: {file!r} is a damaged bench report (its fingerprint "
                         "or metrics are not as a bench writes them)")
    return doc


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def compare(a: str, b: str) -> str:
    """Two reports side by side as aligned text: metric, A, B, B/A."""
    ra, rb = load_report(a), load_report(b)

    def rows(r):
        return {m[0]: m for m in r["metrics"] if isinstance(m, list) and len(m) == 3}

    ma, mb = rows(ra), rows(rb)
    names = list(ma) + [k for k in mb if k not in ma]
    table = [["metric", "A", "B", "B/A"]]
    for key in ("host", "cpu", "cores", "device", "date"):
        va, vb = ((r["fingerprint"].get("cluster", {}) if key == "device" else
                   r["fingerprint"]).get(key) for r in (ra, rb))
        table.append([key, str(va), str(vb), ""])
    for name in names:
        va, vb = (ma.get(name) or [None] * 3)[1], (mb.get(name) or [None] * 3)[1]
        unit = (ma.get(name) or mb.get(name))[2]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in (va, vb))
        try:
            ratio = f"{vb / va:.3g}" if numeric and va else "-"
        except (OverflowError, ZeroDivisionError):
            ratio = "-"
        table.append([f"{name} ({unit})" if unit else name, _cell(va), _cell(vb), ratio])
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = [f"A: {os.path.abspath(a)}", f"B: {os.path.abspath(b)}"]
    for k, r in enumerate(table):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                           zip(r[1:], widths[1:])]).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    sa, sb = (r.get("sizes") if isinstance(r.get("sizes"), dict) else {} for r in (ra, rb))
    differ = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if differ or bool(ra.get("quick")) != bool(rb.get("quick")):
        lines.append("warning: the reports measured different sizes ("
                     + ", ".join([f"{k} {sa.get(k)} against {sb.get(k)}" for k in differ]
                                 + (["--quick against a full run"]
                                    if bool(ra.get("quick")) != bool(rb.get("quick")) else []))
                     + "): ratios of sized figures (a pass, the scaling) are not like for like")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command line

def add_bench_parser(sub) -> None:
    """The ``bench`` subcommand: ``bench [options] --out DIR`` or ``bench compare A B``."""
    from .cli import _add_cluster_args, _add_device_arg, _count

    p = sub.add_parser(
        "bench", help="measure the cluster for ntkdist's workload (time to a certified λ_min "
                      "and its breakdown); 'bench compare A B' sets two reports side by side",
        usage="ntkdist bench [--quick] [--n N] [--store-dir DIR] [--no-drop-cache] --out DIR "
              "[cluster options]\n       ntkdist bench compare A B",
        description="Measure a Dask cluster for ntkdist's workload, or compare two reports "
                    "(docs/bench.md).")
    p.add_argument("words", nargs="*", metavar="compare A B",
                   help="compare two reports (folders or report.json files)")
    p.add_argument("--out", help="report folder (created; a previous bench's is replaced)")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes (N = {QUICK_N}, reference N = {REFERENCE_QUICK_N}, "
                        "scaling over 1-2 workers): about 20 s on 2 cores")
    p.add_argument("--n", type=_count, help=f"N of the passes, the store and the scaling runs "
                                            f"(default {DEFAULT_N}, quick {QUICK_N}; "
                                            f"{MIN_N} to {MAX_N})")
    p.add_argument("--store-dir", metavar="DIR",
                   help="where the stores and dd's file are written, and removed after "
                        "(default: DIR/bench-store under --out)")
    p.add_argument("--no-drop-cache", action="store_true",
                   help="do not drop the page cache before the reads (the benchmark's own "
                        "files are still evicted with posix_fadvise)")
    _add_cluster_args(p)
    _add_device_arg(p)


def cmd_bench(args, log=print) -> int:
    """``ntkdist bench``: 0 on PASS, 1 on FAIL (one line on stderr); errors raise."""
    from .cli import _options
    from .config import cluster_request

    words = list(args.words or [])
    if words:
        if words[0] != "compare" or len(words) != 3:
            raise SpecError(f"bench takes 'compare A B' or no positional arguments, got "
                            f"{' '.join(words)!r} (see 'ntkdist bench --help')")
        given = [k for k, v in vars(args).items()
                 if k not in ("words", "command") and v not in (None, False, [])]
        if given:
            raise SpecError(f"bench compare takes two reports and no options, got "
                            f"--{given[0].replace('_', '-')}")
        print(compare(words[1], words[2]))
        return 0
    if not args.out:
        raise SpecError("the following arguments are required: --out")
    cluster = cluster_request(_options(args))
    report = bench(args.out, cluster, quick=args.quick, n=args.n, store_dir=args.store_dir,
                   drop_cache=not args.no_drop_cache, log=log)
    print(report["headline"])
    print(f"report: {os.path.join(args.out, REPORT_MD)}")
    if report["status"] != "PASS":
        print(f"ntkdist: error: bench: {report['reference']['message']}", file=sys.stderr)
        return 1
    return 0
