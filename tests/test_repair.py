"""verify --repair: damaged pieces recomputed on the workers, the store bitwise as assembled."""

import os

import numpy as np
import pytest

from conftest import file_tree
from ntkdist.cli import main
from ntkdist.store import KernelStore, StoreError, open_kernel

ARGS = ["--data", "sphere", "--n", "300", "--d", "8", "--depth", "2", "--tile", "64"]


def _assemble(client, path, args=ARGS):
    assert main(["assemble", *args, "--store", path, "--scheduler", client.scheduler.address]) == 0


def _damage(path, name, index, offset, data):
    """Overwrite bytes of a chunk in place: same size, so only its checksum tells."""
    with open(KernelStore.open(path).chunk_file(name, *index), "r+b") as f:
        f.seek(offset)
        f.write(np.asarray(data).tobytes())


def _pieces(path):
    """Every file under K/, X/ and done/, with its bytes."""
    return {k: v for k, v in file_tree(path).items() if k.split(os.sep)[0] in ("K", "X", "done")}


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntkdist: error:"), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def test_repair_recomputes_damaged_tile_and_rows_bitwise(client, tmp_path, capsys):
    addr = client.scheduler.address
    path, clean = str(tmp_path / "k.zarr"), str(tmp_path / "clean.zarr")
    _assemble(client, path)
    _assemble(client, clean)
    assert _pieces(path) == _pieces(clean)
    _damage(path, "K", (1, 2), 400, np.full(5, 7.0))
    _damage(path, "K", (3, 4), 8 * 64 * 10, np.full(3, -1.0))  # an edge tile (44 columns)
    _damage(path, "X", (2, 0), 16, np.full(2, 0.5))
    with pytest.raises(StoreError, match=r"verify --store .* --repair"):
        open_kernel(path).compute()
    capsys.readouterr()

    assert main(["verify", "--store", path]) == 1
    err = capsys.readouterr().err
    assert "K.1.2" in err and "K.3.4" in err and "X.2" in err and "--repair" in err

    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 0
    out = capsys.readouterr().out
    assert "repaired 3 piece(s): X.2, K.1.2, K.3.4" in out and "sound" in out, out
    assert "note:" not in out  # the recomputed bytes are the recorded ones
    assert _pieces(path) == _pieces(clean)
    assert file_tree(path) == file_tree(clean)  # no lock file left behind either
    assert main(["verify", "--store", path]) == 0
    assert "sound: 20 pieces" in capsys.readouterr().out

    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert file_tree(path) == file_tree(clean)


def test_repair_also_redoes_a_truncated_chunk_and_a_bad_marker(client, tmp_path, capsys):
    path, clean = str(tmp_path / "k.zarr"), str(tmp_path / "clean.zarr")
    _assemble(client, path)
    _assemble(client, clean)
    store = KernelStore.open(path)
    with open(store.chunk_file("K", 4, 4), "r+b") as f:  # the corner: an edge tile both ways
        f.truncate(100)
    with open(os.path.join(path, "done", "K.0.3"), "w") as f:
        f.write("{not json")
    capsys.readouterr()
    assert main(["verify", "--store", path, "--repair", "--scheduler",
                 client.scheduler.address]) == 0
    out = capsys.readouterr().out
    assert "repaired 2 piece(s)" in out and "K.0.3" in out and "K.4.4" in out
    assert "note: K.0.3" in out  # its marker was unreadable: nothing to compare with
    assert file_tree(path) == file_tree(clean)


