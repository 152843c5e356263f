"""Batch clusters: Dask workers started as Slurm or PBS jobs through dask-jobqueue.

``--cluster slurm`` (or ``pbs``) submits ``jobs`` jobs of ``cores`` cores and ``memory`` each,
``processes`` workers a job (default: one a core; with ``--device gpu``, one a
GPU, started by ``dask-cuda``). The scheduler runs in this process. The run

* waits for the workers, printing their count as they connect, and gives up after
  ``worker_timeout`` seconds with one line (jobs still queued, where their logs are);
* keeps the jobs it asked for: the cluster is adaptive with ``minimum = maximum = jobs`` (or the
  ``adapt`` range), so a job that ends (walltime, ``scancel``, a node lost) is replaced by a
  new one, and Dask recomputes the lost tasks (finished tiles are already in the store);
* retires each worker before its job's walltime: workers get ``--lifetime`` (walltime less a
  margin) with a random ``--lifetime-stagger``, so that they leave one by one, handing their
  data over, and new jobs take their place, and a long study outlives any one job;
* cancels every job at the end: on success, on error, on Ctrl-C, SIGTERM and SIGHUP. After a
  SIGKILL of this process the workers exit by themselves ``death_timeout`` (60 s) after
  losing the scheduler.

The option checks, walltimes, lifetimes and job scripts are pure and tested without a batch
system; :func:`make_cluster`, :func:`connect_batch` and the callback that replaces ended jobs
need one (tests/test_slurm.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time

from .errors import NtkdistError, SpecError

#: Seconds the run waits for its workers when no ``worker_timeout`` is given.
DEFAULT_WORKER_TIMEOUT = 1800.0
#: Seconds a worker waits for a lost scheduler before it exits (and its job ends).
DEATH_TIMEOUT = 60
#: The walltime when none is given (dask-jobqueue's own default).
DEFAULT_WALLTIME = "00:30:00"
#: The worker module of a job: Dask's own, or dask-cuda's for GPU jobs.
CPU_WORKER = "distributed.cli.dask_worker"
GPU_WORKER = "dask_cuda.cli"

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)$")


class BatchError(NtkdistError):
    """A batch cluster cannot be started, or its workers do not come."""


def parse_walltime(value) -> int:
    """Seconds of a walltime: ``HH:MM:SS``, ``D-HH:MM:SS`` or a number of minutes."""
    import datetime

    if isinstance(value, bool):
        value = None
    if isinstance(value, datetime.time) and value.tzinfo is None:  # TOML's 04:00:00
        value = f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    if isinstance(value, int) and value > 0:
        return 60 * value
    text = str(value).strip() if isinstance(value, str) else ""
    if not text.isascii():  # '²'.isdigit() is true, int('²') fails
        text = ""
    if text.isdigit() and int(text) > 0:
        return 60 * int(text)
    m = _WALLTIME.match(text)
    if m:
        days, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((days * 24 + h) * 60 + mi) * 60 + s
        if seconds >= 60:
            return seconds
    raise SpecError(f"walltime must be HH:MM:SS, D-HH:MM:SS or minutes, at least one minute, "
                    f"got {value!r}")


def format_walltime(seconds: int, kind: str) -> str:
    """Slurm: ``D-HH:MM:SS`` from a day on; PBS: ``HH:MM:SS`` (hours past 24)."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    if kind == "slurm" and h >= 24:
        return f"{h // 24}-{h % 24:02d}:{m:02d}:{s:02d}"
    return f"{h:02d}:{m:02d}:{s:02d}"


def lifetime(walltime_s: int) -> tuple[int, int] | None:
    """(lifetime, stagger) in seconds for a worker of a job of ``walltime_s``: it retires
    between lifetime − stagger and lifetime + stagger, at least a margin (10 % of the
    walltime, from one to ten minutes) before its job ends. None when the walltime is too
    short to leave a margin."""
    margin = min(max(0.1 * walltime_s, 60), 600)
    stagger = int(min(0.05 * walltime_s, 300))
    life = int(walltime_s - margin - stagger)
    return (life, stagger) if life - stagger >= 30 else None


