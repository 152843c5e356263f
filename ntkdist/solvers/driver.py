"""One entry point for the eigensolvers, with the accuracy certificate every result carries."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import NtkdistError
from .davidson import davidson_smallest
from .dense import dense_smallest
from .lobpcg import block_size, lobpcg_smallest

METHODS = ("lobpcg", "davidson", "lanczos", "dense")
#: Iterations without a tenth's fall of the residuals that end a float32 phase (its noise
#: floor: plain float32 tiles stall at ‖r‖ = 3.5e-4 at N = 20000, benchmarks/solver.py mixed).
MIXED_STALL = 10


@dataclass
class Eigensolution:
    values: np.ndarray  # (k,)
    vectors: np.ndarray  # (N, k)
    residuals: np.ndarray  # (k,) ‖K v − λ v‖ from a fresh product after the solve
    gaps: np.ndarray  # (k,) distance to the next computed eigenvalue (inf if unknown)
    method: str
    converged: bool
    iterations: int
    solver_seconds: float
    resumed: dict | None = None  # the checkpoint this solve started from (iterations, passes)
    phases: list | None = None  # mixed precision: products and outcome of each phase

    def certificate(self) -> dict:
        """Residual-based bounds on |λ − λ_true| for each λ (see README, 'Accuracy')."""
        res, gaps = self.residuals, self.gaps
        quad = np.where(np.isfinite(gaps) & (gaps > 0), res ** 2 / np.where(gaps > 0, gaps, 1), np.inf)
        scale = np.maximum(np.abs(self.values), 1e-300)
        return {
            "abs_error_bound_residual": [float(v) for v in res],
            "abs_error_bound_kato_temple": [float(v) if np.isfinite(v) else None for v in quad],
            "rel_error_bound_residual": [float(v) for v in res / scale],
            "rel_error_bound_kato_temple": [float(v) if np.isfinite(v) else None
                                            for v in quad / scale],
        }


def smallest_eigenpairs(matmat, n: int, method: str = "lobpcg", k: int = 1, tol: float = 1e-8,
                        block: int | None = None, precond=None, max_products: int = 600,
                        seed: int = 0, dense_matrix=None, scale: float = 0.0,
                        log=None, max_seconds: float | None = None,
                        checkpoint=None, fast_matmat=None) -> Eigensolution:
    """The k smallest eigenpairs of the PSD operator ``matmat`` (N×b ↦ K·V).

    ``lobpcg``: :func:`ntkdist.solvers.lobpcg.lobpcg_smallest` with ``precond``, stopping on
    the k eigenvalues (``davidson``: :func:`ntkdist.solvers.davidson.davidson_smallest`, the
    same interface and stopping rule) (to ``tol`` relative, or to tol·1e-6·``scale`` absolute where λ ≈ 0;
    pass ``scale`` = tr(K)/N). ``lanczos``: ARPACK (``scipy.sparse.linalg.eigsh``, which='SA'),
    unpreconditioned, one product per Lanczos step. ``dense``: ``scipy.linalg.eigh`` on
    ``dense_matrix()``. Residuals are always recomputed with one fresh product.

    ``checkpoint`` (a :class:`ntkdist.solvers.checkpoint.Checkpoint`, LOBPCG and Davidson
    only): start from its saved Ritz block if it holds a usable one, and save the block as
    the solve goes.

    ``fast_matmat`` (LOBPCG and Davidson only): a cheaper, inexact K·V (float32 deflated
    products, :meth:`ntkdist.operator.KernelOperator.matmat_fast`). The solve then runs in two
    phases: with ``fast_matmat`` until converged, stalled at its noise floor (residuals not
    falling by a tenth in ``MIXED_STALL`` iterations) or out of four fifths of the products;
    then with ``matmat`` from the first phase's Ritz block until the float64 products certify
    ``tol``. Values, residuals and the certificate come from ``matmat`` alone.
    """
    t0 = time.perf_counter()
    phases = None  # mixed precision only
    if method == "dense":
        res = dense_smallest(dense_matrix(), k=min(k + 1, n))
        values, vectors = res.values[:k], res.vectors[:, :k]
        gaps = np.append(np.diff(res.values), np.inf)[:k] if len(res.values) > k else np.full(k, np.inf)
        converged, iterations, name = True, 0, res.method
    elif method in ("lobpcg", "davidson"):
        solver = lobpcg_smallest if method == "lobpcg" else davidson_smallest
        block = block_size(n, k, block)
        X0 = checkpoint.load(n, block) if checkpoint is not None else None
        common = dict(k=k, block=block, precond=precond, tol=tol, seed=seed,
                      abs_tol=tol * 1e-6 * scale)
        phases, used, done_its = (None if fast_matmat is None else []), 0, 0

        def saver(X, lam, it, products):  # counts continue across the phases
            checkpoint.save(X, lam, it + done_its, products + used)
        resumed_stage = (checkpoint.resumed or {}).get("stage") if checkpoint is not None else None
        if fast_matmat is not None and resumed_stage != "float64":
            if log:
                log("phase 1: float32 deflated products")
            cap = max(1, max_products - max(10, max_products // 5))  # keep a fifth for phase 2
            r1 = solver(fast_matmat, n, max_products=cap,
                        max_seconds=None if max_seconds is None else 0.8 * max_seconds,
                        X0=X0, log=log, stall=MIXED_STALL,
                        on_iterate=saver if checkpoint is not None else None, **common)
            used, done_its = r1.products, r1.iterations
            if np.all(np.isfinite(r1.block)):  # else start the float64 phase as phase 1 did
                X0 = r1.block
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
        left = None if max_seconds is None else max_seconds - (time.perf_counter() - t0)
        r = solver(matmat, n, max_products=max(1, max_products - used), log=log,
                   max_seconds=left, X0=X0, on_iterate=saver if checkpoint is not None else None,
                   **common)
        if phases is not None:
            phases.append({"products": "float64", "passes": r.products,
                           "iterations": r.iterations,
                           "stopped": "converged" if r.converged else "limit"})
        values, vectors, gaps = r.values, r.vectors, r.gaps
        converged, iterations = r.converged, r.iterations + done_its
        what = ("ntkdist block LOBPCG" if method == "lobpcg"
                else "ntkdist block generalized Davidson, GD+k")
        mixed = ", mixed precision: float32 deflated then float64 products"
        name = (f"{method} ({what}, block {block or 'auto'}, "
                f"{'preconditioned' if precond is not None else 'no preconditioner'}"
                f"{mixed if phases is not None else ''})")
    elif method == "lanczos":
        import scipy.sparse.linalg as sla

        op = sla.LinearOperator((n, n), matvec=lambda v: matmat(v[:, None])[:, 0],
                                matmat=matmat, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        kk = min(k + 1, n - 1)
        # ARPACK's maxiter counts implicit restarts, each of ncv − kk products: cap them so
        # that the products stay within max_products.
        ncv = min(n, max(2 * kk + 1, 20))
        restarts = max(1, (max_products - kk) // max(1, ncv - kk))
        try:
            w, V = sla.eigsh(op, k=kk, which="SA", tol=tol, v0=v0, ncv=ncv, maxiter=restarts)
            converged = True
        except sla.ArpackNoConvergence as exc:
            w, V = exc.eigenvalues, exc.eigenvectors
            converged = False
            if len(w) < k:
                raise NtkdistError(
                    f"lanczos (ARPACK) converged {len(w)} of {k} eigenvalues within "
                    f"--max-products {max_products}; raise it, or use --method davidson or "
                    "lobpcg (preconditioned)") from None
        order = np.argsort(w)
        w, V = w[order], V[:, order]
        values, vectors = w[:k], V[:, :k]
        gaps = np.append(np.diff(w), np.inf)[:k]
        iterations, name = -1, "lanczos (ARPACK eigsh, which='SA', no preconditioner)"
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    seconds = time.perf_counter() - t0
    fresh = matmat(vectors) - vectors * values[None, :]
    return Eigensolution(values=np.asarray(values), vectors=np.asarray(vectors),
                         residuals=np.linalg.norm(fresh, axis=0), gaps=np.asarray(gaps),
                         method=name, converged=converged, iterations=iterations,
                         solver_seconds=seconds,
                         resumed=checkpoint.resumed if checkpoint is not None else None,
                         phases=phases)
