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
bounds with their rounding floors (:mod:`ntkdist.solvers.certificate`; the gap δ is
estimated by the next Ritz value of the block less its residual, so the block holds at least
k + 1 vectors), or when the residuals reach their rounding floor, or when λ is too close to 0
for float64 to certify ``tol`` and the residuals stop falling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .certificate import at_floor, certified, error_bounds, floors, gap_estimates, weights


@dataclass
class LobpcgResult:
    values: np.ndarray  # (k,)
    vectors: np.ndarray  # (N, k)
    residuals: np.ndarray  # (k,) ‖A x − λ x‖ from the iteration's A·X
    gaps: np.ndarray  # (k,) estimated gap to the next eigenvalue (NaN: none)
    iterations: int
    products: int  # block products A·V (passes)
    matvecs: int  # columns multiplied
    converged: bool
    restarts: int = 0  # restarts after rounding broke Ritz monotonicity (each costs a product)
    history: list = field(default_factory=list)  # λ_1 per iteration
    block: np.ndarray | None = None  # (N, block) the whole final Ritz block (to start from)
    stalled: bool = False  # stopped because the residuals stopped falling (``stall``)
    block_values: np.ndarray | None = None  # (block,) the Ritz values of ``block``
    at_floor: bool = False  # stopped with the residuals at their rounding floor


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


def _svqb_map(S: np.ndarray, drop: float = 1e-10) -> np.ndarray:
    """T with S·T orthonormal (SVQB, Stathopoulos & Wu 2002), near-dependent directions
    dropped."""
    G = S.T @ S
    d = np.sqrt(np.clip(np.diag(G), 1e-300, None))
    G = G / np.outer(d, d)
    w, V = np.linalg.eigh(G)
    keep = w > drop * w.max()
    return (V[:, keep] / np.sqrt(w[keep])) / d[:, None]


def _svqb(S: np.ndarray, AS: np.ndarray | None, drop: float = 1e-10):
    """Orthonormalise the columns of S (and map AS alike, if given); drop near-dependent
    directions."""
    T = _svqb_map(S, drop)
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


#: Iterations without a tenth's fall of the residuals that end a float64 solve whose λ is too
#: close to 0 for float64 to certify ``tol`` (its rounding floor alone exceeds tol·λ).
HOPELESS_STALL = 20


def _check(R, lam, k: int, tol: float, n: int, trace: float, weight, it: int, t0: float,
           log, products: int, max_products: int, max_seconds: float | None, stall: _Stall,
           hopeless: _Stall):
    """Residual norms, gap estimates, whether the k smallest Ritz values are certified to
    ``tol`` (:mod:`ntkdist.solvers.certificate`), whether the residuals are at their rounding
    floor, and whether to stop (certified, at the floor, stalled, out of products or time, or
    stalled while λ is too close to 0 to be certified); logs every 10 iterations. ``weight``:
    the block's w = (Σ √K_ii |x_i|)² (:func:`ntkdist.solvers.certificate.weights`; None:
    tr(K)), so that the floors are those the final certificate uses."""
    rnorm = np.linalg.norm(R, axis=0)
    floor_q, floor_r = floors(n, trace, weight)
    gaps = gap_estimates(lam, rnorm, floor_r)
    w = None if weight is None else weight[:k]
    bound = error_bounds(rnorm[:k], gaps[:k], n, trace, w)["best"]
    if log and it % 10 == 0:
        log(f"iteration {it}: λ_1 = {lam[0]:.12g}, ‖r_1‖ = {rnorm[0]:.2e}, "
            f"bound {bound[0] / max(abs(lam[0]), 1e-300):.1e} rel, {time.perf_counter() - t0:.0f} s")
    converged = certified(lam[:k], bound, tol)
    floor = not converged and at_floor(rnorm[:k], n, trace, w)
    out_of_time = max_seconds is not None and time.perf_counter() - t0 >= max_seconds
    stalled = not converged and stall(rnorm[:k])
    beyond = (not converged and bool(np.any(np.broadcast_to(floor_q, lam.shape)[:k]
                                            >= tol * lam[:k])) and hopeless(rnorm[:k]))
    return rnorm, gaps, converged, floor, (converged or floor or stalled or beyond
                                           or products >= max_products or out_of_time)


