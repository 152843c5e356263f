"""--precond shift: (K − σI)⁻¹ from a float32 Cholesky factor, σ just below an estimate of
λ_min (ntkdist.solvers.shift), and its two-stage solve in the pipeline."""

import json
import os

import numpy as np
import pytest

import ntkdist
from ntkdist.cli import main
from ntkdist.data import synthetic_rows
from ntkdist.solvers.checkpoint import Checkpoint
from ntkdist.solvers.cholesky import dense_kernel
from ntkdist.solvers.shift import shift_fits, shift_invert, shift_sigma, shifted_kernel
from ntkdist.spec import make_spec

REAL_SHIFT_INVERT = shift_invert


def _rows(n, d, seed=3):
    """Gaussian rows of spread norms (not the sphere): the general case."""
    X = np.random.default_rng(seed).standard_normal((n, d))
    return X * np.exp(np.random.default_rng(seed + 1).uniform(-1, 1, n))[:, None]


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_shifted_kernel_is_the_lower_triangle_of_k_minus_sigma(kind):
    spec = make_spec(n=301, d=7, depth=3, kernel=kind)
    X = _rows(301, 7)
    K = dense_kernel(X, spec.kernel)
    B = shifted_kernel(X, spec.kernel, 0.75, block=64)  # 301 = 4·64 + 45
    assert B.dtype == np.float32 and B.flags.c_contiguous
    want = np.tril(K - 0.75 * np.eye(301))
    np.testing.assert_allclose(np.tril(B), want, rtol=2e-7, atol=2e-7 * np.abs(K).max())


def test_shifted_kernel_less_the_deflation():
    from ntkdist.kernels.taylor import deflation_factor

    spec = make_spec(n=150, d=5, depth=2)
    X = _rows(150, 5)
    F = deflation_factor(X, 2)
    B = shifted_kernel(X, spec.kernel, 0.1, block=32, F=F)
    want = np.tril(dense_kernel(X, spec.kernel) - F @ F.T - 0.1 * np.eye(150))
    np.testing.assert_allclose(np.tril(B), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_shift_invert_applies_the_inverse_of_k_minus_sigma():
    spec = make_spec(n=400, d=9, depth=3)
    X = _rows(400, 9)
    K = dense_kernel(X, spec.kernel)
    lam = np.linalg.eigvalsh(K)[0]
    sigma = 0.9 * lam
    P = shift_invert(X, spec.kernel, sigma)
    assert P is not None and P.name == "shift" and P.describe()["sigma"] == sigma
    R = np.random.default_rng(0).standard_normal((400, 5))
    want = np.linalg.solve(K - sigma * np.eye(400), R)
    got = P.apply(R)
    assert got.dtype == np.float64 and got.shape == (400, 5)
    # float32 factor of a matrix of condition ‖K‖/(λ_min − σ): a loose relative agreement
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)


def test_shift_above_lambda_min_does_not_factor():
    spec = make_spec(n=300, d=9, depth=3)
    X = _rows(300, 9)
    lam = np.linalg.eigvalsh(dense_kernel(X, spec.kernel))[:2]
    assert shift_invert(X, spec.kernel, float(lam.mean())) is None  # K − σI indefinite


def test_sigma_and_memory_rule():
    assert shift_sigma(40.0, 0.1) == pytest.approx(40.0 - 0.4)  # the margin: 1 % of 40
    assert shift_sigma(40.0, 1.0) == pytest.approx(39.0)  # the residual, where larger
    assert shift_fits(1000, max_bytes=4e6) is None
    why = shift_fits(1001, max_bytes=4e6)
    assert why and "float32" in why and "\n" not in why


def test_primed_checkpoint_is_loaded_once_and_is_no_resume(tmp_path):
    ck = Checkpoint(str(tmp_path / "c.npz"), {"n": 50}, every=1e9)
    X = np.linalg.qr(np.random.default_rng(1).standard_normal((50, 6)))[0]
    ck.prime(X, np.arange(6.0), 3, 17)
    assert os.path.exists(ck.path)  # saved at once, whatever ``every``
    np.testing.assert_array_equal(ck.load(50, 4), X[:, :4])
    assert ck.resumed is None
    ck.every = 0.0  # the next stage's snapshots count on from the primed stage's passes
    ck.save(X, np.arange(6.0), 2, 5)
    again = ck.load(50, 6)  # then the file, as a resume would read it
    np.testing.assert_allclose(again, X)
    assert ck.resumed == {"iterations": 5, "passes": 22, "lambda_1": 0.0, "stage": ""}


