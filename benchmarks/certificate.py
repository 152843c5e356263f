"""Hard inputs for the certificate: what each method reports, and at what cost.

    python benchmarks/certificate.py

Each case runs the command line (`ntkdist run … --workers 1`) into a temporary folder and
compares result.json with an independent reference: float64 `eigvalsh` of the kernel, or,
for rows of very different norms, 1/‖(D L)⁻¹‖² from the Cholesky factor L of the unit-row
kernel. Also times the lower-bound chain at depth 1000.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ntkdist  # noqa: E402
from ntkdist.bounds import lambda_min_bounds  # noqa: E402
from ntkdist.cli import main  # noqa: E402
from ntkdist.data import NEAR_PARALLEL_DISTANCE, check_rows, near_parallel_pairs  # noqa: E402


def _scaled_reference(X, depth):
    norms = np.linalg.norm(X, axis=1)
    L = np.linalg.cholesky(ntkdist.ntk(X / norms[:, None], depth=depth))
    return 1.0 / np.linalg.norm(np.linalg.solve(L, np.diag(1.0 / norms)), 2) ** 2


def _moved_pairs():
    """500 rows of norm 4 in d = 16 and a copy of each moved by 1e-7, or by 1e-5."""
    crng = np.random.default_rng(1)
    base = crng.standard_normal((500, 16))
    base *= 4 / np.linalg.norm(base, axis=1, keepdims=True)
    return {s: np.vstack([base, base + s * crng.standard_normal(base.shape)])
            for s in (1e-7, 1e-5)}


def cases(rng):
    good = rng.standard_normal((200, 8))
    norms = good.copy()
    norms[:100] *= 1e6
    norms[100:] *= 1e-6
    near = good.copy()
    near[1] = near[0] + 1e-9 * rng.standard_normal(8)
    dup = rng.standard_normal((1500, 8))
    dup[5], dup[700] = dup[3], dup[10]
    eig = lambda X: np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[0]  # noqa: E731
    moved = _moved_pairs()
    cluster = [
        ("500 pairs moved by 1e-7, N = 1000", moved[1e-7], ["--method", "lobpcg", "--tol", "1e-6"]),
        ("500 pairs moved by 1e-7, N = 1000", moved[1e-7],
         ["--method", "lobpcg", "--tol", "5e-2", "--certify", "cholesky"]),
        ("500 pairs moved by 1e-5, N = 1000", moved[1e-5], ["--method", "lobpcg", "--tol", "1e-6"]),
        ("500 pairs moved by 1e-5, N = 1000", moved[1e-5],
         ["--method", "davidson", "--tol", "1e-6"]),
    ]
    return [
        ("200 Gaussian rows, --block 1", good, ["--method", "lobpcg", "--block", "1"], eig),
        ("200 Gaussian rows, --block 1", good, ["--method", "davidson", "--block", "1"], eig),
        ("5 Gaussian rows", good[:5], ["--method", "lobpcg"], eig),
        ("rows ×1e6 and ×1e-6", norms, [], lambda X: _scaled_reference(X, 3)),
        ("rows ×1e6 and ×1e-6", norms, ["--method", "lobpcg"], lambda X: _scaled_reference(X, 3)),
        ("x and x + 1e-9·noise", near, ["--method", "lobpcg"], eig),
        ("x and x + 1e-9·noise", near, ["--method", "davidson"], eig),
        ("two repeated rows, N = 1500", dup, ["--method", "lobpcg"], lambda X: 0.0),
        ("two repeated rows, N = 1500, k = 3", dup, ["--method", "lobpcg", "--k", "3"],
         lambda X: np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))[2]),
        ("two repeated rows, N = 1500, --dedupe", dup, ["--method", "lobpcg", "--dedupe"],
         lambda X: eig(np.delete(X, [5, 700], axis=0))),
    ] + [(name, X, extra, eig) for name, X, extra in cluster]


def _sci(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def run_case(folder, name, X, extra, reference, index):
    path = os.path.join(folder, f"x{index}.npy")
    np.save(path, X)
    out = os.path.join(folder, f"o{index}")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["run", "--data", path, "--depth", "3", "--workers", "1", "--out", out,
                     *extra])
    seconds = time.perf_counter() - t0
    r = json.load(open(os.path.join(out, "result.json")))
    ref = reference(X)
    k = r["k"]
    value = r["eigenvalues"][k - 1] if k > 1 else r["lambda_min"]
    bound = r["accuracy"]["abs_error_bound"][k - 1]
    err = None if value is None else abs(value - ref)
    holds = "-" if err is None or not r["converged"] else ("yes" if err <= bound else "NO")
    method = r["method"].split(" (")[0].split(":")[0]
    shown = "null" if value is None else f"{value:.6g}"
    print(f"| {name} | {' '.join(extra) or '(default)'} | {code} | {method} | {r['status']} | "
          f"{shown} | {r['eigenvalues_computed'][k - 1]:.6g} | {ref:.6g} | "
          f"{_sci(None if err is None else err / max(abs(ref), 1e-300))}"
          f" | {_sci(r['accuracy']['rel_error_bound'][k - 1])}"
          f" | {holds} | {r['passes'] if r['passes'] is not None else '-'} | {seconds:.1f} |",
          flush=True)


def main_():
    rng = np.random.default_rng(0)
    print("| input | options | exit | method | status | λ reported | λ computed | reference "
          "| true rel. error | rel. bound | bound holds | passes | seconds |")
    print("|" + " --- |" * 13)
    with tempfile.TemporaryDirectory(prefix="ntkdist-cert-") as folder:
        for index, (name, X, extra, reference) in enumerate(cases(rng)):
            run_case(folder, name, X, extra, reference, index)
    X = ntkdist.data.synthetic_rows("sphere", 8, 0, 0, 200)
    t0 = time.perf_counter()
    b = lambda_min_bounds(X, 1000, "ntk")
    print(f"\nlower-bound chain, N = 200, d = 8, depth 1000: {time.perf_counter() - t0:.1f} s "
          f"(lower = {b['lower']:.4g})")
    for s, X in _moved_pairs().items():
        w = np.linalg.eigvalsh(ntkdist.ntk(X, depth=3))
        print(f"500 pairs moved by {s:g}: {len(check_rows(X).near_pairs)} found within "
              f"{NEAR_PARALLEL_DISTANCE:g}; {int(np.sum(w < 2 * w[0]))} eigenvalues below "
              f"2·λ_min, λ_2 {w[1] / w[0] - 1:.1%} above λ_min")
    prng = np.random.default_rng(2)
    for n, d in ((300000, 64), (200000, 784)):
        U = prng.standard_normal((n, d))
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        t0 = time.perf_counter()
        near_parallel_pairs(U)
        print(f"nearly parallel pair scan, N = {n}, d = {d}: {time.perf_counter() - t0:.2f} s")
        del U


if __name__ == "__main__":
    main_()
