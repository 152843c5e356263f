"""Assembly as users run it: the CLI, attaching to a cluster, kills and resumes, failures."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ntkdist
from conftest import file_tree
from ntkdist import assemble as assemble_mod
from ntkdist.assemble import AssemblyError, assemble
from ntkdist.cli import main
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore, open_kernel


def test_sigkill_then_rerun_gives_identical_store(client, tmp_path):
    args = ["--data", "sphere", "--n", "3000", "--d", "16", "--depth", "3", "--seed", "77",
            "--tile", "100"]
    killed = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([sys.executable, "-m", "ntkdist", "assemble", *args, "--store", killed,
                             "--workers", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = os.path.join(killed, "done")
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline:
        count = sum(n.startswith("K.") for n in os.listdir(done_dir)) if os.path.isdir(done_dir) else 0
        if count >= 40:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = KernelStore.open(killed)
    total = len(store.upper_tiles())
    remaining = len(store.pending()[1])
    assert 0 < remaining < total - 30, "the kill must land in the middle of the run"

    code = main(["assemble", *args, "--store", killed, "--scheduler", client.scheduler.address])
    assert code == 0
    assert not store.pending()[1]

    clean = str(tmp_path / "clean.zarr")
    assert main(["assemble", *args, "--store", clean, "--scheduler", client.scheduler.address]) == 0
    assert file_tree(killed) == file_tree(clean)


def test_cli_attach_info_verify_and_run_from_store(client, tmp_path, capsys):
    addr = client.scheduler.address
    path = str(tmp_path / "k.zarr")
    base = ["--n", "120", "--d", "8", "--depth", "2", "--seed", "3"]
    assert main(["assemble", *base, "--store", path, "--tile", "50", "--scheduler", addr]) == 0
    assert main(["info", "--store", path]) == 0
    out = capsys.readouterr().out
    assert "6/6 done" in out and "tile 50" in out and "float64" in out
    assert main(["verify", "--store", path, "--recompute", "2"]) == 0
    assert "sound" in capsys.readouterr().out

    res = str(tmp_path / "res")
    assert main(["run", *base, "--store", path, "--scheduler", addr, "--out", res]) == 0
    r = json.load(open(os.path.join(res, "result.json")))
    X = make_spec(data="sphere", n=120, d=8, depth=2, seed=3).rows()
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ntkdist.ntk(X, depth=2))[0],
                                            rel=1e-10)
    assert r["store"] == os.path.abspath(path)

    with open(KernelStore.open(path).chunk_file("K", 0, 2), "r+b") as f:
        f.seek(16)
        f.write(b"garbage!")
    assert main(["verify", "--store", path]) == 1
    assert "K.0.2" in capsys.readouterr().err


def test_cli_refusals_are_one_line(client, tmp_path, capsys):
    addr = client.scheduler.address
    path = str(tmp_path / "k.zarr")
    base = ["--n", "30", "--d", "4", "--depth", "2", "--scheduler", addr]
    assert main(["assemble", *base, "--store", path]) == 0
    before = file_tree(path)
    capsys.readouterr()
    cases = [
        ["assemble", "--n", "30", "--d", "4", "--depth", "3", "--store", path, "--scheduler", addr],
        ["assemble", *base, "--store", path, "--tile", "7"],
        ["assemble", *base, "--store", str(tmp_path / "x.zarr"), "--scheduler-file",
         str(tmp_path / "none.json")],
        ["assemble", *base, "--store", str(tmp_path / "y.zarr"), "--tile", "0"],
        ["info", "--store", str(tmp_path)],
        ["verify", "--store", str(tmp_path / "nothing")],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("ntkdist: error:"), err
    assert file_tree(path) == before


def test_failing_task_reports_and_store_stays_resumable(client, tmp_path, monkeypatch):
    run = make_spec(data="gaussian", n=40, d=5, depth=3, seed=9)
    spec = make_store_spec(run, 10, "float64")
    path = str(tmp_path / "k.zarr")
    real = assemble_mod.compute_tile

    def flaky(store, i, j):
        if (i, j) == (1, 2):
            raise OSError(28, "No space left on device")
        return real(store, i, j)

    monkeypatch.setattr(assemble_mod, "compute_tile", flaky)
    with pytest.raises(AssemblyError, match=r"tile \(1, 2\) failed: OSError.*No space left on device.*resume"):
        assemble(spec, path, client, progress=False)
    monkeypatch.setattr(assemble_mod, "compute_tile", real)
    report = assemble(spec, path, client, progress=False)
    assert 1 <= report["tiles_computed"] < 10
    np.testing.assert_allclose(open_kernel(path).compute(), ntkdist.ntk(run.rows(), depth=3),
                               rtol=1e-13)
