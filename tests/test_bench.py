"""``ntkdist bench``: one quick bench end to end on a local cluster (shared by the tests that
read its report), ``bench compare``, a wrong reference failing the bench, and the refusals."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import file_tree
from ntkdist import bench
from ntkdist.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``ntkdist bench --quick`` on a local cluster of two workers, run once for the module:
    (exit code, stdout, stderr, the report folder)."""
    out = str(tmp_path_factory.mktemp("bench") / "quick")
    done = subprocess.run([sys.executable, "-m", "ntkdist", "bench", "--quick", "--workers", "2",
                           "--no-drop-cache", "--out", out],
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr, out


@pytest.fixture(scope="module")
def report(quick):
    code, stdout, stderr, out = quick
    assert code == 0, stderr[-4000:]
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_quick_bench_passes_its_reference(quick, report):
    code, stdout, stderr, out = quick
    assert "Traceback" not in stderr
    ref = report["reference"]
    assert report["status"] == ref["verdict"] == "PASS" and ref["pass"]
    assert ref["n"] == bench.REFERENCE_QUICK_N == 2000 and ref["status"] == "certified"
    assert ref["store"] and ref["passes"] > 0
    expected = bench.REFERENCE_LAMBDA[2000]
    assert ref["expected"] == expected
    assert abs(ref["lambda_min"] - expected) <= expected * (ref["relative_accuracy"] + 1e-10)
    assert ref["relative_accuracy"] <= 1e-10
    headline = f"time to a certified λ_min at N = 2000: {ref['seconds']:.1f} s"
    assert report["headline"] == headline
    assert stdout.splitlines()[-2:] == [headline, f"report: {os.path.join(out, 'report.md')}"]
    assert "bench: reference problem" in stdout  # progress lines as it goes
    # the scratch stores are gone; only the report is left
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "scaling.png",
                                       "throughput.png"]


def test_report_values_are_sane(report):
    assert report["format"] == bench.FORMAT and report["quick"] is True
    fp = report["fingerprint"]
    for key in ("cpu", "cores", "memory_bytes", "gpus", "blas", "versions", "cluster", "date"):
        assert key in fp
    assert set(fp["versions"]) >= {"python", "numpy", "scipy", "dask", "distributed", "zarr",
                                   "ntkdist"}
    assert fp["cluster"]["kind"] == "local" and fp["cluster"]["workers"] == 2
    if importlib.util.find_spec("cupy") is None:
        assert fp["gpus"] == "no GPU (CuPy not installed)"
    assert report["sizes"]["n"] == bench.QUICK_N and report["sizes"]["block"] == 32
    assert 0 < report["round_trip"]["median_seconds"] < 5
    assert len(report["round_trip"]["samples"]) == bench.ROUND_TRIPS
    assert len(report["workers"]) == 2
    for w in report["workers"]:
        assert w["tile"]["entries_per_s"] > 0 and w["arccos"]["per_s"] > 0
        assert w["arccos_floor_entries_per_s"] == pytest.approx(w["arccos"]["per_s"] / 2)
        assert w["tile_fraction_of_floor"] > 0
        for dt in ("float64", "float32"):
            assert w["thin"][dt]["gflops"] > 0 and w["peak"][dt]["gflops"] > 0
            assert w["thin_fraction_of_peak"][dt] == pytest.approx(
                w["thin"][dt]["gflops"] / w["peak"][dt]["gflops"])
    st = report["store"]
    assert st["bytes"] > 4 * 4096 ** 2 / 2 and st["dtype"] == "float32"
    assert st["write"]["gb_per_s"] > 0 and st["read"]["gb_per_s"] > 0
    assert "page cache not dropped (--no-drop-cache)" in st["page_cache"]
    dd = st["dd"]
    if "error" not in dd:
        assert dd["write"]["gb_per_s"] > 0 and dd["read"]["gb_per_s"] > 0
        assert st["write"]["vs_dd"] == pytest.approx(st["write"]["gb_per_s"]
                                                     / dd["write"]["gb_per_s"])
    passes = report["passes"]
    assert set(passes) == {"memory", "store", "recompute"}
    for name, p in passes.items():
        assert p["mode"] == name and p["seconds"] > 0 and p["bytes_moved"] > 0
        assert p["seconds"] <= p["median_seconds"] <= max(p["samples"])
    assert passes["store"]["store_bytes_read"] > 0 and passes["memory"]["store_bytes_read"] == 0
    assert passes["memory"]["bytes_kept_in_memory"] > 0
    sc = report["scaling"]
    assert sc["workers"] == [1, 2]
    for kind in ("strong", "weak"):
        assert [r["workers"] for r in sc[kind]] == [1, 2]
        for r in sc[kind]:
            assert r["seconds"] > 0 and 0 < r["efficiency"] <= 1.5
    assert [r["n"] for r in sc["strong"]] == [4096, 4096]
    assert [r["n"] for r in sc["weak"]] == [round(4096 / 2 ** 0.5), 4096]
    assert sc["strong"][0]["efficiency"] == sc["weak"][0]["efficiency"] == 1.0
    # every (workers, N) is timed once: the full-size pass is the recompute operator's
    assert sc["strong"][-1]["seconds"] == sc["weak"][-1]["seconds"] == passes["recompute"][
        "seconds"]
    names = [m[0] for m in report["metrics"]]
    assert names[0] == "time to a certified λ_min (N = 2000)"
    assert len(names) == len(set(names))


