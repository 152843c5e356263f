"""Scaling studies: the study file, a tiny sweep end to end, resume, a killed sweep, the
plan, the fits and the bounds command."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.kernels import ntk
from ntkdist.errors import SpecError
from ntkdist.study import crossover, fit_rows, load_study

TINY = """
[study]
storage = "none"
[data]
source = "sphere"
n = [60, 120]
d = [3, 5]
seed = [0, 1]
[kernel]
depth = 2
"""
TIMES = {"wall_seconds", "solver_seconds"}


def _write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_a_tiny_sweep_matches_dense_eigenvalues_and_draws_its_figures(tmp_path, capsys):
    study = _write(tmp_path, TINY)
    out = tmp_path / "out"
    assert main(["sweep", study, "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 8
    for r in rows:
        n, d, seed = int(r["n"]), int(r["d"]), int(r["seed"])
        X = synthetic_rows("sphere", d, seed, 0, n)
        ref = np.linalg.eigvalsh(ntk(X, depth=2))[0]
        assert float(r["lambda_min"]) == pytest.approx(ref, rel=1e-10)
        assert r["status"] == "certified" and float(r["certified_rel_accuracy"]) < 1e-8
        assert float(r["lower_bound"]) <= ref <= float(r["upper_bound"])
        assert float(r["lambda_over_d"]) == pytest.approx(ref / d)
        assert float(r["measured_over_predicted"]) == pytest.approx(
            ref / float(r["prediction"]))
        assert r["data"] == "sphere" and r["kernel"] == "ntk" and r["depth"] == "2"
    for name in ("lambda_vs_n.png", "lambda_vs_depth.png", "ratio_vs_n.png"):
        assert _png(out / name), name
    fits = _rows(out / "fits.csv")
    assert {f["kind"] for f in fits} >= {"exponent"}
    assert {(f["d"], f["seeds"]) for f in fits if f["kind"] == "exponent"} == {("3", "2"),
                                                                               ("5", "2")}
    # A rerun skips every finished point and ends with the same table.
    before = (out / "results.csv").read_text()
    assert main(["sweep", study, "--out", str(out)]) == 0
    assert "0 point(s) run now" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == before
    # A second sweep of the same folder while one runs: one line naming the first.
    from ntkdist.errors import OutputError
    from ntkdist.locks import folder_lock

    with folder_lock(str(out), "it", "swept", OutputError):
        code = main(["sweep", study, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "is being swept by process" in err and (out / "results.csv").read_text() == before
    # Another study into the folder: its own table; the first one's points stay, said so.
    other = _write(tmp_path, TINY.replace("n = [60, 120]", "n = [90]"), "other.toml")
    assert main(["sweep", other, "--out", str(out)]) == 0
    assert "finished point(s) in" in capsys.readouterr().out
    assert len(list((out / "points").iterdir())) > len(_rows(out / "results.csv"))


@pytest.mark.parametrize("holds", ["run", "junk", "file", "dangling", "points-file"])
def test_a_sweep_refuses_a_folder_that_is_not_a_study(tmp_path, capsys, holds):
    study = _write(tmp_path, TINY)
    out = tmp_path / "out"
    if holds == "run":
        assert main(["run", "--data", "sphere", "--n", "50", "--d", "4", "--depth", "2",
                     "--out", str(out)]) == 0
    elif holds == "junk":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif holds == "dangling":
        out.symlink_to(tmp_path / "nowhere")
    elif holds == "points-file":
        out.mkdir()
        (out / "points").write_text("mine")
    else:
        out.write_text("mine")
    listing = lambda: (sorted(p.name for p in out.iterdir()) if out.is_dir()  # noqa: E731
                       else out.read_text() if out.exists() else os.readlink(out))
    before = listing()
    capsys.readouterr()
    assert main(["sweep", study, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err, err
    assert before == listing()


def test_zip_and_product_axes_and_labels(tmp_path):
    study = load_study(_write(tmp_path, """
