"""Assembly as users run it: the CLI, attaching to a cluster, kills and resumes, failures."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import ntkdist
from conftest import file_tree, sigkill_assembly
from ntkdist import assemble as assemble_mod
from ntkdist.assemble import AssemblyError, assemble
from ntkdist.cli import main
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore, open_kernel


def test_sigkill_then_rerun_gives_identical_store(client, tmp_path):
    args = ["--data", "sphere", "--n", "2000", "--d", "16", "--depth", "3", "--seed", "77",
            "--tile", "100"]
    killed = str(tmp_path / "killed.zarr")
    sigkill_assembly(args, killed, 40, 120)
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

    def flaky(store, i, j, **options):
        if (i, j) == (1, 2):
            raise OSError(28, "No space left on device")
        return real(store, i, j, **options)

    monkeypatch.setattr(assemble_mod, "compute_tile", flaky)
    with pytest.raises(AssemblyError, match=r"tile \(1, 2\) failed: no space left on device "
                                            r"\(ENOSPC\).*free space.*resume"):
        assemble(spec, path, client, progress=False)
    monkeypatch.setattr(assemble_mod, "compute_tile", real)
    report = assemble(spec, path, client, progress=False)
    assert 1 <= report["tiles_computed"] < 10
    np.testing.assert_allclose(open_kernel(path).compute(), ntkdist.ntk(run.rows(), depth=3),
                               rtol=1e-13)


def _spec(n=40, tile=10):
    run = make_spec(data="gaussian", n=n, d=5, depth=3, seed=9)
    return run, make_store_spec(run, tile, "float64")


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntkdist: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], err
    return lines[0]


_HOLD = """
import sys, time
from ntkdist.store import KernelStore
with KernelStore.open(sys.argv[1]).lock("assembled"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_assembly_is_refused_while_one_runs_and_a_kill_frees_the_store(
        client, tmp_path, capsys):
    addr = client.scheduler.address
    path = str(tmp_path / "k.zarr")
    args = ["assemble", "--data", "gaussian", "--n", "40", "--d", "5", "--depth", "3",
            "--seed", "9", "--tile", "10", "--store", path, "--scheduler", addr]
    assert main(args) == 0
    for key in ("K.0.1", "K.2.3", "K.3.3"):
        os.remove(os.path.join(path, "done", key))
    before = file_tree(path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(args) == 2
        line = _one_line(capsys, f"is being assembled by process {holder.pid} on ", "since",
                         "wait for it")
        assert path in line
        assert {k: v for k, v in file_tree(path).items() if k != ".lock"} == before
        assert len(KernelStore.open(path).pending()[1]) == 3  # nothing computed
        assert main(["info", "--store", path]) == 0
        assert f"being assembled by process {holder.pid}" in capsys.readouterr().out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(path, ".lock"))  # left by the kill, but not locked
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming: 7 of 10 tiles already done" in out and "3 tiles computed now" in out
    assert not os.path.exists(os.path.join(path, ".lock"))
    assert main(["info", "--store", path]) == 0
    assert "being" not in capsys.readouterr().out


def test_the_lock_is_held_for_the_whole_assembly_and_is_no_piece(client, tmp_path):
    """The lock is taken by assemble() itself (run --store goes through it): a second open
    file description in this process is a second holder, refused like another process."""
    run, spec = _spec()
    path = str(tmp_path / "k.zarr")
    report = assemble(spec, path, client, progress=False)
    assert report["tiles_done_before"] == 0 and report["tiles_computed"] == 10
    os.remove(os.path.join(path, "done", "K.1.1"))
    store = KernelStore.open(path)
    size = store.bytes_on_disk()
    from ntkdist.store import StoreError

    with store.lock("repaired"):
        assert os.path.exists(os.path.join(path, ".lock"))
        assert store.bytes_on_disk() == size
        assert store.pending() == ([], [(1, 1)])
        assert "repaired by process" in store.lock_holder()
        with pytest.raises(StoreError, match=f"is being repaired by process {os.getpid()}"):
            assemble(spec, path, client, progress=False)
        with pytest.raises(StoreError, match="is being repaired"):
            with store.lock():
                pass
    assert store.lock_holder() is None and not os.path.exists(os.path.join(path, ".lock"))
    report = assemble(spec, path, client, progress=False)
    assert report["tiles_done_before"] == 9 and report["tiles_computed"] == 1
    # A complete store needs no lock: it is only checked (a read-only copy still serves run).
    with store.lock():
        assert assemble(spec, path, client, progress=False)["tiles_done_before"] == 10


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                         (errno.EROFS, "read-only file system (EROFS)")])
def test_full_disk_or_read_only_store_is_one_line_and_resumable(client, tmp_path, capsys,
                                                                monkeypatch, code, words):
    """A chunk write failing on the worker (the in-process workers see the patched write of
    Zarr's local store) stops the run with one line naming the problem and the tile; the
    tiles done keep their markers and the same command resumes."""
    import zarr.storage._local as local

    addr = client.scheduler.address
    path = str(tmp_path / "k.zarr")
    args = ["assemble", "--data", "gaussian", "--n", "40", "--d", "5", "--depth", "3",
            "--seed", "9", "--tile", "10", "--store", path, "--scheduler", addr]
    real = local._put

    def failing(file, value, exclusive=False):
        if str(file).endswith(os.path.join("K", "c", "1", "2")):
            raise OSError(code, os.strerror(code), str(file))
        return real(file, value, exclusive)

    monkeypatch.setattr(local, "_put", failing)
    capsys.readouterr()
    assert main(args) == 2
    _one_line(capsys, "tile (1, 2) failed: " + words, "writing store", "rerun the same command")
    store = KernelStore.open(path)
    done = {k: store.recorded_checksum(k) for k in store.done_keys()}
    assert "K.1.2" not in done and len(done) >= 4  # the row blocks, and the tiles done
    assert not any(".partial" in name or ".tmp" in name for name in file_tree(path))
    monkeypatch.setattr(local, "_put", real)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(done) == 4 or f"resuming: {len(done) - 4} of 10 tiles already done" in out
    assert all(store.recorded_checksum(k) == v for k, v in done.items())
    assert main(["verify", "--store", path]) == 0
    clean = str(tmp_path / "clean.zarr")
    assert main(args[:-4] + ["--store", clean, "--scheduler", addr]) == 0
    assert file_tree(path) == file_tree(clean)


