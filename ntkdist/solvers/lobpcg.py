"""Block LOBPCG for the smallest eigenvalues that stops on the eigenvalues asked for.

Knyazev's locally optimal block preconditioned conjugate gradient (SIAM J. Sci. Comput. 23,
2001), in the basis-orthonormalised form: each iteration does one block product A·W with
W = M·R (preconditioned residuals of the block), orthonormalises [X, W, P] by SVQB
(Stathopoulos & Wu 2002; directions with tiny singular values are dropped), and takes the
Rayleigh–Ritz solution; P = X_new − X_old (X_oldᵀ X_new) needs no product. A·X and A·P are
updated by the same combinations, so one pass over the matrix per iteration.

Why not ``scipy.sparse.linalg.lobpcg``: it stops only when every vector of the block has a
small residual. The bottom of an NTK's spectrum is a dense cluster, where eigenvectors
converge far more slowly than eigenvalues (peers.md); this driver stops when the k smallest
Ritz values are certified to ``tol`` relative by the residual bounds

    |λ − λ_true| ≤ ‖r‖                    (any symmetric A, unit x)
    0 ≤ λ − λ_true ≤ ‖r‖²/δ               (Kato–Temple, δ = gap to the rest of the spectrum)

with δ estimated by the next Ritz value of the block, and reports both bounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LobpcgResult:
    values: np.ndarray  # (k,)
    vectors: np.ndarray  # (N, k)
    residuals: np.ndarray  # (k,) ‖A x − λ x‖ from the iteration's A·X
    gaps: np.ndarray  # (k,) Ritz gap to the next Ritz value in the block
    iterations: int
    products: int  # block products A·V (passes)
    matvecs: int  # columns multiplied
    converged: bool
    restarts: int = 0  # restarts after rounding broke Ritz monotonicity (each costs a product)
    history: list = field(default_factory=list)  # λ_1 per iteration
    block: np.ndarray | None = None  # (N, block) the whole final Ritz block (to start from)
    stalled: bool = False  # stopped because the residuals stopped falling (``stall``)


class _Stall:
    """Whether the k smallest residual norms have stopped falling: no fall by a tenth for
    ``window`` iterations (an inexact operator's noise floor; None: never)."""

    def __init__(self, window: int | None):
        self.window, self.best, self.since, self.stalled = window, np.inf, 0, False

    def __call__(self, rnorm: np.ndarray) -> bool:
        r = float(np.max(rnorm))
        if r < 0.9 * self.best:
            self.best, self.since = r, 0
        else:
            self.since += 1
        self.stalled = self.window is not None and self.since >= self.window
        return self.stalled


def _svqb(S: np.ndarray, AS: np.ndarray | None, drop: float = 1e-10):
    """Orthonormalise the columns of S (and map AS alike, if given); drop near-dependent
    directions."""
    G = S.T @ S
    d = np.sqrt(np.clip(np.diag(G), 1e-300, None))
    G = G / np.outer(d, d)
    w, V = np.linalg.eigh(G)
    keep = w > drop * w.max()
    T = (V[:, keep] / np.sqrt(w[keep])) / d[:, None]
    return S @ T, (None if AS is None else AS @ T)


def _start_block(rng, n: int, block: int, precond):
    """A random block (seeded), through the preconditioner if there is one: M is positive
    definite, so every eigenvector keeps a nonzero component, and the directions the
    preconditioner models (the top of the spectrum) start damped (one pass fewer at N=20000)."""
    X = rng.standard_normal((n, block))
    return X if precond is None else precond(X)


def _fresh_ritz(X: np.ndarray, matmat):
    """Rayleigh–Ritz on span(X) with a fresh product: Ritz vectors, A times them, values."""
    X, _ = np.linalg.qr(X)
    AX = matmat(X)
    H = X.T @ AX
    lam, C = np.linalg.eigh((H + H.T) / 2)
    return X @ C, AX @ C, lam


def _check(R, lam, k: int, tol: float, abs_tol: float, it: int, t0: float, log,
           products: int, max_products: int, max_seconds: float | None, stall: _Stall):
    """Residual norms, Ritz gaps, whether the k smallest Ritz values meet
    min(‖r‖, ‖r‖²/δ) ≤ max(tol·|λ|, abs_tol), and whether to stop (converged, stalled, or out
    of products or time); logs every 10 iterations."""
    rnorm = np.linalg.norm(R, axis=0)
    gaps = np.append(np.diff(lam), np.inf)
    bound = np.minimum(rnorm[:k], rnorm[:k] ** 2 / np.where(gaps[:k] > 0, gaps[:k], np.inf))
    if log and it % 10 == 0:
        log(f"iteration {it}: λ_1 = {lam[0]:.12g}, ‖r_1‖ = {rnorm[0]:.2e}, "
            f"bound {bound[0] / max(abs(lam[0]), 1e-300):.1e} rel, {time.perf_counter() - t0:.0f} s")
    converged = bool(np.all(bound <= np.maximum(tol * np.abs(lam[:k]), abs_tol)))
    out_of_time = max_seconds is not None and time.perf_counter() - t0 >= max_seconds
    stalled = not converged and stall(rnorm[:k])
    return rnorm, gaps, converged, (converged or stalled or products >= max_products
                                    or out_of_time)


def block_size(n: int, k: int, block: int | None) -> int:
    """The block the solvers use: ``block`` or max(32, 2k+16), at most max(k, n/4) and n.

    A smaller block costs less per pass but needs more passes, the more so the denser the
    bottom of the spectrum: Davidson with block 16 was faster at N = 20000 (102 s against
    119 s) but more slowly per pass to converge at N = 100000 (benchmarks/RESULTS.md)."""
    block = block or max(32, 2 * k + 16)
    block = min(block, max(k, n // 4), n)
    if not 1 <= k <= block:
        raise ValueError(f"need 1 <= k <= block <= n, got k={k}, block={block}, n={n}")
    return block


def lobpcg_smallest(matmat, n: int, k: int = 1, block: int | None = None, precond=None,
                    tol: float = 1e-8, max_products: int = 500, seed: int = 0,
                    X0: np.ndarray | None = None, abs_tol: float = 0.0, log=None,
                    max_seconds: float | None = None, on_iterate=None,
                    stall: int | None = None) -> LobpcgResult:
    """The k smallest eigenpairs of a symmetric positive semidefinite operator.

    ``matmat(V)`` returns A·V for an (n, b) float64 block; ``precond(R)`` applies an
    approximation of A⁻¹ (or None). Stops when, for each of the k smallest Ritz pairs,
    min(‖r‖, ‖r‖²/δ) ≤ max(tol·|λ|, abs_tol), or after ``max_products`` block products
    (``abs_tol`` lets a singular matrix, λ ≈ 0, stop). ``on_iterate(X, λ, iteration,
    products)`` is called after every iteration that does not stop (checkpoints).
    """
    block = block_size(n, k, block)
    rng = np.random.default_rng(seed)
    X = _start_block(rng, n, block, precond) if X0 is None else np.array(X0, dtype=np.float64)
    X, AX, lam = _fresh_ritz(X, matmat)
    products, matvecs = 1, X.shape[1]
    P = AP = None
    history, it, restarts = [], 0, 0
    stalling = _Stall(stall)
    t0 = time.perf_counter()
    while True:
        R = AX - X * lam
        history.append(float(lam[0]))
        rnorm, gaps, converged, stop = _check(R, lam, k, tol, abs_tol, it, t0, log, products,
                                              max_products, max_seconds, stalling)
        if stop:
            break
        if on_iterate is not None:
            on_iterate(X, lam, it, products)
        # Converged directions beyond k keep their place in the basis; all are refined.
        W = precond(R) if precond is not None else R.copy()
        W -= X @ (X.T @ W)
        if P is not None:
            W -= P @ (P.T @ W)
        W, _ = _svqb(W, None)
        AW = matmat(W)
        products += 1
        matvecs += W.shape[1]
        parts = [X, W] if P is None else [X, W, P]
        aparts = [AX, AW] if P is None else [AX, AW, AP]
        S, AS = _svqb(np.hstack(parts), np.hstack(aparts))
        H = S.T @ AS
        lam_all, C = np.linalg.eigh((H + H.T) / 2)
        scale = max(abs(lam_all[-1]), abs(lam[-1]), 1e-300)
        if lam_all[0] > lam[0] + 1e-10 * scale or lam_all[0] < -1e-8 * scale:
            # The basis contains X, so the smallest Ritz value cannot rise (nor fall below 0
            # for a PSD operator): rounding in the implicitly updated A·X, A·P broke down.
            # Restart from X with a fresh product and no P.
            X, AX, lam = _fresh_ritz(X, matmat)
            products += 1
            matvecs += X.shape[1]
            P = AP = None
            restarts += 1
            it += 1
            continue
        Xn, AXn = S @ C[:, :block], AS @ C[:, :block]
        coef = X.T @ Xn
        P, AP = Xn - X @ coef, AXn - AX @ coef
        pn = np.linalg.norm(P, axis=0)
        keep = pn > 1e-8
        P, AP = P[:, keep] / pn[keep], AP[:, keep] / pn[keep]
        if P.shape[1] == 0:
            P = AP = None
        X, AX, lam = Xn, AXn, lam_all[:block]
        it += 1
    return LobpcgResult(values=lam[:k].copy(), vectors=X[:, :k].copy(), residuals=rnorm[:k].copy(),
                        gaps=gaps[:k].copy(), iterations=it, products=products, matvecs=matvecs,
                        converged=converged, restarts=restarts, history=history, block=X,
                        stalled=stalling.stalled)
