"""Batch clusters: options, walltimes, and the job scripts dask-jobqueue would submit (no batch
system needed; the real Slurm runs are in test_slurm.py)."""

import pytest

from ntkdist.batch import (format_walltime, job_script, jobqueue_kwargs, lifetime, parse_adapt,
                           parse_walltime)
from ntkdist.cli import main
from ntkdist.config import cluster_request, merge
from ntkdist.errors import SpecError
from ntkdist.spec import make_cluster_spec

pytest.importorskip("dask_jobqueue")


@pytest.mark.parametrize("text, seconds", [
    ("00:10:00", 600), ("1:00:00", 3600), ("2-03:04:05", ((2 * 24 + 3) * 60 + 4) * 60 + 5),
    ("90", 5400), (45, 2700), ("48:00:00", 48 * 3600),
])
def test_walltime_parsed(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["10min", "00:00:30", "1:60:00", "", "0", "-5", "1-2", True,
                                  "00:10", None, 1.5, "²", "1:²0:00"])
def test_bad_walltime_refused(text):
    with pytest.raises(SpecError, match="walltime"):
        parse_walltime(text)


def test_walltime_formats():
    assert format_walltime(600, "slurm") == "00:10:00"
    assert format_walltime(26 * 3600 + 61, "slurm") == "1-02:01:01"
    assert format_walltime(26 * 3600 + 61, "pbs") == "26:01:01"


def test_lifetime_leaves_a_margin_before_the_walltime():
    for w in (120, 600, 3600, 86400, 7 * 86400):
        life, stagger = lifetime(w)
        assert life + stagger <= w - 60  # a worker retires at least a minute before its job ends
        assert life - stagger >= 30 and stagger >= 0
    assert lifetime(60) is None


@pytest.mark.parametrize("value, pair", [("1:4", (1, 4)), ("2:2", (2, 2)), ([1, 3], (1, 3))])
def test_adapt_parsed(value, pair):
    assert parse_adapt(value) == pair


@pytest.mark.parametrize("value", ["3:1", "0:0", "0:4", "a:b", "1", [1], [1, 2, 3], "-1:2",
                                   [True, 2], "1:100000"])
def test_bad_adapt_refused(value):
    with pytest.raises(SpecError, match="adapt"):
        parse_adapt(value)


def _slurm(**o):
    o.setdefault("cores", 4)
    o.setdefault("memory", "8GB")
    return make_cluster_spec(kind=o.pop("kind", "slurm"), device=o.pop("device", "cpu"), **o)


def test_slurm_job_script():
    spec = _slurm(queue="short", account="proj1", walltime="01:00:00", jobs=3,
                  interface="lo", local_directory="/scratch/x", job_logs="/tmp/jl",
                  job_prologue=["module load python", "source ~/venv/bin/activate"])
    assert spec.kind == "slurm" and spec.processes == 4 and spec.jobs == 3
    assert spec.expected_workers == 12
    script = job_script(spec)
    for line in ("#SBATCH -p short", "#SBATCH -A proj1", "#SBATCH -t 01:00:00",
                 "#SBATCH --mem=", "#SBATCH -n 1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH -J ntkdist", "module load python", "source ~/venv/bin/activate",
                 "export OMP_NUM_THREADS=1", "--nworkers 4", "--nthreads 1",
                 "--local-directory /scratch/x", "--interface lo", "--death-timeout 60",
                 "--lifetime", "--lifetime-stagger", "distributed.cli.dask_worker",
                 "#SBATCH -e /tmp/jl/"):
        assert line in script, (line, script)
    # the prologue runs before the worker starts
    assert script.index("module load python") < script.index("dask_worker")
    life, stagger = lifetime(3600)
    assert f"--lifetime {life}s --lifetime-stagger {stagger}s" in script


def test_pbs_job_script():
    spec = _slurm(kind="pbs", queue="workq", walltime="2-00:00:00", processes=2)
    script = job_script(spec)
    for line in ("#PBS -q workq", "#PBS -l walltime=48:00:00", "#PBS -l select=1:ncpus=4",
                 "--nworkers 2", "--nthreads 2", "export OMP_NUM_THREADS=2"):
        assert line in script, (line, script)


def test_gpu_jobs_use_dask_cuda():
    spec = _slurm(device="gpu", gpus_per_job=2, cores=8, memory="64GB")
    assert spec.processes == 2
    script = job_script(spec)
    assert "dask_cuda.cli" in script and "--gres=gpu:2" in script
    assert "--lifetime" not in script  # dask-cuda's worker has no --lifetime
    pbs = job_script(_slurm(kind="pbs", device="gpu", gpus_per_job=1, cores=8, memory="64GB"))
    assert "ngpus=1" in pbs and "dask_cuda.cli" in pbs