def _run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    code = main(["run", "--n", "1000", "--d", "16", "--depth", "3", "--seed", "2",
                 "--method", "lobpcg", "--precond", "shift", "--out", out, *extra])
    assert code == 0
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference():
    X = synthetic_rows("sphere", 16, 2, 0, 1000)
    return float(np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0])


def test_shift_run_in_two_stages_certifies_the_dense_value(tmp_path, reference):
    r = _run(tmp_path, "o")
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(reference, rel=1e-8)
    X = synthetic_rows("sphere", 16, 2, 0, 1000)
    two = _run(tmp_path, "k2", "--k", "2", "--method", "davidson")
    np.testing.assert_allclose(two["eigenvalues"],
                               np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[:2], rtol=1e-8)
    assert two["status"] == "certified" and two["preconditioner"]["name"] == "shift"
    p = r["preconditioner"]
    assert p["name"] == "shift" and p["asked"] == "shift"
    assert p["estimate"] >= r["lambda_min"] * (1 - 1e-12)  # a Ritz value: from above
    assert p["sigma"] < reference and p["sigma_tried"] == [p["sigma"]]
    assert p["estimate_passes"] > 0 and p["estimate_seconds"] >= 0


def test_shift_run_with_a_store_counts_both_stages(client, tmp_path, reference):
    store = str(tmp_path / "k.zarr")
    r = _run(tmp_path, "s", "--store", store, "--scheduler", client.scheduler.address)
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(reference, rel=1e-8)
    phases = r["phases"]
    assert phases[0]["stage"] == "shift estimate"
    assert phases[0]["passes"] == r["preconditioner"]["estimate_passes"]
    assert r["passes"] >= sum(ph["passes"] for ph in phases)
    assert not os.path.exists(tmp_path / "s" / "checkpoint.npz")


def test_shift_that_does_not_factor_goes_on_with_the_harmonic_model(tmp_path, monkeypatch,
                                                                   reference, capsys):
    import ntkdist.solvers.shift as shift

    tried = []
    monkeypatch.setattr(shift, "shift_invert", lambda X, k, s, **kw: tried.append(s))
    r = _run(tmp_path, "f")
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(reference, rel=1e-8)
    p = r["preconditioner"]
    assert p["name"] == "harmonic" and p["shift_skipped"] == "K − σI did not factor in float32"
    est = p["estimate"]
    assert len(tried) == 2 and tried[1] == pytest.approx(est - 4 * (est - tried[0]))
    assert "σ lowered" in capsys.readouterr().out


def test_out_of_memory_for_k_minus_sigma_keeps_the_harmonic_model(tmp_path, monkeypatch,
                                                                    reference):
    import ntkdist.solvers.shift as shift

    def no_room(*a, **k):
        raise MemoryError

    monkeypatch.setattr(shift, "shift_invert", no_room)
    r = _run(tmp_path, "m")
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(reference, rel=1e-8)
    p = r["preconditioner"]
    assert p["name"] == "harmonic" and p["shift_skipped"].startswith("out of memory")


