"""Typed specs and TOML run files: the same run by flags or by file has the same spec hash
and result; bad keys and values are one line naming them; 0.1.0 hashes are unchanged."""

import json

import pytest

from ntkdist.cli import main
from ntkdist.config import load_config, merge, problem_request, run_request
from ntkdist.errors import SpecError
from ntkdist.spec import (ClusterSpec, DataSpec, KernelSpec, RunSpec, SolverSpec, StoreSpec,
                          make_spec, make_store_spec)

RUN_TOML = """
out = "{out}"
[data]
source = "gaussian"   # sphere | gaussian | a .npy or Zarr path
n = 70
d = 13
seed = 4
[kernel]
kind = "ntk"
depth = 3
[solver]
method = "dense"
tol = 1e-8
[cluster]
workers = 2
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_hashes_of_0_1_0_specs_are_unchanged():
    # Computed with ntkdist 0.1.0's RunSpec / StoreSpec (flat dicts, nested "problem").
    run = make_spec(data="gaussian", n=40, d=5, depth=3, seed=9)
    assert run.hash() == "949c1683e80917f09ef19e566a1daaa681426b8d666c6168a266a42fced5cf12"
    store = make_store_spec(run, 10, "float64")
    assert store.to_dict()["problem"] == {
        "data": "gaussian", "n": 40, "d": 5, "depth": 3, "kernel": "ntk",
        "normalization": "paper", "seed": 9, "input_sha256": None}
    if store.ntkdist_version == "0.1.0":
        assert store.hash() == ("9a2003fab83d6fa3f3c8763e46622650d9cbdf9eab7ecc3c8efc07ea09f7"
                                "6ec6")
    other = make_spec(data="sphere", n=50, d=4, depth=2, seed=1, kernel="nngp",
                      normalization="nt", method="lobpcg").with_solver(
        k=2, tol=1e-6, block=8, precond="nystrom:20", operator="recompute",
        precision="float64", max_products=77)
    assert other.hash() == "84fdfa988e38bc5380d8609ad26f8c7575c124f969574f10142b8224d2270300"


def test_specs_round_trip_through_their_dicts():
    run = make_spec(data="sphere", n=30, d=3, depth=4, seed=2, kernel="nngp")
    assert RunSpec.from_dict(run.to_dict()) == run
    store = make_store_spec(run, 7, "float32")
    assert StoreSpec.from_dict(store.to_dict()) == store
    assert StoreSpec.from_dict(store.to_dict()).hash() == store.hash()
    assert isinstance(run.data, DataSpec) and isinstance(run.kernel, KernelSpec)
    assert isinstance(run.solver, SolverSpec)
    with pytest.raises(SpecError, match="unknown spec field"):
        RunSpec.from_dict({**run.to_dict(), "activation": "tanh"})
    with pytest.raises(SpecError, match="widths applies to --kernel empirical"):
        RunSpec.from_dict({**run.to_dict(), "widths": [3]})
    for kernel, layer in (("empirical", None), ("features", 1)):
        finite = make_spec(data="sphere", n=30, d=3, kernel=kernel, widths=[5, 7],
                           weights_seed=4, layer=layer)
        assert finite.kernel.depth == 3
        assert RunSpec.from_dict(finite.to_dict()) == finite
        fstore = make_store_spec(finite, 7, "float64")
        assert StoreSpec.from_dict(fstore.to_dict()).hash() == fstore.hash()
    assert make_spec(data="sphere", n=30, d=3, kernel="features", widths=[5, 7]).kernel.layer == 2
    with pytest.raises(SpecError, match="does not match"):
        make_spec(data="sphere", n=30, d=3, depth=2, kernel="empirical", widths=[5, 7])
    with pytest.raises(SpecError, match="needs --widths"):
        make_spec(data="sphere", n=30, d=3, depth=3, kernel="empirical")
    with pytest.raises(SpecError, match="layer must be"):
        make_spec(data="sphere", n=30, d=3, kernel="features", widths=[5, 7], layer=3)
    with pytest.raises(SpecError, match="normalization"):
        make_spec(data="sphere", n=30, d=3, kernel="ntk", depth=2, normalization="raw")


def test_specs_are_frozen():
    run = make_spec(data="sphere", n=30, d=3, depth=4)
    with pytest.raises(AttributeError):
        run.kernel.depth = 5  # type: ignore[misc]


def test_a_toml_run_and_its_flags_give_the_same_spec(tmp_path):
    path = _write(tmp_path, RUN_TOML.format(out=tmp_path / "a"))
    by_file, cluster = run_request(load_config(path))
    flags = {"data": "gaussian", "n": 70, "d": 13, "seed": 4, "kernel": "ntk", "depth": 3,
             "method": "dense", "tol": 1e-8, "workers": 2}
    by_flags, cluster2 = run_request(merge(None, flags))
    assert by_file == by_flags and by_file.hash() == by_flags.hash()
    assert cluster == cluster2 == ClusterSpec(workers=2)


def test_flags_override_the_file(tmp_path):
    path = _write(tmp_path, RUN_TOML.format(out=tmp_path / "a"))
    spec, _ = run_request(merge(load_config(path), {"depth": 4, "tol": 1e-6, "n": None}))
    assert spec.kernel.depth == 4 and spec.solver.tol == 1e-6 and spec.n == 70


def test_the_same_result_by_file_and_by_flags(tmp_path, capsys):
    path = _write(tmp_path, RUN_TOML.format(out=tmp_path / "a"))
    assert main(["run", "--config", path]) == 0
    assert main(["run", "--data", "gaussian", "--n", "70", "--d", "13", "--seed", "4",
                 "--depth", "3", "--method", "dense", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "result.json").read_text()) for x in "ab")
    assert a["spec_hash"] == b["spec_hash"] and a["lambda_min"] == b["lambda_min"]
    assert a["spec"] == b["spec"]


@pytest.mark.parametrize("text, words", [
    ("[solver]\ntolerance = 1e-8\n", r"run.toml: unknown key \[solver\] tolerance"),
    ("[solvers]\ntol = 1e-8\n", r"run.toml: unknown table \[solvers\]"),
    ("[solver]\ntol = 2.0\n", r"run.toml: \[solver\] tol must be in \(0, 1\), got 2.0"),
    ("[solver]\nk = \"two\"\n", r"run.toml: \[solver\] k must be an integer"),
    ("[kernel]\nkind = \"rbf\"\ndepth = 3\n", r"run.toml: \[kernel\] kind must be one of"),
    ("[kernel]\ndepth = 0\n", r"run.toml: \[kernel\] depth must be an integer >= 1"),
    ("[data]\nn = 1\nd = 3\n", r"run.toml: \[data\] n must be an integer >= 2"),
    ("[data]\nseed = -1\nn = 5\nd = 2\n", r"run.toml: \[data\] seed must be"),
    ("[cluster]\nmemory_limit = \"banana\"\n", r"run.toml: \[cluster\] memory_limit must be"),
    ("[cluster]\nworkers = 0\n", r"run.toml: \[cluster\] workers must be"),
    ("[cluster]\ndevice = \"tpu\"\n", r"run.toml: \[cluster\] device must be one of"),
    ("[store]\ndtype = \"float16\"\npath = \"s.zarr\"\n", r"run.toml: \[store\] dtype must be"),
    ("[solver]\ncheckpoint_every = -1\n", r"run.toml: \[solver\] checkpoint_every must be"),
    ("data = 3\n", r"run.toml: \[data\] must be a table"),
    ("[data\n", r"run.toml: not valid TOML"),
])
def test_bad_keys_and_values_are_one_line_naming_the_key(tmp_path, capsys, text, words):
    top = "out = \"%s\"\n" % (tmp_path / "o")
    tables = "" if "[kernel]" in text or "depth" in text else "[kernel]\ndepth = 2\n"
    if "[data]" not in text and not text.startswith(("data", "[data")):
        tables += "[data]\nn = 20\nd = 3\n"
    body = top + text + tables if not text.startswith("[") else top + tables + text
    path = _write(tmp_path, body)
    code = main(["run", "--config", path])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    import re

    assert re.search(words, err), err
    assert not (tmp_path / "o").exists()


def test_a_bad_flag_value_is_named_as_the_flag(tmp_path, capsys):
    code = main(["run", "--n", "20", "--d", "3", "--depth", "2", "--tol", "2",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--tol must be in (0, 1)" in err


def test_required_options_are_named(tmp_path, capsys):
    path = _write(tmp_path, "[data]\nn = 20\nd = 3\n[kernel]\ndepth = 2\n")
    assert main(["run", "--config", path]) == 2
    assert "--out" in capsys.readouterr().err
    path = _write(tmp_path, "out = 'x'\n[data]\nn = 20\nd = 3\n", "nodepth.toml")
    assert main(["run", "--config", path]) == 2
    assert "--depth" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_assemble_takes_a_config(tmp_path, capsys):
    path = _write(tmp_path, "[data]\nsource = 'sphere'\nn = 30\nd = 4\n[kernel]\ndepth = 2\n"
                  f"[store]\npath = '{tmp_path / 's.zarr'}'\ntile = 16\n[cluster]\nworkers = 1\n"
                  "[solver]\ntol = 1e-6\n")
    assert main(["assemble", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "tile 16" in out and "3 tiles computed now" in out
    assert problem_request(load_config(path)).n == 30


@pytest.mark.parametrize("argv, words", [
    (["--depth", "9223372036854775807"], "--depth must be at most"),
    (["--depth", "2", "--n", "100000000000"], "--n must fit in memory"),
    (["--depth", "2", "--workers", "100000"], "--workers must be at most"),
    (["--depth", "2", "--memory-limit", "1kB"], "--memory-limit must be at least"),
    (["--depth", "2", "--dtype", "float32"], "--dtype float32 applies to a store"),
])
def test_hostile_values_are_refused_in_one_line(tmp_path, capsys, argv, words):
    code = main(["run", "--n", "300", "--d", "8", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists()


def test_typed_specs_validate_themselves():
    for build in (lambda: ClusterSpec(workers=0), lambda: ClusterSpec(device="tpu"),
                  lambda: ClusterSpec(workers="2"), lambda: DataSpec("sphere", n=1, d=3),
                  lambda: KernelSpec(depth=0), lambda: KernelSpec(kind="rbf")):
        with pytest.raises(SpecError):
            build()


def test_a_cluster_flag_replaces_the_files_cluster(tmp_path):
    path = _write(tmp_path, "[cluster]\nscheduler = \"tcp://nowhere:1\"\n")
    o = merge(load_config(path), {"workers": 1, "scheduler": None})
    assert "scheduler" not in o and o["workers"] == 1
    o = merge(load_config(path), {"scheduler_file": "s.json"})
    assert "scheduler" not in o and o["scheduler_file"] == "s.json"


def test_solve_refuses_a_run_file_of_another_kernel(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["assemble", "--n", "40", "--d", "3", "--depth", "2", "--store", str(store),
                 "--workers", "1"]) == 0
    path = _write(tmp_path, f"out = '{tmp_path / 'o'}'\n[data]\nn = 40\nd = 3\n[kernel]\n"
                  f"depth = 3\n[store]\npath = '{store}'\n[cluster]\nworkers = 1\n")
    capsys.readouterr()
    assert main(["solve", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "holds another kernel" in err and "depth (2 ≠ 3)" in err
    assert not (tmp_path / "o").exists()
    path = _write(tmp_path, f"[data]\nn = 40\nd = 3\n[kernel]\ndepth = 2\n[store]\npath = "
                  f"'{tmp_path / 't.zarr'}'\n[solver]\nk = 'two'\n", "asm.toml")
    assert main(["assemble", "--config", path]) == 2
    assert "asm.toml: [solver] k must be" in capsys.readouterr().err
