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
                        checkpoint=None) -> Eigensolution:
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
    """
    t0 = time.perf_counter()
    if method == "dense":
        res = dense_smallest(dense_matrix(), k=min(k + 1, n))
        values, vectors = res.values[:k], res.vectors[:, :k]
        gaps = np.append(np.diff(res.values), np.inf)[:k] if len(res.values) > k else np.full(k, np.inf)
        converged, iterations, name = True, 0, res.method
    elif method in ("lobpcg", "davidson"):
        solver = lobpcg_smallest if method == "lobpcg" else davidson_smallest
        block = block_size(n, k, block)
        X0 = checkpoint.load(n, block) if checkpoint is not None else None
        r = solver(matmat, n, k=k, block=block, precond=precond, tol=tol,
                   max_products=max_products, seed=seed, abs_tol=tol * 1e-6 * scale, log=log,
                   max_seconds=max_seconds, X0=X0,
                   on_iterate=checkpoint.save if checkpoint is not None else None)
        values, vectors, gaps = r.values, r.vectors, r.gaps
        converged, iterations = r.converged, r.iterations
        what = ("ntkdist block LOBPCG" if method == "lobpcg"
                else "ntkdist block generalized Davidson, GD+k")
        name = (f"{method} ({what}, block {block or 'auto'}, "
                f"{'preconditioned' if precond is not None else 'no preconditioner'})")
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
                         resumed=checkpoint.resumed if checkpoint is not None else None)
