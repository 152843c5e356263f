"""Block LOBPCG for the smallest eigenvalues that stops on the eigenvalues asked for.

Knyazev's locally optimal block preconditioned conjugate gradient (SIAM J. Sci. Comput. 23,
2001), in the basis-orthonormalised form: each iteration does one block product A·W with
W = M·R (preconditioned residuals of the block), orthonormalises [X, W, P] by SVQB
(Stathopoulos & Wu 2002; directions with tiny singular values are dropped), and takes the
Rayleigh–Ritz solution; P = X_new − X_old (X_oldᵀ X_new) needs no product. A·X and A·P are
updated by the same combinations, so one pass over the matrix per iteration.

Why not ``scipy.sparse.linalg.lobpcg``: it stops only when every vector of the block has a
small residual. The bottom of an NTK's spectrum is a dense cluster, where eigenvectors
converge far more slowly than eigenvalues (the solver benchmarks); this one stops when the
k smallest Ritz values are certified to ``tol`` relative by the residual and Kato–Temple
bounds with their rounding floors (the gap δ is estimated by the next Ritz value of the
block less its residual, so the block holds at least k + 1 vectors), or when the residuals
reach their rounding floor, or when λ is too close to 0 for float64 to certify ``tol`` and the
residuals stop falling. That stopping rule, and the Rayleigh–Ritz pieces this solver shares
with Davidson, are in :mod:`ntkdist.solvers.certificate`.
"""

from __future__ import annotations

import numpy as np

from .certificate import (Iteration, block_size, broke_down, fresh_ritz, initial_block,
                          next_directions, ritz, svqb, svqb_map)
from .result import EigenResult


def lobpcg_smallest(matmat, n: int, k: int = 1, block: int | None = None, precond=None,
                    tol: float = 1e-8, max_products: int = 500, seed: int = 0,
                    X0: np.ndarray | None = None, trace: float = 0.0, log=None,
                    max_seconds: float | None = None, on_iterate=None,
                    stall: int | None = None, project=None, diag=None,
                    enough=None) -> EigenResult:
    """The k smallest eigenpairs of a symmetric positive semidefinite operator.

    ``matmat(V)`` returns A·V for an (n, b) float64 block; ``precond(R)`` applies an
    approximation of A⁻¹ (or None). Stops when the k smallest Ritz values are certified to
    ``tol`` (:class:`ntkdist.solvers.certificate.Iteration`; ``trace`` = tr(A) sets the
    rounding floors), or after ``max_products`` block products, or when the residuals have not
    fallen by a tenth in ``stall`` iterations (None: never). ``on_iterate(X, λ, iteration,
    products)`` is called after every iteration that does not stop (checkpoints).
    ``project(V)`` (or None) maps a block onto the subspace the solve is restricted to (an
    orthogonal projector that commutes with A: the complement of a known null space).
    ``diag``: A's diagonal, for the rounding floors of :mod:`ntkdist.solvers.certificate`
    (None: tr(A) alone). ``enough(X, AX, λ, ‖r‖)`` (or None) stops the solve when true
    (:class:`ntkdist.solvers.certificate.Iteration`).
    """
    block = block_size(n, k, block)
    X = initial_block(n, block, precond, seed, X0, project)
    X, AX, lam = fresh_ritz(X, matmat)
    P = AP = None
    state = Iteration(n, k, tol, trace, diag, log, max_products, max_seconds, stall, X.shape[1],
                      on_iterate, enough)
    while True:
        R, stop = state.check(X, AX, lam)
        if stop:
            break
        # Converged directions beyond k keep their place in the basis; all are refined.
        W = next_directions(R, precond, project)
        # Twice against X and P, and again after normalising: W then stays orthogonal to them to
        # working accuracy, so Rayleigh–Ritz needs no ill-conditioned change of basis that
        # would magnify the rounding of the implicitly updated A·X and A·P (Duersch, Shao,
        # Yang & Gu, SIAM J. Sci. Comput. 40, 2018); needed where λ_min is far below ‖K‖.
        for _ in range(2):
            W -= X @ (X.T @ W)
            if P is not None:
                W -= P @ (P.T @ W)
            W, _ = svqb(W)
        AW = matmat(W)
        state.product(W.shape[1])
        parts = [X, W] if P is None else [X, W, P]
        aparts = [AX, AW] if P is None else [AX, AW, AP]
        S = np.hstack(parts)
        T = svqb_map(S)
        S, AS = S @ T, np.hstack(aparts) @ T
        lam_all, C = ritz(S.T @ AS)
        if broke_down(lam_all, lam, max(abs(lam_all[-1]), abs(lam[-1]))):
            # The basis contains X: restart from X with a fresh product and no P.
            X, AX, lam = fresh_ritz(X, matmat)
            state.restart(X.shape[1])
            P = AP = None
            continue
        Xn, AXn = S @ C[:, :block], AS @ C[:, :block]
        # The new direction P is the W and P part of the new Ritz vectors (Knyazev's form):
        # no difference Xn − X·coef, whose cancellation would magnify A·X's rounding.
        Y = (T @ C[:, :block])[X.shape[1]:]
        P, AP = np.hstack(parts[1:]) @ Y, np.hstack(aparts[1:]) @ Y
        pn = np.linalg.norm(P, axis=0)
        keep = pn > 1e-12
        P, AP = P[:, keep], AP[:, keep]
        if P.shape[1]:  # orthonormal, so that W −= P(PᵀW) is a projection
            P, AP = svqb(P, AP)
        if P.shape[1] == 0:
            P = AP = None
        X, AX, lam = Xn, AXn, lam_all[:block]
        state.iterations += 1
    return state.result("lobpcg", X, lam, block)