def test_shift_skipped_for_repeated_rows(tmp_path):
    X = synthetic_rows("sphere", 8, 1, 0, 300)
    X[200] = X[7]
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "o"
    assert main(["run", "--data", str(tmp_path / "x.npy"), "--n", "300", "--depth", "3",
                 "--method", "lobpcg", "--precond", "shift", "--k", "2",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert r["eigenvalues"][0] == 0 and r["status"] in ("certified", "exact")
    assert "repeat" in r["preconditioner"]["shift_skipped"]


def test_no_factorisation_tried_for_an_estimate_near_zero(tmp_path, monkeypatch):
    """Nearly parallel rows: λ_min ~ 1e-9 of tr(K)/N, far below a float32 factor's reach;
    the run keeps the harmonic model without trying one, and still certifies."""
    import ntkdist.solvers.shift as shift

    monkeypatch.setattr(shift, "shift_invert", lambda *a, **k: pytest.fail("factored"))
    X = synthetic_rows("sphere", 8, 1, 0, 400)
    X[300] = X[11] + 1e-6 * np.random.default_rng(0).standard_normal(8)
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "o"
    assert main(["run", "--data", str(tmp_path / "x.npy"), "--n", "400", "--depth", "3",
                 "--method", "lobpcg", "--precond", "shift", "--out", str(out)]) == 0
    r = json.load(open(out / "result.json"))
    assert "too close to 0" in r["preconditioner"]["shift_skipped"]
    assert r["preconditioner"]["sigma_tried"] == []
    lam = np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0]
    assert r["lambda_min_interval"][0] <= lam <= r["lambda_min_interval"][1]


def test_shift_option_refused_where_it_cannot_apply(tmp_path, capsys):
    base = ["run", "--n", "50", "--d", "8", "--depth", "2", "--out", str(tmp_path / "o")]
    for extra in (["--precond", "shift:2"], ["--precond", "shift", "--kernel", "empirical",
                                             "--widths", "64"]):
        assert main([*base, *extra]) == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_solve_shifted_in_process_saves_passes_over_the_harmonic_model():
    """d = 16, N = 3000 (near D_4 = 3876, LOBPCG block 32): the two-stage solve certifies the
    dense λ_min in fewer passes than its own estimate's preconditioner alone (in process)."""
    from ntkdist.solvers.driver import smallest_eigenpairs
    from ntkdist.solvers.precond import make_preconditioner
    from ntkdist.solvers.shift import solve_shifted

    spec = make_spec(n=3000, d=16, depth=3, seed=7)
    X = spec.rows()
    K = dense_kernel(X, spec.kernel)
    ref = float(np.linalg.eigvalsh(K)[0])
    pre = make_preconditioner("shift", X, 3, "ntk", "paper")
    assert pre.name == "harmonic" and pre.degree == 3 and pre.form == "features"
    counts = {}
    for name in ("harmonic", "shift"):
        used = []

        def matmat(V):
            used.append(1)
            return K @ V

        kw = dict(tol=1e-8, block=32, scale=float(np.trace(K)) / 3000)
        if name == "shift":
            sol, P = solve_shifted(matmat, 3000, "lobpcg", X, spec.kernel, pre, **kw)
            assert P.name == "shift" and P.info["estimate_passes"] < len(used)
        else:
            sol = smallest_eigenpairs(matmat, 3000, "lobpcg", precond=pre.apply, **kw)
        assert sol.status == "certified" and sol.values[0] == pytest.approx(ref, rel=1e-8)
        counts[name] = len(used)
    assert counts["shift"] < counts["harmonic"], counts


def test_killed_while_factoring_then_rerun_resumes_from_the_estimate(client, tmp_path):
    """SIGKILL as the factorisation of K − σI starts: the estimate's Ritz block was saved
    before it, so the rerun resumes from it (its passes counted) and certifies."""
    import signal

    from conftest import spawn_solve

    addr = client.scheduler.address
    store = str(tmp_path / "k.zarr")
    args = ["--n", "3000", "--d", "16", "--depth", "3", "--seed", "3"]
    assert main(["assemble", *args, "--store", store, "--tile", "750",
                 "--scheduler", addr]) == 0
    out = tmp_path / "o"
    solve = ["solve", "--store", store, "--out", str(out), "--precond", "shift",
             "--operator", "store", "--checkpoint-every", "1000"]
    proc = spawn_solve(solve)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "shift-invert, stage 2" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    ck = out / "checkpoint.npz"
    assert ck.exists() and not (out / "result.json").exists(), "".join(seen[-20:])
    with np.load(ck) as f:
        saved = int(f["products"])
    assert saved > 0
    assert main([*solve, "--scheduler", addr]) == 0
    r = json.load(open(out / "result.json"))
    X = synthetic_rows("sphere", 16, 3, 0, 3000)
    assert r["status"] == "certified"
    assert r["lambda_min"] == pytest.approx(np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0],
                                            rel=1e-8)
    assert r["resumed_from_checkpoint"]["passes"] == saved
    assert r["preconditioner"]["name"] == "shift" and not ck.exists()


