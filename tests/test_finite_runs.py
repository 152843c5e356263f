"""Finite-width kernels as users run them: run (dense, recompute), assemble, kill and resume,
solve, verify, the result's theorem fields and the refusals."""

import json
import os

import numpy as np
import pytest

import ntkdist
from conftest import file_tree, sigkill_assembly
from ntkdist.cli import main
from ntkdist.spec import make_spec
from ntkdist.store import KernelStore

BASE = ["--n", "150", "--d", "6", "--seed", "5", "--kernel", "empirical", "--widths", "20,30",
        "--weights-seed", "3"]


def reference(n=150, d=6, seed=5, widths=(20, 30), weights_seed=3, kind="empirical",
              layer=None, normalize="paper"):
    X = make_spec(data="sphere", n=n, d=d, depth=2, seed=seed).rows()
    weights = ntkdist.random_weights(d, widths, weights_seed)
    if kind == "empirical":
        return ntkdist.empirical_ntk(X, weights=weights, normalize=normalize)
    return ntkdist.feature_gram(X, weights=weights, layer=layer, normalize=normalize)


def result(path):
    return json.load(open(os.path.join(path, "result.json")))


def test_dense_run_matches_the_python_api_and_reports_the_theorem(tmp_path):
    out = str(tmp_path / "r")
    assert main(["run", *BASE, "--out", out]) == 0
    r = result(out)
    lam = np.linalg.eigvalsh(reference())[0]
    assert r["lambda_min"] == pytest.approx(lam, rel=1e-10)
    assert r["spec"]["widths"] == [20, 30] and r["spec"]["weights_seed"] == 3
    assert r["depth"] == 3 and r["kernel"] == "empirical"
    b = r["bounds"]
    assert b["theorem"].startswith("Theorem 4.1") and b["assumptions_hold"] is False
    assert "does not hold" in b["assumptions_note"]
    assert b["upper_min_diagonal"] == pytest.approx(np.diagonal(reference()).min(), rel=1e-12)
    assert b["theorem_scale"] == pytest.approx(6 * 20 * 30 * (2 / 20) * (2 / 30))
    assert "prediction" not in b


def test_cholesky_bracket_of_an_iterative_finite_run(client, tmp_path):
    out = str(tmp_path / "c")
    assert main(["run", *BASE, "--method", "davidson", "--certify", "cholesky", "--scheduler",
                 client.scheduler.address, "--out", out]) == 0
    r = result(out)
    lam = np.linalg.eigvalsh(reference())[0]
    assert r["lambda_min_lower_certified"] <= lam <= r["lambda_min_upper_certified"]
    assert r["lambda_min_upper_certified"] - r["lambda_min_lower_certified"] < 1e-8 * lam


def test_features_raw_and_singular_width(tmp_path):
    out = str(tmp_path / "f")
    assert main(["run", "--n", "40", "--d", "5", "--kernel", "features", "--widths", "60,30",
                 "--layer", "1", "--normalization", "raw", "--out", out]) == 0
    r = result(out)
    G = reference(n=40, d=5, seed=None, widths=(60, 30), weights_seed=0, kind="features",
                  layer=1, normalize=False)
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(G)[0], rel=1e-9)
    assert r["bounds"]["theorem"].startswith("Theorem 5.1")
    out2 = str(tmp_path / "f2")
    assert main(["run", "--n", "40", "--d", "5", "--kernel", "features", "--widths", "60,30",
                 "--out", out2]) == 0
    r2 = result(out2)
    assert r2["singular_expected"] and "rank ≤ its width 30" in r2["singular_reason"]


def test_recompute_store_and_solve_agree_with_dense(client, tmp_path):
    addr = client.scheduler.address
    lam = np.linalg.eigvalsh(reference())[0]
    rec = str(tmp_path / "rec")
    assert main(["run", *BASE, "--method", "lobpcg", "--tile", "40", "--scheduler", addr,
                 "--out", rec]) == 0
    assert result(rec)["lambda_min"] == pytest.approx(lam, rel=1e-7)
    assert result(rec)["bounds"]["upper_min_diagonal"] == pytest.approx(
        np.diagonal(reference()).min(), rel=1e-12)
    store = str(tmp_path / "k.zarr")
    assert main(["assemble", *BASE, "--store", store, "--tile", "40", "--scheduler", addr]) == 0
    assert not os.path.exists(os.path.join(store, "features")), "the feature cache is dropped"
    K = np.asarray(ntkdist.open_kernel(store).compute(scheduler="threads"))
    ref = reference()
    assert np.max(np.abs(K - ref)) <= 1e-12 * np.max(np.abs(ref))
    sol = str(tmp_path / "sol")
    assert main(["solve", "--store", store, "--method", "dense", "--out", sol]) == 0
    assert result(sol)["lambda_min"] == pytest.approx(lam, rel=1e-10)
    it = str(tmp_path / "it")
    assert main(["solve", "--store", store, "--method", "lobpcg", "--out", it,
                 "--scheduler", addr]) == 0
    r = result(it)
    assert r["status"] == "certified" and r["lambda_min"] == pytest.approx(lam, rel=1e-8)
    assert r["preconditioner"]["name"].startswith("nystrom") and r["passes"] < 100
    assert main(["verify", "--store", store, "--recompute", "3"]) == 0
    assert not os.path.exists(os.path.join(store, "features")), "verify writes nothing"


