"""Iterative λ_min against the dense reference; preconditioners; operator modes; the CLI."""

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg

import ntkdist
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner

SEED = 6021


def _dense_bottom(K, k):
    return scipy.linalg.eigh(K, subset_by_index=[0, k - 1], eigvals_only=True)


CASES = [
    ("sphere", 1500, 64, 3, 1),
    ("gaussian", 1200, 32, 2, 3),
    ("sphere", 800, 16, 4, 2),
    ("gaussian", 40, 64, 1, 2),
    ("sphere", 4000, 64, 3, 2),
]


@pytest.mark.parametrize("kind, n, d, depth, k, method",
                         [(*c, "lobpcg") for c in CASES]
                         + [(*c, "davidson") for c in CASES if c[1] <= 1500])
def test_iterative_matches_dense(kind, n, d, depth, k, method):
    X = synthetic_rows(kind, d, SEED + n, 0, n)
    K = ntkdist.ntk(X, depth=depth)
    ref = _dense_bottom(K, k)
    P = make_preconditioner("auto", X, depth, "ntk", "paper")
    sol = smallest_eigenpairs(lambda V: K @ V, n, method, k=k, tol=1e-8, precond=P.apply,
                              scale=np.trace(K) / n)
    assert sol.converged
    np.testing.assert_allclose(sol.values, ref, rtol=1e-6)
    direct = np.linalg.norm(K @ sol.vectors - sol.vectors * sol.values, axis=0)
    np.testing.assert_allclose(sol.residuals, direct, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("precond, method", [("nystrom:300", "lobpcg"), ("none", "lobpcg"),
                                             ("harmonic", "lobpcg"), ("none", "davidson"),
                                             ("nystrom:300", "davidson")])
def test_preconditioners_and_nngp(precond, method):
    X = synthetic_rows("sphere", 24, SEED, 0, 600)
    K = ntkdist.nngp(X, depth=3)
    P = make_preconditioner(precond, X, 3, "nngp", "paper")
    # Without a preconditioner (condition ~7000) LOBPCG with a block of 16 certifies 1e-8 in
    # ~2300 products (the gap estimate is the next Ritz value less its residual).
    sol = smallest_eigenpairs(lambda V: K @ V, 600, method, k=1, tol=1e-8, block=16,
                              precond=P.apply, max_products=3000, scale=np.trace(K) / 600)
    assert sol.converged
    assert sol.values[0] == pytest.approx(_dense_bottom(K, 1)[0], rel=1e-6)


def test_harmonic_preconditioner_saves_passes():
    X = synthetic_rows("sphere", 64, SEED, 0, 1500)
    K = ntkdist.ntk(X, depth=3)
    counts = {}
    for name in ("harmonic", "none"):
        P = make_preconditioner(name, X, 3, "ntk", "paper")
        sol = smallest_eigenpairs(lambda V: K @ V, 1500, "lobpcg", tol=1e-6, precond=P.apply,
                                  max_products=400, scale=np.trace(K) / 1500)
        counts[name] = (sol.converged, sol.iterations)
    assert counts["harmonic"][0] and counts["harmonic"][1] < counts["none"][1] / 3


def test_degree_three_features_and_the_degree_kept():
    from ntkdist.solvers.precond import _sym_cube_features, harmonic_plan

    U = np.random.default_rng(SEED).standard_normal((40, 6))
    out = np.empty((56, 40))
    _sym_cube_features(np.ascontiguousarray(U.T), out)
    np.testing.assert_allclose(out.T @ out, (U @ U.T) ** 3, rtol=1e-12, atol=1e-12)
    assert harmonic_plan(100000, 16) == (3, "features")  # rank 969
    assert harmonic_plan(10000, 30) == (3, "features")  # rank 5456
    # rank 5456: N × rank too large at this N, and N × N far too large
    assert harmonic_plan(100000, 30) == (2, None)
    # d = 64: rank 47905 > 6000; N × N float32 held from C(66, 3)/4 = 11440 on, where it
    # fits; harmonic:3 (gram_from ∞) wherever it fits
    assert harmonic_plan(20000, 64, gram_bytes=8e9) == (3, "gram")
    assert harmonic_plan(40000, 64, gram_bytes=8e9) == (3, "gram")
    assert harmonic_plan(40000, 64, gram_bytes=6e9) == (2, None)  # 6.4 GB
    assert harmonic_plan(10000, 64, gram_bytes=8e9) == (2, None)  # below: time not repaid
    assert harmonic_plan(10000, 64, gram_bytes=8e9, gram_from=math.inf) == (3, "gram")
    assert harmonic_plan(300000, 64) == (2, None)
    assert harmonic_plan(1000, 120) == (1, None)  # even degree 2 is over 6000
    assert harmonic_plan(1000, 16, degree=2) == (2, None)
    assert harmonic_plan(10000, 64, degree=2, gram_bytes=8e9) == (2, None)


def test_harmonic_request_reads_precond_once_for_runs_and_studies():
    from ntkdist.solvers.precond import HARMONIC_GRAM_FROM, harmonic_request

    assert harmonic_request("auto", 3) == {"degree": 3, "gram_from": HARMONIC_GRAM_FROM,
                                           "gram_bytes": None}
    assert harmonic_request("harmonic:3", 3)["gram_from"] == math.inf
    assert harmonic_request("harmonic:2", 1)["degree"] == 2  # asked for at depth 1: kept
    assert harmonic_request("auto", 3, device="gpu")["gram_bytes"] == 0.0  # no gram form
    assert harmonic_request("auto", 1) is None  # auto at depth 1: none
    assert harmonic_request("auto", 3, finite=True) is None  # a finite network: Nyström
    assert harmonic_request("nystrom:500", 3) is None


def test_degree_three_in_n_space_is_the_same_model():
    """The gram form (B = cI + a₃(X̂X̂ᵀ)^∘3 factored in float32, the degree ≤ 2 features by
    Woodbury) applies the same model as the degree-3 features, and both are the model's
    inverse s⁻¹D⁻¹(ΦΦᵀ + cI)⁻¹D⁻¹ formed densely in float64."""
    from ntkdist.kernels.taylor import kernel_coefficients
    from ntkdist.solvers.precond import HARMONIC_SHIFT, harmonic

    n, d = 600, 16
    X = synthetic_rows("gaussian", d, SEED, 0, n) * 1.7
    feats = harmonic(X, 3, "ntk", "paper")
    gram = harmonic(X, 3, "ntk", "paper", max_rank=153, gram_bytes=1e9)
    assert (feats.degree, feats.form, gram.degree, gram.form) == (3, "features", 3, "gram")
    assert gram.describe()["degree3_form"] == "gram"
    norms = np.linalg.norm(X, axis=1)
    U = X / norms[:, None]
    a = kernel_coefficients(3, "ntk", 3)
    G = U @ U.T
    c = (3 - a.sum()) * (1 - HARMONIC_SHIFT)
    M = a[0] + a[1] * G + a[2] * G ** 2 + a[3] * G ** 3 + c * np.eye(n)
    R = np.random.default_rng(SEED).standard_normal((n, 5))
    want = np.linalg.solve(M, R / norms[:, None]) / norms[:, None]  # paper: s = 1
    for P in (feats, gram):
        got = P.apply(R.copy())
        assert np.linalg.norm(got - want) < 1e-4 * np.linalg.norm(want), P.form


def test_harmonic_three_asks_for_degree_three_wherever_it_fits():
    """d = 64, N = 600: far below C(66, 3)/4, auto keeps degrees ≤ 2 and harmonic:3 holds
    degree 3 N × N; both certify the dense λ_min, and result.json's description says which."""
    X = synthetic_rows("sphere", 64, SEED, 0, 600)
    K = ntkdist.ntk(X, depth=3)
    ref = _dense_bottom(K, 1)[0]
    forms = {}
    for name in ("auto", "harmonic:3"):
        P = make_preconditioner(name, X, 3, "ntk", "paper")
        sol = smallest_eigenpairs(lambda V: K @ V, 600, "davidson", precond=P.apply,
                                  scale=np.trace(K) / 600)
        assert sol.status == "certified" and sol.values[0] == pytest.approx(ref, rel=1e-8)
        forms[name] = (P.degree, P.describe().get("degree3_form"))
    assert forms == {"auto": (2, None), "harmonic:3": (3, "gram")}


def test_degree_three_in_n_space_falls_back_when_float32_cannot_factor(monkeypatch):
    import ntkdist.solvers.cholesky as chol
    from ntkdist.solvers.precond import harmonic

    monkeypatch.setattr(chol, "_potrf_in_place", lambda K, nb=None: False)
    X = synthetic_rows("sphere", 16, SEED, 0, 300)
    P = harmonic(X, 3, "ntk", "paper", max_rank=153, gram_bytes=1e9)
    assert (P.degree, P.form, P.rank) == (2, None, 153)
    K = ntkdist.ntk(X, depth=3)
    sol = smallest_eigenpairs(lambda V: K @ V, 300, "davidson", precond=P.apply,
                              scale=np.trace(K) / 300)
    assert sol.status == "certified"
    assert sol.values[0] == pytest.approx(_dense_bottom(K, 1)[0], rel=1e-8)


def _davidson_passes(X, names):
    """Davidson's passes to a certified 1e-8 with each preconditioner of ``names``, each
    checked against the dense λ_min: {(degree kept, degree-3 form): passes}."""
    n = len(X)
    K = ntkdist.ntk(X, depth=3)
    ref = _dense_bottom(K, 1)[0]
    passes = {}
    for name in names:
        P = make_preconditioner(name, X, 3, "ntk", "paper")
        count = []
        sol = smallest_eigenpairs(lambda V: count.append(1) or K @ V, n, "davidson",
                                  tol=1e-8, precond=P.apply, max_products=400,
                                  scale=np.trace(K) / n)
        assert sol.status == "certified" and sol.values[0] == pytest.approx(ref, rel=1e-8)
        passes[P.degree, P.form] = len(count)
    return passes


def test_degree_three_in_n_space_halves_the_passes_at_d_32():
    """d = 32: the degree-3 features (rank 6545) are over 6000, so auto holds the block in
    N-space; at N = 2000 (a third of C(34, 3) = 5984) Davidson's passes to a certified 1e-8
    drop (measured 35 → 17 at N = 3000), to the same λ_min."""
    passes = _davidson_passes(synthetic_rows("sphere", 32, SEED, 0, 2000),
                              ("harmonic:2", "auto"))
    assert passes[3, "gram"] < 0.7 * passes[2, None], passes


def test_degree_three_halves_the_passes_where_its_block_bites():
    """d = 16 at N = 3000 (between D_3 = 816 and D_4 = 3876): keeping the degree-3 block
    exactly cuts Davidson's passes to a certified 1e-8 (measured 57 → 29 at N = 4000)."""
    passes = _davidson_passes(synthetic_rows("sphere", 16, SEED, 0, 3000),
                              ("harmonic:2", "harmonic"))
    assert passes[3, "features"] < 0.7 * passes[2, None], passes


@pytest.mark.parametrize("method", ["lobpcg", "davidson"])
def test_duplicate_rows_give_zero(method):
    X = synthetic_rows("sphere", 16, SEED, 0, 300)
    X[200] = X[17]
    K = ntkdist.ntk(X, depth=3)
    P = make_preconditioner("auto", X, 3, "ntk", "paper")
    sol = smallest_eigenpairs(lambda V: K @ V, 300, method, precond=P.apply,
                              scale=np.trace(K) / 300)
    # Not told which rows repeat: λ_min ≈ 0 is below float64's resolution, never "converged".
    assert not sol.converged and sol.status == "below_resolution"
    assert abs(sol.values[0]) < 1e-9 * np.trace(K) / 300
    groups = np.arange(300)
    groups[200] = 17
    sol = smallest_eigenpairs(lambda V: K @ V, 300, method, k=2, precond=P.apply,
                              scale=np.trace(K) / 300, groups=groups)
    assert sol.converged and sol.values[0] == 0.0 and list(sol.exact) == [True, False]
    v = sol.vectors[:, 0]
    assert v[17] == -v[200] and np.count_nonzero(v) == 2
    assert sol.values[1] == pytest.approx(_dense_bottom(K, 2)[1], rel=1e-7)


def test_lanczos_and_dense_methods():
    X = synthetic_rows("gaussian", 10, SEED, 0, 200)
    K = ntkdist.ntk(X, depth=2)
    ref = _dense_bottom(K, 2)
    lan = smallest_eigenpairs(lambda V: K @ V, 200, "lanczos", k=2, tol=1e-10, max_products=5000)
    np.testing.assert_allclose(lan.values, ref, rtol=1e-6)
    den = smallest_eigenpairs(lambda V: K @ V, 200, "dense", k=2, dense_matrix=lambda: K)
    np.testing.assert_allclose(den.values, ref, rtol=1e-12)
    assert den.residuals.max() < 1e-10 * K.max()


def test_operator_modes_agree_and_cli_solve(client, tmp_path, capsys):
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    args = ["--n", "700", "--d", "32", "--depth", "3", "--seed", "4"]
    assert main(["assemble", *args, "--store", store, "--tile", "256", "--scheduler", addr]) == 0
    X = synthetic_rows("sphere", 32, 4, 0, 700)
    ref = _dense_bottom(ntkdist.ntk(X, depth=3), 2)
    results = {}
    for mode in ("store", "memory", "recompute"):
        out = str(tmp_path / mode)
        assert main(["solve", "--store", store, "--out", out, "--operator", mode, "--k", "2",
                     "--scheduler", addr]) == 0
        r = json.load(open(os.path.join(out, "result.json")))
        results[mode] = r
        np.testing.assert_allclose(r["eigenvalues"], ref, rtol=1e-7)
        assert r["operator"] == mode and r["passes"] >= 2 and r["k"] == 2
        assert r["matvecs"] >= r["passes"] and r["preconditioner"]["name"] == "harmonic"
        assert r["preconditioner"]["setup_seconds"] >= 0 and r["converged"]
        v = np.load(os.path.join(out, "eigvec.npy"))
        assert v.shape == (700, 2)
    out = str(tmp_path / "davidson")
    assert main(["solve", "--store", store, "--out", out, "--method", "davidson", "--k", "2",
                 "--scheduler", addr]) == 0
    r = json.load(open(os.path.join(out, "result.json")))
    np.testing.assert_allclose(r["eigenvalues"], ref, rtol=1e-7)
    assert r["method"].startswith("davidson") and r["converged"]
    assert r["operator_memory"]["cached_bytes"] == r["operator_memory"]["tile_bytes"]
    sizes = [256, 256, 188]
    per_pass = sum(sizes[i] * sizes[j] * 8 for i in range(3) for j in range(i, 3))
    assert results["store"]["bytes_read"] == results["store"]["passes"] * per_pass
    assert results["memory"]["bytes_read"] == per_pass
    assert results["recompute"]["bytes_read"] == 0
    out = capsys.readouterr().out
    assert "passes over the kernel" in out


def test_solve_refuses_incomplete_store(client, tmp_path, capsys):
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    assert main(["assemble", "--n", "60", "--d", "8", "--depth", "2", "--store", store,
                 "--tile", "20", "--scheduler", addr]) == 0
    os.remove(os.path.join(store, "done", "K.0.1"))
    capsys.readouterr()
    assert main(["solve", "--store", store, "--out", str(tmp_path / "o"), "--scheduler", addr]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_solver_options_refused(capsys, tmp_path):
    base = ["run", "--n", "50", "--d", "8", "--depth", "2", "--out", str(tmp_path / "o")]
    for extra in (["--k", "0"], ["--tol", "2"], ["--precond", "magic"], ["--precond", "nystrom:x"],
                  ["--block", "0"], ["--method", "power"]):
        assert main([*base, *extra]) == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_run_without_store_recomputes_on_workers(client, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--n", "400", "--d", "16", "--depth", "3", "--method", "lobpcg",
                 "--k", "2", "--scheduler", client.scheduler.address, "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    X = synthetic_rows("sphere", 16, 0, 0, 400)
    np.testing.assert_allclose(r["eigenvalues"], _dense_bottom(ntkdist.ntk(X, depth=3), 2),
                               rtol=1e-7)
    assert r["operator"] == "recompute" and r["bytes_read"] == 0 and r["store"] is None
    assert r["bounds"]["prediction_staircase"]["degree"] == 2
    assert r["bounds"]["lower"] <= r["lambda_min"] <= r["bounds"]["upper_min_diagonal"]
    assert main(["run", "--n", "400", "--d", "16", "--depth", "3", "--operator", "store",
                 "--method", "lobpcg", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("method", ["lobpcg", "davidson"])
def test_time_limit_stops_unconverged_with_fresh_residual(method):
    X = synthetic_rows("sphere", 32, SEED, 0, 500)
    K = ntkdist.ntk(X, depth=3)
    sol = smallest_eigenpairs(lambda V: K @ V, 500, method, tol=1e-12, max_seconds=0.0,
                              scale=np.trace(K) / 500)
    assert not sol.converged and sol.iterations == 0
    assert sol.values[0] >= _dense_bottom(K, 1)[0] * (1 - 1e-12)  # a Ritz value: an upper bound
    direct = np.linalg.norm(K @ sol.vectors - sol.vectors * sol.values, axis=0)
    np.testing.assert_allclose(sol.residuals, direct, rtol=1e-8)


def test_lanczos_keeps_to_the_product_cap_and_fails_in_one_line(client, tmp_path, capsys):
    X = synthetic_rows("sphere", 64, SEED, 0, 1500)
    K = ntkdist.ntk(X, depth=3)
    count = [0]

    def mv(V):
        count[0] += 1
        return K @ V

    with pytest.raises(ntkdist.NtkdistError, match="max-products"):
        smallest_eigenpairs(mv, 1500, "lanczos", k=1, tol=1e-12, max_products=60)
    assert count[0] <= 60 + 20  # ARPACK's restarts stay within the cap (up to one restart)
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    assert main(["assemble", "--n", "1500", "--d", "64", "--depth", "3", "--seed", str(SEED),
                 "--store", store, "--tile", "500", "--scheduler", addr]) == 0
    capsys.readouterr()
    assert main(["solve", "--store", store, "--out", str(tmp_path / "o"), "--method", "lanczos",
                 "--tol", "1e-12", "--max-products", "60", "--scheduler", addr]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