def test_k_minus_sigma_read_from_the_store_and_formed_where_a_tile_is_damaged(tmp_path):
    from ntkdist.kernels.taylor import deflation_factor
    from ntkdist.solvers.shift import stored_shifted_kernel

    store = str(tmp_path / "k.zarr")
    assert main(["assemble", "--data", "gaussian", "--n", "300", "--d", "7", "--depth", "3",
                 "--seed", "9", "--store", store, "--tile", "128", "--dtype", "float64",
                 "--workers", "1"]) == 0
    spec = make_spec(data="gaussian", n=300, d=7, depth=3, seed=9)
    X = spec.rows()
    F = deflation_factor(X, 3)
    want = np.tril(shifted_kernel(X, spec.kernel, 0.5, F=F))
    np.testing.assert_allclose(np.tril(stored_shifted_kernel(store, 0.5, F)), want,
                               rtol=1e-6, atol=1e-6 * np.abs(want).max())
    lam = float(np.linalg.eigvalsh(dense_kernel(X, spec.kernel))[0])
    R = np.random.default_rng(2).standard_normal((300, 3))
    good = shift_invert(X, spec.kernel, 0.9 * lam, store=store).apply(R)
    chunks = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(store, "K"))
              for f in files if not f.startswith(".") and f != "zarr.json"]
    with open(sorted(chunks)[0], "r+b") as f:  # damage one stored tile
        f.seek(20)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(Exception, match="checksum|damaged|corrupt"):
        stored_shifted_kernel(store, 0.5, F)
    again = shift_invert(X, spec.kernel, 0.9 * lam, store=store)  # formed from the rows
    np.testing.assert_allclose(again.apply(R), good, rtol=1e-3)


def test_sigmas_from_a_prediction_and_from_the_estimate():
    from ntkdist.solvers.shift import SHIFT_PREDICTION_MARGIN as m, shift_sigmas

    plain, why = shift_sigmas(40.0, 1.0)
    assert plain == pytest.approx([39.0, 36.0]) and why is None
    near, why = shift_sigmas(40.0, 1.0, prediction=38.0)  # below λ̃: tried first
    assert why is None
    assert near == pytest.approx([38.0 * (1 - m), 38.0 * (1 - 4 * m), 36.0])
    loose, _ = shift_sigmas(42.0, 4.0, prediction=38.0)  # the estimate's first σ lies above
    assert loose == pytest.approx([38.0 * (1 - m), 38.0 * (1 - 4 * m), 42.0 - 16.0])
    high, why = shift_sigmas(40.0, 1.0, prediction=40.5)  # above an upper bound of λ_1
    assert high == plain and "not below the estimate" in why and "\n" not in why
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        got, why = shift_sigmas(40.0, 1.0, prediction=bad)
        assert got == plain and "not a positive number" in why


def test_the_prediction_places_sigma_only_in_its_measured_domain():
    from ntkdist.predict import predict_lambda_min
    from ntkdist.solvers.shift import trusted_prediction

    p = trusted_prediction("sphere", 5000, 64, 3, "ntk", "paper")
    assert p == predict_lambda_min(5000, 64, 3, "ntk", "paper")["lambda_min"]
    assert trusted_prediction("sphere", 5000, 64, 4, "ntk", "nt") > 0
    for args in (("gaussian", 5000, 64, 3, "ntk"), ("/data/x.npy", 5000, 64, 3, "ntk"),
                 ("sphere", 5000, 32, 3, "ntk"), ("sphere", 5000, 64, 2, "ntk"),
                 ("sphere", 5000, 64, 3, "nngp"), ("sphere", 5000, 64, 3, "empirical")):
        assert trusted_prediction(*args, "paper") is None, args


@pytest.fixture(scope="module")
def shifted_problem():
    spec = make_spec(n=2000, d=16, depth=3, seed=5)
    X = spec.rows()
    K = dense_kernel(X, spec.kernel)
    return spec, X, K, float(np.linalg.eigvalsh(K)[0])