[study]
storage = "delete"
[data]
n = [100, 200]
d = 4
[kernel]
depth = [2, 3]
[zip]
seed = [0, 1, 2]
tol = [1e-8, 1e-7, 1e-6]
"""), str(tmp_path / "o"))
    assert len(study.points) == 12
    assert [(p.spec.data.seed, p.spec.solver.tol) for p in study.points[::4]] == [
        (0, 1e-8), (1, 1e-7), (2, 1e-6)]
    assert all(p.store and p.store.startswith(str(tmp_path / "o" / "stores"))
               for p in study.points)
    assert all(p.spec.solver.method == "davidson" for p in study.points)  # a store's default
    # Points of the same matrix (here: each seed's, at each n and depth) share one store.
    assert len({p.store for p in study.points}) == 12
    assert len({p.label for p in study.points}) == 12


@pytest.mark.parametrize("text, words", [
    ("[data]\nn = [100]\nd = 3\nbogus = 1\n[kernel]\ndepth = 2\n",
     r"unknown key \[data\] bogus"),
    ("[datas]\nn = 3\n", r"unknown key datas"),
    ("[data]\nn = [100, 1]\nd = 3\n[kernel]\ndepth = 2\n", r"\[data\] n must be an integer >= 2"),
    ("[data]\nn = 100\nd = 3\n[kernel]\ndepth = [2, 0]\n", r"\[kernel\] depth must be"),
    ("[study]\nstorage = \"tape\"\n", r"\[study\] storage must be one of"),
    ("[study]\ncrossover_fraction = 2\n", r"crossover_fraction must be in"),
    ("[study]\nwho = 1\n", r"unknown key \[study\] who"),
    ("[data]\nn = 100\nd = 3\n[kernel]\ndepth = 2\n[zip]\nseed = [1, 2]\ntol = [1e-8]\n",
     r"equal lengths"),
    ("[data]\nn = 100\nd = 3\n[kernel]\ndepth = 2\n[cluster]\nworkers = [1, 2]\n",
     r"\[cluster\] workers must be one value"),
    ("[data]\nn = 100\nd = 3\n[kernel]\ndepth = 2\n[store]\npath = \"x.zarr\"\n",
     r"\[store\] path is chosen by the study"),
    ("[data]\nn = 30000\nd = 3\n[kernel]\ndepth = 2\n[solver]\nmethod = \"dense\"\n"
     "[study]\nstorage = \"none\"\n", r"point n=30000 .*dense path's limit"),
    ("[data]\nn = [100, 100]\nd = 3\n[kernel]\ndepth = 2\n", r"the same run"),
    ("[data\n", r"not valid TOML"),
])
def test_bad_study_files_are_one_line_naming_the_key(tmp_path, capsys, text, words):
    import re

    code = main(["sweep", _write(tmp_path, text), "--out", str(tmp_path / "o"), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(words, err), err
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path, capsys):
    study = _write(tmp_path, "[data]\nn = [2000, 30000]\nd = 8\n[kernel]\ndepth = 3\n"
                   "[store]\ndtype = \"float64\"\n")
    assert main(["sweep", study, "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sphere-n2000-d8-L3" in out and "sphere-n30000-d8-L3" in out and "to run" in out
    assert "3.60" in out  # the N = 30000 float64 store: 30000² × 8 / 2 bytes
    assert not (tmp_path / "o").exists()
    huge = _write(tmp_path, "[data]\nn = 3000000\nd = 8\n[kernel]\ndepth = 3\n", "huge.toml")
    assert main(["sweep", huge, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "of disk for its store" in err and len(err.strip().splitlines()) == 1


def test_a_killed_sweep_resumes_to_the_same_table(tmp_path):
    text = TINY.replace("n = [60, 120]", "n = [60, 120, 240]")
    study = _write(tmp_path, text)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["sweep", study, "--out", str(whole)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "ntkdist", "sweep", study, "--out",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "results.csv").exists() and len(_rows(killed / "results.csv")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_rows(killed / "results.csv")) < 12
    # --report-only: the table, fits and figures of the finished points, nothing run
    finished = len(os.listdir(killed / "points"))
    (killed / "results.csv").unlink()
    assert main(["sweep", study, "--out", str(killed), "--report-only"]) == 0
    done = [r for r in _rows(whole / "results.csv")
            if r["point"] in {r2["point"] for r2 in _rows(killed / "results.csv")}]
    assert 1 <= len(_rows(killed / "results.csv")) <= finished
    assert [r["lambda_min"] for r in done] == [r["lambda_min"] for r in _rows(
        killed / "results.csv")]
    assert (killed / "lambda_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(os.listdir(killed / "points")) == finished
    assert main(["sweep", study, "--out", str(killed)]) == 0

    def values(path):
        return [{k: v for k, v in r.items() if k not in TIMES} for r in _rows(path)]

    assert values(killed / "results.csv") == values(whole / "results.csv")


def test_fits_recover_a_known_exponent_and_crossover():
    rows, rng = [], np.random.default_rng(0)
    for seed in range(4):
        for n in (1000, 2000, 4000, 8000, 16000):
            lam = 3.0 * 8 * (n / 1000.0) ** -0.5 * (1 if n == 1000 else
                                                    np.exp(0.02 * rng.standard_normal()))
            rows.append({"kernel": "ntk", "data": "sphere", "depth": 3, "d": 8, "n": n,
                         "seed": seed, "lambda_min": lam, "status": "certified"})
    fits = fit_rows(rows, 0.5)
    exponent = next(f for f in fits if f["kind"] == "exponent")
    assert exponent["value"] == pytest.approx(-0.5, abs=0.03)
    assert exponent["ci_low"] < -0.5 < exponent["ci_high"] and exponent["seeds"] == 4
    assert exponent["ci_high"] - exponent["ci_low"] < 0.1
    star = next(f for f in fits if f["kind"] == "crossover")["value"]
    assert star == pytest.approx(4000.0, rel=0.1)  # λ/d halves at 4× the smallest N
    # Crossovers at several d: their growth in d.
    more = [{**r, "d": 16, "n": r["n"] * 4, "lambda_min": r["lambda_min"] * 2} for r in rows]
    growth = next(f for f in fit_rows(rows + more, 0.5) if f["kind"] == "crossover_growth")
    assert growth["value"] == pytest.approx(2.0, rel=0.1)  # N* ∝ d² here
    assert crossover(rows[:2], 0.1) is None
    # A value that is not certified does not enter the fits.
    bad = [{**r, "lambda_min": r["lambda_min"] * 1e-3, "status": "not_converged"}
           for r in rows if r["n"] == 16000]
    assert next(f for f in fit_rows(rows + bad, 0.5) if f["kind"] == "exponent")[
        "value"] == exponent["value"]


def test_the_bounds_command_prints_the_chain_and_the_prediction(tmp_path, capsys):
    assert main(["bounds", "--n", "300", "--d", "8", "--depth", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "upper" in out and "lower" in out and "prediction" in out and "G2" in out
    X = synthetic_rows("sphere", 8, 2, 0, 300)
    lam = np.linalg.eigvalsh(ntk(X, depth=3))[0]
    lower = float(out.split("λ_min ≥ ")[1].split()[0])
    assert lower <= lam
    assert main(["bounds", "--n", "300", "--d", "8"]) == 2
    assert "--depth" in capsys.readouterr().err


def test_a_sweep_with_stores_deletes_each_after_its_last_point(tmp_path):
    """storage = "delete": points solved from their stores (LOBPCG, one cluster), each store
    removed once no later point needs it; the values match the dense ones."""
    study = _write(tmp_path, """
