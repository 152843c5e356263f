"""The distributed operator's pieces: tile products, whole-chunk reads, the worker cache."""

import os

import numpy as np
import pytest

from ntkdist.assemble import assemble
from ntkdist.errors import NtkdistError
from ntkdist.operator import _fused, _products, make_operator
from ntkdist.spec import KernelSpec
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore, StoreError

SEED = 9127


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tile_products_match_dense(dtype):
    rng = np.random.default_rng(SEED)
    n, t, b = 700, 256, 5
    A = rng.standard_normal((n, n))
    K = (A + A.T).astype(dtype).astype(np.float64)  # the stored values, exactly
    V = rng.standard_normal((n, b))
    VT = np.ascontiguousarray(V.T)
    for i, j in [(0, 0), (0, 1), (1, 2), (2, 2), (0, 2)]:
        I, J = slice(i * t, min(n, (i + 1) * t)), slice(j * t, min(n, (j + 1) * t))
        tile = K[I, J].astype(dtype)
        yi, yj = _products(tile, VT, i, j, t)
        np.testing.assert_allclose(yi.T, K[I, J] @ V[J], rtol=0, atol=1e-12 * np.abs(K).max() * n)
        if i == j:
            assert yj is None
        else:
            np.testing.assert_allclose(yj.T, K[I, J].T @ V[I], rtol=0,
                                       atol=1e-12 * np.abs(K).max() * n)