def _solve_with(problem, prediction, monkeypatch, fail=0, **kw):
    """solve_shifted in process with ``prediction``, its first ``fail`` factorisations made
    to fail: (the solve, its preconditioner, its passes, every σ it tried to factor)."""
    import ntkdist.solvers.shift as shift
    from ntkdist.solvers.precond import make_preconditioner

    spec, X, K, ref = problem
    pre = make_preconditioner("shift", X, 3, "ntk", "paper")
    passes, tried = [], []

    def matmat(V):
        passes.append(1)
        return K @ V

    def watched(X, kernel, sigma, **kw):
        tried.append(sigma)
        return None if len(tried) <= fail else REAL_SHIFT_INVERT(X, kernel, sigma, **kw)

    monkeypatch.setattr(shift, "shift_invert", watched)
    kw = {"tol": 1e-8, **kw}
    sol, P = shift.solve_shifted(matmat, 2000, "davidson", X, spec.kernel, pre, block=16,
                                 prediction=prediction, scale=float(np.trace(K)) / 2000, **kw)
    assert sol.products == len(passes)
    if kw["tol"] == 1e-8 and kw.get("max_products", 600) > 100:
        assert sol.status == "certified" and sol.values[0] == pytest.approx(ref, rel=1e-8)
    return sol, P, len(passes), tried


def test_a_close_prediction_places_sigma_and_saves_passes(shifted_problem, monkeypatch):
    from ntkdist.solvers.shift import SHIFT_PREDICTION_MARGIN as m

    ref = shifted_problem[3]
    _, P0, plain, tried0 = _solve_with(shifted_problem, None, monkeypatch)
    assert P0.info["sigma_from"] == "estimate" and "prediction" not in P0.info
    _, P, fewer, tried = _solve_with(shifted_problem, 1.001 * ref, monkeypatch)
    assert tried == [pytest.approx(1.001 * ref * (1 - m))] and P.name == "shift"
    assert P.info["sigma_from"] == "prediction" and P.info["prediction"] == 1.001 * ref
    assert P.info["sigma"] < ref and P.info["sigma"] > tried0[0]  # closer than the estimate's
    assert fewer < plain, (fewer, plain)


def test_a_prediction_too_high_fails_to_factor_and_a_lower_sigma_serves(shifted_problem,
                                                                        monkeypatch):
    from ntkdist.solvers.shift import SHIFT_PREDICTION_MARGIN as m

    ref = shifted_problem[3]
    high = (1 + 2 * m) * ref  # p·(1 − m) lies above λ_1: K − σI is indefinite
    _, P, _, tried = _solve_with(shifted_problem, high, monkeypatch)
    assert P.info["estimate"] > high  # the estimate did not rule it out
    assert tried == pytest.approx([high * (1 - m), high * (1 - 4 * m)])
    assert P.name == "shift" and P.info["sigma_tried"] == tried
    assert P.info["sigma"] == tried[1] < ref and P.info["sigma_from"] == "prediction"


def test_a_prediction_above_the_estimate_is_not_used(shifted_problem, monkeypatch):
    ref = shifted_problem[3]
    _, P, _, tried = _solve_with(shifted_problem, 2.0 * ref, monkeypatch)
    assert "not below the estimate" in P.info["prediction_unused"]
    assert P.info["estimate_passes"] > 2  # the estimate went on past the prediction's pass
    assert P.info["sigma_from"] == "estimate" and tried[0] < ref


def test_a_sphere_run_at_d_64_places_sigma_by_the_prediction(tmp_path):
    from ntkdist.predict import predict_lambda_min
    from ntkdist.solvers.shift import SHIFT_PREDICTION_MARGIN as m

    out = str(tmp_path / "p")
    assert main(["run", "--n", "1200", "--d", "64", "--depth", "3", "--seed", "4",
                 "--method", "davidson", "--precond", "shift", "--out", out]) == 0
    r = json.load(open(os.path.join(out, "result.json")))
    X = synthetic_rows("sphere", 64, 4, 0, 1200)
    ref = float(np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0])
    assert r["status"] == "certified" and r["lambda_min"] == pytest.approx(ref, rel=1e-8)
    p = r["preconditioner"]
    want = predict_lambda_min(1200, 64, 3)["lambda_min"]
    assert p["prediction"] == pytest.approx(want, rel=1e-12)
    assert r["bounds"]["prediction"]["value"] == pytest.approx(want, rel=1e-12)
    assert p["sigma_from"] == "prediction" and p["sigma"] == pytest.approx(want * (1 - m))
    assert p["sigma"] < ref < p["estimate"]