[study]
storage = "delete"
[data]
n = 150
d = 4
[kernel]
depth = 2
[zip]
tol = [1e-8, 1e-6]
[cluster]
workers = 1
""")
    out = tmp_path / "out"
    assert main(["sweep", study, "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert [r["method"] for r in rows] == ["davidson", "davidson"]
    ref = np.linalg.eigvalsh(ntk(synthetic_rows("sphere", 4, 0, 0, 150), depth=2))[0]
    for r in rows:
        assert r["status"] == "certified"
        assert float(r["lambda_min"]) == pytest.approx(ref, rel=float(r["tol"]))
        assert int(r["store_bytes"]) == 8 * 150 * 150  # one diagonal tile of 150²
    assert not any((out / "stores").iterdir())  # the shared store, deleted after both


def test_dry_run_models_the_shift_factor_on_disk_beyond_memory(tmp_path, monkeypatch):
    """--precond shift past memory: the factor's tiles join the point's disk, its column
    panel the client's memory, two reads of it each pass the time; the passes follow the
    shift's own model where the prediction places σ (13 at N = 10000, 21 at 100000)."""
    import ntkdist.solvers.shift as shift
    from ntkdist.solvers.diskfactor import disk_bytes, panel_bytes
    from ntkdist.spec import ClusterSpec
    from ntkdist.study import _base_passes, estimate

    study = load_study(_write(tmp_path, """
[study]
storage = "delete"
[data]
source = "sphere"
d = 64
[kernel]
depth = 3
[solver]
method = "davidson"
precond = "shift"
[zip]
n = [10000, 100000]
"""), str(tmp_path / "o"))
    small, big = study.points
    assert _base_passes(small.spec, True) == pytest.approx(13.0)
    assert _base_passes(big.spec, True) == pytest.approx(21.0, abs=0.6)
    rates = {"cores": 2, "entries_per_s": 1.7e7, "gemm_flops_per_s": 1e11,
             "worker_memory": 10e9, "disk_bytes_per_s": 1e9, "build_s": 1.0}
    cluster = ClusterSpec()
    monkeypatch.setattr(shift, "SHIFT_MAX_BYTES", 1e20)  # as if K − σI fitted in memory
    monkeypatch.setattr(shift, "SHIFT_MEMORY_SHARE", 1e9)
    fits = estimate(big, cluster, dict(rates))
    monkeypatch.setattr(shift, "SHIFT_MAX_BYTES", 1e6)  # it does not: on disk
    disk = estimate(big, cluster, dict(rates))
    tile = 4096
    assert disk["disk"] - fits["disk"] == pytest.approx(disk_bytes(100000, tile))
    assert disk["client_memory"] < fits["client_memory"] == pytest.approx(4e10)
    assert disk["client_memory"] >= panel_bytes(100000, tile)
    assert disk["seconds"] - fits["seconds"] > 21 * 2 * disk_bytes(100000, tile) / 1e9 * 0.9


