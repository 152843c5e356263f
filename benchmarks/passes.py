"""Passes to a certified λ_min against N, by method, block and preconditioner, on K held in
this process (the count of products does not depend on the operator that computes them).

    python benchmarks/passes.py --d 16 --n 2000,4000,8000,16000 \\
        --configs "davidson:32:harmonic:2,davidson:32:harmonic"
    python benchmarks/passes.py --d 64 --n 10000,20000 \\
        --configs "lobpcg:32:harmonic,lobpcg:128:harmonic,davidson:32:harmonic"

A config is METHOD:BLOCK:PRECOND (PRECOND as --precond takes it; ``shift`` runs the
two-stage shift-invert solve, its estimate's passes counted). Sphere rows, L = 3,
seed 31, tol 1e-8 unless given. One line per (N, config): passes, status, λ_min, seconds.
"""

from __future__ import annotations

import argparse
import time

from ntkdist.bounds import upper_bounds
from ntkdist.solvers.cholesky import dense_kernel
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner
from ntkdist.solvers.shift import solve_shifted
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
    args = p.parse_args()
    for n in (int(v) for v in args.n.split(",")):
        spec = make_spec(data="sphere", n=n, d=args.d, depth=args.depth, seed=args.seed)
        X = spec.rows()
        K = dense_kernel(X, spec.kernel)  # block by block: no N² temporaries
        scale = upper_bounds(X, args.depth, "ntk", "paper")["upper_trace_over_n"]
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
                                          scale=scale)
                what = (f"estimate {used.info['estimate_passes']} passes, sigma "
                        f"{used.info.get('sigma', used.info.get('shift_skipped'))}")
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
