"""Passes to a certified λ_min against N, by method, block and preconditioner, on K held in
this process (the count of products does not depend on the operator that computes them).

    python benchmarks/passes.py --d 16 --n 2000,4000,8000,16000 \\
        --configs "davidson:32:harmonic:2,davidson:32:harmonic"
    python benchmarks/passes.py --d 64 --n 10000,20000 \\
        --configs "lobpcg:32:harmonic,lobpcg:128:harmonic,davidson:32:harmonic"

A config is METHOD:BLOCK:PRECOND (PRECOND as --precond takes it; ``shift`` runs the
two-stage shift-invert solve, its estimate's passes counted; σ from the paper's model where
it is trusted, as a run places it, unless ``--no-prediction``). Sphere rows, L = 3, seed 31,
tol 1e-8 unless given. One line per (N, config): passes, status, λ_min, seconds.

``--spectrum J`` also prints, per N, the J smallest eigenvalues' spread (λ_j/λ_1 − 1 for
j = 2, 17, 33, 65, … ≤ J, by LAPACK's eigh of K) and, for ``shift`` configs, where σ fell
(1 − σ/λ_1) and the shifted stage's rate (λ_1 − σ)/(λ_{b+1} − σ) that it sets:

    python benchmarks/passes.py --d 64 --n 10000 --configs lobpcg:32:shift --spectrum 129
"""

from __future__ import annotations

import argparse
import time

from ntkdist.bounds import upper_bounds
from ntkdist.solvers.cholesky import dense_kernel
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner
from ntkdist.solvers.shift import solve_shifted, trusted_prediction
from ntkdist.spec import make_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, required=True)
    p.add_argument("--n", required=True, help="comma-separated N")
    p.add_argument("--configs", required=True, help="comma-separated METHOD:BLOCK:PRECOND")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--max-products", type=int, default=800)
    p.add_argument("--no-prediction", action="store_true",
                   help="shift configs: σ from the estimate alone (as before the prediction)")
    p.add_argument("--spectrum", type=int, default=0,
                   help="print the spread of the J smallest eigenvalues (dense eigh)")
    args = p.parse_args()
    for n in (int(v) for v in args.n.split(",")):
        spec = make_spec(data="sphere", n=n, d=args.d, depth=args.depth, seed=args.seed)
        X = spec.rows()
        K = dense_kernel(X, spec.kernel)  # block by block: no N² temporaries
        scale = upper_bounds(X, args.depth, "ntk", "paper")["upper_trace_over_n"]
        low = None
        if args.spectrum:
            from scipy.linalg import eigh

            low = eigh(K, eigvals_only=True, subset_by_index=[0, min(args.spectrum, n) - 1])
            marks = [j for j in (2, 17, 33, 65, 129, 257, 513) if j <= low.size]
            print(f"d={args.d} N={n} lambda_1={low[0]:.12g} spread "
                  + " ".join(f"lambda_{j}/lambda_1-1={low[j - 1] / low[0] - 1:.3g}"
                             for j in marks), flush=True)
        prediction = None if args.no_prediction else trusted_prediction(
            "sphere", n, args.d, args.depth, "ntk", "paper")
        for config in args.configs.split(","):
            method, block, precond = config.split(":", 2)
            pre = make_preconditioner(precond, X, args.depth, "ntk", "paper")
            passes = []

            def matmat(V):
                passes.append(1)
                return K @ V

            t = time.perf_counter()
            if precond == "shift":  # the two-stage solve: the estimate's passes counted
                sol, used = solve_shifted(matmat, n, method, X, spec.kernel, pre, tol=args.tol,
                                          block=int(block), max_products=args.max_products,
                                          scale=scale, prediction=prediction)
                what = (f"estimate {used.info.get('estimate_passes')} passes, sigma "
                        f"{used.info.get('sigma', used.info.get('shift_skipped'))} from the "
                        f"{used.info.get('sigma_from')}")
                sigma, b = used.info.get("sigma"), int(block)
                if low is not None and sigma is not None and low.size > b:
                    what += (f", 1-sigma/lambda_1 {1 - sigma / low[0]:.3g}, rate "
                             f"(lambda_1-sigma)/(lambda_{b + 1}-sigma) "
                             f"{(low[0] - sigma) / (low[b] - sigma):.3g}")
            else:
                sol = smallest_eigenpairs(matmat, n, method, k=1, tol=args.tol,
                                          block=int(block), precond=pre.apply,
                                          max_products=args.max_products, scale=scale,
                                          log=lambda *a: None)
                what = f"rank {pre.rank}, degree {pre.degree}"
            print(f"d={args.d} N={n} {method} block={block} precond={precond} "
                  f"({what}) passes={len(passes)} "
                  f"status={sol.status} lambda_min={sol.values[0]:.12g} "
                  f"{time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