def test_site_defaults_from_dask_config():
    import dask

    with dask.config.set({"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GB",
                          "jobqueue.slurm.queue": "site-q"}):
        spec = make_cluster_spec(kind="slurm")
    assert (spec.cores, spec.memory, spec.queue, spec.walltime) == (2, "4GB", "site-q",
                                                                     "00:30:00")
    kw = jobqueue_kwargs(spec)
    assert kw["queue"] == "site-q" and kw["death_timeout"] == 60


def test_adapt_spec_expected_workers():
    spec = _slurm(adapt="1:5", processes=2)
    assert spec.adapt == (1, 5) and spec.jobs is None and spec.expected_workers == 10


@pytest.mark.parametrize("args, words", [
    (["--cluster", "slurm"], ["cores and memory"]),
    (["--cluster", "slurm", "--cores", "2", "--memory", "1GB", "--walltime", "10min"],
     ["--walltime", "HH:MM:SS"]),
    (["--cluster", "slurm", "--cores", "2", "--memory", "1GB", "--processes", "3"],
     ["--processes", "at most cores"]),
    (["--cluster", "pbs", "--cores", "2", "--memory", "1GB", "--jobs", "2", "--adapt", "1:2"],
     ["--jobs", "--adapt"]),
    (["--queue", "x"], ["--queue", "batch cluster"]),
    (["--cluster", "slurm", "--cores", "2", "--memory", "1GB", "--workers", "2"],
     ["--workers", "local cluster"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--adapt", "3:1"], ["--adapt"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--gpus-per-job", "1"],
     ["--gpus-per-job", "--device gpu"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--device", "gpu"],
     ["--gpus-per-job"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "100MB"], ["--memory", "256MiB"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "lots"], ["--memory", "size"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1e400GB"], ["--memory", "size"]),
    (["--memory-limit", "1e400GB"], ["--memory-limit", "size"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--adapt", "²:3"], ["--adapt"]),
    (["--cluster", "slurm", "--scheduler", "tcp://h:1", "--cores", "1", "--memory", "1GB"],
     ["--cluster slurm", "scheduler"]),
    (["--cluster", "lsf"], ["--cluster", "local, slurm, pbs"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--worker-timeout", "0"],
     ["--worker-timeout"]),
    (["--cluster", "slurm", "--cores", "1", "--memory", "1GB", "--job-prologue", "a\nb"],
     ["--job-prologue"]),
])
def test_bad_cluster_options_are_one_line(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--n", "5000", "--d", "4", "--depth", "2", "--method", "lobpcg",
                 "--out", "o", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "ntkdist-jobs").exists()


def test_run_file_cluster_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[cluster]\nkind = "slurm"\ncores = 2\nmemory = "4GB"\nwalltime = "01:00:00"'
                    '\njob_prologue = ["module load x"]\nadapt = [1, 4]\n')
    from ntkdist.config import load_config

    o = merge(load_config(str(path)), {})
    spec = cluster_request(o)
    assert (spec.kind, spec.cores, spec.adapt, spec.job_prologue) == ("slurm", 2, (1, 4),
                                                                       ("module load x",))
    # flags of the same kind amend the file's cluster; another kind replaces it
    spec = cluster_request(merge(load_config(str(path)), {"cores": 4, "processes": 2}))
    assert (spec.kind, spec.cores, spec.processes, spec.memory) == ("slurm", 4, 2, "4GB")
    spec = cluster_request(merge(load_config(str(path)), {"cluster": "local"}))
    assert spec.kind == "local" and spec.cores is None
    spec = cluster_request(merge(load_config(str(path)), {"workers": 2}))
    assert spec.kind == "local" and spec.workers == 2
    path.write_text('[cluster]\nkind = "slurm"\ncores = 2\nmemory = "4GB"\nwalltime = "soon"\n')
    with pytest.raises(SpecError, match=r"run.toml: \[cluster\] walltime must be"):
        cluster_request(merge(load_config(str(path)), {}))


def test_missing_submit_command_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no qsub
    code = main(["run", "--n", "5000", "--d", "4", "--depth", "2", "--method", "lobpcg",
                 "--out", "o", "--cluster", "pbs", "--cores", "1", "--memory", "1GB"])
    err = capsys.readouterr().err
    assert code == 2 and "qsub is not on PATH" in err and len(err.strip().splitlines()) == 1


def test_lost_worker_on_a_batch_cluster_resumes(monkeypatch):
    """A batch cluster's lost worker is waited out and the solve resumes (its operator rebuilt);
    on a local cluster the loss is one line."""
    from ntkdist import batch, pipeline
    from ntkdist.operator.client import WorkerLostError
    from ntkdist.spec import ClusterSpec

    waited, built, logged = [], [], []
    monkeypatch.setattr(batch, "wait_for_workers", lambda *a, **k: waited.append(a[2]))

    class Op:
        def close(self):
            built.append("closed")

    def make_op():
        built.append("op")
        return Op()

    calls = iter([WorkerLostError("a Dask worker was lost during a pass (x)"), "result"])

    def solve_with(op):
        r = next(calls)
        if isinstance(r, Exception):
            raise r
        return r

    spec = _slurm(jobs=2, processes=2)
    assert pipeline._resuming(None, spec, make_op, solve_with, logged.append) == "result"
    assert waited == [4] and built == ["op", "closed", "op", "closed"]
    assert "resuming from the checkpoint (1/" in logged[0]
    calls = iter([WorkerLostError("lost")])
    with pytest.raises(WorkerLostError):
        pipeline._resuming(None, ClusterSpec(), make_op, solve_with, logged.append)


def test_checkpoints_come_before_workers_retire():
    from ntkdist.pipeline import checkpoint_every
    from ntkdist.spec import ClusterSpec, make_solver_spec

    solver = make_solver_spec(5000, method="lobpcg")
    assert checkpoint_every(solver, ClusterSpec()) == solver.checkpoint_every == 60
    life, stagger = lifetime(120)
    assert checkpoint_every(solver, _slurm(walltime="00:02:00")) == (life - stagger) / 3
    assert checkpoint_every(solver, _slurm(walltime="04:00:00")) == 60


def test_a_refused_submission_becomes_one_line():
    """dask-jobqueue only logs a failed sbatch (with a traceback, from its event loop): the
    record is dropped and the refusal kept for one line."""
    import logging

    from ntkdist.batch import SubmitFailures

    exc = RuntimeError("Command exited with non-zero exit code.\nExit code: 1\nCommand:\n"
                       "sbatch /tmp/x.sh\nstdout:\n\nstderr:\nsbatch: error: invalid partition "
                       "specified: q9\nsbatch: error: Batch job submission failed: Invalid "
                       "partition name specified\n\n")
    failures = SubmitFailures()
    with failures.installed():
        record = logging.LogRecord("tornado.application", logging.ERROR, __file__, 1,
                                   "Exception in callback", None, (RuntimeError, exc, None))
        assert failures.filter(record) is False
        other = logging.LogRecord("tornado.application", logging.ERROR, __file__, 1,
                                  "something else", None, None)
        assert failures.filter(other) is True
    assert failures.message("sbatch") == ("sbatch refused the worker job: invalid partition "
                                          "specified: q9; Batch job submission failed: "
                                          "Invalid partition name specified")
    assert SubmitFailures().message("qsub") is None


def test_dry_run_shows_the_job_script(tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text('[data]\nn = [30000]\nd = 8\n[kernel]\ndepth = 2\n[study]\n'
                     'storage = "none"\n')
    assert main(["sweep", str(study), "--out", str(tmp_path / "o"), "--dry-run", "--cluster",
                 "slurm", "--cores", "2", "--memory", "4GB", "--jobs", "3",
                 "--job-prologue", "module load x"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=2" in out and "module load x" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value", [
    ("queue", "debug -A other"), ("account", "a;b"), ("interface", "ib0;touch x"),
    ("queue", "q'"), ("local_directory", "/scratch/my dir"), ("job_logs", "logs|x"),
    ("local_directory", "/tmp/`id`"),
])
def test_values_that_would_break_the_job_script_are_refused(option, value):
    with pytest.raises(SpecError, match=f"^{option} must be"):
        _slurm(**{option: value})


def test_names_and_paths_jobs_scripts_take():
    spec = _slurm(queue="gpu,debug", account="proj-1.a", interface="ib0",
                  local_directory="$TMPDIR/ntk", job_logs="${HOME}/logs")
    assert "--local-directory $TMPDIR/ntk" in job_script(spec)


@pytest.mark.parametrize("option, value", [("jobs", 10 ** 8), ("cores", 10 ** 6),
                                           ("gpus_per_job", 1000)])
def test_counts_are_capped(option, value):
    with pytest.raises(SpecError, match=f"{option} must be at most"):
        _slurm(**{option: value}, **({"device": "gpu"} if option == "gpus_per_job" else {}))


def test_toml_time_walltime(tmp_path):
    import datetime

    assert parse_walltime(datetime.time(4, 0)) == 4 * 3600
    path = tmp_path / "run.toml"
    path.write_text('[cluster]\nkind = "slurm"\ncores = 2\nmemory = "4GB"\n'
                    'walltime = 04:00:00\n')
    from ntkdist.config import load_config

    assert cluster_request(merge(load_config(str(path)), {})).walltime == "04:00:00"


def test_site_prologue_directives_and_scheduler_options_are_kept():
    import dask

    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["module load site"],
                          "jobqueue.slurm.job-extra-directives": ["--qos=long"],
                          "jobqueue.slurm.scheduler-options": {"host": "10.0.0.1"}}):
        spec = _slurm(job_prologue=["source env"], interface="ib0")
        kw = jobqueue_kwargs(spec)
        script = job_script(spec)
    assert kw["scheduler_options"]["host"] == "10.0.0.1" and "interface" not in kw[
        "scheduler_options"]
    assert "#SBATCH --qos=long" in script
    assert script.index("module load site") < script.index("source env")


def test_job_script_creates_no_log_folder(tmp_path):
    job_script(_slurm(job_logs=str(tmp_path / "logs")))
    assert not (tmp_path / "logs").exists()


def test_nohup_is_respected_and_signals_restored():
    import signal

    from ntkdist.batch import _signals_raise

    old_term = signal.getsignal(signal.SIGTERM)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _signals_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup kept
            assert signal.getsignal(signal.SIGTERM) not in (old_term, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == old_term
    finally:
        signal.signal(signal.SIGHUP, old_hup)


def test_a_cluster_spec_built_by_hand_is_checked_before_it_connects(monkeypatch):
    from ntkdist.spec import ClusterSpec

    with pytest.raises(SpecError, match="cores and memory"):
        with ClusterSpec(kind="slurm").connect():
            pass


def test_resumes_stop_after_many_losses_without_progress():
    from ntkdist import batch, pipeline
    from ntkdist.operator.client import WorkerLostError

    class Op:
        def close(self):
            pass

    def lose(op):
        raise WorkerLostError("a Dask worker was lost during a pass (x)")

    waits = []
    spec = _slurm()
    orig = batch.wait_for_workers
    batch.wait_for_workers = lambda *a, **k: waits.append(1)
    try:
        with pytest.raises(WorkerLostError):
            pipeline._resuming(None, spec, Op, lose, lambda m: None)
        assert len(waits) == pipeline.MAX_RESUMES
        # progress between losses resets the count: 3 × MAX losses, all resumed, then done
        ticks, calls = iter(range(10 ** 6)), iter(range(10 ** 6))

        def lose_then_finish(op):
            if next(calls) < 3 * pipeline.MAX_RESUMES:
                raise WorkerLostError("lost (x)")
            return "done"

        assert pipeline._resuming(None, spec, Op, lose_then_finish, lambda m: None,
                                  lambda: next(ticks)) == "done"
    finally:
        batch.wait_for_workers = orig


def test_killed_worker_is_not_resumed():
    from types import SimpleNamespace

    from distributed.scheduler import KilledWorker

    from ntkdist.operator.client import WorkerLostError, _worker_lost

    assert not isinstance(_worker_lost("x", KilledWorker("k", SimpleNamespace(address="tcp://w:1"), 3)),
                          WorkerLostError)
    assert isinstance(_worker_lost("x", None), WorkerLostError)


def test_dask_jobqueue_leaves_ctrl_c_alone():
    """Importing dask-jobqueue installs a SIGINT handler that exits with status 0; the
    cluster class comes back with Python's, so Ctrl-C stays exit 130 "interrupted"."""
    import subprocess
    import sys

    code = ("import signal; from ntkdist.batch import _cluster_class; _cluster_class('slurm'); "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("text", ["x", "", "[1]", '{"address": 5}', "\xff\xfe"])
def test_a_bad_scheduler_file_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "sched.json"
    path.write_bytes(text.encode("latin-1"))
    code = main(["run", "--n", "200", "--d", "4", "--depth", "2", "--method", "lobpcg",
                 "--scheduler-file", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a Dask scheduler file" in err, err
    assert not (tmp_path / "o").exists()