def test_auto_takes_the_factor_on_disk_only_where_passes_rebuild_the_tiles(monkeypatch):
    """Past the memory's N, `--precond auto` shifts where there is no store (each pass
    rebuilds the tiles: the dry run puts 9–13× less time on it at N = 50000–100000), and
    keeps the harmonic model where a store's tiles are read."""
    import ntkdist.solvers.shift as shift
    from ntkdist.solvers.shift import uses_shift

    monkeypatch.setattr(shift, "SHIFT_MAX_BYTES", 1e9)  # N ≤ 15811 fits
    assert uses_shift("auto", 10000, 3) and uses_shift("auto", 10000, 3, recompute=True)
    assert not uses_shift("auto", 50000, 3)
    assert uses_shift("auto", 50000, 3, recompute=True)
    assert not uses_shift("auto", 50000, 3, device="gpu", recompute=True)
    assert not uses_shift("auto", 50000, 3, finite=True, recompute=True)
    assert not uses_shift("auto", 4000, 3, recompute=True)
    assert not uses_shift("harmonic", 50000, 3, recompute=True)


def test_a_study_cluster_takes_its_list_values(tmp_path):
    """[cluster] job_prologue (lines) and adapt ([MIN, MAX]) are values that are lists, not
    axes; another [cluster] key given a list is refused."""
    pytest.importorskip("dask_jobqueue")
    text = TINY + ('[cluster]\nkind = "slurm"\ncores = 1\nmemory = "1GB"\n'
                   'job_prologue = ["module load x", "echo ready"]\nadapt = [1, 3]\n')
    study = load_study(_write(tmp_path, text), str(tmp_path / "out"))
    assert study.cluster.job_prologue == ("module load x", "echo ready")
    assert study.cluster.adapt == (1, 3)
    with pytest.raises(SpecError, match="one value"):
        load_study(_write(tmp_path, text.replace("cores = 1", "cores = [1, 2]"), "b.toml"),
                   str(tmp_path / "out"))
