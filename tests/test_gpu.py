"""--device gpu: the recompute operator on GPU workers, checked here with a NumPy-backed
stand-in for CuPy whose arrays are of a device type of their own that refuses host/device
mix-ups as CuPy does (tests/fakecupy.py; the real CuPy path runs in scripts/gpu_check.py on
a GPU)."""

import json
import os
import re
import sys

import numpy as np
import pytest

import fakecupy
from ntkdist.assemble import assemble
from ntkdist.cli import main
from ntkdist.cluster import ClusterError, connect, gpu_count
from ntkdist.data import synthetic_rows
from ntkdist.errors import InputError, NtkdistError
from ntkdist.kernels.limiting import array_module, kernel_tile, row_block
from ntkdist.operator import make_operator
from ntkdist.spec import KernelSpec, make_spec, make_store_spec

SEED = 5521


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake CuPy as ``cupy``: the test cluster's workers run in this process, so they
    import it too."""
    cp = fakecupy.module()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    return cp


@pytest.fixture
def store(client, tmp_path):
    path = str(tmp_path / "k.zarr")
    spec = make_store_spec(make_spec(data="gaussian", n=333, d=7, depth=3, seed=SEED), 128,
                           "float64")
    assemble(spec, path, client, progress=False)
    return path


def test_gpu_operators_match_the_cpu_operators(client, store, fake_gpu):
    from ntkdist.operator import _GPU_TILES

    V = np.random.default_rng(SEED).standard_normal((333, 5))
    ref = make_operator(client, "memory", store=store)
    want = ref.matmat(V)
    for mode, expected in [("recompute", "recompute"), ("auto", "memory"), ("memory", "memory")]:
        gpu = make_operator(client, mode, store=store, device="gpu")
        assert (gpu.mode, gpu.device, gpu.precision) == (expected, "gpu", "float64")
        assert set(gpu.gpus) == set(client.scheduler_info()["workers"])
        assert set(gpu.gpus.values()) == {fakecupy.NAME}
        for _ in range(2):  # memory: the second pass uses the tiles kept from the first
            got = gpu.matmat(V)
            assert type(got) is np.ndarray  # back on the host
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        if expected == "memory":
            kept = _GPU_TILES[gpu._gpu_token]  # the fake's workers share this process
            assert sorted(kept) == sorted(gpu.plan.kept)
            # built by the tile function on the device arrays, and kept there
            assert all(type(t) is fakecupy.FakeDeviceArray for t in kept.values())
            assert gpu.cached_bytes == sum(t.nbytes for t in kept.values())
            token = gpu._gpu_token
            gpu.close()
            assert token not in _GPU_TILES
        else:
            assert gpu._gpu_token is None and gpu.cached_bytes == 0
            gpu.close()
    # Without a store: the rows and the problem given, as 'ntkdist run' does.
    X = synthetic_rows("gaussian", 7, SEED, 0, 333)
    problem = KernelSpec(kind="ntk", depth=3, normalization="paper")
    cpu = make_operator(client, "auto", rows=X, kernel=problem, tile=100)
    gpu = make_operator(client, "recompute", rows=X, kernel=problem, tile=100, device="gpu")
    np.testing.assert_allclose(gpu.matmat(V), cpu.matmat(V), rtol=0,
                               atol=1e-12 * np.abs(cpu.matmat(V)).max())
    assert gpu.describe()["gpus"] == [fakecupy.NAME]
    for op in (ref, gpu, cpu):
        op.close()


def test_gpu_auto_keeps_what_fits_and_rebuilds_the_rest(client, store, monkeypatch):
    """Free GPU memory for about two of a worker's tiles besides the room to build one:
    auto keeps those on the GPU and rebuilds the others every pass, with the same products."""
    from ntkdist.operator import _GPU_TILES

    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=2_900_000))
    V = np.random.default_rng(SEED).standard_normal((333, 4))
    want = make_operator(client, "memory", store=store).matmat(V)
    op = make_operator(client, "auto", store=store, device="gpu")
    assert op.mode == "recompute" and op.plan.kept_on_gpu
    assert 0 < len(op.plan.kept) < 6
    assert op.memory()["cached_bytes"] == sum(
        8 * min(128, 333 - 128 * i) * min(128, 333 - 128 * j) for i, j in op.plan.kept)
    for _ in range(3):
        got = op.matmat(V)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        assert set(_GPU_TILES[op._gpu_token]) == set(op.plan.kept)  # never more than planned
    token = op._gpu_token
    op.close()
    assert token not in _GPU_TILES
    # memory refuses what does not fit; recompute keeps nothing
    with pytest.raises(NtkdistError, match="do not fit"):
        make_operator(client, "memory", store=store, device="gpu")
    op = make_operator(client, "recompute", store=store, device="gpu")
    assert op.plan.kept == () and not op.plan.kept_on_gpu
    op.close()


def test_gpu_refusals(client, store, fake_gpu, monkeypatch):
    with pytest.raises(NtkdistError, match="not store"):
        make_operator(client, "store", store=store, device="gpu")
    # Tiles that do not fit in the GPU's free memory: memory refuses, auto rebuilds them.
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=2 ** 20))
    with pytest.raises(NtkdistError, match="do not fit"):
        make_operator(client, "memory", store=store, device="gpu")
    op = make_operator(client, "auto", store=store, device="gpu")
    assert op.mode == "recompute"
    op.close()
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module())
    with pytest.raises(NtkdistError, match="precision mixed"):
        make_operator(client, "auto", store=store, device="gpu", precision="mixed")
    with pytest.raises(NtkdistError, match="device must be"):
        make_operator(client, "auto", store=store, device="tpu")
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(devices=0))
    with pytest.raises(NtkdistError, match="sees no usable GPU"):
        make_operator(client, "auto", store=store, device="gpu")
    with pytest.raises(ClusterError, match="CUDA sees no GPU"):
        gpu_count()
    monkeypatch.setitem(sys.modules, "cupy", None)  # not installed
    with pytest.raises(NtkdistError, match="needs CuPy"):
        make_operator(client, "auto", store=store, device="gpu")
    with pytest.raises(ClusterError, match="needs CuPy"):
        with connect(device="gpu"):
            pass


def test_gpu_solve_and_run_from_the_command_line(client, store, fake_gpu, tmp_path, capsys):
    addr = client.scheduler.address
    out_cpu, out_gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    common = ["--method", "davidson", "--tol", "1e-9", "--scheduler", addr]
    assert main(["solve", "--store", store, "--out", out_cpu, *common]) == 0
    assert main(["solve", "--store", store, "--out", out_gpu, *common, "--device", "gpu"]) == 0
    cpu = json.load(open(os.path.join(out_cpu, "result.json")))
    gpu = json.load(open(os.path.join(out_gpu, "result.json")))
    assert (gpu["device"], gpu["operator"], gpu["gpus"]) == ("gpu", "memory", [fakecupy.NAME])
    r = [128, 128, 77]  # the store's row blocks: float64 upper tiles kept on the GPU
    assert gpu["operator_memory"]["cached_bytes"] == sum(
        8 * r[i] * r[j] for i in range(3) for j in range(i, 3))
    assert cpu["device"] == "cpu" and cpu["gpus"] is None
    assert abs(gpu["lambda_min"] - cpu["lambda_min"]) <= 1e-9 * cpu["lambda_min"]
    assert gpu["relative_accuracy_kato_temple"] <= 1e-9
    assert "GPU worker(s): " + fakecupy.NAME in capsys.readouterr().out
    # run without a store: --device gpu picks an iterative method (not the dense default).
    out_run = str(tmp_path / "run")
    data = ["--data", "gaussian", "--n", "333", "--d", "7", "--depth", "3", "--seed", str(SEED)]
    assert main(["run", *data, "--out", out_run, "--device", "gpu", "--scheduler", addr]) == 0
    run = json.load(open(os.path.join(out_run, "result.json")))
    assert run["device"] == "gpu" and run["method"].startswith("lobpcg")
    assert abs(run["lambda_min"] - cpu["lambda_min"]) <= 1e-7 * cpu["lambda_min"]


def test_gpu_shift_invert_forms_factors_and_applies_on_the_device(client, store, fake_gpu,
                                                                   tmp_path, monkeypatch):
    """--precond shift on a GPU run: K − σI formed, factored and applied on the client's
    device (host/device mix-ups fail in the stand-in), to the CPU's λ_min; where the device
    has no room for it, the harmonic model finishes the solve and result.json says why."""
    for name, mod in fakecupy.cupyx_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    addr = client.scheduler.address
    common = ["--method", "lobpcg", "--tol", "1e-9", "--scheduler", addr]
    out_cpu, out_gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    assert main(["solve", "--store", store, "--out", out_cpu, *common]) == 0
    assert main(["solve", "--store", store, "--out", out_gpu, *common, "--device", "gpu",
                 "--precond", "shift"]) == 0
    cpu = json.load(open(os.path.join(out_cpu, "result.json")))
    gpu = json.load(open(os.path.join(out_gpu, "result.json")))
    p = gpu["preconditioner"]
    assert (p["name"], p.get("device")) == ("shift", "gpu") and p["sigma"] < cpu["lambda_min"]
    assert gpu["status"] == "certified"
    assert abs(gpu["lambda_min"] - cpu["lambda_min"]) <= 1e-9 * cpu["lambda_min"]
    # 1 MB free: below (4N² and the factorisation's temporaries) / 0.8
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=1_000_000))
    out_small = str(tmp_path / "small")
    assert main(["solve", "--store", store, "--out", out_small, *common, "--device", "gpu",
                 "--precond", "shift"]) == 0
    small = json.load(open(os.path.join(out_small, "result.json")))
    assert small["preconditioner"]["name"] == "harmonic"
    assert "on the GPU" in small["preconditioner"]["shift_skipped"]
    assert abs(small["lambda_min"] - cpu["lambda_min"]) <= 1e-9 * cpu["lambda_min"]


def test_gpu_bad_combinations_exit_2_with_one_line_and_write_nothing(client, store, fake_gpu,
                                                                     tmp_path, capsys):
    addr = client.scheduler.address
    data = ["--data", "gaussian", "--n", "333", "--d", "7", "--depth", "3"]
    cases = [
        (["run", *data, "--store", str(tmp_path / "s.zarr"), "--device", "gpu"], "needs no store"),
        (["run", *data, "--method", "dense", "--device", "gpu"], "runs on the CPU"),
        (["solve", "--store", store, "--method", "dense", "--device", "gpu"], "runs on the CPU"),
        (["solve", "--store", store, "--operator", "store", "--device", "gpu"], "not store"),
        (["solve", "--store", store, "--precision", "mixed", "--method", "davidson",
          "--device", "gpu"], "precision mixed"),
    ]
    cases.append((["run", *data, "--precision", "mixed", "--device", "gpu"], "precision mixed"))
    for args, message in cases:
        out = str(tmp_path / "out")
        capsys.readouterr()
        assert main([*args, "--out", out, "--scheduler", addr]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
        assert not os.path.exists(out), args
    assert not os.path.exists(str(tmp_path / "s.zarr"))


@pytest.mark.parametrize("cupy", [None, "no device", "no room"])
def test_gpu_workers_refusing_leave_no_output_folder(client, tmp_path, capsys, monkeypatch,
                                                     cupy):
    """The workers' GPUs are checked before 'run' claims its output folder."""
    fake = {None: None, "no device": fakecupy.module(devices=0),
            "no room": fakecupy.module(free=2 ** 20)}[cupy]
    monkeypatch.setitem(sys.modules, "cupy", fake)
    out = str(tmp_path / "out")
    args = ["run", "--data", "gaussian", "--n", "300", "--d", "5", "--depth", "2", "--device",
            "gpu", "--out", out, "--scheduler", client.scheduler.address]
    if cupy == "no room":
        args += ["--operator", "memory"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    message = {None: "needs CuPy", "no device": "no usable GPU", "no room": "do not fit"}[cupy]
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(out)


def test_a_pass_waiting_on_a_departed_gpu_worker_stops_with_one_line(client, fake_gpu):
    import time

    X = synthetic_rows("gaussian", 5, SEED, 0, 200)
    op = make_operator(client, "recompute", rows=X,
                       kernel=KernelSpec(kind="ntk", depth=2, normalization="paper"),
                       tile=100, device="gpu")
    slow = client.submit(time.sleep, 3, pure=False)
    op.gpus = {**op.gpus, "tcp://127.0.0.1:9": "a departed GPU worker"}
    with pytest.raises(NtkdistError, match="left the cluster"):
        op._wait_pinned([slow], poll=0.2)
    op.gpus.pop("tcp://127.0.0.1:9")
    op._wait_pinned([slow], poll=0.2)  # all there: waits until done
    assert slow.done()
    op.close()


def test_the_fake_cupy_refuses_host_device_mixups(fake_gpu):
    """Its arrays are not NumPy arrays: a host/device mix-up fails here as on a GPU."""
    cp = fake_gpu
    h0 = np.arange(6.0).reshape(2, 3)
    h = h0.copy()
    x = cp.asarray(h)
    assert type(x) is cp.ndarray is fakecupy.FakeDeviceArray and not isinstance(x, np.ndarray)
    h[0, 0] = 7.0  # cp.asarray of a host array is a copy (a transfer)
    assert float(x[0, 0]) == 0.0 and type(x[0, 0]) is cp.ndarray  # 0-d, as CuPy's
    for implicit in (np.asarray, np.array, np.ascontiguousarray):
        with pytest.raises(TypeError, match=re.escape(fakecupy.IMPLICIT)):
            implicit(x)
    mixups = [lambda: x + h, lambda: h + x, lambda: x * h[0], lambda: h[0] - x,
              lambda: x @ h.T, lambda: h @ x.T, lambda: x < h, lambda: cp.sqrt(h),
              lambda: cp.where(x > 1, x, h), lambda: np.concatenate([x, h]),
              lambda: x + np.ones(()), lambda: x.dot(h.T)]
    for mix in mixups:
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mix()
    y = h.copy()
    with pytest.raises(TypeError, match="Unsupported type"):
        y += x
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        x[:, :2] = h[:, :2]  # as CuPy: a basic slice is filled, not copied from the host
    # What works on CuPy works here: device with device, Python and NumPy scalars, NumPy
    # functions dispatched to the module's, explicit transfers back.
    z = np.sqrt(2.0 * x @ x.T + np.float64(1.0)) - 1
    assert type(z) is cp.ndarray and z.shape == (2, 2) and z.dtype == np.float64
    assert type(np.sum(x, axis=0)) is cp.ndarray and int(cp.nonzero(x > 2)[0].shape[0]) == 3
    for back in (cp.asnumpy(z), z.get()):
        assert type(back) is np.ndarray
        np.testing.assert_array_equal(back, np.sqrt(2.0 * h0 @ h0.T + 1.0) - 1)
    assert cp.asnumpy(z) is not cp.asnumpy(z)  # copies
    assert array_module(x) is cp and array_module(h) is np
    assert cp.get_array_module(h, 1.0) is np and cp.get_array_module(h, x) is cp


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_the_tile_function_on_fake_device_row_blocks(fake_gpu, depth, kernel):
    """kernel_tile on device row blocks runs the fused GPU kernel (the stand-in compiles it
    on the host) and the array-module path on device arrays (close pairs and a zero row
    included), each giving the NumPy paths' tile to 1e-15 of √(K_ii K_jj); a host block with
    a device block fails, as it would on a GPU."""
    from reference import hard_rows

    cp = fake_gpu
    rng = np.random.default_rng(SEED)
    X = np.vstack([hard_rows(rng), np.zeros((1, 9)), rng.standard_normal((30, 9))])
    Y = np.vstack([X[:7], -X[3:9], rng.standard_normal((20, 9))])
    A, B = row_block(X), row_block(Y)
    Ad, Bd = row_block(cp.asarray(X)), row_block(cp.asarray(Y))
    assert all(type(a) is cp.ndarray for a in (Ad.unit, Ad.norms, Bd.unit, Bd.norms))
    for normalization in ("paper", "nt"):
        diag_a = kernel_tile(A, A, depth, kernel, normalization).diagonal()
        diag_b = kernel_tile(B, B, depth, kernel, normalization).diagonal()
        scale = np.sqrt(np.outer(diag_a, diag_b))
        scale[scale == 0] = 1.0  # the zero row: exactly 0 on both
        for on_device in (True, False):  # the fused GPU kernel, the array-module path
            Kd = kernel_tile(Ad, Bd, depth, kernel, normalization, fused=on_device)
            assert type(Kd) is cp.ndarray and Kd.shape == (len(X), len(Y))
            K = cp.asnumpy(Kd)
            for fused in (None, False):  # NumPy: its default (fused with numba), the common one
                want = kernel_tile(A, B, depth, kernel, normalization, fused=fused)
                assert np.max(np.abs(K - want) / scale) <= 1e-15, (normalization, fused)
    for a, b in ((A, Bd), (Ad, B)):  # a block left on the host: a mix-up
        with pytest.raises(TypeError, match="Unsupported type"):
            kernel_tile(a, b, depth, kernel)
    bad = X.copy()
    bad[4, 2] = np.nan
    with pytest.raises(InputError, match="row 4"):  # the check's reductions sync to the host
        row_block(cp.asarray(bad))


def test_a_gpu_pass_with_a_forgotten_transfer_fails_with_one_line(client, fake_gpu,
                                                                   monkeypatch):
    """Were the vectors or row blocks left on the host in a GPU pass, it fails as on a GPU
    (here made by a cupy.asarray that does not transfer)."""
    X = synthetic_rows("gaussian", 5, SEED, 0, 200)
    op = make_operator(client, "recompute", rows=X,
                       kernel=KernelSpec(kind="ntk", depth=2, normalization="paper"),
                       tile=100, device="gpu")
    V = np.ones((200, 2))
    ok = op.matmat(V)
    forgetful = fakecupy.module()
    forgetful.asarray = lambda a, dtype=None: a  # "transfers" that leave arrays on the host
    monkeypatch.setitem(sys.modules, "cupy", forgetful)
    with pytest.raises(NtkdistError, match="TypeError: Unsupported type") as err:
        op.matmat(V)
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.setitem(sys.modules, "cupy", fake_gpu)
    np.testing.assert_array_equal(op.matmat(V), ok)
    op.close()


def test_finite_features_and_tiles_on_fake_device_arrays(fake_gpu):
    """The finite-width features and tile run on the device module (weights drawn on the
    host and moved over) and give the NumPy path's numbers."""
    from ntkdist.kernels.finite import (SeededWeights, block_features, finite_diagonal,
                                        finite_tile, on_module)

    X = np.random.default_rng(SEED).standard_normal((40, 6))
    w = SeededWeights(6, [30, 9, 17], seed=2)
    for kind, layer in (("empirical", None), ("features", 2)):
        host = block_features(X, w, kind, layer, factor=0.5)
        dev = block_features(fake_gpu.asarray(X), w, kind, layer, factor=0.5)
        assert array_module(dev.terms[0][0]) is fake_gpu
        want = finite_tile(host, host)
        got = finite_tile(dev, on_module(host, fake_gpu))
        np.testing.assert_allclose(got.get(), want, rtol=1e-13, atol=1e-13 * abs(want).max())
        np.testing.assert_allclose(finite_diagonal(dev).get(), np.diagonal(want), rtol=1e-13)


def test_empirical_kernel_runs_on_gpu_workers(client, fake_gpu, tmp_path):
    args = ["--n", "120", "--d", "5", "--seed", "3", "--kernel", "empirical", "--widths",
            "25,40", "--weights-seed", "1"]
    out_cpu, out_gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    assert main(["run", *args, "--out", out_cpu]) == 0
    assert main(["run", *args, "--out", out_gpu, "--device", "gpu", "--scheduler",
                 client.scheduler.address]) == 0
    cpu = json.load(open(os.path.join(out_cpu, "result.json")))
    gpu = json.load(open(os.path.join(out_gpu, "result.json")))
    assert gpu["device"] == "gpu" and gpu["gpus"] == [fakecupy.NAME]
    assert gpu["lambda_min"] == pytest.approx(cpu["lambda_min"], rel=1e-7)


def test_harmonic_preconditioner_built_and_applied_on_a_device(fake_gpu):
    """The harmonic features (degree 3 included) built on the array module's device in
    float32, ΦᵀΦ in float64 there, applied to host blocks: the CPU's model to float32
    accuracy, and a solve with it certifies the dense λ_min. A device holds degree 3 by its
    features only (no N × N gram form)."""
    import ntkdist
    from ntkdist.solvers.driver import smallest_eigenpairs
    from ntkdist.solvers.precond import harmonic

    X = synthetic_rows("sphere", 16, SEED, 0, 900)
    host = harmonic(X, 3, "ntk", "paper")
    dev = harmonic(X, 3, "ntk", "paper", xp=fake_gpu)
    assert (dev.degree, dev.form, dev.rank) == (3, "features", host.rank)
    R = np.random.default_rng(SEED).standard_normal((900, 6))
    got, want = dev.apply(R), host.apply(R)
    assert isinstance(got, np.ndarray)
    assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)
    K = ntkdist.ntk(X, depth=3)
    sol = smallest_eigenpairs(lambda V: K @ V, 900, "davidson", precond=dev.apply,
                              scale=np.trace(K) / 900)
    assert sol.status == "certified"
    assert sol.values[0] == pytest.approx(np.linalg.eigvalsh(K)[0], rel=1e-8)
    # d = 32 (features rank 6545 over the CPU's 6000): no gram form on a device, degree 2
    # where it is not given room for the features ...
    X32 = synthetic_rows("sphere", 32, SEED, 0, 1200)
    assert harmonic(X32, 3, "ntk", "paper", xp=fake_gpu).degree == 2
    # ... and at d = 24 (rank 2925) the features, where N = 1200 rows are under the rank
    X24 = synthetic_rows("sphere", 24, SEED, 0, 1200)
    wide = harmonic(X24, 3, "ntk", "paper", xp=fake_gpu)
    assert (wide.degree, wide.form, wide.rank) == (3, "features", 2925)
    assert harmonic(X24, 3, "ntk", "paper", xp=fake_gpu, max_rank=2000).degree == 2


