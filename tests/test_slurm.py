"""Runs through a real Slurm (``scripts/slurm-local.sh`` sets one up on a Debian/Ubuntu machine
as root): workers as Slurm jobs through dask-jobqueue's SLURMCluster. Skipped, with the reason,
where no Slurm answers."""

import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slurm


def _slurm_reason() -> str | None:
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'ntkdist[hpc]')"
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm here (sbatch/sinfo not on PATH; scripts/slurm-local.sh sets one up)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo does not answer ({exc})"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable Slurm node (sinfo: {' '.join(states) or 'nothing'})"
    return None


REASON = _slurm_reason()
if REASON:
    pytestmark = [pytest.mark.slurm, pytest.mark.skip(reason=REASON)]

BATCH = ["--cluster", "slurm", "--cores", "1", "--memory", "2GB", "--walltime", "00:10:00",
         "--worker-timeout", "120"]


def _ntkdist(*args, cwd, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "ntkdist.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _job_ids(logs) -> set[str]:
    return {name.split("-")[1].split(".")[0] for name in os.listdir(logs)
            if name.startswith("ntkdist-") and name.endswith(".err")} if os.path.isdir(logs) \
        else set()


def _assert_released(logs, wait=20.0):
    """Every job the run submitted has left the queue."""
    ids = _job_ids(logs)
    assert ids, "no job was submitted"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        queued = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                                    text=True).stdout.split())
        if not ids & queued:
            return
        time.sleep(0.5)
    pytest.fail(f"jobs {sorted(ids & queued)} still queued after the run")


def _dense_lambda(n, d, depth, seed=0):
    from ntkdist.spec import make_spec

    spec = make_spec(data="sphere", n=n, d=d, seed=seed, depth=depth)
    return float(np.linalg.eigvalsh(spec.kernel.gram(spec.data.rows()))[0])


def test_run_through_slurm_matches_dense(tmp_path):
    logs = tmp_path / "jobs"
    out = _ntkdist("run", "--data", "sphere", "--n", 2500, "--d", 8, "--depth", 2,
                   "--method", "lobpcg", "--store", tmp_path / "k.zarr", "--tile", 1024,
                   "--out", tmp_path / "r", *BATCH, "--jobs", 2, "--job-logs", logs,
                   cwd=tmp_path)
    assert "workers 2/2 connected" in out
    import json

    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["converged"]
    dense = _dense_lambda(2500, 8, 2)
    assert abs(result["lambda_min"] - dense) <= 1e-7 * dense
    assert len(_job_ids(logs)) >= 2
    _assert_released(logs)


def test_sweep_through_slurm(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text('[study]\nstorage = "delete"\n[data]\nsource = "sphere"\nn = [1500, 2500]\n'
                     'd = 8\nseed = 0\n[kernel]\ndepth = 2\n[solver]\nmethod = "lobpcg"\n'
                     '[store]\ntile = 1024\n')
    logs = tmp_path / "jobs"
    _ntkdist("sweep", study, "--out", tmp_path / "s", *BATCH, "--jobs", 2, "--job-logs", logs,
             cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [int(r["n"]) for r in rows] == [1500, 2500]
    for r in rows:
        assert r["status"] == "certified"
        dense = _dense_lambda(int(r["n"]), 8, 2)
        assert abs(float(r["lambda_min"]) - dense) <= 1e-7 * dense
    assert not list((tmp_path / "s" / "stores").glob("*.zarr"))  # storage delete
    _assert_released(logs)


def _stores_equal(a, b):
    from ntkdist.store import KernelStore

    sa, sb = KernelStore.open(str(a)), KernelStore.open(str(b))
    keys = sa.done_keys()
    assert keys == sb.done_keys()
    for key in keys:
        assert sa.recorded_checksum(key) == sb.recorded_checksum(key), key
    for i, j in sa.upper_tiles():
        assert np.array_equal(sa.read_tile(i, j), sb.read_tile(i, j)), (i, j)


def test_scancel_mid_assembly_completes_on_a_replacement(tmp_path):
    """The only worker job (two workers in it) is cancelled while tiles are being written:
    the run waits for the replacement job that the cluster submits, and the store equals a
    clean one."""
    logs = tmp_path / "jobs"
    args = ["assemble", "--data", "sphere", "--n", 9000, "--d", 8, "--depth", 2, "--tile", 512]
    proc = subprocess.Popen([sys.executable, "-m", "ntkdist.cli", *map(str, args), "--store",
                             str(tmp_path / "batch.zarr"), *BATCH, "--jobs", "1", "--cores",
                             "2", "--processes", "2", "--job-logs", str(logs)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        from ntkdist.store import KernelStore

        deadline = time.monotonic() + 120
        store = tmp_path / "batch.zarr"
        while time.monotonic() < deadline:  # some tiles written, not all
            if store.exists():
                try:
                    done = len(KernelStore.open(str(store)).done_keys())
                except Exception:
                    done = 0
                if done >= 5:
                    break
            time.sleep(0.2)
        first = _job_ids(logs)
        assert len(first) == 1, first
        subprocess.run(["scancel", *first], check=True)
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert len(_job_ids(logs)) >= 2, "no replacement job was submitted"
    _ntkdist(*args, "--store", tmp_path / "clean.zarr", "--workers", 1, cwd=tmp_path)
    _stores_equal(tmp_path / "batch.zarr", tmp_path / "clean.zarr")
    _assert_released(logs)


def test_a_job_slurm_refuses_is_one_line(tmp_path):
    """More memory than the node has: sbatch refuses the job, and the run stops at once with
    sbatch's reason, no traceback, no result folder."""
    proc = subprocess.run([sys.executable, "-m", "ntkdist.cli", "run", "--n", "3000", "--d",
                           "8", "--depth", "2", "--method", "lobpcg", "--out", "r", "--cluster",
                           "slurm", "--cores", "1", "--memory", "100TB", "--job-logs", "jobs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("ntkdist: error: sbatch refused the worker job:"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_job_that_dies_before_its_worker_connects_stops_the_run_at_once(tmp_path):
    """A job whose worker cannot start (a --local-directory under a file): one line naming
    the job and its log's last line, exit 2, within seconds, not at --worker-timeout."""
    (tmp_path / "afile").write_text("")
    logs = tmp_path / "jobs"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ntkdist.cli", "run", "--data", "sphere", "--n", "300", "--d",
         "8", "--depth", "3", "--method", "lobpcg", "--out", str(tmp_path / "r"), *BATCH,
         "--local-directory", str(tmp_path / "afile" / "sub"), "--job-logs", str(logs)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("ntkdist: error:"), proc.stderr[-2000:]
    assert "ended before its worker connected" in err[-1] and "Not a directory" in err[-1]
    assert time.monotonic() - t0 < 100  # --worker-timeout in BATCH is 120 s
    assert not (tmp_path / "r").exists()
    _assert_released(logs)
