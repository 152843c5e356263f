"""Bad input and bad environments: one line on stderr, exit 2, nothing left behind."""

import json
import os

import numpy as np
import pytest

from ntkdist.cli import main


def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ntkdist: error:") and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("make, words", [
    (lambda r: r.standard_normal((10, 3)) + 1j, ["complex"]),
    (lambda r: np.array([["1", "2"], ["3", "4"]]), ["dtype"]),
    (lambda r: np.array([[True, False], [False, True]]), ["dtype"]),
    (lambda r: r.standard_normal((1, 8)), ["N < 2"]),
    (lambda r: r.standard_normal((20, 8)) * 1e200, ["too large", "rescale"]),
    (lambda r: r.standard_normal((20, 8)) * 1e150, ["too large", "rescale"]),
    (lambda r: r.standard_normal((20, 8)) * 1e-200, ["underflow", "rescale"]),
])
def test_inputs_refused(tmp_path, capsys, make, words):
    path = str(tmp_path / "x.npy")
    np.save(path, make(np.random.default_rng(0)))
    out = tmp_path / "o"
    code = main(["run", "--data", path, "--depth", "3", "--out", str(out)])
    _one_line_error(capsys, code, *words)
    assert not out.exists()


def test_mixed_norms_are_accepted_and_written_as_strict_json(tmp_path):
    X = np.random.default_rng(1).standard_normal((30, 4))
    X[:15] *= 1e60
    path = str(tmp_path / "x.npy")
    np.save(path, X)
    out = tmp_path / "o"
    assert main(["run", "--data", path, "--depth", "2", "--out", str(out)]) == 0
    text = (out / "result.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


@pytest.mark.parametrize("args, words", [
    (["--workers", "0"], ["--workers", ">= 1"]),
    (["--tile", "0", "--store", "S.zarr"], ["--tile"]),
    (["--block", "0", "--method", "lobpcg"], ["--block"]),
    (["--max-products", "0"], ["--max-products"]),
])
def test_bad_counts_leave_nothing(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--n", "50", "--d", "4", "--depth", "2", "--out", "o", *args])
    _one_line_error(capsys, code, *words)
    assert os.listdir(tmp_path) == []


def test_store_and_out_must_differ(tmp_path, capsys):
    same = str(tmp_path / "same")
    code = main(["run", "--n", "50", "--d", "4", "--depth", "2", "--store", same, "--out", same,
                 "--workers", "1"])
    _one_line_error(capsys, code, "different")
    assert not os.path.exists(same)
    code = main(["run", "--n", "50", "--d", "4", "--depth", "2", "--store", same,
                 "--out", os.path.join(same, "r"), "--workers", "1"])
    _one_line_error(capsys, code, "different")
    assert not os.path.exists(same)


def test_unwritable_out_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import ntkdist.results as results

    def refuse(path, obj):
        raise PermissionError(1, "Operation not permitted", path)

    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(results, "write_json", refuse)
    code = main(["run", "--n", "50", "--d", "4", "--depth", "2", "--out", str(out)])
    _one_line_error(capsys, code, "not permitted")
    assert os.listdir(out) == []


def test_full_disk_when_writing_results_is_one_line(tmp_path, capsys, monkeypatch):
    import ntkdist.results as results

    def full(path, array):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(results, "write_npy", full)
    code = main(["run", "--n", "50", "--d", "4", "--depth", "2", "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "No space left", "λ_min")


def test_other_spec_names_the_fields(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["run", "--n", "50", "--d", "4", "--depth", "2", "--out", out]) == 0
    capsys.readouterr()
    code = main(["run", "--n", "50", "--d", "4", "--depth", "3", "--seed", "2", "--out", out])
    _one_line_error(capsys, code, "depth (2 ≠ 3)", "seed (0 ≠ 2)")


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    from ntkdist.errors import OutputError
    from ntkdist.locks import folder_lock

    out = str(tmp_path / "o")
    args = ["run", "--n", "60", "--d", "4", "--depth", "2", "--out", out]
    assert main(args) == 0 and not os.path.exists(os.path.join(out, ".lock"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    capsys.readouterr()
    with folder_lock(out, f"--out {out!r}", "written", OutputError):  # another run's hold
        _one_line_error(capsys, main(args), "is being written by process", str(os.getpid()))
        assert {n: open(os.path.join(out, n), "rb").read()
                for n in os.listdir(out) if n != ".lock"} == before
    assert main(args) == 0 and sorted(os.listdir(out)) == sorted(before)


def test_a_stale_or_planted_lock_file_never_blocks_nor_is_written_through(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text('{"pid": 999999999, "host": "gone"}')  # a dead run's, by hand
    args = ["run", "--n", "60", "--d", "4", "--depth", "2", "--out", str(out)]
    assert main(args) == 0 and sorted(os.listdir(out)) == ["eigvec.npy", "result.json",
                                                            "spec.json"]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / ".lock")
    _one_line_error(capsys, main(args), "symbolic link")
    assert victim.read_text() == "precious"


def test_racing_runs_on_a_new_folder_leave_the_winners_spec(tmp_path):
    """Two processes claim one new folder at the same moment for different specs: one wins
    and the folder holds its spec alone; the other is refused by the lock or the spec."""
    import multiprocessing as mp

    from ntkdist.errors import OutputError
    from ntkdist.results import OutClaim

    def claim(path, depth, barrier, queue):
        barrier.wait()
        try:
            with OutClaim(path, {"depth": depth}, f"h{depth}") as c:
                c()
                queue.put(("won", depth))
                time.sleep(0.3)
        except OutputError as exc:
            queue.put(("refused", str(exc)))

    import time

    ctx = mp.get_context("fork")
    for trial in range(12):
        path = str(tmp_path / f"q{trial}")
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=claim, args=(path, depth, barrier, queue))
                 for depth in (2, 3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        got = sorted(queue.get(timeout=5) for _ in procs)
        assert [g[0] for g in got] == ["refused", "won"], got
        assert "is being" in got[0][1] or "another spec" in got[0][1], got
        spec = json.load(open(os.path.join(path, "spec.json")))
        assert spec["spec_hash"] == f"h{got[1][1]}" and os.listdir(path) == ["spec.json"]


def test_depth_one_with_more_rows_than_dimensions_is_singular(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--data", "gaussian", "--n", "40", "--d", "5", "--depth", "1",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert r["singular_expected"] and "rank" in r["singular_reason"]
    assert not r["converged"] and r["status"] == "below_resolution"
    assert r["lambda_min"] is None and r["lambda_min_interval"][0] == 0.0
    assert "rank" in capsys.readouterr().out


def test_a_failed_solve_leaves_no_folder_that_refuses_the_fix(tmp_path, capsys):
    X = np.random.default_rng(4).standard_normal((100, 8))
    path = str(tmp_path / "x.npy")
    np.save(path, X)
    out = tmp_path / "o"
    args = ["run", "--data", path, "--depth", "1", "--method", "lanczos", "--k", "3",
            "--workers", "1", "--out", str(out)]
    code = main([*args, "--max-products", "40"])
    _one_line_error(capsys, code, "lanczos")
    assert not out.exists()
    out.mkdir()  # an empty folder given by the user stays, empty
    code = main([*args, "--max-products", "40"])
    _one_line_error(capsys, code, "lanczos")
    assert out.exists() and os.listdir(out) == []


def test_edited_store_spec_is_refused(tmp_path, capsys):
    store = str(tmp_path / "S.zarr")
    assert main(["assemble", "--data", "gaussian", "--n", "120", "--d", "8", "--depth", "3",
                 "--store", store, "--tile", "64", "--workers", "1"]) == 0
    meta = os.path.join(store, "zarr.json")
    doc = json.load(open(meta))
    doc["attributes"]["ntkdist"]["spec"]["problem"]["depth"] = 5
    json.dump(doc, open(meta, "w"))
    capsys.readouterr()
    for cmd in (["solve", "--store", store, "--out", str(tmp_path / "o"), "--workers", "1"],
                ["verify", "--store", store]):
        _one_line_error(capsys, main(cmd), "does not match its spec hash")
    assert not (tmp_path / "o").exists()


def test_small_block_below_k_is_raised_not_refused(tmp_path):
    out = tmp_path / "o"
    assert main(["run", "--data", "gaussian", "--n", "120", "--d", "8", "--depth", "3",
                 "--method", "davidson", "--k", "2", "--block", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert r["block"] == 3 and any("block raised" in n for n in r["notes"])
    assert r["converged"]


def test_memory_limit_is_checked_before_anything(tmp_path, capsys):
    code = main(["run", "--n", "40", "--d", "4", "--depth", "2", "--memory-limit", "banana",
                 "--out", str(tmp_path / "o")])
    _one_line_error(capsys, code, "--memory-limit")
    assert not (tmp_path / "o").exists()


def test_a_closed_pipe_is_not_an_error(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m ntkdist run --n 40 --d 4 --depth 2 --out {tmp_path / 'o'} "
        "| head -c 1", shell=True, capture_output=True, text=True)
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_in_a_terminal_is_one_line_from_the_whole_process_group(tmp_path):
    """A terminal's Ctrl-C signals every process of the group: the local workers ignore it
    (no traceback of theirs), the run says one line and exits 130, its store resumable."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "ntkdist", "run", "--data", "sphere", "--n", "6000", "--d",
         "16", "--depth", "3", "--method", "davidson", "--store", str(tmp_path / "k.zarr"),
         "--tile", "1000", "--out", str(tmp_path / "o"), "--workers", "2"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("tiles "):
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "ntkdist: interrupted"
