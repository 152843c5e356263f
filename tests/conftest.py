import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def file_tree(path):
    """Every file under ``path`` with its bytes, to show that nothing was touched."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def sigkill_assembly(args, store, tiles, timeout):
    """Run ``ntkdist assemble ARGS --store STORE --workers 1`` in a process group of its own
    and SIGKILL it once ``tiles`` tiles are done (or after ``timeout`` seconds)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ntkdist", "assemble", *args, "--store",
                             store, "--workers", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = os.path.join(store, "done")
    deadline = time.time() + timeout
    while time.time() < deadline:
        count = sum(n.startswith("K.") for n in os.listdir(done_dir)) if os.path.isdir(
            done_dir) else 0
        if count >= tiles:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spawn_solve(solve):
    """``ntkdist SOLVE --workers 1`` in a process group of its own (for ``os.killpg``), its
    output (stdout and stderr) readable line by line from ``proc.stdout``."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "ntkdist", *solve, "--workers", "1"],
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def cluster():
    """An in-process Dask cluster shared by the tests (two workers, one thread each)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c
