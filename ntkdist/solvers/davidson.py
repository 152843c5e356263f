"""Block generalized Davidson with the previous Ritz vectors kept at restart (GD+k).

Stathopoulos & McCombs, "Nearly optimal preconditioned methods for Hermitian eigenproblems
under limited memory" (SIAM J. Sci. Comput. 29, 2007; PRIMME's default): the search space
grows by one preconditioned residual block W = M·R per product up to ``basis`` columns (6
blocks by default, so the space is restarted every third iteration), and
restarts to the ``keep`` smallest Ritz vectors plus the previous iteration's Ritz vectors
(which carry the conjugate direction that LOBPCG keeps in P). One product A·W per
iteration, as LOBPCG, but Rayleigh–Ritz sees a larger space, which is what the dense bottom
cluster of an NTK needs. Stops exactly as :func:`ntkdist.solvers.lobpcg.lobpcg_smallest`.
"""

from __future__ import annotations

import time

import numpy as np

from .certificate import weights
from .lobpcg import (HOPELESS_STALL, LobpcgResult, _check, _fresh_ritz, _Stall, _start_block,
                     _svqb, block_size)


class _Basis:
    """The search space V and A·V in preallocated column-major buffers (no copies of the
    whole space when it grows; a restart multiplies into the spare pair and swaps)."""

    def __init__(self, n: int, cols: int):
        self._buf = [np.empty((n, cols), order="F") for _ in range(2)]
        self._abuf = [np.empty((n, cols), order="F") for _ in range(2)]
        self.m = 0

    @property
    def V(self):
        return self._buf[0][:, :self.m]

    @property
    def AV(self):
        return self._abuf[0][:, :self.m]

    def set(self, V, AV):
        self.m = V.shape[1]
        self._buf[0][:, :self.m] = V
        self._abuf[0][:, :self.m] = AV

    def transform(self, Q):
        q = Q.shape[1]
        np.matmul(self.V, Q, out=self._buf[1][:, :q])
        np.matmul(self.AV, Q, out=self._abuf[1][:, :q])
        self._buf.reverse()
        self._abuf.reverse()
        self.m = q

    def append(self, W, AW):
        b = W.shape[1]
        self._buf[0][:, self.m:self.m + b] = W
        self._abuf[0][:, self.m:self.m + b] = AW
        self.m += b


def _orthonormalize_against(V, W, passes: int = 2):
    """W with V's span removed (classical Gram–Schmidt, twice), then orthonormalised."""
    for _ in range(passes):
        W = W - V @ (V.T @ W)
    return _svqb(W, None)[0]


def davidson_smallest(matmat, n: int, k: int = 1, block: int | None = None, precond=None,
                      tol: float = 1e-8, max_products: int = 500, seed: int = 0,
                      X0: np.ndarray | None = None, trace: float = 0.0, log=None,
                      max_seconds: float | None = None, on_iterate=None,
                      basis: int | None = None, keep: int | None = None,
                      stall: int | None = None, project=None, diag=None) -> LobpcgResult:
    """The k smallest eigenpairs of a symmetric PSD operator; arguments as LOBPCG's, plus
    the largest search space ``basis`` (default 6·block) and the Ritz vectors ``keep``
    at restart (default 2·block; the previous iteration's block is kept as well)."""
    block = block_size(n, k, block)
    basis = min(basis or 6 * block, n)
    keep = min(keep or 2 * block, basis - 2 * block) if basis >= 3 * block else block
    rng = np.random.default_rng(seed)
    X = _start_block(rng, n, block, precond) if X0 is None else np.array(X0, dtype=np.float64)
    if project is not None:
        X = project(X)
    space = _Basis(n, basis)
    Xf, AXf, lam = _fresh_ritz(X, matmat)
    space.set(Xf, AXf)
    H, C = np.diag(lam), np.eye(block)  # projected matrix, its eigenvectors
    prev = None  # the previous iteration's Ritz vectors, as coefficients on V
    products, matvecs, restarts, it = 1, block, 0, 0
    history = []
    stalling, hopeless = _Stall(stall), _Stall(HOPELESS_STALL)
    t0 = time.perf_counter()
    while True:
        X, AX = space.V @ C[:, :block], space.AV @ C[:, :block]
        theta = lam[:block]
        R = AX - X * theta
        history.append(float(theta[0]))
        rnorm, gaps, converged, floor, stop = _check(
            R, theta, k, tol, n, trace, weights(X, diag), it, t0, log, products,
            max_products, max_seconds, stalling, hopeless)
        if stop:
            break
        if on_iterate is not None:
            on_iterate(X, theta, it, products)
        if space.m + block > basis:  # restart: smallest Ritz vectors + the previous ones
            Q = C[:, :keep]
            if prev is not None:
                extra = _svqb(prev - Q @ (Q.T @ prev), None)[0]
                Q = np.hstack([Q, extra])
            space.transform(Q)
            H = Q.T @ H @ Q
            H = (H + H.T) / 2
            lam, C = np.linalg.eigh(H)
            prev = None
        W = precond(R) if precond is not None else R.copy()
        if project is not None:
            W = project(W)
        W = _orthonormalize_against(space.V, W)
        if W.shape[1] == 0:  # the space is invariant: nothing new to add
            break
        AW = matmat(W)
        products += 1
        matvecs += W.shape[1]
        b = W.shape[1]
        VAW = space.V.T @ AW
        WAW = W.T @ AW
        H = np.block([[H, VAW], [VAW.T, (WAW + WAW.T) / 2]])
        space.append(W, AW)
        prev = np.vstack([C[:, :block], np.zeros((b, block))])
        lam_new, C_new = np.linalg.eigh(H)
        scale = max(abs(lam_new[-1]), 1e-300)
        if lam_new[0] > theta[0] + 1e-10 * scale or lam_new[0] < -1e-8 * scale:
            # The space contains the previous Ritz vectors, so λ_1 cannot rise (nor fall below
            # 0): rounding in the implicitly updated A·V broke down. Restart from X afresh.
            Xf, AXf, lam = _fresh_ritz(X, matmat)
            space.set(Xf, AXf)
            H, C, prev = np.diag(lam), np.eye(block), None
            products += 1
            matvecs += block
            restarts += 1
            it += 1
            continue
        lam, C = lam_new, C_new
        it += 1
    return LobpcgResult(values=theta[:k].copy(), vectors=X[:, :k].copy(),
                        residuals=rnorm[:k].copy(), gaps=gaps[:k].copy(), iterations=it,
                        products=products, matvecs=matvecs, converged=converged,
                        restarts=restarts, history=history, block=X,
                        stalled=stalling.stalled or hopeless.stalled,
                        block_values=theta.copy(), at_floor=floor)
