"""--certify cholesky: the bracket holds against float64 eigh and 50-digit eigenvalues of the
same matrix, a wrong Ritz value is caught, K is restored between attempts, and the option
works (and is refused) from the command line, a store solve and a study."""

import json
import os

import mpmath
import numpy as np
import pytest

import ntkdist.pipeline as pipeline
from ntkdist.cli import main
from ntkdist.errors import SpecError
from ntkdist.solvers import cholesky as ch
from ntkdist.spec import make_spec

SEED = 7310


def _rows(data, n, d, seed):
    return make_spec(data=data, n=n, d=d, depth=3, seed=seed).rows()


def _kernel(depth=3, kind="ntk"):
    return make_spec(data="sphere", n=10, d=3, depth=depth, kernel=kind).kernel


def test_allowance_is_the_stated_bound():
    n, tr, top = 1000, 123.0, 2.5
    g = (2 * n + 2) * 2.0 ** -53 / (1 - (2 * n + 2) * 2.0 ** -53)
    want = g / (1 - g) * tr + 2.0 ** -53 * top + n * n * 2.0 ** -1022
    got = ch.cholesky_allowance(n, tr, top)
    assert want <= got <= want * (1 + 1e-12)
    assert ch.cholesky_allowance(2 ** 60, 1.0, 1.0) == np.inf  # γ undefined: nothing proved
    assert ch.gamma(2 ** 54) == np.inf


@pytest.mark.parametrize("data,n,d,depth,kind", [
    ("sphere", 400, 8, 3, "ntk"), ("gaussian", 300, 5, 2, "ntk"), ("sphere", 700, 16, 4, "nngp"),
    ("gaussian", 257, 30, 3, "nngp")])
def test_bracket_holds_against_eigh(data, n, d, depth, kind):
    X = _rows(data, n, d, SEED + n)
    kernel = _kernel(depth, kind)
    K = ch.dense_kernel(X, kernel)
    np.testing.assert_array_equal(K, K.T)
    np.testing.assert_allclose(K, kernel.gram(X), rtol=1e-13, atol=1e-13)
    w, V = np.linalg.eigh(K)
    proof = ch.certify_cholesky(K.copy(), w[0], 1e-12 * w[0], V[:, 0])
    assert proof["status"] == "proved", proof
    assert proof["lower"] <= w[0] <= proof["upper"]
    assert proof["upper"] - proof["lower"] < 1e-6 * w[0]  # a tight bracket, not a vacuous one
    assert proof["rayleigh_quotient"] <= proof["upper"]
    assert proof["attempts"][-1]["factorised"]


def test_bracket_holds_in_50_digits():
    """The bracket is about K as formed in float64: its eigenvalue in 50 digits lies inside."""
    X = _rows("gaussian", 36, 4, SEED)
    K = ch.dense_kernel(X, _kernel(3))
    w, V = np.linalg.eigh(K)
    proof = ch.certify_cholesky(K.copy(), w[0], 1e-13, V[:, 0])
    mpmath.mp.dps = 50
    exact = min(mpmath.eigsy(mpmath.matrix(K.tolist()), eigvals_only=True))
    assert proof["status"] == "proved"
    assert mpmath.mpf(proof["lower"]) < exact < mpmath.mpf(proof["upper"])


def test_a_wrong_ritz_value_is_caught_and_k_is_restored_between_attempts():
    X = _rows("sphere", 500, 10, SEED)
    K = ch.dense_kernel(X, _kernel(3))
    w, V = np.linalg.eigh(K)
    work = K.copy()
    proof = ch.certify_cholesky(work, w[2], 1e-12, V[:, 2])  # the third eigenvalue
    assert proof["status"] == "failed" and proof["lower"] is None
    assert len(proof["attempts"]) == ch.ATTEMPTS
    assert not any(a["factorised"] for a in proof["attempts"])
    assert "eigenvalue below" in proof["reason"]
    # the upper end (a Rayleigh quotient) still holds
    assert proof["upper"] >= w[0]
    # between attempts K is rebuilt exactly from its untouched triangle
    work = K.copy()
    diag = np.diagonal(K).copy()
    work[np.diag_indices(500)] -= w[3]
    assert not ch._potrf_in_place(work)
    ch._restore(work, diag)
    np.testing.assert_array_equal(work, K)


@pytest.mark.parametrize("nb", [64, 100])
def test_blocked_factorisation_over_many_blocks(monkeypatch, nb):
    """Blocks of 64 and 100 rows (the default is 2048): the factor, the untouched upper
    triangle, the restore, and the whole bracket against eigh."""
    monkeypatch.setattr(ch, "BLOCK", nb)
    X = _rows("gaussian", 530, 9, SEED)
    K = ch.dense_kernel(X, _kernel(3))
    np.testing.assert_allclose(K, _kernel(3).gram(X), rtol=1e-13, atol=1e-13)
    work = K.copy()
    assert ch._potrf_in_place(work)
    L = np.tril(work)
    np.testing.assert_allclose(L @ L.T, K, rtol=0, atol=1e-12 * np.abs(K).max())
    np.testing.assert_array_equal(np.triu(work, 1), np.triu(K, 1))
    ch._restore(work, np.diagonal(K).copy())
    np.testing.assert_array_equal(work, K)
    w, V = np.linalg.eigh(K)
    proof = ch.certify_cholesky(K.copy(), w[0], 1e-12 * w[0], V[:, 0])
    assert proof["status"] == "proved" and proof["lower"] <= w[0] <= proof["upper"]
    proof = ch.certify_cholesky(K.copy(), w[1], 1e-12 * w[1], V[:, 1])
    assert proof["status"] == "failed"