def block_size(n: int, k: int, block: int | None) -> int:
    """The block the solvers use: ``block`` or max(32, 2k+16), at most max(k+1, n/4) and n,
    and at least k + 1 (the gap of the k-th value is estimated from the (k+1)-th).

    A smaller block costs less per pass but needs more passes, the more so the denser the
    bottom of the spectrum: Davidson with block 16 was faster at N = 20000 (102 s against
    119 s) but more slowly per pass to converge at N = 100000 (benchmarks/RESULTS.md)."""
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < n, got k={k}, n={n}")
    block = block or max(32, 2 * k + 16)
    return max(k + 1, min(block, max(k + 1, n // 4), n))


def lobpcg_smallest(matmat, n: int, k: int = 1, block: int | None = None, precond=None,
                    tol: float = 1e-8, max_products: int = 500, seed: int = 0,
                    X0: np.ndarray | None = None, trace: float = 0.0, log=None,
                    max_seconds: float | None = None, on_iterate=None,
                    stall: int | None = None, project=None, diag=None) -> LobpcgResult:
    """The k smallest eigenpairs of a symmetric positive semidefinite operator.

    ``matmat(V)`` returns A·V for an (n, b) float64 block; ``precond(R)`` applies an
    approximation of A⁻¹ (or None). Stops when the k smallest Ritz values are certified to
    ``tol`` (see :func:`_check`; ``trace`` = tr(A) sets the rounding floors), or after
    ``max_products`` block products. ``on_iterate(X, λ, iteration, products)`` is called after
    every iteration that does not stop (checkpoints). ``project(V)`` (or None) maps a block
    onto the subspace the solve is restricted to (an orthogonal projector that commutes with
    A: the complement of a known null space). ``diag``: A's diagonal, for the rounding floors
    of :mod:`ntkdist.solvers.certificate` (None: tr(A) alone).
    """
    block = block_size(n, k, block)
    rng = np.random.default_rng(seed)
    X = _start_block(rng, n, block, precond) if X0 is None else np.array(X0, dtype=np.float64)
    if project is not None:
        X = project(X)
    X, AX, lam = _fresh_ritz(X, matmat)
    products, matvecs = 1, X.shape[1]
    P = AP = None
    history, it, restarts = [], 0, 0
    stalling, hopeless = _Stall(stall), _Stall(HOPELESS_STALL)
    t0 = time.perf_counter()
    while True:
        R = AX - X * lam
        history.append(float(lam[0]))
        rnorm, gaps, converged, floor, stop = _check(
            R, lam, k, tol, n, trace, weights(X, diag), it, t0, log, products, max_products,
            max_seconds, stalling, hopeless)
        if stop:
            break
        if on_iterate is not None:
            on_iterate(X, lam, it, products)
        # Converged directions beyond k keep their place in the basis; all are refined.
        W = precond(R) if precond is not None else R.copy()
        if project is not None:
            W = project(W)
        # Twice against X and P, and again after normalising: W then stays orthogonal to them to
        # working accuracy, so Rayleigh–Ritz needs no ill-conditioned change of basis that
        # would magnify the rounding of the implicitly updated A·X and A·P (Duersch, Shao,
        # Yang & Gu, SIAM J. Sci. Comput. 40, 2018); needed where λ_min is far below ‖K‖.
        for _ in range(2):
            W -= X @ (X.T @ W)
            if P is not None:
                W -= P @ (P.T @ W)
            W, _ = _svqb(W, None)
        AW = matmat(W)
        products += 1
        matvecs += W.shape[1]
        parts = [X, W] if P is None else [X, W, P]
        aparts = [AX, AW] if P is None else [AX, AW, AP]
        S = np.hstack(parts)
        T = _svqb_map(S)
        S, AS = S @ T, np.hstack(aparts) @ T
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
        # The new direction P is the W and P part of the new Ritz vectors (Knyazev's form):
        # no difference Xn − X·coef, whose cancellation would magnify A·X's rounding.
        Y = (T @ C[:, :block])[X.shape[1]:]
        P, AP = np.hstack(parts[1:]) @ Y, np.hstack(aparts[1:]) @ Y
        pn = np.linalg.norm(P, axis=0)
        keep = pn > 1e-12
        P, AP = P[:, keep], AP[:, keep]
        if P.shape[1]:  # orthonormal, so that W −= P(PᵀW) is a projection
            P, AP = _svqb(P, AP)
        if P.shape[1] == 0:
            P = AP = None
        X, AX, lam = Xn, AXn, lam_all[:block]
        it += 1
    return LobpcgResult(values=lam[:k].copy(), vectors=X[:, :k].copy(), residuals=rnorm[:k].copy(),
                        gaps=gaps[:k].copy(), iterations=it, products=products, matvecs=matvecs,
                        converged=converged, restarts=restarts, history=history, block=X,
                        stalled=stalling.stalled or hopeless.stalled,
                        block_values=lam.copy(), at_floor=floor)
