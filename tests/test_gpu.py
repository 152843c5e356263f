"""--device gpu: the recompute operator on GPU workers, checked here with a NumPy stand-in
for CuPy (tests/fakecupy.py; the real CuPy path runs in scripts/gpu_check.py on a GPU)."""

import json
import os
import sys

import numpy as np
import pytest

import fakecupy
from ntkdist.assemble import assemble
from ntkdist.cli import main
from ntkdist.cluster import ClusterError, connect, gpu_count
from ntkdist.data import synthetic_rows
from ntkdist.errors import NtkdistError
from ntkdist.operator import KernelOperator
from ntkdist.spec import make_spec, make_store_spec

SEED = 5521


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module())


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
    ref = KernelOperator(client, "memory", store=store)
    want = ref.matmat(V)
    for mode, expected in [("recompute", "recompute"), ("auto", "memory"), ("memory", "memory")]:
        gpu = KernelOperator(client, mode, store=store, device="gpu")
        assert (gpu.mode, gpu.device, gpu.precision) == (expected, "gpu", "float64")
        assert set(gpu.gpus) == set(client.scheduler_info()["workers"])
        assert set(gpu.gpus.values()) == {fakecupy.NAME}
        for _ in range(2):  # memory: the second pass uses the tiles kept from the first
            np.testing.assert_allclose(gpu.matmat(V), want, rtol=0, atol=1e-12 * np.abs(want).max())
        if expected == "memory":
            kept = _GPU_TILES[gpu._gpu_token]  # the fake's workers share this process
            assert sorted(kept) == sorted(gpu.pairs)
            assert gpu.cached_bytes == sum(t.nbytes for t in kept.values())
            token = gpu._gpu_token
            gpu.close()
            assert token not in _GPU_TILES
        else:
            assert gpu._gpu_token is None and gpu.cached_bytes == 0
            gpu.close()
    # Without a store: the rows and the problem given, as 'ntkdist run' does.
    X = synthetic_rows("gaussian", 7, SEED, 0, 333)
    problem = {"depth": 3, "kernel": "ntk", "normalization": "paper"}
    cpu = KernelOperator(client, "auto", rows=X, problem=problem, tile=100)
    gpu = KernelOperator(client, "recompute", rows=X, problem=problem, tile=100, device="gpu")
    np.testing.assert_allclose(gpu.matmat(V), cpu.matmat(V), rtol=0,
                               atol=1e-12 * np.abs(cpu.matmat(V)).max())
    assert gpu.describe()["gpus"] == [fakecupy.NAME]
    for op in (ref, gpu, cpu):
        op.close()


def test_gpu_refusals(client, store, fake_gpu, monkeypatch):
    with pytest.raises(NtkdistError, match="not store"):
        KernelOperator(client, "store", store=store, device="gpu")
    # Tiles that do not fit in the GPU's free memory: memory refuses, auto rebuilds them.
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(free=2 ** 20))
    with pytest.raises(NtkdistError, match="do not fit"):
        KernelOperator(client, "memory", store=store, device="gpu")
    op = KernelOperator(client, "auto", store=store, device="gpu")
    assert op.mode == "recompute"
    op.close()
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module())
    with pytest.raises(NtkdistError, match="precision mixed"):
        KernelOperator(client, "auto", store=store, device="gpu", precision="mixed")
    with pytest.raises(NtkdistError, match="device must be"):
        KernelOperator(client, "auto", store=store, device="tpu")
    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module(devices=0))
    with pytest.raises(NtkdistError, match="sees no usable GPU"):
        KernelOperator(client, "auto", store=store, device="gpu")
    with pytest.raises(ClusterError, match="CUDA sees no GPU"):
        gpu_count()
    monkeypatch.setitem(sys.modules, "cupy", None)  # not installed
    with pytest.raises(NtkdistError, match="needs CuPy"):
        KernelOperator(client, "auto", store=store, device="gpu")
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
    op = KernelOperator(client, "recompute", rows=X, problem={"depth": 2, "kernel": "ntk",
                                                            "normalization": "paper"},
                        tile=100, device="gpu")
    slow = client.submit(time.sleep, 3, pure=False)
    op.gpus = {**op.gpus, "tcp://127.0.0.1:9": "a departed GPU worker"}
    with pytest.raises(NtkdistError, match="left the cluster"):
        op._wait_pinned([slow], poll=0.2)
    op.gpus.pop("tcp://127.0.0.1:9")
    op._wait_pinned([slow], poll=0.2)  # all there: waits until done
    assert slow.done()
    op.close()