def test_report_md_and_figures(quick, report):
    out = quick[3]
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert md.startswith("# ntkdist bench\n\n**time to a certified λ_min at N = 2000: ")
    assert f"**{report['headline']}**" in md and "PASS" in md
    for section in ("## Machine", "## Reference problem", "## Workers", "## Store",
                    "## One pass", "## Scaling"):
        assert section in md
    import matplotlib.image

    assert report["figures"] == ["scaling.png", "throughput.png"]
    for name in report["figures"]:
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == PNG
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({name})" in md


def test_compare_prints_both_reports(quick, report, tmp_path, capsys):
    out = quick[3]
    other = tmp_path / "other"
    other.mkdir()
    doc = copy.deepcopy(report)
    for m in doc["metrics"]:
        if m[0] == "Dask round trip (median)":
            m[1] *= 2
    (other / "report.json").write_text(json.dumps(doc))
    assert main(["bench", "compare", out, str(other / "report.json")]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"A: {os.path.abspath(out)}"
    assert lines[1] == f"B: {other / 'report.json'}"
    assert lines[2].split() == ["metric", "A", "B", "B/A"]
    row = next(r for r in lines if r.startswith("Dask round trip (median) (ms)"))
    assert row.split()[-1] == "2"
    head = next(r for r in lines if r.startswith("time to a certified"))
    assert head.split()[-1] == "1"
    data = [r for r in lines[4:] if r.strip()
            and not r.startswith(("host", "cpu", "cores", "device", "date"))]
    assert len(data) > 10
    # aligned columns: every metric row's B/A column ends where the header's B/A ends
    assert all(len(r) == len(lines[2]) for r in data), data
    assert "warning" not in text
    doc["sizes"]["n"] *= 2  # a report of another N: said, once, after the table
    (other / "report.json").write_text(json.dumps(doc))
    assert main(["bench", "compare", out, str(other / "report.json")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("warning: the reports measured different sizes (n ") and \
        "not like for like" in last


def test_compare_refuses_what_is_not_a_report(quick, tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    for args in (["compare", str(tmp_path), quick[3]], ["compare", quick[3],
                                                        str(tmp_path / "x.json")]):
        assert main(["bench", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ntkdist: error: bench compare: ") and err.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--quick"], "required: --out"),
    (["--n", "100", "--out", "{tmp}/o"], "--n must be an integer in [1024, 1000000]"),
    (["--n", "0", "--out", "{tmp}/o"], "argument --n: expected an integer >= 1"),
    (["compare", "a"], "bench takes 'compare A B'"),
    (["compare", "a", "b", "c"], "bench takes 'compare A B'"),
    (["frobnicate", "--out", "{tmp}/o"], "bench takes 'compare A B'"),
    (["compare", "a", "b", "--quick"], "bench compare takes two reports and no options, "
                                       "got --quick"),
    (["--out", "{tmp}/o", "--memory-limit", "1MB"], "--memory-limit must be at least"),
    (["--out", "{tmp}/o", "--cluster", "nope"], "cluster must be one of"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntkdist: error: ") and err.count("\n") == 1, err
    assert words in err
    assert not os.path.exists(tmp_path / "o")


def test_out_holding_other_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "report.json").write_text('{"not": "a bench"}')
    before = file_tree(str(out))
    assert main(["bench", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds no bench report" in err and err.count("\n") == 1
    assert file_tree(str(out)) == before
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_previous_report_folder_is_accepted(quick, tmp_path):
    """A previous bench's folder (and a killed one's scratch) may be replaced; a folder with
    more than that may not."""
    out = str(tmp_path / "prev")
    shutil.copytree(quick[3], out)
    bench.prepare_out(out)
    os.makedirs(os.path.join(out, "bench-store", "ntkdist-bench-999999999-x"))
    bench.prepare_out(out)
    with open(os.path.join(out, "extra.csv"), "w") as f:
        f.write("1\n")
    with pytest.raises(bench.OutputError):
        bench.prepare_out(out)
    scratch_only = tmp_path / "killed" / "bench-store" / "ntkdist-bench-1-x"
    scratch_only.mkdir(parents=True)
    bench.prepare_out(str(tmp_path / "killed"))


def test_too_large_n_for_the_workers_memory_is_one_line(tmp_path, capsys):
    args = ["bench", "--n", "300000", "--workers", "1", "--memory-limit", "1GB",
            "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntkdist: error: --n 300000: the float32 tiles") and \
        err.count("\n") == 1, err
    assert "use a smaller --n" in err
    assert not os.path.exists(tmp_path / "o")  # nothing left behind


def test_wrong_reference_fails_the_bench(report, tmp_path, monkeypatch, capsys):
    """A shipped reference value that the cluster does not reproduce: FAIL, exit code 1,
    one line on stderr; the report is still written, saying FAIL. The measurements other
    than the reference solve are the quick run's (to save time); the solve is real."""
    wrong = bench.REFERENCE_LAMBDA[2000] * (1 + 1e-6)
    monkeypatch.setitem(bench.REFERENCE_LAMBDA, 2000, wrong)
    canned = {"round_trip": report["round_trip"], "worker_rates": report["workers"],
              "passes": report["passes"], "scaling": report["scaling"]}
    for name, value in canned.items():
        monkeypatch.setattr(bench._Bench, name, lambda self, *a, v=value: v)
    monkeypatch.setattr(bench._Bench, "store",
                        lambda self: (report["store"], str(tmp_path / "no-store")))
    out = tmp_path / "fail"
    assert main(["bench", "--quick", "--workers", "2", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("ntkdist: error: bench: reference λ_min wrong: ")
    assert repr(wrong) in err[0]
    doc = json.load(open(out / "report.json"))
    assert doc["status"] == "FAIL" and doc["reference"]["pass"] is False
    assert doc["reference"]["lambda_min"] == pytest.approx(bench.REFERENCE_LAMBDA[2000] / (1 + 1e-6),
                                                           rel=1e-9)
    assert "FAIL" in doc["headline"]
    assert "FAIL" in (out / "report.md").read_text(encoding="utf-8").splitlines()[2]


def test_compare_refuses_damaged_or_other_version_reports(quick, tmp_path, capsys):
    doc = json.loads(open(os.path.join(quick[3], "report.json")).read())
    cases = {"version": {**doc, "format_version": 99},
             "no-fingerprint": {k: v for k, v in doc.items() if k != "fingerprint"},
             "fingerprint-list": {**doc, "fingerprint": []},
             "bad-row": {**doc, "metrics": [[["a"], 1, "s"]]}}
    for name, bad in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        assert main(["bench", "compare", quick[3], str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("ntkdist: error: bench compare: ") and err.count("\n") == 1, err
    huge = copy.deepcopy(doc)
    huge["metrics"][0][1] = 1e308
    (tmp_path / "huge.json").write_text(json.dumps(huge))
    small = copy.deepcopy(doc)
    small["metrics"][0][1] = 1e-308
    (tmp_path / "small.json").write_text(json.dumps(small))
    assert main(["bench", "compare", str(tmp_path / "small.json"),
                 str(tmp_path / "huge.json")]) == 0


def test_judge_reference_never_passes_nan():
    nan = float("nan")
    assert not bench.judge_reference(nan, "certified", 1e-11, 1.0)["pass"]
    assert not bench.judge_reference(2.0, "certified", nan, 1.0)["pass"]
    assert not bench.judge_reference(float("inf"), "certified", 1e-11, 1.0)["pass"]


def test_judge_reference():
    ok = bench.judge_reference(1.0 + 1e-12, "certified", 1e-11, 1.0)
    assert ok["pass"] and ok["verdict"] == "PASS" and ok["message"] is None
    off = bench.judge_reference(1.0 + 1e-9, "certified", 1e-11, 1.0)
    assert not off["pass"] and off["message"].startswith("reference λ_min wrong: got")
    loose = bench.judge_reference(1.0 + 1e-9, "certified", 1e-8, 1.0)
    assert loose["pass"]  # within what was certified
    unsure = bench.judge_reference(1.0, "not_converged", 1e-3, 1.0)
    assert not unsure["pass"] and unsure["message"].startswith("reference λ_min not certified")
    assert not bench.judge_reference(None, "below_resolution", None, 1.0)["pass"]


def test_sizes_and_scaling_counts():
    assert bench.scaling_counts(1) == [1]
    assert bench.scaling_counts(6) == [1, 2, 4, 6]
    assert bench.scaling_counts(16, cap=2) == [1, 2]
    q, full = bench.make_sizes(quick=True), bench.make_sizes(n=5000)
    assert (q.n, q.reference_n, full.n, full.reference_n) == (4096, 2000, 5000, 10000)
    assert set(bench.REFERENCE_LAMBDA) == {q.reference_n, full.reference_n}
    assert bench.bench_tile(4096, 2, [8 << 30] * 2) == 1024
    assert bench.bench_tile(20000, 2, [8 << 30] * 2) == 4096
    assert bench.bench_tile(4096, 64, [0] * 64) == 4096 // 23 + 1


def test_worker_rates_on_a_gpu_worker(client, monkeypatch):
    """The per-worker rates with --device gpu run on the worker's GPU (here the fake CuPy of
    tests/fakecupy.py, which refuses host arrays where device arrays are needed)."""
    import fakecupy

    monkeypatch.setitem(sys.modules, "cupy", fakecupy.module())
    w = sorted(client.scheduler_info()["workers"])[0]
    r = client.submit(bench.worker_rates, "gpu", 64, 3, 8, 4, 64, 1000, 1, workers=[w],
                      allow_other_workers=False, pure=False).result()
    assert r["device"] == "gpu" and r["gpu"] == fakecupy.NAME
    assert r["tile"]["entries_per_s"] > 0 and r["peak"]["float64"]["side"] == 64
    assert r["thin"]["float32"]["gflops"] > 0 and r["arccos"]["per_s"] > 0
    assert bench.gpus_here() == [fakecupy.NAME]


def test_the_quick_reference_value_is_reproduced():
    """REFERENCE_LAMBDA[2000] recomputed (benchmarks/reference_lambda.py): evr's lowest
    eigenvector's long-double Rayleigh quotient, within a Kato–Temple bound of an
    eigenvalue."""
    r = bench.reference_value(2000)
    assert r["lambda_min"] == pytest.approx(bench.REFERENCE_LAMBDA[2000], rel=2e-16, abs=0)
    assert r["residual"] < 1e-11 and r["kato_temple"] < 1e-20
    assert r["lambda_2"] > r["lambda_min"] * 1.02


def test_gpu_workers_are_not_refused_for_host_memory(tmp_path):
    """The memory pass's tiles stay on the GPUs of GPU workers: their host memory limit does
    not refuse the bench (the CPU's does)."""
    from types import SimpleNamespace

    from ntkdist.errors import SpecError

    state = dict(sizes=bench.make_sizes(False, 100000), tile=4096, memories=[10 ** 9],
                 scratch=str(tmp_path))
    with pytest.raises(SpecError, match="the float32 tiles"):
        bench._Bench.check_room(SimpleNamespace(device="cpu", **state))
    try:
        bench._Bench.check_room(SimpleNamespace(device="gpu", **state))
    except SpecError as exc:  # only the disk may refuse it
        assert "free" in str(exc)
