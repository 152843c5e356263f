"""The shift-invert factor out of core (ntkdist.solvers.diskfactor): its solves against a
float64 dense solve, a killed factorisation resumed, damaged and foreign folders, a full
disk, and the run that uses it where K − σI does not fit in memory."""

import json
import os

import numpy as np
import pytest

import ntkdist.solvers.shift as shift
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.solvers.diskfactor import (DiskFactor, DiskFactorError, disk_bytes, disk_fits,
                                        tiling)


def spd(n, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return A @ A.T / n + 0.5 * np.eye(n)


def source(A, bounds, calls=None):
    def lower_tile(i, j):
        if calls is not None:
            calls.append((i, j))
        return A[bounds[i], bounds[j]]
    return lower_tile


@pytest.mark.parametrize("n, tile", [(257, 64), (200, 200), (130, 47)])
def test_solves_match_a_dense_float64_solve(tmp_path, n, tile):
    A = spd(n)
    f = DiskFactor(str(tmp_path / "f"), n, tile, 0.1, "a")
    assert f.factor(source(A, f.bounds))
    Z = np.random.default_rng(1).standard_normal((n, 5))
    want = np.linalg.solve(A, Z)
    got = f.solve(Z)
    assert got.dtype == np.float32 and got.shape == Z.shape
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()
    np.testing.assert_allclose(f.solve(Z[:, 2]), got[:, 2], rtol=1e-6, atol=1e-6)
    files = sorted(os.listdir(tmp_path / "f"))
    T = len(tiling(n, tile))
    assert len([x for x in files if x.endswith(".npy")]) == T * (T + 1) // 2
    assert sum(os.path.getsize(tmp_path / "f" / x) for x in files
               if x.endswith(".npy")) == pytest.approx(disk_bytes(n, tile), rel=0.05)
    f.remove()
    assert not (tmp_path / "f").exists()


def test_not_positive_definite_is_said(tmp_path):
    A = spd(150) - 3.0 * np.eye(150)
    f = DiskFactor(str(tmp_path / "f"), 150, 64, 0.1)
    assert f.factor(source(A, f.bounds)) is False


def test_killed_factorisation_resumes_at_its_first_unfinished_column(tmp_path):
    n, tile = 300, 64
    A = spd(n, 3)
    path = str(tmp_path / "f")
    f = DiskFactor(path, n, tile, 0.25, "same")

    def dies(i, j):
        if j == 3:
            raise KeyboardInterrupt
        return A[f.bounds[i], f.bounds[j]]

    with pytest.raises(KeyboardInterrupt):
        f.factor(dies)
    assert json.load(open(os.path.join(path, "manifest.json")))["columns"] == 3
    calls, seen = [], []
    g = DiskFactor(path, n, tile, 0.25, "same", log=seen.append)
    assert g.factor(source(A, g.bounds, calls))
    assert min(j for _, j in calls) == 3  # columns 0–2 were not formed again
    assert any("resuming at column 4 of 5" in line for line in seen)
    Z = np.random.default_rng(2).standard_normal((n, 3))
    want = np.linalg.solve(A, Z)
    assert np.abs(g.solve(Z) - want).max() < 2e-5 * np.abs(want).max()


def test_a_damaged_tile_is_factored_again_from_its_column(tmp_path):
    n, tile = 300, 64
    A = spd(n, 4)
    path = str(tmp_path / "f")
    f = DiskFactor(path, n, tile, 0.25, "same")
    assert f.factor(source(A, f.bounds))
    with open(os.path.join(path, "L.3.2.npy"), "r+b") as fh:
        fh.seek(-40, os.SEEK_END)
        fh.write(b"\x7f" * 8)
    calls, seen = [], []
    g = DiskFactor(path, n, tile, 0.25, "same", log=seen.append)
    assert g.factor(source(A, g.bounds, calls))
    assert min(j for _, j in calls) == 2
    assert any("damaged at column 3" in line for line in seen)
    Z = np.random.default_rng(5).standard_normal((n, 2))
    want = np.linalg.solve(A, Z)
    assert np.abs(g.solve(Z) - want).max() < 2e-5 * np.abs(want).max()


@pytest.mark.parametrize("other", [dict(sigma=0.3), dict(identity="another"), dict(tile=50)])
def test_a_factor_of_another_matrix_is_not_resumed(tmp_path, other):
    n = 200
    A, B = spd(n, 6), spd(n, 7)
    path = str(tmp_path / "f")
    f = DiskFactor(path, n, 64, 0.25, "same")
    assert f.factor(source(A, f.bounds))
    keys = {"tile": 64, "sigma": 0.25, "identity": "same", **other}
    calls = []
    g = DiskFactor(path, n, keys["tile"], keys["sigma"], keys["identity"])
    assert g.factor(source(B, g.bounds, calls))
    assert min(j for _, j in calls) == 0
    Z = np.random.default_rng(8).standard_normal((n, 2))
    want = np.linalg.solve(B, Z)
    assert np.abs(g.solve(Z) - want).max() < 2e-5 * np.abs(want).max()


def test_a_foreign_file_in_the_folder_is_left_alone(tmp_path):
    path = tmp_path / "f"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    f = DiskFactor(str(path), 100, 64, 0.1)
    assert f.factor(source(spd(100), f.bounds))
    f.remove()
    assert (path / "notes.txt").read_text() == "mine"


def test_full_disk_and_unwritable_folder_are_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    why = disk_fits(str(tmp_path / "f"), 100000, 4096)
    assert "20.8 GB" in why and "0.0 GB are free" in why
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert "cannot be written" in disk_fits(str(ro / "f"), 100, 64)
        with pytest.raises(DiskFactorError):
            DiskFactor(str(ro / "f"), 100, 64, 0.1).factor(lambda i, j: np.eye(64))
    f = DiskFactor(str(tmp_path / "g"), 100, 64, 0.1)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(DiskFactorError, match="No space left"):
        f.factor(source(spd(100), f.bounds))


@pytest.fixture
def small_memory(monkeypatch):
    """K − σI 'does not fit in memory': the shift factors it on disk."""
    monkeypatch.setattr(shift, "SHIFT_MAX_BYTES", 1e5)


ARGS = ["--data", "sphere", "--n", "1000", "--d", "16", "--depth", "3", "--seed", "31",
        "--method", "davidson", "--precond", "shift"]


def test_disk_factor_run_certifies_the_dense_value_and_removes_its_folder(client, tmp_path,
                                                                          small_memory):
    import ntkdist

    out = tmp_path / "o"
    assert main(["run", *ARGS, "--store", str(tmp_path / "k.zarr"), "--tile", "384",
                 "--out", str(out), "--scheduler", client.scheduler.address]) == 0
    r = json.load(open(out / "result.json"))
    pre = r["preconditioner"]
    assert pre["name"] == "shift" and pre["factor_on_disk"]["tile"] == 384
    assert pre["factor_on_disk"]["gigabytes"] > 0
    assert not (out / "shift-factor").exists()
    X = synthetic_rows("sphere", 16, 31, 0, 1000)
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0],
                                            rel=1e-8)