def test_a_ritz_value_far_below_lambda_min_still_gives_a_true_bound():
    X = _rows("sphere", 300, 12, SEED)
    K = ch.dense_kernel(X, _kernel(3))
    lam = np.linalg.eigvalsh(K)[0]
    proof = ch.certify_cholesky(K.copy(), 0.5 * lam, None)  # no vector: no upper end
    assert proof["status"] == "proved" and proof["upper"] is None
    assert proof["lower"] <= 0.5 * lam


@pytest.mark.parametrize("gap", [1e-9, 1e-14])
def test_nearly_singular_k_proves_nothing_false(gap):
    """Two rows ``gap`` apart: λ_min ~ 5e-9 is bracketed truly; ~1e-14 lies below the
    allowance and nothing above 0 is claimed."""
    X = _rows("sphere", 200, 6, SEED)
    X[1] = X[0] + gap * X[2]
    K = ch.dense_kernel(X, _kernel(3))
    w, V = np.linalg.eigh(K)
    proof = ch.certify_cholesky(K.copy(), max(w[0], 1e-15), 1e-12, V[:, 0])
    eigh_error = 1e-13 * np.abs(w).max()
    if gap > 1e-10:
        assert proof["status"] == "proved"
        assert proof["lower"] <= w[0] + eigh_error and w[0] - eigh_error <= proof["upper"]
    else:
        assert proof["status"] in ("skipped", "failed")
        assert proof["lower"] is None and proof["reason"]


def test_memory_check():
    assert ch.check_memory(1000, available=10 ** 10) is None
    reason = ch.check_memory(100000, available=24 * 10 ** 9)
    assert "at N = 100000" in reason and "24.0 GB are available" in reason and "N ≤" in reason
    n = ch.max_n(24 * 10 ** 9)
    assert ch.check_memory(n, available=24 * 10 ** 9) is None
    assert ch.check_memory(n + 1, available=24 * 10 ** 9) is not None


