"""A killed iterative solve resumes from its checkpoint; bad checkpoints are never trusted."""

import json
import os
import signal
import time

import numpy as np
import pytest
import scipy.linalg
from conftest import spawn_solve

import ntkdist
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.solvers.checkpoint import Checkpoint
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner

SEED = 8117


class Crash(Exception):
    pass


def _problem(n=900, d=32):
    X = synthetic_rows("sphere", d, SEED + n, 0, n)
    K = ntkdist.ntk(X, depth=3)
    return X, K, scipy.linalg.eigh(K, subset_by_index=[0, 1], eigvals_only=True)


@pytest.mark.parametrize("method", ["lobpcg", "davidson"])
def test_crash_then_resume_continues_where_it_stopped(tmp_path, method):
    X, K, ref = _problem()
    n = len(K)
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    path = str(tmp_path / "checkpoint.npz")
    key = {"out_hash": "abc", "method": method, "n": n}
    scale = np.trace(K) / n
    fresh = smallest_eigenpairs(lambda V: K @ V, n, method, k=2, tol=1e-10, block=8,
                                precond=P.apply, scale=scale)
    assert fresh.converged
    calls = [0]

    def crashing(V):
        calls[0] += 1
        if calls[0] > fresh.iterations // 2:
            raise Crash
        return K @ V

    with pytest.raises(Crash):
        smallest_eigenpairs(crashing, n, method, k=2, tol=1e-10, block=8, scale=scale,
                            precond=P.apply, checkpoint=Checkpoint(path, key, every=0))
    assert os.path.exists(path)
    logs = []
    ck = Checkpoint(path, key, every=0, log=logs.append)
    count = [0]

    def counting(V):
        count[0] += 1
        return K @ V

    sol = smallest_eigenpairs(counting, n, method, k=2, tol=1e-10, block=8, scale=scale,
                              precond=P.apply, checkpoint=ck)
    assert sol.converged and sol.resumed is not None
    assert sol.resumed["passes"] >= fresh.iterations // 2 - 2
    assert any("resuming" in m for m in logs)
    np.testing.assert_allclose(sol.values, ref, rtol=1e-9)
    # the second half needs far fewer products than a fresh start
    assert count[0] < 0.8 * (fresh.iterations + 2)


def test_unusable_checkpoints_are_ignored(tmp_path):
    X, K, ref = _problem(n=400, d=16)
    n = len(K)
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    path = tmp_path / "checkpoint.npz"
    key = {"out_hash": "abc", "method": "lobpcg", "n": n}
    bad = {
        "garbage": lambda: path.write_bytes(b"not a zip file at all"),
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),
        "other problem": lambda: Checkpoint(str(path), {**key, "out_hash": "zzz"}, every=0).save(
            np.linalg.qr(np.random.default_rng(1).standard_normal((n, 8)))[0], np.ones(8), 3, 4),
        "wrong length": lambda: Checkpoint(str(path), key, every=0).save(
            np.random.default_rng(1).standard_normal((n - 1, 8)), np.ones(8), 3, 4),
        "nan": lambda: Checkpoint(str(path), key, every=0).save(
            np.full((n, 8), np.nan), np.ones(8), 3, 4),
    }
    Checkpoint(str(path), key, every=0).save(np.eye(n, 8), np.ones(8), 1, 2)
    good = path.read_bytes()
    for what, make in bad.items():
        path.unlink()
        make()
        logs = []
        ck = Checkpoint(str(path), key, every=0, log=logs.append)
        assert ck.load(n, 8) is None, what
        assert ck.resumed is None and "ignored" in logs[0], what
        sol = smallest_eigenpairs(lambda V: K @ V, n, "lobpcg", k=1, block=8, tol=1e-9,
                                  precond=P.apply, scale=np.trace(K) / n, checkpoint=ck)
        assert sol.converged and sol.resumed is None, what
        assert sol.values[0] == pytest.approx(ref[0], rel=1e-8), what


def test_cli_sigkill_mid_solve_then_rerun_resumes(client, tmp_path):
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    args = ["--n", "1000", "--d", "8", "--depth", "3", "--seed", "5"]
    assert main(["assemble", *args, "--store", store, "--tile", "500",
                 "--scheduler", addr]) == 0
    out = tmp_path / "o"
    # No preconditioner: ~250 passes, time enough to kill the solve early on.
    solve = ["solve", "--store", store, "--out", str(out), "--precond", "none",
             "--method", "davidson", "--operator", "store", "--tol", "1e-9", "--block", "8",
             "--max-products", "3000", "--checkpoint-every", "0"]
    proc = spawn_solve(solve)
    ck = out / "checkpoint.npz"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ck.exists():
            with np.load(ck) as f:
                if int(f["products"]) >= 40:
                    break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()  # still running: killed mid-solve
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ck.exists() and not (out / "result.json").exists()
    assert main([*solve, "--scheduler", addr]) == 0
    r = json.load(open(out / "result.json"))
    X = synthetic_rows("sphere", 8, 5, 0, 1000)
    ref = scipy.linalg.eigh(ntkdist.ntk(X, depth=3), subset_by_index=[0, 0], eigvals_only=True)
    assert r["converged"] and r["lambda_min"] == pytest.approx(ref[0], rel=1e-8)
    assert r["resumed_from_checkpoint"]["passes"] >= 40
    assert r["passes_total"] == r["passes"] + r["resumed_from_checkpoint"]["passes"]
    assert not ck.exists()  # removed once the result is written


def test_checkpoint_interval_refused_when_negative(tmp_path, capsys):
    assert main(["run", "--n", "50", "--d", "8", "--depth", "2", "--out", str(tmp_path / "o"),
                 "--checkpoint-every", "-1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("saved", [5, 12])
def test_a_checkpoint_of_another_block_width_is_fitted_and_resumed(tmp_path, saved):
    """A checkpoint saved with another block (an older default, or --block changed) resumes:
    its lowest Ritz vectors are kept, padded with random columns if it was narrower."""
    X, K, ref = _problem(n=400, d=16)
    n = len(K)
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    path = tmp_path / "checkpoint.npz"
    key = {"out_hash": "abc", "method": "davidson", "n": n}
    Q = np.linalg.eigh(K)[1][:, :saved]
    Checkpoint(str(path), key, every=0).save(Q, np.arange(saved, dtype=float), 7, 9)
    ck = Checkpoint(str(path), key, every=0)
    X0 = ck.load(n, 8)
    assert X0.shape == (n, 8) and ck.resumed["passes"] == 9
    np.testing.assert_array_equal(X0[:, :min(saved, 8)], Q[:, :min(saved, 8)])
    sol = smallest_eigenpairs(lambda V: K @ V, n, "davidson", k=1, block=8, tol=1e-9,
                              precond=P.apply, scale=np.trace(K) / n,
                              checkpoint=Checkpoint(str(path), key, every=0))
    assert sol.converged and sol.resumed is not None
    assert sol.values[0] == pytest.approx(ref[0], rel=1e-8)
