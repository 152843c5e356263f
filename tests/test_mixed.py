"""Mixed precision: float32 deflated products for the bulk of a solve, float64 to certify."""

import json
import os

import numpy as np
import pytest
import scipy.linalg

import ntkdist
from ntkdist.assemble import assemble
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.errors import NtkdistError
from ntkdist.kernels.limiting import normalization_factor, row_block
from ntkdist.kernels.taylor import deflation_factor
from ntkdist.operator import make_operator
from ntkdist.solvers.checkpoint import Checkpoint
from ntkdist.solvers.davidson import davidson_smallest
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore

SEED = 4409


class Crash(Exception):
    pass


@pytest.mark.parametrize("kind, d, depth, kernel, normalization",
                         [("sphere", 16, 3, "ntk", "paper"), ("gaussian", 24, 2, "nngp", "nt"),
                          ("gaussian", 12, 4, "ntk", "nt")])
def test_deflation_leaves_the_degree_two_and_higher_terms(kind, d, depth, kernel, normalization):
    X = synthetic_rows(kind, d, SEED, 0, 300)
    gram = ntkdist.ntk if kernel == "ntk" else ntkdist.nngp
    K = gram(X, depth=depth, normalization=normalization)
    F = deflation_factor(X, depth, kernel, normalization)
    assert F.shape == (300, d + 1)
    R = K - F @ F.T
    # Independently: the Taylor tail Σ_{r≥2} a_r s D ρ^r D, where the series converges fast.
    blk = row_block(X)
    rho = np.clip(blk.unit @ blk.unit.T, -1, 1)
    a = ntkdist.kernel_coefficients(depth, kernel, 80)
    tail = sum(a[r] * rho ** r for r in range(2, 81))
    tail *= normalization_factor(normalization, d) * np.outer(blk.norms, blk.norms)
    mask = np.abs(rho) < 0.5
    np.fill_diagonal(mask, False)
    np.testing.assert_allclose(R[mask], tail[mask], rtol=0, atol=1e-10 * np.abs(K).max())
    off = ~np.eye(300, dtype=bool)
    assert np.sqrt(np.mean(R[off] ** 2)) < 0.3 * np.sqrt(np.mean(K[off] ** 2))