def test_recomputation_failures_are_repaired_with_recompute(client, tmp_path, capsys):
    """A tile rewritten with its checksum updated passes the checksum; --recompute finds it
    and --repair --recompute rewrites it from the rows."""
    from ntkdist.store import checksum

    path, clean = str(tmp_path / "k.zarr"), str(tmp_path / "clean.zarr")
    small = ["--data", "gaussian", "--n", "20", "--d", "4", "--depth", "3", "--tile", "10"]
    _assemble(client, path, small)
    _assemble(client, clean, small)
    store = KernelStore.open(path)
    wrong = store.read_tile(0, 1) * 1.001
    store.write_piece("K.0.1", "K", (0, 1), wrong)
    assert store.recorded_checksum("K.0.1") == checksum(wrong)
    capsys.readouterr()
    assert main(["verify", "--store", path, "--repair", "--recompute", "3", "--scheduler",
                 client.scheduler.address]) == 0
    out = capsys.readouterr().out
    assert "repaired 1 piece(s): K.0.1" in out and "note: K.0.1" in out
    assert file_tree(path) == file_tree(clean)


def test_repair_refuses_a_changed_or_missing_input_file(client, tmp_path, capsys):
    data = tmp_path / "x.npy"
    X = np.random.default_rng(4).standard_normal((50, 3))
    np.save(data, X)
    path = str(tmp_path / "k.zarr")
    args = ["--data", str(data), "--depth", "2", "--tile", "20"]
    _assemble(client, path, args)
    _damage(path, "X", (1, 0), 8, np.full(1, 9.0))
    damaged = file_tree(path)
    addr = client.scheduler.address
    X[45, 0] += 1.0  # a row outside the damaged block: the file as a whole is another one
    np.save(data, X)
    capsys.readouterr()
    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 2
    _one_error_line(capsys, "X.1", "has changed", "restore the original file")
    assert file_tree(path) == damaged
    os.remove(data)
    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 2
    _one_error_line(capsys, "no longer exists")
    assert file_tree(path) == damaged
    X[45, 0] -= 1.0
    np.save(data, X)
    assert main(["verify", "--store", path, "--repair", "--scheduler", addr]) == 0
    assert "repaired 1 piece(s): X.1" in capsys.readouterr().out
    assert main(["verify", "--store", path]) == 0


def test_repair_refuses_rows_the_data_source_no_longer_gives(client, tmp_path, capsys,
                                                              monkeypatch):
    """Row blocks are rewritten only with the bytes their markers record: a generator that
    gives other rows (another NumPy, say) stops the repair before anything is written."""
    from ntkdist import assemble as assemble_mod

    path = str(tmp_path / "k.zarr")
    _assemble(client, path)
    _damage(path, "X", (0, 0), 8, np.full(1, 3.0))
    damaged = file_tree(path)
    real = assemble_mod._source_rows
    monkeypatch.setattr(assemble_mod, "_source_rows", lambda store, i: real(store, i) * 1.5)
    capsys.readouterr()
    assert main(["verify", "--store", path, "--repair", "--scheduler",
                 client.scheduler.address]) == 2
    _one_error_line(capsys, "row block 0", "does not match its recorded checksum")
    assert file_tree(path) == damaged


def test_verify_refusals_are_one_line(client, tmp_path, capsys):
    path = str(tmp_path / "k.zarr")
    _assemble(client, path, ["--n", "30", "--d", "4", "--depth", "2", "--tile", "10"])
    before = file_tree(path)
    capsys.readouterr()
    for args in (["--recompute", "-1"], ["--recompute", "-1", "--repair"],
                 ["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:9"]):
        assert main(["verify", "--store", path, *args]) == 2, args
        _one_error_line(capsys)
    assert file_tree(path) == before
    from ntkdist.assemble import verify
    from ntkdist.errors import SpecError

    with pytest.raises(SpecError, match="--recompute must be"):
        verify(path, recompute=-1)


def test_repair_is_refused_while_the_store_is_locked(client, tmp_path, capsys):
    path = str(tmp_path / "k.zarr")
    _assemble(client, path, ["--n", "30", "--d", "4", "--depth", "2", "--tile", "10"])
    _damage(path, "K", (0, 1), 8, np.full(1, 3.0))
    damaged = file_tree(path)
    capsys.readouterr()
    with KernelStore.open(path).lock("assembled"):
        assert main(["verify", "--store", path, "--repair", "--scheduler",
                     client.scheduler.address]) == 2
        _one_error_line(capsys, "is being assembled by process", str(os.getpid()))
    assert file_tree(path) == damaged
