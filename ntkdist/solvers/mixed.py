"""An iterative solve (LOBPCG or Davidson) in two phases: float32 products, then float64.

Given a cheaper, inexact product ``fast_matmat`` (float32 deflated or shifted products,
``matmat_fast`` of the distributed operator, named by :class:`FastProducts`), the solve runs
in two phases
(docs/accuracy.md, "Mixed precision"):

1. **float32**: the solver with ``fast_matmat`` until its values converge, its residuals
   reach a third of the fast products' measured error (:class:`NoiseFloor`) or stall (no
   fall by a tenth in ``MIXED_STALL`` iterations), or four fifths of the products are spent;
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
#: The residuals (on fast products) relative to |λ_k| at which a float32 phase measures its
#: products' error, once (:class:`NoiseFloor`): far above any useful fast product's error
#: (shifted products at N = 100000: 2.7e-5·λ; deflated at N = 8000: 1.4e-6·λ).
NOISE_CHECK = 1e-3
#: A float32 phase ends where its residuals reach its products' measured error divided by
#: this. Its iterations below the error still help the float64 phase (the other Ritz vectors
#: keep converging, the true residual ≈ √(‖r‖² + error²) still falls): at N = 100000, with
#: shifted products, ending at the error itself (‖r‖ = 8.1e-4, true 1.17e-3) left the float64
#: phase 27 passes of 17 s, against 14 after a phase that went on to ‖r‖ = 3.5e-4 (true 9e-4).
NOISE_MARGIN = 3.0
#: Times an iterative solve that stopped certified by its own residuals, but not by the fresh
#: product's, is continued from its block.
RESUMES = 3


class FastProducts:
    """A fast, inexact product V ↦ K·V with the name the solve's record gives it
    (``label``, e.g. "float32 deflated")."""

    def __init__(self, matmat, label: str):
        self.matmat, self.label = matmat, label

    def __call__(self, V):
        return self.matmat(V)


#: Fast products are used only where N · max K_ii stays below this: |K_ij| ≤ max K_ii (K is
#: PSD), so no float32 sum of a product with unit vectors can overflow (float32's 3.4e38).
FLOAT32_SAFE = 1e36


#: ... and only where max K_ii is above this: smaller entries reach float32's subnormals
#: (below 1.2e-38), where its products lose their relative accuracy.
FLOAT32_TINY = 1e-30


def float32_unsafe(diag, n: int) -> str | None:
    """Why float32 products cannot serve a kernel of diagonal ``diag`` (None: they can)."""
    top = float(np.max(diag)) if len(diag) else 0.0
    if top * n >= FLOAT32_SAFE or not np.isfinite(top):
        return (f"no float32 products: the kernel's diagonal reaches {top:.3g}, too close "
                "to the top of float32's range (3.4e38); float64 products throughout")
    if top < FLOAT32_TINY:
        return (f"no float32 products: the kernel's diagonal is at most {top:.3g}, in "
                "float32's subnormal range; float64 products throughout")
    return None


class NonFiniteProducts(ArithmeticError):
    """A fast product came back with an overflow or a NaN (entries beyond float32's range)."""


class Checked:
    """``fast_matmat``, its calls counted, and refused (:class:`NonFiniteProducts`) where a
    product is not finite."""

    def __init__(self, fast_matmat):
        self.fast_matmat, self.calls = fast_matmat, 0

    def __call__(self, V):
        self.calls += 1
        Y = self.fast_matmat(V)
        if not np.all(np.isfinite(Y)):
            raise NonFiniteProducts("a float32 product overflowed")
        return Y


class NoiseFloor:
    """``enough`` for a float32 phase (:class:`ntkdist.solvers.certificate.Iteration`): stop
    where its residuals reach the error of its products.

    The float32 phase iterates with K̃, the operator its products apply, and converges to K̃'s
    eigenpairs; the true residual ‖Kx − θx‖ ≥ ‖(K̃ − K)x‖ − ‖K̃x − θx‖ stops falling once the
    phase's own residual ‖K̃x − θx‖ is well below the error ‖(K̃ − K)x‖. Iterating on there
    spends passes for nothing, as a tight ``tol`` would have the phase do (its own
    certificate at 1e-8 and N = 100000 needs ‖r‖ ≈ 3.5e-5, against an error of 8.4e-4).

    So, the first time the k smallest Ritz pairs' residuals are at most ``NOISE_CHECK``·|λ_k|,
    one float64 product ``matmat`` of those k Ritz vectors measures the error of the phase's
    own product of them, η = max_i ‖(AX)_i − K x_i‖ (AX as the solver holds it: its
    combination of fast products). From then on the phase stops as soon as every one of the
    k residuals is at most η / ``NOISE_MARGIN``, where the true residual has all but stopped
    falling. It decides when the float32 phase ends, never what is certified: that is the
    float64 phase's alone. ``products`` counts the measurement."""

    def __init__(self, matmat, k: int, log=None):
        self.matmat, self.k, self.log = matmat, k, log
        self.error: float | None = None  # η, once measured
        self.products = 0
        self.reached = False

    def __call__(self, X, AX, lam, rnorm) -> bool:
        k = self.k
        r = float(np.max(rnorm[:k]))
        if self.error is None:
            scale = float(np.max(np.abs(lam[:k])))
            if not r <= NOISE_CHECK * scale:  # λ = 0 or NaN never measures: the stall rules
                return False
            V = np.ascontiguousarray(X[:, :k])
            KV = self.matmat(V)
            self.products += 1
            self.error = float(np.max(np.linalg.norm(AX[:, :k] - KV, axis=0)))
            true = float(np.max(np.linalg.norm(KV - V * lam[:k], axis=0)))
            if self.log:
                self.log(f"float32 products' error on the Ritz vectors: {self.error:.2e} "
                         f"(float64 residual {true:.2e}, float32 {r:.2e}); the phase ends "
                         f"where its residuals reach {self.error / NOISE_MARGIN:.2e}")
        self.reached = r <= self.error / NOISE_MARGIN
        return self.reached


def fast_log(log):
    """``log`` for a solve on fast products: its iteration lines (whose bound comes from
    inexact products) say that they certify nothing."""
    if log is None:
        return None
    return lambda m: log(f"{m} (float32 products: no certificate)" if m.startswith("iteration")
                         else m)


def fast_label(fast_matmat) -> str:
    """The record's name of a fast product: its :class:`FastProducts` label, else "float32"."""
    return getattr(fast_matmat, "label", "float32")


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
            log(f"phase 1: {fast_label(fast_matmat)} products")
        cap = max(1, max_products - max(10, max_products // 5))  # keep a fifth for phase 2
        counted, seen = Checked(fast_matmat), [0]
        noise = NoiseFloor(matmat, k, log)

        def phase1_iterate(X, lam, it, products):  # the iterations done, for the record
            seen[0] = it + 1
            if on_iterate is not None:  # the float64 product that measured the error counts
                on_iterate(X, lam, it, products + noise.products)
        try:
            r1 = solver(counted, n, max_products=cap,
                        max_seconds=None if max_seconds is None else 0.8 * max_seconds,
                        X0=X0, log=fast_log(log), stall=MIXED_STALL, on_iterate=phase1_iterate,
                        enough=noise, **common)
        except NonFiniteProducts:  # the float64 phase starts as phase 1 did
            used, done_its = counted.calls + noise.products, seen[0]
            end = {"stopped": "non-finite products", "lambda_1": None, "residual_1": None}
        else:
            used, done_its = r1.products + noise.products, r1.iterations
            if np.all(np.isfinite(r1.ritz_block)):  # else start float64 as phase 1 did
                X0 = r1.ritz_block
            end = {"stopped": ("converged" if r1.converged else
                               "noise floor" if noise.reached else
                               "stalled" if r1.stalled else "limit"),
                   "lambda_1": float(r1.values[0]), "residual_1": float(r1.residuals[0])}
        phases.append({"products": fast_label(fast_matmat), "passes": used,
                       "iterations": done_its, **end, "product_error": noise.error})
        if log:
            start = ("its starting block" if phases[0]["stopped"] == "non-finite products"
                     else "the phase-1 block")
            log(f"phase 2: float64 products from {start} ({phases[0]['stopped']} after "
                f"{used} passes)")
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