def _store(client, tmp_path, dtype, n=700, d=24, tile=256):
    path = str(tmp_path / f"k-{dtype}.zarr")
    spec = make_store_spec(make_spec(data="gaussian", n=n, d=d, depth=3, seed=7), tile, dtype)
    assemble(spec, path, client, progress=False)
    return path


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_operator_products(client, tmp_path, dtype):
    path = _store(client, tmp_path, dtype)
    from ntkdist import open_kernel

    K = np.asarray(open_kernel(path).compute(scheduler="threads"), dtype=np.float64)
    V = np.random.default_rng(SEED).standard_normal((700, 5))
    op = make_operator(client, "memory", store=path, precision="mixed")
    assert op.mixed and op.precision == "mixed"
    assert op.deflated_bytes == op.tile_bytes // np.dtype(dtype).itemsize * 4
    exact = K @ V
    np.testing.assert_allclose(op.matmat(V), exact, rtol=1e-12, atol=1e-10)
    fast = op.matmat_fast(V)
    plain = (K.astype(np.float32) @ V.astype(np.float32)).astype(np.float64)
    err, err_plain = np.linalg.norm(fast - exact), np.linalg.norm(plain - exact)
    assert err < 1e-6 * np.linalg.norm(exact) and err < err_plain / 5
    one = op.matmat_fast(V[:, 0])
    assert one.shape == (700,)
    assert np.linalg.norm(one - exact[:, 0]) < 1e-6 * np.linalg.norm(exact[:, 0])
    assert op.passes == 3 and op.passes_fast == 2
    op.close()
    auto = make_operator(client, "auto", store=path, precision="auto")
    assert auto.mode == "memory" and auto.precision == "mixed" and auto.fast_kind == "deflated"
    auto.close()
    plain64 = make_operator(client, "store", store=path, precision="float64")
    assert plain64.precision == "float64" and not plain64.mixed and plain64.fast_kind == ""
    with pytest.raises(NtkdistError, match="mixed"):
        plain64.matmat_fast(V)
    total = sum(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
    # streamed, or kept without room for the float32 copies: the shifted float32 products
    fraction = 1.1 * plain64.tile_bytes / total
    plain64.close()
    for mode, kw in (("store", {}), ("memory", dict(cache_fraction=fraction)),
                     ("auto", dict(cache_fraction=0.3 * fraction))):
        for precision in ("auto", "mixed"):
            op = make_operator(client, mode, store=path, precision=precision, **kw)
            assert op.precision == "mixed" and op.fast_kind == "shifted", (mode, precision)
            assert op.deflated_bytes == 0
            np.testing.assert_allclose(op.matmat(V), exact, rtol=1e-12, atol=1e-10)
            shifted = op.matmat_fast(V)
            err_shifted = np.linalg.norm(shifted - exact)
            assert err_shifted < 1e-6 * np.linalg.norm(exact), (mode, precision)
            assert err_shifted < err_plain / 2, (err_shifted, err_plain)
            assert err < err_shifted  # the deflated copies are the more accurate
            assert np.linalg.norm(op.matmat_fast(V[:, 0]) - exact[:, 0]) < (
                1e-6 * np.linalg.norm(exact[:, 0]))
            assert op.passes == 3 and op.passes_fast == 2
            op.close()
    with pytest.raises(NtkdistError, match="recompute"):
        make_operator(client, "recompute", store=path, precision="mixed")
    if dtype == "float32":  # N below one tile: c from the one (diagonal) tile
        (tmp_path / "small").mkdir()
        small = _store(client, tmp_path / "small", dtype, n=90, d=8, tile=256)
        Ks = np.asarray(open_kernel(small).compute(scheduler="threads"), dtype=np.float64)
        op = make_operator(client, "store", store=small, precision="auto")
        assert op.fast_kind == "shifted" and op.tile == 90
        W = V[:90]
        assert np.linalg.norm(op.matmat_fast(W) - Ks @ W) < 1e-6 * np.linalg.norm(Ks @ W)
        op.close()


def _problem(n=900, d=32, depth=3):
    X = synthetic_rows("sphere", d, SEED + n, 0, n)
    K = ntkdist.ntk(X, depth=depth)
    return X, K, scipy.linalg.eigh(K, subset_by_index=[0, 2], eigvals_only=True)


def _counted(K, fast_op):
    """(count, exact, fast): K·V and ``fast_op``, each call counted in ``count``."""
    count = {"exact": 0, "fast": 0}

    def exact(V):
        count["exact"] += 1
        return K @ V

    def fast(V):
        count["fast"] += 1
        return fast_op(V)

    return count, exact, fast


def test_stall_ends_an_inexact_operator_and_float64_finishes():
    X, K, ref = _problem()
    n = len(K)
    rng = np.random.default_rng(SEED)
    noise = 1e-5 * np.linalg.norm(K, 2)

    def noisy(V):  # an operator with a noise floor far above what tol needs
        return K @ V + noise * rng.standard_normal(V.shape) / np.sqrt(n)

    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    r = davidson_smallest(noisy, n, k=2, block=8, precond=P.apply, tol=1e-12,
                          max_products=400, stall=10)
    assert r.stalled and not r.converged and r.products < 200
    assert r.ritz_block.shape == (n, 8) and r.block == 8
    count, exact, fast = _counted(K, noisy)
    for method in ("lobpcg", "davidson"):
        count.update(exact=0, fast=0)
        sol = smallest_eigenpairs(exact, n, method, k=2, tol=1e-9, block=8, precond=P.apply,
                                  scale=np.trace(K) / n, fast_matmat=fast, max_products=400)
        assert sol.converged and "mixed precision" in sol.method
        np.testing.assert_allclose(sol.values, ref[:2], rtol=1e-9)
        direct = np.linalg.norm(K @ sol.vectors - sol.vectors * sol.values, axis=0)
        np.testing.assert_allclose(sol.residuals, direct, rtol=1e-6, atol=1e-12)
        assert [p["products"] for p in sol.phases] == ["float32", "float64"]
        assert sol.phases[0]["stopped"] == "stalled"
        assert sol.phases[0]["passes"] == count["fast"]
        assert sol.phases[1]["passes"] + 1 == count["exact"]  # + the fresh residual product
        assert count["exact"] < count["fast"]


@pytest.mark.parametrize("method, k", [("lobpcg", 1), ("davidson", 1), ("davidson", 2)])
def test_float32_phase_ends_at_its_products_measured_error(monkeypatch, method, k):
    """Fast products of a fixed perturbed matrix K̃ = K + E converge to K̃'s eigenpairs, never
    stalling; the first phase measures ‖E x‖ once and ends there, saving passes."""
    from ntkdist.solvers import mixed

    X, K, ref = _problem()
    n = len(K)
    E = np.random.default_rng(SEED).standard_normal((n, n))
    E = (E + E.T) / 2
    size = 1e-5 * np.linalg.norm(K, 2)
    Kt = K + size / np.linalg.norm(E, 2) * E  # ‖E x‖ ≈ size / 2 for a spread-out unit x
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    runs, default = {}, mixed.NOISE_CHECK
    for check in (default, 0.0):  # 0: never measured, the phase runs to its end
        monkeypatch.setattr(mixed, "NOISE_CHECK", check)
        count, exact, fast = _counted(K, lambda V: Kt @ V)
        lines = []
        sol = smallest_eigenpairs(exact, n, method, k=k, tol=1e-10, block=8, precond=P.apply,
                                  scale=np.trace(K) / n, fast_matmat=fast, max_products=400,
                                  log=lines.append)
        assert sol.converged
        np.testing.assert_allclose(sol.values, ref[:k], rtol=1e-10)
        assert sol.products == count["exact"] + count["fast"]
        runs[check] = sol, count, lines
    sol, count, lines = runs[default]
    first = sol.phases[0]
    assert first["stopped"] == "noise floor"
    assert first["passes"] == count["fast"] + 1  # + the float64 product that measured it
    assert 0.3 * size < first["product_error"] < 0.7 * size
    assert first["residual_1"] <= first["product_error"] / mixed.NOISE_MARGIN
    assert sum("float32 products' error on the Ritz vectors" in ln for ln in lines) == 1
    old = runs[0.0][0]
    assert old.phases[0]["stopped"] == "converged" and old.phases[0]["product_error"] is None
    assert sol.products < old.products - 5


def test_overflowing_fast_products_hand_over_to_float64():
    X, K, ref = _problem(n=600)
    calls = [0]

    def overflowing(V):  # as float32 products of entries beyond float32's range
        calls[0] += 1
        Y = K @ V
        if calls[0] > 3:
            Y[0, 0] = np.inf
        return Y

    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    lines, saved = [], []

    class Saver:  # the checkpoint's interface, recording what is saved
        resumed, stage = None, ""

        def save(self, X, lam, it, products):
            saved.append((self.stage, it, products))

        def load(self, n, block):
            return None

    sol = smallest_eigenpairs(lambda V: K @ V, len(K), "lobpcg", k=1, tol=1e-9, block=8,
                              precond=P.apply, scale=np.trace(K) / len(K),
                              fast_matmat=overflowing, log=lines.append, checkpoint=Saver())
    assert sol.converged and sol.phases[0]["stopped"] == "non-finite products"
    assert sol.phases[0]["passes"] == 4 and sol.phases[0]["lambda_1"] is None
    assert sol.phases[0]["iterations"] == 3  # the iterations that went on before it
    np.testing.assert_allclose(sol.values[:1], ref[:1], rtol=1e-9)
    assert any("from its starting block (non-finite products after 4" in ln for ln in lines)
    # Saves go on counting across the phases: the float64 phase's continue the first's.
    first = [(it, p) for stage, it, p in saved if stage == ""]
    second = [(it, p) for stage, it, p in saved if stage == "float64"]
    assert first and second and second[0][0] > first[-1][0] and second[0][1] > first[-1][1]


def test_overflow_in_the_shifts_estimate_counts_every_pass():
    """A float32 product that overflows in the shift's first stage hands the solve to float64
    products, with a note, and the passes it spent are counted in the estimate's."""
    from ntkdist.solvers.shift import solve_shifted

    X, K, ref = _problem()
    n = len(K)
    calls = [0]

    def overflowing(V):
        calls[0] += 1
        Y = K @ V
        if calls[0] > 2:
            Y[0, 0] = np.inf
        return Y

    count, exact, fast = _counted(K, overflowing)
    pre = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    kernel = make_spec(data="sphere", n=n, d=32, depth=3).kernel  # X's K: ntk, paper
    sol, P = solve_shifted(exact, n, "davidson", X, kernel, pre, tol=1e-9, block=8,
                           fast_matmat=fast, scale=np.trace(K) / n)
    assert sol.converged and sol.values[0] == pytest.approx(ref[0], rel=1e-9)
    assert count["fast"] == 3 and sol.products == count["exact"] + count["fast"]
    assert P.info["estimate_passes"] > count["fast"]
    assert any("overflowed in the shift's estimate" in note for note in sol.notes)


def test_huge_entries_keep_float64_products(client, tmp_path):
    X = synthetic_rows("gaussian", 8, SEED, 0, 300) * 1e25  # K_ii ~ 1e51: float32 overflows
    path = str(tmp_path / "huge.npy")
    np.save(path, X)
    store, addr = str(tmp_path / "k.zarr"), client.scheduler.address
    assert main(["assemble", "--data", path, "--depth", "3", "--store", store, "--tile", "128",
                 "--scheduler", addr]) == 0
    ref = np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0]
    for operator in ("store", "memory"):
        out = tmp_path / operator
        assert main(["solve", "--store", store, "--out", str(out), "--operator", operator,
                     "--method", "lobpcg", "--scheduler", addr]) == 0
        r = json.load(open(out / "result.json"))
        assert r["precision"] == "float64" and r["phases"] is None
        assert any("no float32 products" in note for note in r["notes"])
        assert r["status"] == "certified" and r["lambda_min"] == pytest.approx(ref, rel=1e-7)