def test_float32_pass_products_fused_by_strips_match():
    """A float32 pass (float32 tile, float32 Vᵀ) multiplies off-diagonal tiles strip by strip
    (``_fused``), also when the strip does not divide the tile's rows; the result matches
    the two whole-tile products in float32 to float32 accuracy."""
    rng = np.random.default_rng(SEED + 1)
    n, t, b = 600, 256, 7  # tiles of 256 and 88 rows: 64-row strips, then a partial one
    K = rng.standard_normal((n, n)).astype(np.float32)
    K = K + K.T
    VT = rng.standard_normal((b, n)).astype(np.float32)
    for i, j in [(0, 1), (1, 2), (0, 2), (2, 2)]:
        I, J = slice(i * t, min(n, (i + 1) * t)), slice(j * t, min(n, (j + 1) * t))
        yi, yj = _products(np.ascontiguousarray(K[I, J]), VT, i, j, t)
        assert yi.dtype == np.float32
        ref_i = K[I, J].astype(np.float64) @ VT[:, J].T.astype(np.float64)
        scale = np.abs(K).max() * np.abs(VT).max() * n
        np.testing.assert_allclose(yi.T, ref_i, rtol=0, atol=1e-6 * scale)
        if i == j:
            assert yj is None
        else:
            ref_j = K[I, J].T.astype(np.float64) @ VT[:, I].T.astype(np.float64)
            np.testing.assert_allclose(yj.T, ref_j, rtol=0, atol=1e-6 * scale)
    A = np.ascontiguousarray(K[:130, :77])
    yi, yj = _fused(A, VT[:, :130], VT[:, 200:277], strip=64)
    np.testing.assert_allclose(yi, VT[:, 200:277] @ A.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(yj, VT[:, :130] @ A, rtol=1e-5, atol=1e-4)


def _store(client, tmp_path, dtype="float32", n=700, tile=256):
    path = str(tmp_path / f"k-{dtype}.zarr")
    spec = make_store_spec(make_spec(data="sphere", n=n, d=16, depth=3, seed=5), tile, dtype)
    assemble(spec, path, client, progress=False)
    return path


def test_whole_chunk_reads_match_zarr_and_refuse_damage(client, tmp_path):
    path = _store(client, tmp_path)
    store = KernelStore.open(path)
    K = store.array("K")
    for i, j in store.upper_tiles():
        fast = store.read_tile(i, j)
        np.testing.assert_array_equal(fast, K[store.tile_slices(i, j)])
        assert fast.dtype == np.float32 and fast.flags.c_contiguous
    chunk = os.path.join(path, "K", "c", "0", "1")
    with open(chunk, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="damaged"):
        store.read_tile(0, 1)
    os.remove(chunk)
    assert np.isnan(store.read_tile(0, 1)).all()


def test_partial_cache_streams_the_rest_and_agrees(client, tmp_path):
    path = _store(client, tmp_path)
    from ntkdist import open_kernel

    K = np.asarray(open_kernel(path).compute(scheduler="threads"), dtype=np.float64)
    V = np.random.default_rng(SEED).standard_normal((700, 6))
    total = sum(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
    probe = make_operator(client, "store", store=path)
    assert probe.mode == "store" and probe.cached_bytes == 0
    fraction = 0.5 * probe.tile_bytes / total  # room for about half of the tiles
    op = make_operator(client, "auto", store=path, cache_fraction=fraction)
    assert op.mode == "store" and 0 < op.cached_bytes < op.tile_bytes
    assert op.cached_bytes + op.streamed_bytes_per_pass == op.tile_bytes
    before = op.bytes_read
    for _ in range(2):
        np.testing.assert_allclose(op.matmat(V), K @ V, rtol=1e-13, atol=1e-11)
    assert op.bytes_read - before == 2 * op.streamed_bytes_per_pass
    np.testing.assert_array_equal(op.matmat(V), op.matmat(V))  # a fixed summation order
    np.testing.assert_allclose(op.matmat(V), probe.matmat(V), rtol=1e-13, atol=1e-11)
    np.testing.assert_allclose(op.matmat(V[:, 0]), K @ V[:, 0], rtol=1e-13, atol=1e-11)
    op.close()
    probe.close()
    with pytest.raises(NtkdistError, match="do not fit"):
        make_operator(client, "memory", store=path, cache_fraction=fraction)
    whole = make_operator(client, "auto", store=path)
    assert whole.mode == "memory" and whole.cached_bytes == whole.tile_bytes
    assert whole.streamed_bytes_per_pass == 0
    # A scipy LinearOperator: shape, dtype, matvec and matmat.
    from scipy.sparse.linalg import aslinearoperator

    lin = aslinearoperator(whole)
    assert lin.shape == (700, 700) and lin.dtype == np.float64
    np.testing.assert_allclose(lin.matmat(V), K @ V, rtol=1e-13, atol=1e-11)
    np.testing.assert_allclose(lin.matvec(V[:, 1]), K @ V[:, 1], rtol=1e-13, atol=1e-11)
    np.testing.assert_allclose(whole.matmat(V), K @ V, rtol=1e-13, atol=1e-11)
    whole.close()


@pytest.mark.parametrize("mode", ["store", "memory"])
def test_damaged_tile_of_the_right_size_stops_the_solve(client, tmp_path, capsys, mode):
    """A chunk overwritten in place after assembly (same size, so only its checksum tells)
    stops the solve with one line instead of giving a wrong λ_min; so does damaged X."""
    from ntkdist.cli import main

    path = _store(client, tmp_path)
    addr = client.scheduler.address
    chunk = os.path.join(path, "K", "c", "1", "2")
    with open(chunk, "r+b") as f:
        f.seek(4 * 300)
        f.write(np.full(50, 7.0, dtype=np.float32).tobytes())
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["solve", "--store", path, "--out", str(out), "--operator", mode,
                 "--scheduler", addr]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "K.1.2" in err[0] and "checksum" in err[0]
    assert not (out / "result.json").exists()


def test_damaged_rows_stop_the_solve(client, tmp_path, capsys):
    from ntkdist.cli import main

    path = _store(client, tmp_path)
    with open(os.path.join(path, "X", "c", "1", "0"), "r+b") as f:
        f.seek(8 * 10)
        f.write(np.full(3, 0.5).tobytes())
    capsys.readouterr()
    assert main(["solve", "--store", path, "--out", str(tmp_path / "o"), "--operator", "store",
                 "--scheduler", client.scheduler.address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "X.1" in err[0] and "checksum" in err[0]


def test_operators_one_after_another_on_one_client_use_their_own_data(client, tmp_path):
    """Row blocks (recompute) and low-rank parts (mixed) are scattered under fresh names: a
    second operator on the same client, with other rows and another tile, must not pick up
    the first one's blocks (it did when they were scattered as a dict keyed 0, 1, …)."""
    from ntkdist.kernels.limiting import ntk

    problem = KernelSpec(kind="ntk", depth=3, normalization="paper")
    rng = np.random.default_rng(SEED + 2)
    for n, t in [(600, 256), (500, 200), (450, 450)]:
        X = rng.standard_normal((n, 9))
        V = rng.standard_normal((n, 3))
        op = make_operator(client, "recompute", rows=X, kernel=problem, tile=t)
        ref = ntk(X, depth=3) @ V
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        if n == 500:
            op.close()  # closed or not, the next operator gets its own blocks
    for n, t in [(700, 256), (520, 200)]:
        path = _store(client, tmp_path / str(n), "float64", n=n, tile=t)
        from ntkdist import open_kernel

        K = np.asarray(open_kernel(path).compute(scheduler="threads"))
        V = rng.standard_normal((n, 3))
        op = make_operator(client, "memory", store=path, precision="mixed")
        np.testing.assert_allclose(op.matmat_fast(V), K @ V, rtol=0,
                                   atol=1e-5 * np.abs(K @ V).max())


def test_solve_on_a_damaged_store_prints_one_line_without_dask_logs(client, tmp_path):
    """The CLI's cluster runs worker processes, whose log of a failed task (Dask's "Compute
    Failed" with a traceback) would reach the terminal before ntkdist's line."""
    import subprocess
    import sys

    path = _store(client, tmp_path)
    with open(os.path.join(path, "K", "c", "1", "2"), "r+b") as f:
        f.seek(4 * 300)
        f.write(np.full(50, 7.0, dtype=np.float32).tobytes())
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "ntkdist", "solve", "--store", path, "--out",
                           str(out), "--workers", "1", "--operator", "store"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ntkdist: error: K.1.2") and "--repair" in lines[0]
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr
    assert not (out / "result.json").exists()


def _kill_the_worker(client, timeout=30.0):
    """SIGKILL the cluster's one worker process; return once its nanny's new one is there."""
    import signal
    import time

    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = set(client.scheduler_info(n_workers=-1)["workers"])
        if workers and not workers & set(pids):
            return
        time.sleep(0.05)
    raise AssertionError("no new worker")


def test_a_lost_worker_stops_the_solve_with_one_line(client, tmp_path, capfd):
    """A worker killed during a pass (its scattered row blocks lost with it) or between two
    passes (its kept tiles lost, and no worker left that could recompute them: Dask would
    wait for ever) stops the product with one line that says how to resume."""
    import threading

    from ntkdist.cluster import connect

    path = _store(client, tmp_path, "float64", n=300, tile=100)
    problem = KernelSpec(kind="ntk", depth=3, normalization="paper")
    X = np.random.default_rng(SEED).standard_normal((3000, 8))
    V = np.ones((3000, 2))
    capfd.readouterr()
    with connect(workers=1) as c:
        op = make_operator(c, "recompute", rows=X, kernel=problem, tile=500)
        op.matmat(V)
        pid = next(iter(c.run(os.getpid).values()))
        threading.Timer(0.2, os.kill, (pid, 9)).start()
        with pytest.raises(NtkdistError, match=r"^a Dask worker was lost during a pass over the "
                                               r"kernel.*rerun the same command"):
            for _ in range(20):  # the kill lands in one of these passes
                op.matmat(V)
        op.close()

        c.wait_for_workers(1, timeout=30)  # the nanny's new worker
        kept = make_operator(c, "memory", store=path)
        W = np.ones((300, 2))
        kept.matmat(W)
        _kill_the_worker(c)
        failed = []

        def product():
            try:
                kept.matmat(W)
            except NtkdistError as exc:
                failed.append(str(exc))

        waiting = threading.Thread(target=product, daemon=True)
        waiting.start()
        waiting.join(20)
        assert not waiting.is_alive(), "the pass waits for ever for the lost tiles"
        assert len(failed) == 1 and failed[0].startswith("a Dask worker was lost during a pass")
        assert "\n" not in failed[0] and "checkpoint" in failed[0]
        kept.close()
    err = capfd.readouterr().err
    assert "Removing worker" not in err and "Traceback" not in err, err