def test_gpu_certify_cholesky_factorises_on_the_device(client, store, fake_gpu, tmp_path,
                                                       monkeypatch, capsys):
    """--certify cholesky on a GPU run: K formed and factorised on the client's device (the
    stand-in refuses host/device mix-ups), the bracket the CPU's; where the device has no
    room now, on the host; where neither the host nor the device could ever hold K, refused
    before the solve with one line."""
    import ntkdist.solvers.cholesky as chol

    for name, mod in fakecupy.cupyx_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(chol, "BLOCK", 128)  # several diagonal blocks at N = 333
    addr = client.scheduler.address
    common = ["--method", "lobpcg", "--tol", "1e-10", "--scheduler", addr,
              "--certify", "cholesky"]
    outs = {w: str(tmp_path / w) for w in ("cpu", "gpu", "host")}
    assert main(["solve", "--store", store, "--out", outs["cpu"], *common]) == 0
    assert main(["solve", "--store", store, "--out", outs["gpu"], *common,
                 "--device", "gpu"]) == 0
    cpu, gpu = (json.load(open(os.path.join(outs[w], "result.json"))) for w in ("cpu", "gpu"))
    a, b = cpu["certify"], gpu["certify"]
    assert (a["status"], a["device"], b["status"], b["device"]) == ("proved", "cpu",
                                                                    "proved", "gpu")
    assert b["lower"] <= gpu["lambda_min"] <= b["upper"]
    assert abs(b["lower"] - a["lower"]) <= 1e-12 * a["lower"]
    assert abs(b["upper"] - a["upper"]) <= 1e-12 * a["upper"]
    # No room on the device now (K needs 8N² ≈ 0.9 MB): formed and factorised on the host.
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=100_000))
    assert main(["solve", "--store", store, "--out", outs["host"], *common,
                 "--device", "gpu"]) == 0
    host = json.load(open(os.path.join(outs["host"], "result.json")))["certify"]
    assert (host["status"], host["device"]) == ("proved", "cpu")
    assert "formed on the host instead" in capsys.readouterr().out
    # A failure on the GPU (here cuSOLVER's, made up): the host, with the reason said.
    failing = fakecupy.module()

    def broken(a):
        raise RuntimeError("CUSOLVER_STATUS_INTERNAL_ERROR")

    failing.linalg.cholesky = broken
    monkeypatch.setitem(sys.modules, "cupy", failing)
    out = str(tmp_path / "failing")
    assert main(["solve", "--store", store, "--out", out, *common, "--device", "gpu"]) == 0
    failed = json.load(open(os.path.join(out, "result.json")))
    assert (failed["certify"]["status"], failed["certify"]["device"]) == ("proved", "cpu")
    assert abs(failed["lambda_min_lower_certified"] - host["lower"]) <= 1e-12 * host["lower"]
    assert "the GPU failed (RuntimeError: CUSOLVER" in capsys.readouterr().out
    assert "assumption" in b and "assumption" not in a
    # The host cannot hold K: the GPU's whole memory decides before the solve.
    monkeypatch.setattr(chol, "available_memory", lambda: 1000)
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module())
    out = str(tmp_path / "room")
    assert main(["solve", "--store", store, "--out", out, *common, "--device", "gpu"]) == 0
    assert json.load(open(os.path.join(out, "result.json")))["certify"]["device"] == "gpu"
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=100_000))
    capsys.readouterr()
    out = str(tmp_path / "none")
    assert main(["solve", "--store", store, "--out", out, *common, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GB in all" in err[0] and not os.path.exists(out)