def test_disk_factor_matches_the_in_memory_one(monkeypatch):
    from ntkdist.spec import make_spec

    spec = make_spec(data="sphere", n=700, d=64, depth=3, seed=2)
    X = spec.rows()
    lam = float(np.linalg.eigvalsh(ntkdist_dense(X))[0])
    R = np.random.default_rng(0).standard_normal((700, 4))
    mem = shift.shift_invert(X, spec.kernel, 0.9 * lam).apply(R)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pre = shift.disk_shift_invert(X, spec.kernel, 0.9 * lam, os.path.join(d, "f"))
        disk = pre.apply(R)
        pre.release()
        assert not os.path.exists(os.path.join(d, "f"))
    np.testing.assert_allclose(disk, mem, rtol=2e-3, atol=2e-3 * np.abs(mem).max())


def ntkdist_dense(X):
    import ntkdist

    return ntkdist.ntk(X, depth=3)


def test_no_room_on_disk_keeps_the_harmonic_model_and_says_why(client, tmp_path,
                                                               small_memory, monkeypatch):
    import ntkdist.solvers.diskfactor as df

    monkeypatch.setattr(df, "DISK_SHARE", 1e-12)
    out = tmp_path / "o"
    assert main(["run", *ARGS, "--store", str(tmp_path / "k.zarr"), "--out", str(out),
                 "--scheduler", client.scheduler.address]) == 0
    r = json.load(open(out / "result.json"))
    assert r["status"] == "certified"
    why = r["preconditioner"]["shift_skipped"]
    assert "in float32" in why and "on disk takes" in why and "free" in why


