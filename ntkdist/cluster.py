"""Dask clusters: a LocalCluster sized to the machine, or a running scheduler to attach to."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from .errors import NtkdistError


class ClusterError(NtkdistError):
    """A scheduler cannot be reached or a cluster cannot be started."""


class _DropRecords(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__("ntkdist")
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


#: What Dask logs on our local clusters that ntkdist reports itself, in one line: a task's
#: failure with its traceback (the workers' ``distributed.worker``; the client raises the
#: error), a worker's loss with the data it held and a task whose workers kept dying (the
#: in-process scheduler's), and a heartbeat cut short when the cluster closes at the end of
#: a run (a worker's traceback printed after the result).
_WORKER_QUIET = ("Compute Failed", "Failed to communicate with scheduler during heartbeat")
_SCHEDULER_QUIET = ("Removing worker", "Task %s marked as failed")
#: The local scheduler's HTTP server (started with or without a dashboard) on a free port:
#: on its default, 8787, a second cluster on the machine warns that the port is in use.
_NO_DASHBOARD = {"dashboard": False, "dashboard_address": ":0"}


def _quiet_workers_plugin():
    """A worker plugin that installs the ``_WORKER_QUIET`` filter in each worker process
    (restarted workers included). Made here so that this module does not import distributed
    at import time; Dask pickles the class by value."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietTaskFailures(WorkerPlugin):
        name = "ntkdist-quiet-task-failures"

        def setup(self, worker):
            import logging

            from ntkdist.cluster import _WORKER_QUIET, _DropRecords

            log = logging.getLogger("distributed.worker")
            if not any(isinstance(f, _DropRecords) for f in log.filters):
                log.addFilter(_DropRecords(_WORKER_QUIET))

    return QuietTaskFailures()


@contextlib.contextmanager
def _quiet_local_cluster(client):
    """Our local cluster's task failures and lost workers are reported by ntkdist as one line;
    Dask's own log records of them (tracebacks, lists of lost keys) are dropped."""
    quiet = _DropRecords(_SCHEDULER_QUIET)
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addFilter(quiet)
    try:
        client.register_plugin(_quiet_workers_plugin())
        yield client
    finally:
        scheduler_log.removeFilter(quiet)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_count() -> int:
    """GPUs this process sees through CuPy; a ClusterError when CuPy or CUDA is missing."""
    try:
        import cupy
    except ImportError:
        raise ClusterError("--device gpu needs CuPy (pip install 'ntkdist[gpu]')") from None
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDA's errors come in several types
        raise ClusterError(f"--device gpu: CUDA sees no GPU ({type(exc).__name__}: {exc})") from None


def _gpu_cluster(workers, memory_limit):
    """One worker per GPU: dask-cuda's LocalCUDACluster (each worker pinned to its GPU) when
    it is installed; with a single GPU a one-worker LocalCluster does the same."""
    from distributed import LocalCluster

    gpus = gpu_count()
    if gpus < 1:
        raise ClusterError("--device gpu: CUDA sees no GPU")
    if workers is not None and workers != gpus:
        raise ClusterError(f"--device gpu starts one worker per GPU ({gpus} here); "
                           f"leave out --workers, or start the workers yourself and pass "
                           f"--scheduler")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        if gpus > 1:
            raise ClusterError(f"--device gpu with {gpus} GPUs needs dask-cuda to pin one "
                               "worker to each (pip install 'ntkdist[gpu]')") from None
        return LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                            memory_limit=memory_limit or "auto", dashboard_address=None,
                            scheduler_kwargs=_NO_DASHBOARD, silence_logs=logging.ERROR)
    return LocalCUDACluster(threads_per_worker=1, memory_limit=memory_limit or "auto",
                            dashboard_address=None, scheduler_kwargs=_NO_DASHBOARD,
                            silence_logs=logging.ERROR)


def _local_cluster(device, workers, memory_limit, n_workers, env):
    from distributed import LocalCluster

    if device == "gpu":
        return _gpu_cluster(workers, memory_limit)
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        memory_limit=memory_limit or "auto", dashboard_address=None,
                        scheduler_kwargs=_NO_DASHBOARD, silence_logs=logging.ERROR, env=env)


@contextlib.contextmanager
def _sigint_ignored_by_workers():
    """SIGINT ignored while the local workers start, so that they inherit it ignored: Ctrl-C
    in a terminal signals the whole process group, and each worker would print its own
    KeyboardInterrupt traceback; this process alone handles it (one line, the workers closed
    with the cluster)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _check_scheduler_file(path: str) -> None:
    """Refuse (ClusterError, one line) a scheduler file that is missing, unreadable, or not
    the JSON object with a text ``address`` that ``dask scheduler --scheduler-file`` writes."""
    import json

    if not os.path.exists(path):
        raise ClusterError(f"scheduler file {path!r} does not exist")
    for _ in range(5):  # a scheduler may be writing it now: a moment to finish
        try:
            with open(path) as f:
                info = json.load(f)
            break
        except OSError as exc:
            raise ClusterError(f"cannot read scheduler file {path!r}: "
                               f"{exc.strerror or exc}") from None
        except ValueError:  # JSON's, and a text that is not UTF-8
            info = None
            time.sleep(0.4)
    if not isinstance(info, dict) or not isinstance(info.get("address"), str):
        raise ClusterError(f"scheduler file {path!r} is not a Dask scheduler file (a JSON "
                           "object with an 'address', as `dask scheduler --scheduler-file` "
                           "writes)")


@contextlib.contextmanager
def connect(scheduler: str | None = None, scheduler_file: str | None = None,
            workers: int | None = None, memory_limit: str | None = None,
            device: str = "cpu"):
    """Yield a ``distributed.Client``.

    With ``scheduler`` (an address) or ``scheduler_file`` attach to a running cluster, the way
    batch jobs run it; otherwise start a ``LocalCluster`` of ``workers`` processes (default:
    one per core) with one thread each, and numba/BLAS threads split among them. With
    ``device="gpu"`` the local cluster has one worker per GPU (:func:`_gpu_cluster`).
    """
    from distributed import Client

    if scheduler and scheduler_file:
        raise ClusterError("give either --scheduler or --scheduler-file, not both")
    if device not in ("cpu", "gpu"):
        raise ClusterError(f"device must be cpu or gpu, got {device!r}")
    if scheduler or scheduler_file:
        if scheduler_file:
            _check_scheduler_file(scheduler_file)
        try:
            client = Client(address=scheduler, scheduler_file=scheduler_file, timeout="20s")
        except (OSError, TimeoutError, ValueError, TypeError, KeyError, AssertionError) as exc:
            where = scheduler or scheduler_file
            raise ClusterError(f"cannot reach the Dask scheduler at {where!r} ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    cores = _cpu_count()
    n_workers = workers or cores
    if n_workers < 1:
        raise ClusterError(f"--workers must be >= 1, got {n_workers}")
    threads = str(max(1, cores // n_workers))
    env = {"NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    try:
        with _sigint_ignored_by_workers():
            cluster = _local_cluster(device, workers, memory_limit, n_workers, env)
    except ClusterError:
        raise
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # dask-cuda/NVML's, too
        raise ClusterError(f"cannot start a local Dask cluster ({type(exc).__name__}: "
                           f"{exc})") from None
    try:
        with Client(cluster) as client, _quiet_local_cluster(client):
            yield client
    finally:
        cluster.close()