def test_unwritable_store_paths_are_one_line(tmp_path, monkeypatch):
    """Root ignores chmod, so the OS errors are simulated where they arise."""
    import zarr

    from ntkdist import store as store_mod
    from ntkdist.errors import OutputError

    _, spec = _spec()

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "k.zarr"))

    monkeypatch.setattr(store_mod.os, "makedirs", refuse)
    with pytest.raises(OutputError, match=r"cannot write store .*permission denied \(EACCES\)"):
        KernelStore.create_or_resume(str(tmp_path / "k.zarr"), spec)
    monkeypatch.undo()
    monkeypatch.setattr(store_mod.os, "listdir", refuse)
    with pytest.raises(OutputError, match=r"cannot read --store .*permission denied"):
        KernelStore.create_or_resume(str(tmp_path / "k.zarr"), spec)
    monkeypatch.undo()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(zarr, "create_group", read_only)
    with pytest.raises(OutputError, match=r"cannot create store .*read-only file system"):
        KernelStore.create_or_resume(str(tmp_path / "r.zarr"), spec)
    monkeypatch.setattr(zarr, "open_group", read_only)
    with pytest.raises(OutputError, match=r"cannot write store .*read-only file system"):
        KernelStore(path=str(tmp_path / "k.zarr"), spec=spec)._ensure_arrays()


def test_resuming_is_reported(client, tmp_path, capsys):
    run, spec = _spec(n=30)
    path = str(tmp_path / "k.zarr")
    lines = []
    assert assemble(spec, path, client, progress=False, log=lines.append)["tiles_done_before"] == 0
    assert lines == []
    for key in ("K.0.0", "K.1.2"):
        os.remove(os.path.join(path, "done", key))
    report = assemble(spec, path, client, progress=False, log=lines.append)
    assert report["tiles_done_before"] == 4 and report["tiles_computed"] == 2
    assert lines == ["resuming: 4 of 6 tiles already done"]