#: Values pasted into job scripts: names (queue, account, interface) and paths (the
#: workers' scratch and log folders, where $VAR and ${VAR} stay for the job's shell).
_NAME = re.compile(r"^[A-Za-z0-9_.,:+@%/=-]+$")
_PATH = re.compile(r"^[A-Za-z0-9_.,:+@%/=~${}-]+$")
#: Upper limits of a batch cluster's counts (a typo must not flood the queue).
MAX_JOBS, MAX_CORES, MAX_GPUS = 10000, 4096, 64


def _text(value, name: str, pattern=None) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise SpecError(f"{name} must be a non-empty one-line string, got {value!r}")
    if pattern is not None and not pattern.match(value):
        what = "letters, digits and _.,:+@%/=-" if pattern is _NAME else \
            "a path without spaces, quotes or shell operators ($VAR allowed)"
        raise SpecError(f"{name} must be {what} (it goes into the job script), got {value!r}")
    return value


def _count(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{name} must be at most {maximum}, got {value}")
    return value


def parse_adapt(value) -> tuple[int, int]:
    """``"MIN:MAX"`` (or a two-item list) → (MIN, MAX) with 0 <= MIN <= MAX and MAX >= 1."""
    pair = None
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*:\s*[0-9]+\s*", value):
        pair = tuple(int(x) for x in value.split(":"))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        pair = tuple(value)
    if pair is None or not (1 <= pair[0] <= pair[1] <= MAX_JOBS):
        raise SpecError(f"adapt must be MIN:MAX jobs with 1 <= MIN <= MAX <= {MAX_JOBS}, got "
                        f"{value!r} (ntkdist plans its work on the workers it has: at least one "
                        "job stays)")
    return pair


def check_batch_options(kind: str, device: str, o: dict) -> dict:
    """The ClusterSpec fields of a ``kind`` (slurm, pbs) cluster from the options given
    (``o``: option → value, absent when not given), checked; a SpecError naming the first bad
    one. Cores, memory, queue, account and walltime not given come from Dask's jobqueue
    configuration (``jobqueue.<kind>.*``), where a site may set them."""
    import dask.config

    from .spec import MIN_WORKER_MEMORY, parse_size

    def site(key):
        return dask.config.get(f"jobqueue.{kind}.{key}", None)

    out = {}
    for name in ("queue", "account", "interface", "local_directory", "job_logs"):
        value = o.get(name, site(name.replace("_", "-")) if name in ("queue", "account",
                                                                       "interface") else None)
        if value is not None:
            out[name] = _text(value, name, _NAME if name in ("queue", "account", "interface")
                              else _PATH)
    cores = o.get("cores", site("cores"))
    memory = o.get("memory", site("memory"))
    if cores is None or memory is None:
        missing = " and ".join(n for n, v in (("cores", cores), ("memory", memory)) if v is None)
        raise SpecError(f"a {kind} cluster needs {missing} per job (--cores, --memory, or "
                        f"[cluster] in the run file, or jobqueue.{kind} in Dask's config)")
    out["cores"] = _count(cores, "cores", maximum=MAX_CORES)
    mem_bytes = parse_size(memory, "memory")
    out["memory"] = memory
    gpus = o.get("gpus_per_job")
    if gpus is not None:
        _count(gpus, "gpus_per_job", maximum=MAX_GPUS)
        if device != "gpu":
            raise SpecError("gpus_per_job is for GPU workers: add --device gpu")
        out["gpus_per_job"] = gpus
    elif device == "gpu":
        raise SpecError(f"--device gpu on a {kind} cluster needs --gpus-per-job (one worker a "
                        "GPU, started by dask-cuda)")
    default_processes = gpus if gpus is not None else out["cores"]
    processes = o.get("processes", default_processes)
    _count(processes, "processes")
    if gpus is not None and processes != gpus:
        raise SpecError(f"processes must equal gpus_per_job ({gpus}) on GPU jobs (one worker a "
                        f"GPU), got {processes}")
    if processes > out["cores"]:
        raise SpecError(f"processes ({processes}) must be at most cores ({out['cores']}): "
                        "each worker needs a core")
    if mem_bytes / processes < MIN_WORKER_MEMORY:
        raise SpecError(f"memory {memory} for {processes} worker(s) a job leaves under 256MiB "
                        "each (a Dask worker alone takes about 100 MB)")
    out["processes"] = processes
    if "jobs" in o and "adapt" in o:
        raise SpecError("give jobs (--jobs) or adapt (--adapt MIN:MAX), not both")
    if "adapt" in o:
        out["adapt"] = parse_adapt(o["adapt"])
    else:
        out["jobs"] = _count(o.get("jobs", 1), "jobs", maximum=MAX_JOBS)
    walltime = o.get("walltime", site("walltime") or DEFAULT_WALLTIME)
    out["walltime"] = format_walltime(parse_walltime(walltime), kind)
    prologue = o.get("job_prologue", ())
    if isinstance(prologue, str):
        prologue = [prologue]
    if not isinstance(prologue, (list, tuple)):
        raise SpecError(f"job_prologue must be a list of lines, got {prologue!r}")
    out["job_prologue"] = tuple(_text(line, "job_prologue line") for line in prologue)
    timeout = o.get("worker_timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                0 < timeout < float("inf")):
            raise SpecError(f"worker_timeout must be a number of seconds > 0, got {timeout!r}")
        out["worker_timeout"] = float(timeout)
    return out


def jobqueue_kwargs(spec) -> dict:
    """The keyword arguments of ``SLURMCluster`` / ``PBSCluster`` for a batch ClusterSpec."""
    walltime_s = parse_walltime(spec.walltime)
    threads = max(1, spec.cores // spec.processes)
    gpu = spec.device == "gpu"
    import dask.config

    def site(key, default):
        return list(dask.config.get(f"jobqueue.{spec.kind}.{key}", None) or default)

    # The site's Dask configuration comes first (its module loads, directives, scheduler
    # options); ntkdist's own settings and the user's options after it.
    prologue = site("job-script-prologue", [])
    prologue += [f"export {v}={threads}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                    "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")]
    prologue += list(spec.job_prologue)
    extra_args = []
    life = lifetime(walltime_s)
    if life and not gpu:  # dask-cuda's worker has no --lifetime
        extra_args += ["--lifetime", f"{life[0]}s", "--lifetime-stagger", f"{life[1]}s"]
    kwargs = dict(cores=spec.cores, memory=spec.memory, processes=spec.processes,
                  walltime=spec.walltime, job_script_prologue=prologue,
                  worker_extra_args=extra_args, death_timeout=DEATH_TIMEOUT,
                  job_name="ntkdist", log_directory=spec.job_logs or "ntkdist-jobs",
                  worker_command=GPU_WORKER if gpu else CPU_WORKER)
    for name in ("queue", "account", "interface", "local_directory"):
        if getattr(spec, name) is not None:
            kwargs[name] = getattr(spec, name)
    directives = site("job-extra-directives", [])
    if gpu and spec.kind == "slurm":
        directives.append(f"--gres=gpu:{spec.gpus_per_job}")
    if directives:
        kwargs["job_extra_directives"] = directives
    if gpu and spec.kind == "pbs":
        from dask.utils import parse_bytes

        mem = f"{max(1, parse_bytes(spec.memory) // 2 ** 20)}mb"
        kwargs["resource_spec"] = (f"select=1:ncpus={spec.cores}:ngpus={spec.gpus_per_job}"
                                   f":mem={mem}")
    scheduler = dict(dask.config.get(f"jobqueue.{spec.kind}.scheduler-options", None) or {})
    scheduler.setdefault("dashboard_address", ":0")
    if spec.interface is not None and "host" not in scheduler:
        scheduler.setdefault("interface", spec.interface)
    kwargs["scheduler_options"] = scheduler
    return kwargs


def _cluster_class(kind: str):
    """dask-jobqueue's cluster class for ``kind``. Importing dask-jobqueue replaces the
    SIGINT handler with one that exits with status 0 (its runner module's); Python's own
    goes back, so that Ctrl-C stays KeyboardInterrupt: exit 130, "interrupted"."""
    import threading

    before = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import PBSCluster, SLURMCluster
    except ImportError:
        raise BatchError(f"--cluster {kind} needs dask-jobqueue (pip install "
                         "'ntkdist[hpc]')") from None
    finally:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not before and before is not None):
            signal.signal(signal.SIGINT, before)
    return SLURMCluster if kind == "slurm" else PBSCluster


def make_cluster(spec):
    """A started (scheduler only) dask-jobqueue cluster for ``spec``; no job submitted yet."""
    import shutil

    cls = _cluster_class(spec.kind)
    submit = cls.job_cls.submit_command
    if shutil.which(submit) is None:
        raise BatchError(f"--cluster {spec.kind}: {submit} is not on PATH (is this a "
                         f"{spec.kind} login node?)")
    try:
        return cls(**jobqueue_kwargs(spec))
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise BatchError(f"cannot start the {spec.kind} cluster ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def job_script(spec) -> str:
    """The job script each worker job runs (for ``--dry-run`` and for tests)."""
    cls = _cluster_class(spec.kind)
    kwargs = {k: v for k, v in jobqueue_kwargs(spec).items() if k != "scheduler_options"}
    logs = kwargs.pop("log_directory")  # shown, not created (dask-jobqueue would create it)
    script = cls.job_cls("tcp://SCHEDULER:8786", name="ntkdist-worker", **kwargs).job_script()
    flag = {"slurm": "#SBATCH -e {0}/ntkdist-%J.err\n#SBATCH -o {0}/ntkdist-%J.out",
            "pbs": "#PBS -e {0}/\n#PBS -o {0}/"}[spec.kind].format(logs)
    lines = script.split("\n")
    prefix = "#SBATCH" if spec.kind == "slurm" else "#PBS"
    last = max((i for i, ln in enumerate(lines) if ln.startswith(prefix)), default=0)
    return "\n".join([*lines[:last + 1], flag, *lines[last + 1:]])


class SubmitFailures(logging.Filter):
    """Catches dask-jobqueue's failed submissions (``sbatch``/``qsub`` exiting non-zero), which
    it only logs, with a traceback, from its event loop: the records are dropped and the
    submit command's error lines kept, for one line of ours (:meth:`message`)."""

    LOGGERS = ("tornado.application", "asyncio", "distributed.deploy.spec",
               "distributed.deploy.adaptive", "distributed.deploy.adaptive_core")

    def __init__(self):
        super().__init__("ntkdist-batch")
        self.errors: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(exc) if exc is not None else record.getMessage()
        if "Command exited with non-zero exit code" not in text:
            return True
        lines = [ln.strip() for ln in text.replace("\\n", "\n").split("\n")]
        last = max((i for i, ln in enumerate(lines) if ln == "stderr:"), default=None)
        stderr = lines[last + 1:] if last is not None else lines[-3:]
        said = [ln.split("error:", 1)[-1].strip(" ')>") for ln in stderr if ln.strip(" ')>")]
        self.errors.append("; ".join(dict.fromkeys(said)) or "no message")
        return False

    def message(self, submit: str) -> str | None:
        return f"{submit} refused the worker job: {self.errors[-1]}" if self.errors else None

    @contextlib.contextmanager
    def installed(self):
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        for log in loggers:
            log.addFilter(self)
        try:
            yield self
        finally:
            for log in loggers:
                log.removeFilter(self)


def _jobs_submitted(cluster) -> int:
    """Jobs the dask-jobqueue cluster has submitted and not yet seen end."""
    with contextlib.suppress(Exception):
        return len(cluster.workers)
    return 0


#: Seconds between asks to the batch system whether a job whose worker has not connected
#: is still queued or running.
JOB_POLL = 5.0


def _ended_before_connecting(cluster, kind: str, seen: set) -> str | None:
    """The id of a job of ``cluster`` that the batch system no longer holds (neither queued
    nor running) and none of whose workers was ever connected (``seen``: the names seen),
    or None. Slurm's ``squeue``, PBS's ``qstat``; None whenever they cannot answer."""
    import subprocess

    jobs = {}
    with contextlib.suppress(Exception):  # the cluster's own bookkeeping, as it is now
        jobs = {str(job.job_id): name for name, job in dict(cluster.workers).items()
                if getattr(job, "job_id", None)}
    waiting = {i: name for i, name in jobs.items() if not any(
        str(w) == str(name) or str(w).startswith(f"{name}-") for w in seen if w)}
    if not waiting:
        return None
    ids = sorted(waiting)
    cmd = (["squeue", "-h", "-o", "%i", "-j", ",".join(ids)] if kind == "slurm"
           else ["qstat", *ids])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if kind == "slurm":
        if out.returncode and "Invalid job id" not in out.stderr:
            return None  # the controller did not answer: not an answer about the jobs
        alive = set(out.stdout.split())
        gone = [i for i in ids if i not in alive]
    else:  # qstat lists the jobs it holds; an ended one is "Unknown Job Id" or state F
        if out.returncode and "Unknown Job Id" not in out.stderr + out.stdout:
            return None
        text = out.stdout + out.stderr
        gone = [i for i in ids if f"Unknown Job Id {i}" in text or re.search(
            rf"^{re.escape(i)}\S*\s.*\sF\s", out.stdout, re.M)]
    return gone[0] if gone else None


def _log_tail(logs: str, job_id: str) -> str:
    """'; its log ends: LINE' from the job's .err (or .out) file in ``logs``, or ''."""
    for ext in ("err", "out"):
        path = os.path.join(logs, f"ntkdist-{job_id}.{ext}")
        with contextlib.suppress(OSError):
            with open(path, errors="replace") as f:
                lines = [line.strip() for line in f.read().splitlines()[-50:] if line.strip()]
            if lines:
                return f"; its log ends: {lines[-1][:200]}"
    return ""


def wait_for_workers(client, cluster, want: int, timeout: float | None, log, kind: str,
                     logs: str | None, failures: SubmitFailures | None = None) -> None:
    """Block until ``want`` workers are connected, logging the count as it changes; a
    BatchError after ``timeout`` seconds (None: the default), or as soon as the batch system
    refuses a job (``failures``). ``cluster``: the dask-jobqueue cluster, for its job count
    (None: not shown)."""
    timeout = timeout or DEFAULT_WORKER_TIMEOUT
    logs = logs or "ntkdist-jobs"
    submit = "sbatch" if kind == "slurm" else "qsub"
    start = time.monotonic()
    last, seen, polled = None, set(), start
    while True:
        refused = failures.message(submit) if failures is not None else None
        if refused:
            raise BatchError(refused)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        have = len(workers)
        seen |= {w.get("name") for w in workers.values()}
        if cluster is not None and have < want and time.monotonic() - polled >= JOB_POLL:
            polled = time.monotonic()
            ended = _ended_before_connecting(cluster, kind, seen)
            if ended:
                raise BatchError(f"{kind} job {ended} ended before its worker connected"
                                 f"{_log_tail(logs, ended)}; its log is in {logs}/")
        if have != last:
            jobs = f"{_jobs_submitted(cluster)} {kind} job(s) submitted, " if cluster else ""
            log(f"workers {have}/{want} connected ({jobs}{time.monotonic() - start:.0f} s)")
            last = have
        if have >= want:
            return
        if time.monotonic() - start > timeout:
            raise BatchError(f"only {have} of {want} workers connected after {timeout:.0f} s "
                             f"(jobs still queued or failing; their logs are in {logs}/); "
                             "raise --worker-timeout or check the queue")
        time.sleep(0.5)


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP raise KeyboardInterrupt while the cluster is up (so that its jobs
    are cancelled on the way out); the old handlers come back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_IGN:  # nohup: the user chose to ignore it
            continue
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored():
    """Ctrl-C, SIGTERM and SIGHUP wait while the jobs are being cancelled (a second Ctrl-C
    must not leave them queued)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


#: Seconds a job may have none of its workers connected, after it had some, before it is
#: taken as ended and replaced (Dask's own lost-worker timeout).
JOB_GONE_AFTER = 15.0


def _replace_ended_jobs(cluster, interval: float = 2.0):
    """A periodic callback on the cluster's event loop that forgets a job whose workers all
    left, for :data:`JOB_GONE_AFTER` seconds, after some had connected, and cancels it, so
    that the adaptive cluster submits a replacement. Dask does this itself for a job of one
    worker only: a job of several names its workers ``JOB-0``, ``JOB-1``…, which Dask's check
    does not match (dask-jobqueue issue 611). Every worker that ever connected is recorded as
    the cluster learns of it (a job may connect and end between two checks). Returns the
    callback."""
    import asyncio

    from tornado.ioloop import PeriodicCallback

    ever: set = set()  # names of the workers that have connected
    absent: dict = {}  # job → when it was first seen started and without workers
    update = cluster._update_worker_status

    def record(op, msg):  # the cluster's own handler of the scheduler's worker events
        if op == "add" and isinstance(msg, dict):
            ever.update(str(w.get("name")) for w in (msg.get("workers") or {}).values())
        return update(op, msg)

    cluster._update_worker_status = record

    def names_of(job) -> set:
        group = cluster.worker_spec.get(job, {}).get("group")
        return {f"{job}{suffix}" for suffix in group} if group else {str(job)}

    def check():
        workers = cluster.scheduler_info.get("workers", {}).values()
        connected = {str(w.get("name")) for w in workers}
        ever.update(connected)
        now = time.monotonic()
        for job in list(cluster.workers):
            names = names_of(job)
            if names & connected or not names & ever:  # running, or not started yet
                absent.pop(job, None)
                continue
            if now - absent.setdefault(job, now) > JOB_GONE_AFTER:
                del absent[job]
                ended = cluster.workers.pop(job, None)
                if ended is not None:
                    cluster._futures.add(asyncio.ensure_future(ended.close()))

    callback = PeriodicCallback(check, interval * 1000)
    cluster.loop.add_callback(callback.start)
    return callback


#: {id(client): SubmitFailures} of the batch clusters open in this process, for the waits
#: after a lost worker (:func:`submit_failures`).
_FAILURES: dict = {}


def submit_failures(client) -> "SubmitFailures | None":
    """The refused submissions of the batch cluster behind ``client`` (None: not one)."""
    return _FAILURES.get(id(client))


@contextlib.contextmanager
def connect_batch(spec, log=None):
    """Yield a ``distributed.Client`` of a batch cluster for ``spec`` (module docstring)."""
    from distributed import Client

    from .spec import BATCH_OPTIONS, make_cluster_spec

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if spec.processes is None:  # a ClusterSpec built by hand: its batch fields checked here
        spec = make_cluster_spec(kind=spec.kind, device=spec.device, **{
            k: getattr(spec, k) for k in BATCH_OPTIONS})
    with _signals_raise(), SubmitFailures().installed() as failures:
        cluster = make_cluster(spec)
        adaptive = reaper = client = None
        try:
            lo, hi = spec.adapt if spec.adapt else (spec.jobs, spec.jobs)
            adaptive = cluster.adapt(minimum_jobs=lo, maximum_jobs=hi)
            reaper = _replace_ended_jobs(cluster)
            logs = os.path.abspath(spec.job_logs or "ntkdist-jobs")
            log(f"{spec.kind}: scheduler at {cluster.scheduler_address}; "
                f"{'adaptive ' + str(lo) + '–' + str(hi) if spec.adapt else hi} job(s) of "
                f"{spec.cores} core(s), {spec.memory}, {spec.processes} worker(s) each, "
                f"walltime {spec.walltime}; job logs in {logs}/")
            from .cluster import _quiet_local_cluster

            # a lost worker is ntkdist's one line, not Dask's log records of it
            with Client(cluster) as client, _quiet_local_cluster(client):
                _FAILURES[id(client)] = failures
                wait_for_workers(client, cluster, spec.min_workers, spec.worker_timeout, log,
                                 spec.kind, logs, failures)
                yield client
        finally:
            _FAILURES.pop(id(client), None)
            with _signals_ignored():
                with contextlib.suppress(Exception):  # no replacement jobs while closing
                    adaptive.stop()
                with contextlib.suppress(Exception):
                    cluster.loop.add_callback(reaper.stop)
                with contextlib.suppress(Exception):
                    cluster.close(timeout=30)