def test_weights_and_stores_do_not_depend_on_tiling_or_workers(client, tmp_path):
    """Another tile side changes entries only by rounding; another worker count not at all."""
    addr = client.scheduler.address
    one, two, other = (str(tmp_path / f"{k}.zarr") for k in ("one", "two", "other"))
    assert main(["assemble", *BASE, "--store", one, "--tile", "50", "--workers", "1"]) == 0
    assert main(["assemble", *BASE, "--store", two, "--tile", "50", "--scheduler", addr]) == 0
    assert file_tree(one) == file_tree(two)
    assert main(["assemble", *BASE, "--store", other, "--tile", "64", "--scheduler", addr]) == 0
    A = np.asarray(ntkdist.open_kernel(one).compute(scheduler="threads"))
    B = np.asarray(ntkdist.open_kernel(other).compute(scheduler="threads"))
    assert np.max(np.abs(A - B)) <= 1e-13 * np.max(np.abs(A))


def test_killed_empirical_assembly_resumes_bitwise(client, tmp_path):
    args = ["--n", "1200", "--d", "8", "--seed", "2", "--kernel", "empirical", "--widths",
            "300,200", "--tile", "60"]
    killed = str(tmp_path / "killed.zarr")
    sigkill_assembly(args, killed, 30, 240)
    store = KernelStore.open(killed)
    assert 0 < len(store.pending()[1]) < len(store.upper_tiles()) - 25
    assert os.listdir(os.path.join(killed, "features")), "the feature cache survives a kill"
    # a damaged cached feature block is detected and made again, not trusted
    with open(os.path.join(killed, "features", "3.npy"), "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x7f" * 16)
    addr = client.scheduler.address
    assert main(["assemble", *args, "--store", killed, "--scheduler", addr]) == 0
    clean = str(tmp_path / "clean.zarr")
    assert main(["assemble", *args, "--store", clean, "--scheduler", addr]) == 0
    assert file_tree(killed) == file_tree(clean)


