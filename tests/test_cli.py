import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

import ntkdist
from ntkdist.cli import main


def _run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "ntkdist", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def _tree(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def test_run_end_to_end(tmp_path):
    out = str(tmp_path / "res")
    code, stdout, stderr = _run_cli("run", "--n", "300", "--d", "16", "--depth", "3",
                                    "--seed", "11", "--out", out)
    assert code == 0, stderr
    assert "λ_min" in stdout and "residual" in stdout and "bounds" in stdout
    r = json.load(open(os.path.join(out, "result.json")))
    for key in ("lambda_min", "residual_norm", "method", "n", "d", "depth", "kernel", "seed",
                "wall_seconds", "ntkdist_version", "bounds"):
        assert key in r
    assert (r["n"], r["d"], r["depth"], r["kernel"], r["seed"]) == (300, 16, 3, "ntk", 11)
    assert r["ntkdist_version"] == ntkdist.__version__
    from ntkdist.data import synthetic_rows

    X = synthetic_rows("sphere", 16, 11, 0, 300)
    K = ntkdist.ntk(X, depth=3)
    lam = np.linalg.eigvalsh(K)[0]
    assert r["lambda_min"] == pytest.approx(lam, rel=1e-10)
    v = np.load(os.path.join(out, "eigvec.npy"))
    residual = np.linalg.norm(K @ v - r["lambda_min"] * v)
    assert residual == pytest.approx(r["residual_norm"], rel=1e-3, abs=1e-12)
    assert residual < 1e-9 * lam
    b = r["bounds"]
    assert b["lower"] <= r["lambda_min"] <= b["upper_min_diagonal"] == pytest.approx(3 * 16)

    before = _tree(out)
    code, _, stderr = _run_cli("run", "--n", "300", "--d", "16", "--depth", "4", "--seed", "11",
                               "--out", out)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "another spec" in stderr
    assert "Traceback" not in stderr
    assert _tree(out) == before


def test_same_spec_may_rerun_into_its_folder(tmp_path, capsys):
    args = ["run", "--n", "50", "--d", "8", "--depth", "2", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    first = json.load(open(tmp_path / "o" / "result.json"))["lambda_min"]
    assert main(args) == 0
    assert json.load(open(tmp_path / "o" / "result.json"))["lambda_min"] == first


def test_npy_input_with_duplicates_and_nngp(tmp_path, capsys):
    X = np.random.default_rng(8).standard_normal((40, 10))
    X[30] = X[4]
    path = tmp_path / "x.npy"
    np.save(path, X)
    out = tmp_path / "o"
    assert main(["run", "--data", str(path), "--depth", "2", "--kernel", "nngp",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert r["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert r["seed"] is None and r["n"] == 40 and r["d"] == 10
    assert r["duplicate_rows"] == 1 and r["singular_expected"]
    assert abs(r["lambda_min"]) < 1e-10 * np.max(np.sum(X * X, 1))
    assert "singular" in capsys.readouterr().out


def test_zarr_input_and_first_n_rows(tmp_path, capsys):
    X = np.random.default_rng(9).standard_normal((30, 6))
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(7, 6), dtype="f8")
    z[:] = X
    out = tmp_path / "o"
    assert main(["run", "--data", str(tmp_path / "x.zarr"), "--n", "20", "--depth", "3",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert r["n"] == 20
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ntkdist.ntk(X[:20], depth=3))[0],
                                            rel=1e-10)


def _bad_inputs(tmp_path):
    nan = np.ones((5, 3))
    nan[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "pickle.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.ones(7))
    np.save(tmp_path / "ok.npy", np.random.default_rng(1).standard_normal((5, 3)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    base = ["--depth", "2", "--out", str(tmp_path / "o")]
    return [
        ["run", "--data", str(tmp_path / "nan.npy"), *base],
        ["run", "--data", str(tmp_path / "pickle.npy"), *base],
        ["run", "--data", str(tmp_path / "flat.npy"), *base],
        ["run", "--data", str(tmp_path / "missing.npy"), *base],
        ["run", "--data", str(tmp_path / "ok.npy"), "--seed", "3", *base],
        ["run", "--data", str(tmp_path / "ok.npy"), "--n", "9", *base],
        ["run", "--data", str(tmp_path / "ok.npy"), "--d", "4", *base],
        ["run-away", "--n", "10"],
        ["run", "--n", "10", "--d", "3", "--depth", "0", "--out", str(tmp_path / "o")],
        ["run", "--n", "1", "--d", "3", "--depth", "2", "--out", str(tmp_path / "o")],
        ["run", "--d", "3", "--depth", "2", "--out", str(tmp_path / "o")],
        ["run", "--n", "10", "--d", "3", "--depth", "2"],
        ["run", "--n", "10", "--d", "3", "--depth", "2", "--kernel", "rbf", "--out", "x"],
        ["run", "--n", "10", "--d", "3", "--depth", "2", "--out", str(tmp_path / "busy")],
        ["run", "--n", "10", "--d", "3", "--depth", "2", "--out", str(tmp_path / "ok.npy")],
    ]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    for args in _bad_inputs(tmp_path):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert err.startswith("ntkdist: error: ")
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process(tmp_path):
    nan = np.ones((5, 3))
    nan[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    code, stdout, stderr = _run_cli("run", "--data", str(tmp_path / "nan.npy"), "--depth", "2",
                                    "--out", str(tmp_path / "o"))
    assert code == 2 and "non-finite" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_the_recompute_operator_defaults_to_a_wide_block(client, tmp_path):
    """A recompute pass costs the tile build whatever the block: the default block is 128
    there, 32 with a store; --block still wins."""
    addr = client.scheduler.address
    base = ["--data", "sphere", "--n", "600", "--d", "12", "--depth", "3", "--method",
            "davidson", "--tol", "1e-6", "--scheduler", addr]

    def block(*extra, out):
        assert main(["run", *base, *extra, "--out", str(tmp_path / out)]) == 0
        r = json.load(open(tmp_path / out / "result.json"))
        return r["operator"], r["block"]

    assert block(out="a") == ("recompute", 128)
    assert block("--block", "40", out="b") == ("recompute", 40)
    assert block("--store", str(tmp_path / "k.zarr"), out="c")[1] == 32