def test_mixed_solve_resumed_in_its_float64_phase_skips_the_first(tmp_path):
    X, K, ref = _problem(n=700)
    n = len(K)
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    K32 = K.astype(np.float32)

    def fast(V):
        return (K32 @ V.astype(np.float32)).astype(np.float64)

    calls = [0]

    def crashing(V):
        calls[0] += 1
        if calls[0] > 3:
            raise Crash
        return K @ V

    path = str(tmp_path / "checkpoint.npz")
    key = {"out_hash": "x", "method": "davidson", "n": n}
    kw = dict(k=2, tol=1e-10, block=8, precond=P.apply, scale=np.trace(K) / n)
    with pytest.raises(Crash):
        smallest_eigenpairs(crashing, n, "davidson", fast_matmat=fast,
                            checkpoint=Checkpoint(path, key, every=0), **kw)
    fast_calls = [0]

    def counting_fast(V):
        fast_calls[0] += 1
        return fast(V)

    ck = Checkpoint(path, key, every=0)
    sol = smallest_eigenpairs(lambda V: K @ V, n, "davidson", fast_matmat=counting_fast,
                              checkpoint=ck, **kw)
    assert sol.resumed["stage"] == "float64" and fast_calls[0] == 0
    assert [p["products"] for p in sol.phases] == ["float64"]
    assert sol.converged
    np.testing.assert_allclose(sol.values, ref[:2], rtol=1e-9)


