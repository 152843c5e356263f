"""Block generalized Davidson with the previous Ritz vectors kept at restart (GD+k).

Stathopoulos & McCombs, "Nearly optimal preconditioned methods for Hermitian eigenproblems
under limited memory" (SIAM J. Sci. Comput. 29, 2007; PRIMME's default): the search space
grows by one preconditioned residual block W = M·R per product up to ``basis`` columns (6
blocks by default, so the space is restarted every third iteration), and
restarts to the ``keep`` smallest Ritz vectors plus the previous iteration's Ritz vectors
(which carry the conjugate direction that LOBPCG keeps in P). One product A·W per
iteration, as LOBPCG, but Rayleigh–Ritz sees a larger space, which is what the dense bottom
cluster of an NTK needs. Stops exactly as :func:`ntkdist.solvers.lobpcg.lobpcg_smallest`:
the stopping rule and the Rayleigh–Ritz pieces both share are in
:mod:`ntkdist.solvers.certificate`.
"""

from __future__ import annotations

import numpy as np

from .certificate import (Iteration, block_size, broke_down, fresh_ritz, initial_block,
                          next_directions, svqb)
from .result import EigenResult


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
    return svqb(W)[0]


def davidson_smallest(matmat, n: int, k: int = 1, block: int | None = None, precond=None,
                      tol: float = 1e-8, max_products: int = 500, seed: int = 0,
                      X0: np.ndarray | None = None, trace: float = 0.0, log=None,
                      max_seconds: float | None = None, on_iterate=None,
                      basis: int | None = None, keep: int | None = None,
                      stall: int | None = None, project=None, diag=None,
                      enough=None) -> EigenResult:
    """The k smallest eigenpairs of a symmetric PSD operator; arguments as LOBPCG's, plus
    the largest search space ``basis`` (default 6·block) and the Ritz vectors ``keep``
    at restart (default 2·block; the previous iteration's block is kept as well)."""
    block = block_size(n, k, block)
    basis = min(basis or 6 * block, n)
    keep = min(keep or 2 * block, basis - 2 * block) if basis >= 3 * block else block
    X = initial_block(n, block, precond, seed, X0, project)
    space = _Basis(n, basis)
    Xf, AXf, lam = fresh_ritz(X, matmat)
    space.set(Xf, AXf)
    H, C = np.diag(lam), np.eye(block)  # projected matrix, its eigenvectors
    prev = None  # the previous iteration's Ritz vectors, as coefficients on V
    state = Iteration(n, k, tol, trace, diag, log, max_products, max_seconds, stall, block,
                      on_iterate, enough)
    while True:
        X, AX = space.V @ C[:, :block], space.AV @ C[:, :block]
        theta = lam[:block]
        R, stop = state.check(X, AX, theta)
        if stop:
            break
        if space.m + block > basis:  # restart: smallest Ritz vectors + the previous ones
            Q = C[:, :keep]
            if prev is not None:
                extra = svqb(prev - Q @ (Q.T @ prev))[0]
                Q = np.hstack([Q, extra])
            space.transform(Q)
            H = Q.T @ H @ Q
            H = (H + H.T) / 2
            lam, C = np.linalg.eigh(H)
            prev = None
        W = _orthonormalize_against(space.V, next_directions(R, precond, project))
        if W.shape[1] == 0:  # the space is invariant: nothing new to add
            break
        AW = matmat(W)
        state.product(W.shape[1])
        b = W.shape[1]
        VAW = space.V.T @ AW
        WAW = W.T @ AW
        H = np.block([[H, VAW], [VAW.T, (WAW + WAW.T) / 2]])
        space.append(W, AW)
        prev = np.vstack([C[:, :block], np.zeros((b, block))])
        lam_new, C_new = np.linalg.eigh(H)
        if broke_down(lam_new, theta, abs(lam_new[-1])):
            # The space contains the previous Ritz vectors: restart from X afresh.
            Xf, AXf, lam = fresh_ritz(X, matmat)
            space.set(Xf, AXf)
            H, C, prev = np.diag(lam), np.eye(block), None
            state.restart(block)
            continue
        lam, C = lam_new, C_new
        state.iterations += 1
    return state.result("davidson", X, theta, block)