def test_both_sigmas_of_the_prediction_failing_leave_the_estimates(shifted_problem,
                                                                   monkeypatch):
    from ntkdist.solvers.shift import shift_sigmas

    ref = shifted_problem[3]
    _, P, _, tried = _solve_with(shifted_problem, 1.001 * ref, monkeypatch, fail=2)
    want, _ = shift_sigmas(P.info["estimate"], P.info["estimate_residual"], 1.001 * ref)
    assert len(want) == 3 and tried == pytest.approx(want)
    assert P.name == "shift" and P.info["sigma_from"] == "estimate"


def test_an_estimate_judged_at_a_looser_tol_is_not_returned_as_certified(monkeypatch):
    """The prediction's check is judged at 1e-1: with no passes left to go on, a check
    'certified' there must not stand as a solve certified to --tol 5e-2."""
    from types import SimpleNamespace

    import ntkdist.solvers.driver as driver
    import ntkdist.solvers.shift as shift

    calls = []

    def fake(matmat, n, method, tol=1e-8, max_products=600, **kw):
        calls.append(tol)
        return SimpleNamespace(values=np.array([10.0]), residuals=np.array([0.5]),
                               status="certified", products=max_products, iterations=1,
                               ritz_block=None, ritz_values=None, notes=[], phases=None,
                               converged=True, solver_seconds=0.0)

    monkeypatch.setattr(driver, "smallest_eigenpairs", fake)
    monkeypatch.setattr(shift, "shift_invert", lambda *a, **k: None)
    pre = SimpleNamespace(apply=None, degree=2, info=None)
    sol, P = shift.solve_shifted(lambda V: V, 500, "davidson", np.zeros((500, 3)), None, pre,
                                 tol=5e-2, prediction=20.0, max_products=2)
    assert calls[0] == pytest.approx(1e-1)  # the check, judged at 1e-1 and out of passes
    assert len(calls) == 2 and calls[1] == 5e-2  # so the solve went on to the asked tol
    assert "certified to tol" not in (P.info or {}).get("shift_skipped", "")


def test_no_factorisation_where_the_estimate_leaves_no_passes(shifted_problem, monkeypatch):
    sol, P, passes, tried = _solve_with(shifted_problem, 1.001 * shifted_problem[3],
                                        monkeypatch, tol=1e-8, max_products=2)
    assert tried == [] and "no passes left" in P.info["shift_skipped"]
    assert P.name == "harmonic" and passes <= 4 and sol.status != "certified"


def test_an_accurate_start_block_is_not_estimated_again(monkeypatch):
    """A resumed solve's start block may hold a Ritz value within 3e-2 of λ_1 already: with
    the prediction above it, σ comes from it, without more estimate passes."""
    from types import SimpleNamespace

    import ntkdist.solvers.driver as driver
    import ntkdist.solvers.shift as shift

    calls, tried = [], []

    def fake(matmat, n, method, tol=1e-8, max_products=600, **kw):
        calls.append(tol)
        return SimpleNamespace(values=np.array([10.0]), residuals=np.array([0.1]),
                               status="not_converged", products=2, iterations=1,
                               ritz_block=None, ritz_values=None, notes=[], phases=None,
                               converged=False, solver_seconds=0.0)

    monkeypatch.setattr(driver, "smallest_eigenpairs", fake)
    monkeypatch.setattr(shift, "shift_invert", lambda X, k, s, **kw: tried.append(s))
    pre = SimpleNamespace(apply=None, degree=2, info=None)
    shift.solve_shifted(lambda V: V, 500, "davidson", np.zeros((500, 3)), None, pre,
                        tol=1e-8, prediction=10.05)
    assert calls == [pytest.approx(1e-1), 1e-8]  # the check, then the solve: no estimate
    assert tried[0] == pytest.approx(shift.shift_sigma(10.0, 0.1))


def test_bounds_give_no_sphere_prediction_for_rows_from_a_file(tmp_path, capsys):
    X = 1e3 * synthetic_rows("sphere", 8, 1, 0, 200)  # not on the sphere of radius √d
    np.save(tmp_path / "x.npy", X)
    assert main(["bounds", "--data", str(tmp_path / "x.npy"), "--n", "200",
                 "--depth", "3"]) == 0
    out = capsys.readouterr().out
    assert "prediction none" in out and "≈" not in out
    assert main(["bounds", "--n", "200", "--d", "8", "--depth", "3"]) == 0
    assert "prediction λ_min ≈" in capsys.readouterr().out