def test_a_full_disk_while_factoring_frees_the_folder_and_goes_on(client, tmp_path,
                                                                  small_memory, monkeypatch):
    import ntkdist.solvers.diskfactor as df

    def full(self, i, j, a):
        raise DiskFactorError(f"the shift's factor cannot be written to {self.path!r} "
                              "(No space left on device)")

    monkeypatch.setattr(df.DiskFactor, "_save", full)
    out = tmp_path / "o"
    assert main(["run", *ARGS, "--store", str(tmp_path / "k.zarr"), "--out", str(out),
                 "--scheduler", client.scheduler.address]) == 0
    r = json.load(open(out / "result.json"))
    assert r["status"] == "certified"
    assert "No space left" in r["preconditioner"]["shift_skipped"]
    assert not (out / "shift-factor").exists()


def test_killed_while_factoring_on_disk_then_rerun_resumes_the_factor(client, tmp_path,
                                                                      small_memory, capsys):
    """SIGKILL after the factor's second tile column: the rerun resumes the factor from the
    columns on disk (checked against their checksums) and certifies; the folder goes."""
    import signal
    import subprocess
    import sys

    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    args = ["--n", "2000", "--d", "16", "--depth", "3", "--seed", "3"]
    assert main(["assemble", *args, "--store", store, "--tile", "200",
                 "--scheduler", addr]) == 0
    out = tmp_path / "o"
    solve = ["solve", "--store", store, "--out", str(out), "--precond", "shift",
             "--operator", "store", "--checkpoint-every", "1000"]
    small = ("import sys, ntkdist.solvers.shift as s; s.SHIFT_MAX_BYTES = 1e5; "
             "from ntkdist.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", small, *solve, "--workers", "1"],
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "shift factor on disk: column 2 of 10" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    manifest = out / "shift-factor" / "manifest.json"
    assert manifest.exists() and not (out / "result.json").exists(), "".join(seen[-20:])
    done = json.load(open(manifest))["columns"]
    assert 2 <= done < 10
    capsys.readouterr()
    assert main([*solve, "--scheduler", addr]) == 0  # small_memory holds here too
    said = capsys.readouterr()
    assert f"resuming at column {done + 1} of 10" in said.out + said.err, said.out
    r = json.load(open(out / "result.json"))
    X = synthetic_rows("sphere", 16, 3, 0, 2000)
    import ntkdist

    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0],
                                            rel=1e-8)
    assert r["preconditioner"]["factor_on_disk"]["tile"] == 200
    assert not (out / "shift-factor").exists()


def test_tiles_of_k_minus_sigma_on_disk_from_the_rows_and_from_a_store(client, tmp_path,
                                                                       monkeypatch):
    """Several tiles (700 = 5·128 + 60): the factor on disk of K − FFᵀ − σI, formed from the
    rows and read from a store of another tiling, applies what the in-memory one applies."""
    import ntkdist.solvers.diskfactor as df
    from ntkdist.spec import make_spec

    monkeypatch.setattr(df, "DISK_TILE", 128)
    spec = make_spec(data="sphere", n=700, d=16, depth=3, seed=2)
    X = spec.rows()
    sigma = 0.9 * float(np.linalg.eigvalsh(ntkdist_dense(X))[0])
    R = np.random.default_rng(0).standard_normal((700, 4))
    mem = shift.shift_invert(X, spec.kernel, sigma).apply(R)
    store = str(tmp_path / "k.zarr")
    assert main(["assemble", "--data", "sphere", "--n", "700", "--d", "16", "--depth", "3",
                 "--seed", "2", "--store", store, "--tile", "200", "--dtype", "float64",
                 "--scheduler", client.scheduler.address]) == 0
    for where, tile in ((None, 128), (store, 200)):
        pre = shift.disk_shift_invert(X, spec.kernel, sigma, str(tmp_path / "f"), store=where)
        assert pre.info["factor_on_disk"]["tile"] == tile
        got = pre.apply(R)
        pre.release()
        np.testing.assert_allclose(got, mem, rtol=2e-3, atol=2e-3 * np.abs(mem).max())
        assert not (tmp_path / "f").exists()


def fake_solve(calls):
    from types import SimpleNamespace

    def fake(matmat, n, method, tol=1e-8, max_products=600, precond=None, **kw):
        calls.append(("solve", tol))
        return SimpleNamespace(values=np.array([10.0]), residuals=np.array([0.5]),
                               status="not_converged", products=2, iterations=1,
                               ritz_block=None, ritz_values=None, notes=[], phases=None,
                               converged=False, solver_seconds=0.0)
    return fake