@pytest.mark.parametrize("argv, words", [
    (["--kernel", "ntk", "--depth", "2", "--widths", "4"], "widths applies to --kernel"),
    (["--kernel", "empirical", "--widths", "4,0"], "widths must be positive"),
    (["--kernel", "empirical", "--widths", "4,x"], "widths must be positive"),
    (["--kernel", "empirical"], "--widths"),
    (["--kernel", "empirical", "--widths", "4", "--depth", "3"], "does not match"),
    (["--kernel", "features", "--widths", "4,5", "--layer", "0"], "layer must be"),
    (["--kernel", "empirical", "--widths", "4", "--layer", "1"], "layer applies"),
    (["--kernel", "empirical", "--widths", "4", "--weights-seed", "-2"], "seed"),
    (["--kernel", "empirical", "--widths", "4", "--method", "lobpcg", "--precond",
      "harmonic"], "nystrom"),
    (["--kernel", "ntk", "--depth", "2", "--normalization", "raw"], "normalization"),
])
def test_refusals_are_one_line_exit_2(tmp_path, capsys, argv, words):
    out = str(tmp_path / "bad")
    assert main(["run", "--n", "30", "--d", "3", *argv, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)


def test_feature_groups_draw_weights_once_per_group_and_repair_bitwise(client, tmp_path,
                                                                       monkeypatch):
    """Groups of two row blocks (a small group budget): the store matches the reference, a
    block whose cached features are lost is made again with its group's rows, and tiles
    recomputed after their features were dropped have the bytes they had."""
    from ntkdist import assemble as assemble_mod
    from ntkdist.kernels import finite

    cols = 6 + 2 * 50
    monkeypatch.setattr(assemble_mod, "FEATURE_GROUP_BYTES", 8 * cols * 40 * 2)
    drawn = []
    rows = finite.SeededWeights.rows
    monkeypatch.setattr(finite.SeededWeights, "rows",
                        lambda self, l, a, b: drawn.append(l) or rows(self, l, a, b))
    addr = client.scheduler.address
    path = str(tmp_path / "g.zarr")
    assert main(["assemble", *BASE, "--store", path, "--tile", "40", "--scheduler", addr]) == 0
    store = KernelStore.open(path)
    assert [list(assemble_mod.feature_group(store, i)) for i in range(4)] == [
        [0, 1], [0, 1], [2, 3], [2, 3]]
    assert drawn.count(1) == 2 * 1 and drawn.count(2) == 2 * 2  # W_2: forward and backward
    K = np.asarray(ntkdist.open_kernel(path).compute(scheduler="threads"))
    ref = reference()
    assert np.max(np.abs(K - ref)) <= 1e-12 * np.max(np.abs(ref))
    drawn.clear()  # a tile of two blocks of one group (the cache is gone) makes it once
    tile = assemble_mod.compute_tile(store, 0, 1, cache=False)
    assert drawn.count(2) == 2 and np.array_equal(tile, KernelStore.open(path).read_tile(0, 1))
    before = file_tree(path)
    for key in ("K.1.3", "K.3.3"):
        os.remove(os.path.join(path, "done", key))
    assert main(["assemble", *BASE, "--store", path, "--tile", "40", "--scheduler", addr]) == 0
    assert file_tree(path) == before


def test_study_sweeps_widths_with_the_limit_beside(tmp_path):
    import csv

    study = tmp_path / "widths.toml"
    study.write_text('''
[study]
storage = "none"
[data]
source = "sphere"
n = 60
d = 5
seed = 1
[kernel]
kind = ["empirical", "features"]
widths = [[8, 8], [64, 64], [512, 512]]
weights_seed = [0, 1]
''')
    out = str(tmp_path / "s")
    assert main(["sweep", str(study), "--out", out]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    finite = [r for r in rows if r["kernel"] in ("empirical", "features")]
    limits = {r["kernel"]: r for r in rows if r["kernel"] in ("ntk", "nngp")}
    assert len(finite) == 12 and set(limits) == {"ntk", "nngp"}
    assert limits["ntk"]["depth"] == "3" and limits["nngp"]["depth"] == "3"
    X = make_spec(data="sphere", n=60, d=5, depth=3, seed=1).rows()
    assert float(limits["ntk"]["lambda_min"]) == pytest.approx(
        np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0], rel=1e-9)
    for r in finite:
        assert float(r["limit_lambda_min"]) == float(limits[
            "ntk" if r["kernel"] == "empirical" else "nngp"]["lambda_min"])
        assert r["width_condition_holds"] == "False" and float(r["theorem_scale"]) > 0
    wide = [r for r in finite if r["kernel"] == "empirical" and r["width"] == "512"]
    W = ntkdist.random_weights(5, [512, 512], int(wide[0]["weights_seed"]))
    K = ntkdist.empirical_ntk(X, weights=W, normalize=True)
    assert float(wide[0]["lambda_min"]) == pytest.approx(np.linalg.eigvalsh(K)[0], rel=1e-9)
    errors = {w: np.mean([abs(float(r["lambda_min"]) - float(r["limit_lambda_min"]))
                          for r in finite if r["kernel"] == "empirical" and r["width"] == w])
              for w in ("8", "512")}
    assert errors["512"] < errors["8"]
    assert os.path.getsize(os.path.join(out, "lambda_vs_width.png")) > 10000
    # a rerun finds every point done
    assert main(["sweep", str(study), "--out", out]) == 0


def test_study_width_axis_refusals(tmp_path, capsys):
    study = tmp_path / "bad.toml"
    study.write_text('[data]\nn = 20\nd = 3\n[kernel]\nkind = "empirical"\n'
                     'widths = [[4, 0]]\n')
    assert main(["sweep", str(study), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "widths must be positive" in capsys.readouterr().err


def test_a_layer_of_width_100000(tmp_path):
    """Widths far above N: the weights streamed in spans, J (30 × 400000) never formed."""
    out = str(tmp_path / "wide")
    assert main(["run", "--n", "30", "--d", "3", "--kernel", "empirical", "--widths", "100000",
                 "--normalization", "raw", "--out", out]) == 0
    X = make_spec(data="sphere", n=30, d=3, depth=2, seed=None).rows()
    W = ntkdist.random_weights(3, [100000], 0)
    F = np.maximum(X @ W[0].T, 0)
    ref = F @ F.T + (X @ X.T) * (((F > 0) * W[1][0]) @ ((F > 0) * W[1][0]).T)
    assert result(out)["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ref)[0], rel=1e-9)


def test_a_network_whose_row_blocks_fit_no_worker_is_refused(client, tmp_path, capsys):
    out = str(tmp_path / "huge")
    assert main(["run", "--n", "200", "--d", "3", "--kernel", "empirical", "--widths",
                 "90000000", "--method", "lobpcg", "--memory-limit", "2GB", "--workers", "1",
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "more than a worker's" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_repair_of_an_empirical_store_leaves_no_feature_cache(client, tmp_path):
    store = str(tmp_path / "r.zarr")
    assert main(["assemble", *BASE, "--store", store, "--tile", "50", "--scheduler",
                 client.scheduler.address]) == 0
    before = file_tree(store)
    with open(KernelStore.open(store).chunk_file("K", 0, 2), "r+b") as f:
        f.seek(8)
        f.write(b"damaged!")
    assert main(["verify", "--store", store, "--repair", "--scheduler",
                 client.scheduler.address]) == 0
    assert file_tree(store) == before


def test_assemble_refuses_a_network_no_worker_holds_before_writing(client, tmp_path, capsys):
    store = str(tmp_path / "big.zarr")
    assert main(["assemble", "--n", "20", "--d", "4", "--kernel", "empirical", "--widths",
                 "10000000000", "--store", store, "--scheduler", client.scheduler.address]) == 2
    err = capsys.readouterr().err
    assert "more than a worker's" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(store)