def test_run_reports_the_bracket(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["run", "--data", "sphere", "--n", "600", "--d", "12", "--depth", "3",
                 "--certify", "cholesky", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "certified bracket" in printed
    r = json.load(open(os.path.join(out, "result.json")))
    lo, hi = r["lambda_min_lower_certified"], r["lambda_min_upper_certified"]
    assert lo <= r["lambda_min"] <= hi and r["status"] == "certified"
    assert r["certify"]["status"] == "proved" and r["spec"]["certify"] == "cholesky"
    X = _rows("sphere", 600, 12, 0)
    lam = np.linalg.eigvalsh(_kernel(3).gram(X))[0]
    assert lo <= lam <= hi


def test_store_solve_with_certify(client, tmp_path):
    addr = client.scheduler.address
    store, out = str(tmp_path / "k.zarr"), str(tmp_path / "s")
    base = ["--data", "gaussian", "--n", "450", "--d", "6", "--depth", "3", "--seed", "3"]
    assert main(["assemble", *base, "--store", store, "--tile", "128", "--dtype", "float32",
                 "--scheduler", addr]) == 0
    assert main(["solve", "--store", store, "--out", out, "--certify", "cholesky",
                 "--tol", "1e-7", "--scheduler", addr]) == 0
    r = json.load(open(os.path.join(out, "result.json")))
    lam = np.linalg.eigvalsh(_kernel(3).gram(_rows("gaussian", 450, 6, 3)))[0]
    # about the float64 K: holds although the solver's products were on float32 tiles
    assert r["certify"]["status"] == "proved"
    assert r["lambda_min_lower_certified"] <= lam <= r["lambda_min_upper_certified"]
    assert any("float32-rounded entries" in note for note in r["notes"])  # what is certified


def test_a_failed_certificate_withdraws_the_solvers_claim(tmp_path, monkeypatch):
    """A solver that reports the second eigenvalue as certified (a missed λ_min): the
    Cholesky step catches it and the result is not certified."""
    real = pipeline.smallest_eigenpairs

    def missing(matmat, n, *args, **kwargs):
        sol = real(matmat, n, *args, **kwargs)
        K = matmat(np.eye(n))
        w, V = np.linalg.eigh(K)
        sol.values, sol.vectors = w[1:2].copy(), V[:, 1:2].copy()
        sol.residuals = np.array([np.linalg.norm(K @ V[:, 1] - w[1] * V[:, 1])])
        return sol

    monkeypatch.setattr(pipeline, "smallest_eigenpairs", missing)
    spec = make_spec(data="sphere", n=300, d=10, depth=3, seed=SEED).with_solver(certify="cholesky")
    r = pipeline.run(spec, str(tmp_path / "r"), log=lambda *a: None)
    assert r.status == "missed" and not r.converged and r.lambda_min is None
    assert r.certify["status"] == "failed" and r.lambda_min_lower_certified is None
    assert any("--certify cholesky" in note for note in r.notes)


def test_a_failed_factorisation_bounds_lambda_min_from_above_and_demotes_the_claim(
        tmp_path, monkeypatch):
    """Near-parallel pairs put many eigenvalues at the bottom. A solver that reports one
    above several others, with a bound too small for it to be λ_min, is caught even where a
    later, lower σ factorises: the failures prove λ_min ≤ σ + allowance (Demmel; Higham,
    Theorem 10.7), a bound that holds against eigh, and the proved bracket is reported."""
    rng = np.random.default_rng(1)
    B = rng.standard_normal((200, 16))
    B *= 4 / np.linalg.norm(B, axis=1, keepdims=True)
    X = np.vstack([B, B + 1e-7 * rng.standard_normal(B.shape)])
    K = ch.dense_kernel(X, _kernel(3))
    w, V = np.linalg.eigh(K)
    j = 4  # the fifth eigenvalue, 20 % above λ_min
    gap = w[j] - w[0]
    assert gap > 0.1 * w[j]
    # an error bound of gap/100: σ = θ − δ₀·8^k fails for k < 3, factorises at k = 3
    proof = ch.certify_cholesky(K.copy(), w[j], gap / 100, V[:, j])
    assert [a["factorised"] for a in proof["attempts"]] == [False, False, False, True]
    assert proof["status"] == "proved" and proof["lower"] <= w[0]
    assert w[0] <= proof["upper_from_failure"] < w[j] - gap / 2
    assert proof["upper"] == proof["upper_from_failure"]
    real = pipeline.smallest_eigenpairs

    def missing(matmat, n, *args, **kwargs):
        sol = real(matmat, n, *args, **kwargs)
        sol.values, sol.vectors = w[j:j + 1].copy(), V[:, j:j + 1].copy()
        sol.residuals = np.array([np.linalg.norm(K @ V[:, j] - w[j] * V[:, j])])
        return sol

    monkeypatch.setattr(pipeline, "smallest_eigenpairs", missing)
    np.save(tmp_path / "x.npy", X)
    spec = make_spec(data=str(tmp_path / "x.npy"), depth=3, method="lobpcg").with_solver(
        certify="cholesky")
    r = pipeline.run(spec, str(tmp_path / "r"), log=lambda *a: None)
    assert r.status == "missed" and not r.converged and r.lambda_min is None
    assert r.lambda_min_interval[0] <= w[0] <= r.lambda_min_interval[1] < w[j]
    assert any("missed a smaller eigenvalue" in note for note in r.notes)


def test_certify_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ch, "available_memory", lambda: 2 * 10 ** 9)
    out = str(tmp_path / "r")
    code = main(["run", "--data", "sphere", "--n", "30000", "--d", "8", "--depth", "2",
                 "--method", "lobpcg", "--certify", "cholesky", "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--certify cholesky holds K" in err[0]
    assert not os.path.exists(out)
    code = main(["run", "--data", "sphere", "--n", "30", "--d", "8", "--depth", "2",
                 "--certify", "qr", "--out", out])
    assert code == 2


def test_certify_leaves_other_specs_hashes_alone():
    spec = make_spec(data="sphere", n=100, d=5, depth=2)
    assert "certify" not in spec.to_dict()
    certified = spec.with_solver(certify="cholesky")
    assert certified.to_dict()["certify"] == "cholesky" and certified.hash() != spec.hash()
    assert certified.problem() == spec.problem()
    with pytest.raises(SpecError, match="certify must be one of"):
        spec.with_solver(certify="lu")


def test_a_study_certifies_its_points_and_refuses_what_cannot_be_held(tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text('[study]\nstorage = "none"\n[data]\nsource = "sphere"\nn = [80, 160]\n'
                     'd = 6\n[kernel]\ndepth = 3\n[solver]\ncertify = "cholesky"\n')
    out = tmp_path / "o"
    assert main(["sweep", str(study), "--out", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2
    for r in rows:
        lam = np.linalg.eigvalsh(_kernel(3).gram(_rows("sphere", int(r["n"]), 6, 0)))[0]
        lo, hi = float(r["lambda_min_lower_certified"]), float(r["lambda_min_upper_certified"])
        assert lo <= lam <= hi and hi - lo < 1e-8 * lam
    big = tmp_path / "big.toml"
    big.write_text('[data]\nsource = "sphere"\nn = 10000000\nd = 8\n[kernel]\ndepth = 2\n'
                   '[solver]\nmethod = "lobpcg"\ncertify = "cholesky"\n[study]\n'
                   'storage = "none"\n')
    capsys.readouterr()
    assert main(["sweep", str(big), "--out", str(tmp_path / "b"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--certify cholesky holds K" in err[0]