def test_cli_mixed_precision_agrees_with_float64_and_dense(client, tmp_path, capsys):
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    args = ["--data", "gaussian", "--n", "800", "--d", "32", "--depth", "3", "--seed", "3"]
    assert main(["assemble", *args, "--store", store, "--tile", "256", "--scheduler", addr]) == 0
    X = KernelStore.open(store).array("X")[:]
    ref = scipy.linalg.eigh(ntkdist.ntk(X, depth=3), subset_by_index=[0, 1], eigvals_only=True)
    results = {}
    for precision, operator, precond in (("auto", "auto", "auto"), ("float64", "auto", "auto"),
                                         ("mixed", "store", "auto"), ("shift", "store", "shift")):
        out = str(tmp_path / precision)
        assert main(["solve", "--store", store, "--out", out, "--method", "davidson", "--k", "2",
                     "--precision", "auto" if precision == "shift" else precision,
                     "--operator", operator, "--precond", precond,
                     "--scheduler", addr]) == 0
        r = results[precision] = json.load(open(os.path.join(out, "result.json")))
        np.testing.assert_allclose(r["eigenvalues"], ref, rtol=1e-8)
        assert r["converged"] and r["relative_accuracy_kato_temple"] <= 1e-8
    mixed, plain = results["auto"], results["float64"]
    assert mixed["precision"] == "mixed" and plain["precision"] == "float64"
    assert plain["phases"] is None and mixed["operator"] == "memory"
    assert sum(p["passes"] for p in mixed["phases"]) + 1 == mixed["passes"]
    assert mixed["operator_memory"]["deflated_bytes"] > 0
    assert mixed["phases"][0]["products"] == "float32 deflated"
    shifted = results["mixed"]  # streamed from the store: the shifted float32 products
    assert shifted["precision"] == "mixed" and shifted["operator"] == "store"
    assert shifted["phases"][0]["products"] == "float32 shifted"
    assert shifted["operator_memory"]["deflated_bytes"] == 0
    assert "float32 shifted then float64" in shifted["method"]
    inverted = results["shift"]  # the shift's estimate on the shifted float32 products
    assert inverted["phases"][0]["stage"] == "shift estimate"
    assert [p["products"] for p in inverted["phases"]] == ["float32 shifted", "float32 shifted",
                                                          "float64"]
    assert inverted["preconditioner"]["sigma_tried"]
    printed = capsys.readouterr().out
    assert "mixed precision:" in printed
    # where a float32 phase measured its products' error, the summary says that one of its
    # passes was a float64 one, and the error lies far below the residual it started from
    measured = [p for r in results.values() for p in r["phases"] or () if p.get("product_error")]
    assert measured and all(0 < p["product_error"] < 1e-3 * abs(r["eigenvalues"][0])
                            for r in results.values() for p in r["phases"] or ()
                            if p.get("product_error"))
    assert "measured by one float64 pass of these" in printed
    # float32 iterations' bounds are not certificates, and their lines say so
    assert "(float32 products: no certificate)" in printed
    assert all(("no certificate" in ln) == ln.startswith("iteration") for ln in
               printed.splitlines() if "no certificate" in ln)
    for bad in (["--precision", "mixed", "--operator", "recompute"],
                ["--precision", "mixed", "--method", "lanczos"],
                ["--precision", "half"]):
        out = str(tmp_path / "bad")
        assert main(["solve", "--store", store, "--out", out, "--scheduler", addr, *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, bad
        assert not os.path.exists(out)


def test_repeated_rows_keep_auto_in_float64_and_mixed_still_finds_zero(client, tmp_path):
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((400, 12))
    X[250] = X[7]  # a repeated row: K is singular
    path = str(tmp_path / "rows.npy")
    np.save(path, X)
    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    base = ["run", "--data", path, "--n", "400", "--depth", "3", "--store", store, "--tile",
            "128", "--method", "davidson", "--k", "2", "--scheduler", addr]
    second = np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[1]
    for precision in ("auto", "mixed"):
        out = tmp_path / precision
        assert main([*base, "--out", str(out), "--precision", precision]) == 0
        r = json.load(open(out / "result.json"))
        assert r["singular_expected"] and r["converged"]
        assert r["precision"] == ("float64" if precision == "auto" else "mixed")
        # λ_min = 0 exactly from the repeated row; the next value by the (mixed) solve on
        # the vectors constant over the repeated pair.
        assert r["lambda_min"] == 0.0 and r["accuracy"]["exact_zero"] == [True, False]
        assert r["eigenvalues"][1] == pytest.approx(second, rel=1e-7)
