"""An iterative solve (LOBPCG or Davidson) in two phases: float32 products, then float64.

Given a cheaper, inexact product ``fast_matmat`` (float32 deflated products,
``matmat_fast`` of the distributed operator), the solve runs in two phases
(docs/accuracy.md, "Mixed precision"):

1. **float32**: the solver with ``fast_matmat`` until its values converge, its residuals
   stall at the fast product's noise floor (no fall by a tenth in ``MIXED_STALL``
   iterations), or four fifths of the products are spent;
2. **float64**: the solver with ``matmat`` from the first phase's Ritz block, until float64
   products certify ``tol``.

Without ``fast_matmat`` only the float64 phase runs. Either way, the float64 phase ends with
one fresh product of the k + 1 smallest Ritz vectors (:func:`ntkdist.solvers.certificate.judge`):
values, residuals and the certificate come from ``matmat`` alone. If the solver stopped
certified by its own residuals but the fresh product does not certify, it continues from its
block (at most ``RESUMES`` times). A checkpoint records which phase it was saved in, so that
a resumed solve does not go back to float32.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .certificate import certified, judge

#: Iterations without a tenth's fall of the residuals that end a float32 phase (its noise
#: floor: plain float32 tiles stall at ‖r‖ = 3.5e-4 at N = 20000, benchmarks/solver.py mixed).
MIXED_STALL = 10
#: Times an iterative solve that stopped certified by its own residuals, but not by the fresh
#: product's, is continued from its block.
RESUMES = 3


def solve_in_phases(solver, matmat, n: int, k: int, X0: np.ndarray | None, *,
                    fast_matmat=None, checkpoint=None, block: int, precond, tol: float,
                    seed: int, trace: float, project, diag, max_products: int,
                    max_seconds: float | None, t0: float, log=None):
    """Run ``solver`` (:func:`ntkdist.solvers.lobpcg.lobpcg_smallest` or
    :func:`ntkdist.solvers.davidson.davidson_smallest`) in phases, as the module says.

    Returns (the float64 phase's last result, with ``iterations`` and ``products`` counting
    every phase and fresh product and ``phases`` the record of each phase, or None without
    ``fast_matmat``; the fresh product's judgement of its k + 1 smallest Ritz vectors).
    ``max_seconds`` runs from ``t0``; ``checkpoint`` is saved with counts that continue across
    the phases."""
    common = dict(k=k, block=block, precond=precond, tol=tol, seed=seed, trace=trace,
                  project=project, diag=diag)
    phases, used, done_its = (None if fast_matmat is None else []), 0, 0

    def saver(X, lam, it, products):  # counts continue across the phases
        checkpoint.save(X, lam, it + done_its, products + used)
    on_iterate = saver if checkpoint is not None else None
    resumed_stage = (checkpoint.resumed or {}).get("stage") if checkpoint is not None else None
    if fast_matmat is not None and resumed_stage != "float64":
        if log:
            log("phase 1: float32 deflated products")
        cap = max(1, max_products - max(10, max_products // 5))  # keep a fifth for phase 2
        r1 = solver(fast_matmat, n, max_products=cap,
                    max_seconds=None if max_seconds is None else 0.8 * max_seconds,
                    X0=X0, log=log, stall=MIXED_STALL, on_iterate=on_iterate, **common)
        used, done_its = r1.products, r1.iterations
        if np.all(np.isfinite(r1.ritz_block)):  # else start the float64 phase as phase 1 did
            X0 = r1.ritz_block
        phases.append({"products": "float32 deflated", "passes": r1.products,
                       "iterations": r1.iterations,
                       "stopped": ("converged" if r1.converged else
                                   "stalled" if r1.stalled else "limit"),
                       "lambda_1": float(r1.values[0]),
                       "residual_1": float(r1.residuals[0])})
        if log:
            log(f"phase 2: float64 products from the phase-1 block ({phases[0]['stopped']} "
                f"after {r1.products} passes)")
    if checkpoint is not None and fast_matmat is not None:
        checkpoint.stage = "float64"
    start_used, start_its = used, done_its
    for attempt in range(RESUMES + 1):
        left = None if max_seconds is None else max_seconds - (time.perf_counter() - t0)
        r = solver(matmat, n, max_products=max(1, max_products - used), log=log,
                   max_seconds=left, X0=X0, on_iterate=on_iterate, **common)
        used += r.products
        done_its += r.iterations
        V = r.ritz_block[:, :k + 1]
        judged = judge(matmat(V), V, n, trace, diag)
        used += 1
        fresh_ok = certified(judged.values[:k], judged.bounds["best"][:k], tol)
        if fresh_ok or not r.converged or used >= max_products or attempt == RESUMES:
            break
        if log:  # certified by the iteration's residuals, not by the fresh product's
            log("the fresh product does not certify what the iteration did: continuing")
        X0 = r.ritz_block
    if phases is not None:  # the last fresh product is the result's own (+1 in passes)
        phases.append({"products": "float64", "passes": used - start_used - 1,
                       "iterations": done_its - start_its,
                       "stopped": ("converged" if r.converged else "rounding floor"
                                   if r.at_floor else "stalled" if r.stalled else "limit")})
    return dataclasses.replace(r, iterations=done_its, products=used, phases=phases), judged
