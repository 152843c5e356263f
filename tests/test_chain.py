"""The bounds chain on Dask workers (ntkdist/chain.py) against the in-memory one."""

import numpy as np
import pytest

import ntkdist
from ntkdist import chain
from ntkdist.bounds import lambda_min_bounds
from ntkdist.chain import lambda_min_bounds_distributed
from ntkdist.data import synthetic_rows
from ntkdist.errors import NtkdistError, SpecError


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def assert_same(expected, got, rtol=1e-12):
    """Same keys and strings; numbers equal to ``rtol`` relative (exact zeros exactly)."""
    a, b = _flat(expected), _flat(got)
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], str):
            assert a[k] == b[k], k
        else:
            assert type(b[k]) is float, k
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=0), k


@pytest.mark.parametrize("kind", ["gaussian", "sphere"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_equals_in_memory_chain(client, kind, depth):
    n, d = 45, 12  # 45 rows: not a multiple of the tile 8
    X = synthetic_rows(kind, d, 100 + depth, 0, n)
    for kernel in ("ntk", "nngp"):
        for normalization in ("paper", "nt"):
            expected = lambda_min_bounds(X, depth, kernel, normalization)
            for tile in (8, 1000):
                got = lambda_min_bounds_distributed(client, X, depth, kernel, normalization,
                                                    tile=tile)
                assert_same(expected, got)


def test_positive_lower_bound_matches(client):
    """Few rows in high dimension: every Gershgorin term is positive, nothing clipped."""
    X = synthetic_rows("gaussian", 400, 5, 0, 13)
    for depth in (1, 2, 4):
        expected = lambda_min_bounds(X, depth)
        assert expected["lower"] > 0
        assert_same(expected, lambda_min_bounds_distributed(client, X, depth, tile=4))


def test_duplicate_rows_and_tiny_n(client):
    X = synthetic_rows("sphere", 16, 1, 0, 30)
    X[7] = X[3]
    X[25] = X[3]  # a duplicate in another row block
    for depth in (1, 3):
        got = lambda_min_bounds_distributed(client, X, depth, tile=7)
        assert got["lower"] == 0.0
        assert_same(lambda_min_bounds(X, depth), got)
    tiny = synthetic_rows("gaussian", 5, 2, 0, 2)
    for depth in (1, 2, 3):
        for tile in (1, None):
            assert_same(lambda_min_bounds(tiny, depth),
                         lambda_min_bounds_distributed(client, tiny, depth, tile=tile))


@pytest.mark.parametrize("kind, n, d, depth, kernel", [
    ("sphere", 60, 16, 3, "ntk"),
    ("gaussian", 40, 64, 2, "ntk"),
    ("sphere", 50, 32, 4, "nngp"),
    ("gaussian", 9, 300, 1, "ntk"),
])
def test_bounds_bracket_dense_lambda_min(client, kind, n, d, depth, kernel):
    X = synthetic_rows(kind, d, 4242 + n, 0, n)
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    lam = np.linalg.eigvalsh(gram(X, depth=depth))[0]
    b = lambda_min_bounds_distributed(client, X, depth, kernel, tile=16)
    assert 0 <= b["lower"] <= lam <= b["upper_min_diagonal"]


def test_layer_groups_and_progress(client, monkeypatch):
    """A tiny client budget: one layer per pass, same numbers; progress per ~10 % of tiles."""
    X = synthetic_rows("gaussian", 10, 3, 0, 37)
    expected = lambda_min_bounds(X, 5)
    lines = []
    monkeypatch.setattr(chain, "CLIENT_BYTES", 1)
    got = lambda_min_bounds_distributed(client, X, 5, tile=6, log=lines.append)
    assert_same(expected, got)
    assert sum("of 28 tiles" in line for line in lines) == 4 * 10  # 4 passes, 28 tiles each
    assert any("pass 4/4" in line and "(100 %)" in line for line in lines)


def test_result_does_not_depend_on_timing(client):
    X = synthetic_rows("sphere", 8, 11, 0, 50)
    runs = [lambda_min_bounds_distributed(client, X, 3, tile=7) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("strip", [1, 3, 32, 500])
def test_tile_strips_equal_whole_tile_powers(monkeypatch, strip):
    """chain_tile's (without numba) and the in-process chain's strips (including a last
    short one, and a diagonal crossing them) give the power sums of the whole tile,
    computed here directly."""
    from ntkdist import bounds
    from ntkdist.bounds import HERMITE_ORDERS
    from ntkdist.kernels import fused
    from ntkdist.kernels.limiting import RowBlock, correlation_layers

    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(bounds, "POWER_STRIP", strip)
    monkeypatch.setattr(chain, "CHAIN_ROWS", 16)  # blocks of 16 rows: 70 = 4 × 16 + 6
    X = synthetic_rows("gaussian", 9, 4, 0, 120)
    norms = np.linalg.norm(X, axis=1)
    blocks = [RowBlock(unit=X[s] / norms[s, None], norms=norms[s])
              for s in (slice(0, 70), slice(70, 120))]
    for A, B, same in ((blocks[0], blocks[1], False), (blocks[0], blocks[0], True)):
        rows, cols = chain.chain_tile(A, B, same, (1, 3))
        P = list(correlation_layers(A, B, 3))
        for k, m in enumerate((1, 3)):
            Q = np.abs(P[m - 1])
            if same:
                np.fill_diagonal(Q, 0.0)
            for q, r in enumerate(HERMITE_ORDERS):
                assert rows[:, k, q] == pytest.approx((Q ** r).sum(axis=1), rel=1e-12)
                if same:
                    assert cols is None
                else:
                    assert cols[:, k, q] == pytest.approx((Q ** r).sum(axis=0), rel=1e-12)
    whole = RowBlock(unit=X / norms[:, None], norms=norms)
    maxima = bounds._max_row_power_sums(whole, 3, (1, 3), 50)  # row blocks of 50, 50, 20
    for m in (1, 3):
        Q = np.abs(list(correlation_layers(whole, whole, 3))[m - 1])
        np.fill_diagonal(Q, 0.0)
        expected = [(Q ** r).sum(axis=1).max() for r in HERMITE_ORDERS]
        assert maxima[m] == pytest.approx(expected, rel=1e-12)


def _failing_tile(*args):
    raise ValueError("boom\non two lines")


def test_failed_task_is_one_line(client, monkeypatch):
    X = synthetic_rows("sphere", 8, 11, 0, 20)
    monkeypatch.setattr(chain, "chain_tile", _failing_tile)
    with pytest.raises(NtkdistError) as err:
        lambda_min_bounds_distributed(client, X, 3, tile=7)
    assert "\n" not in str(err.value) and "boom on two lines" in str(err.value)


def test_lost_rows_are_one_line():
    class Lost:
        status = "lost"

    with pytest.raises(NtkdistError, match="worker was lost"):
        chain._require_blocks([Lost()])


def test_arguments_checked_before_any_work():
    X = synthetic_rows("sphere", 8, 11, 0, 20)
    with pytest.raises(SpecError):
        lambda_min_bounds_distributed(None, X, 0)
    with pytest.raises(SpecError):
        lambda_min_bounds_distributed(None, X, 2, tile=0)
    X[3, 1] = np.nan
    with pytest.raises(NtkdistError, match="non-finite"):
        lambda_min_bounds_distributed(None, X, 2)


def test_runs_above_the_in_process_limit_get_the_chain_from_the_workers(tmp_path, monkeypatch,
                                                                        capsys):
    """`run` (and `bounds`) above BOUNDS_MAX_N compute the chain on the workers, with the
    in-process values (the limit lowered so that a small N crosses it)."""
    import json

    import ntkdist.pipeline as pipeline
    from ntkdist.cli import main

    monkeypatch.setattr(pipeline, "BOUNDS_MAX_N", 100)
    X = synthetic_rows("sphere", 6, 3, 0, 300)
    ref = lambda_min_bounds(X, 3)
    assert main(["run", "--n", "300", "--d", "6", "--depth", "3", "--seed", "3", "--method",
                 "lobpcg", "--workers", "1", "--tile", "128", "--out",
                 str(tmp_path / "r")]) == 0
    got = json.loads((tmp_path / "r" / "result.json").read_text())["bounds"]
    assert got["lower"] == pytest.approx(ref["lower"], rel=1e-12)
    assert "lower-bound chain on the workers" in capsys.readouterr().out
    assert main(["bounds", "--n", "300", "--d", "6", "--depth", "3", "--seed", "3",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"λ_min ≥ {ref['lower']:.6g}" in out