def write_manifest(path, n, sigma, identity="x", columns=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump({"n": n, "tile": 64, "sigma": repr(sigma), "identity": identity,
                   "dtype": "float32", "columns": columns, "checksums": {}}, f)


@pytest.mark.parametrize("recorded, first", [(8.0, 8.0), (9.3, 9.3), (2.0, 9.5),
                                             (8.0000001, 9.5)])
def test_a_killed_runs_factor_is_resumed_at_its_sigma(tmp_path, monkeypatch, small_memory,
                                                      recorded, first):
    """The estimate (λ̃ = 10, ‖r‖ = 0.5) places σ at 9.5, then 8.0. A factor on disk begun at
    8.0 (9.5 had failed) resumes at 8.0; one at a σ about as far below λ̃ as 9.5 (9.3) is
    tried first; one far below (2.0, or 8.0000001: not one of this run's σ) is not used, and
    deleted when the solve ends."""
    from types import SimpleNamespace

    import ntkdist.solvers.driver as driver

    calls = []
    monkeypatch.setattr(driver, "smallest_eigenpairs", fake_solve(calls))

    def disk(X, kernel, sigma, path, identity, store, log):
        calls.append(("factor", sigma))
        return SimpleNamespace(apply=lambda R: R, info={"form_seconds": 0.0}, setup_seconds=0.0,
                               release=lambda: df.remove_factor(path))

    import ntkdist.solvers.diskfactor as df

    monkeypatch.setattr(shift, "disk_shift_invert", disk)
    path = str(tmp_path / "f")
    write_manifest(path, 500, recorded)
    pre = SimpleNamespace(apply=None, degree=2, info=None)
    sol, P = shift.solve_shifted(lambda V: V, 500, "davidson", np.zeros((500, 3)), None, pre,
                                 tol=1e-8, factor_dir=path, identity="x")
    tried = [c[1] for c in calls if c[0] == "factor"]
    assert tried[0] == first
    assert P.info["sigma_from"] == ("resumed factor" if first == recorded else "estimate")
    assert not os.path.exists(path)


def test_a_factor_of_another_run_or_a_garbled_manifest_is_not_resumed(tmp_path):
    from ntkdist.solvers.diskfactor import recorded_sigma

    path = str(tmp_path / "f")
    write_manifest(path, 500, 8.0, identity="other")
    assert recorded_sigma(path, 500, "x") is None and recorded_sigma(path, 501, "other") is None
    assert recorded_sigma(path, 500, "other") == 8.0
    write_manifest(path, 500, 8.0, columns=0)
    assert recorded_sigma(path, 500, "x") is None
    n = 200
    f = DiskFactor(path, n, 64, 0.25, "x")
    assert f.factor(source(spd(n), f.bounds))
    m = json.load(open(os.path.join(path, "manifest.json")))
    m["checksums"] = {"garbled": "0"}
    json.dump(m, open(os.path.join(path, "manifest.json"), "w"))
    calls = []
    g = DiskFactor(path, n, 64, 0.25, "x")
    assert g.factor(source(spd(n), g.bounds, calls))
    assert min(j for _, j in calls) == 0


def test_an_overflowing_manifest_and_a_look_alike_file(tmp_path):
    """'columns': Infinity in a hand-edited manifest is not resumable (no OverflowError);
    a user's L.backup.npy is not one of the factor's files; a complete factor is reused."""
    from ntkdist.solvers.diskfactor import recorded_sigma

    path = tmp_path / "f"
    n = 200
    f = DiskFactor(str(path), n, 64, 0.25, "x")
    assert f.factor(source(spd(n), f.bounds))
    seen = []
    again = DiskFactor(str(path), n, 64, 0.25, "x", log=seen.append)
    assert again.factor(lambda i, j: pytest.fail("a complete factor is formed again"))
    assert any("complete" in line and "reused" in line for line in seen)
    text = (path / "manifest.json").read_text().replace('"columns": 4', '"columns": Infinity')
    (path / "manifest.json").write_text(text)
    assert recorded_sigma(str(path), n, "x") is None
    (path / "L.backup.npy").write_bytes(b"mine")
    calls = []
    g = DiskFactor(str(path), n, 64, 0.25, "x")
    assert g.factor(source(spd(n), g.bounds, calls))
    assert min(j for _, j in calls) == 0
    g.remove()
    assert (path / "L.backup.npy").read_bytes() == b"mine"
