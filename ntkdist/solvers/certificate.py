"""What LOBPCG and Davidson share, and what a computed eigenpair proves about K.

The one place for:

* **the certificate**: rounding floors, gap estimates, error bounds, :func:`certified`
  (below; docs/accuracy.md says what they prove and on which assumptions);
* **residuals**: :func:`residuals`, the only computation of R = K·V − V·diag(θ) and its
  norms in ntkdist, and :func:`judge`, the fresh-product assessment of a solver's vectors
  that every result's certificate comes from;
* **Rayleigh–Ritz**: the block size, the starting block, SVQB orthonormalisation,
  Rayleigh–Ritz on a basis, the test for rounding breakdown;
* **the stopping rule**: :class:`Iteration`, the counts and the stopping check both solvers
  run after every Rayleigh–Ritz step, and the :class:`EigenResult` they return.

For a symmetric K, a unit vector v, its Rayleigh quotient θ and residual r = Kv − θv:

* **residual bound**: some eigenvalue of K lies within ‖r‖ of θ (any symmetric K);
* **Kato–Temple**: if δ is the distance from θ to the rest of the spectrum, the eigenvalue
  nearest θ lies within ‖r‖²/δ of it.

Neither proves that this eigenvalue is the *smallest*: that comes from the dense path (all
eigenvalues are computed) or, for the iterative solvers, from the random start having
components along every eigenvector (docs/accuracy.md, "What is not certified").

Both bounds are about the exact K, but θ and r are computed in float64 from kernel entries
that are themselves rounded. ntkdist adds, to every bound, the rounding of what it computed.
For a PSD K, |K_ij| ≤ √(K_ii K_jj), so for a unit v with w = (Σ_i √K_ii |v_i|)² (at most
T = tr(K); the diagonal is known from the rows in O(N d)):

* kernel entries are within ``ENTRY_ERROR``·√(K_ii K_jj) of the exact kernel (the test suite
  checks 1e-12 against 50 digits on the hardest rows and sees ~1e-15): |vᵀ ΔK v| ≤
  ``ENTRY_ERROR``·w and ‖ΔK v‖ ≤ ``ENTRY_ERROR``·√(T w);
* a Rayleigh quotient computed from a float64 product is within ``RQ_ROUNDING``·ε·w of the
  exact one, a residual norm within √N·ε·√(T w) (rounding errors of a long sum adding up as
  a random walk, the usual model; the worst case N·ε is never approached by blocked sums).

Without the diagonal, w = T is used.

So the certified error of θ is ``floor_q + min(r', r'²/δ)`` with r' = ‖r‖ + ``floor_r``.
δ is not known exactly: it is estimated by the next Ritz value less its own residual
(θ_{i+1} − r'_{i+1} − θ_i); with no next value, or a non-positive estimate, only the
residual bound is used. A value is **certified** to ``tol`` when this bound is at most
tol·θ; a θ not larger than its own bound is **below the resolution** of float64 for this
matrix, and no digit of it is claimed.
"""

from __future__ import annotations

import time

import numpy as np

from .result import EigenResult

EPS = float(np.finfo(np.float64).eps)
#: Error of a computed kernel entry relative to √(K_ii K_jj) (tests/test_kernels.py).
ENTRY_ERROR = 2e-15
#: Rounding of a Rayleigh quotient from a float64 product, in units of ε·tr(K).
RQ_ROUNDING = 4.0
#: A residual within this factor of its rounding floor cannot fall further: the solvers stop.
FLOOR_STOP = 10.0


# -- The certificate: rounding floors, gaps, bounds ------------------------------------------------


def floors(n: int, trace: float, weight=None):
    """(error floor of a Rayleigh quotient, error floor of a residual norm), absolute, for
    vectors of weight w = (Σ √K_ii |v_i|)² (``weight``; default: w = tr(K))."""
    trace = abs(float(trace))
    w = trace if weight is None else np.asarray(weight, dtype=np.float64)
    return ((RQ_ROUNDING * EPS + ENTRY_ERROR) * w,
            (np.sqrt(n) * EPS + ENTRY_ERROR) * np.sqrt(trace) * np.sqrt(w))


def weights(V: np.ndarray, diag) -> np.ndarray | None:
    """w = (Σ_i √K_ii |v_i|)² of each unit column of V, or None without the diagonal."""
    if diag is None:
        return None
    norms = np.linalg.norm(V, axis=0)
    return (np.sqrt(np.clip(diag, 0, None)) @ np.abs(V) / np.where(norms > 0, norms, 1)) ** 2


def gap_estimates(theta: np.ndarray, rnorm: np.ndarray, floor_r: float) -> np.ndarray:
    """δ_i, the distance from θ_i to the other eigenvalues, for each value but the last (NaN
    there, and where the estimate is not positive): above, θ_{i+1} − (‖r_{i+1}‖ + floor_r) −
    θ_i; below (i > 0; Kato–Temple for an interior eigenvalue needs both sides), θ_i − θ_{i−1},
    since Ritz values lie above the eigenvalues of the same rank."""
    theta = np.asarray(theta, dtype=np.float64)
    rnorm = np.asarray(rnorm, dtype=np.float64)
    gaps = np.full(theta.shape, np.nan)
    floor_r = np.broadcast_to(np.asarray(floor_r, dtype=np.float64), theta.shape)
    if theta.size > 1:
        gaps[:-1] = theta[1:] - (rnorm[1:] + floor_r[1:]) - theta[:-1]
        gaps[1:-1] = np.minimum(gaps[1:-1], np.diff(theta)[:-1])
    gaps[~(gaps > 0)] = np.nan
    return gaps


def error_bounds(rnorm, gaps, n: int, trace: float, weight=None) -> dict:
    """Absolute error bounds of each value: residual, Kato–Temple (inf without a gap), best."""
    floor_q, floor_r = floors(n, trace, weight)
    r = np.asarray(rnorm, dtype=np.float64) + floor_r
    gaps = np.asarray(gaps, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        kt = np.where(gaps > 0, r * r / np.where(gaps > 0, gaps, 1.0), np.inf)
    return {"residual": floor_q + r, "kato_temple": floor_q + kt,
            "best": floor_q + np.minimum(r, kt)}


def certified(theta, bound, tol: float) -> bool:
    """Whether every value is positive and within tol·θ by its bound."""
    theta = np.asarray(theta, dtype=np.float64)
    return bool(np.all(theta > 0) and np.all(np.asarray(bound) <= tol * theta))


def resolution(n: int, trace: float) -> float:
    """The smallest λ whose first digit float64 can certify for this matrix (both floors)."""
    floor_q, floor_r = floors(n, trace)
    return floor_q + floor_r


def at_floor(rnorm, n: int, trace: float, weight=None) -> bool:
    """Whether the residuals have reached their rounding floor (no further progress)."""
    return bool(np.all(np.asarray(rnorm) <= FLOOR_STOP * floors(n, trace, weight)[1]))


def bounds_of(theta, rnorm, n: int, trace: float, weight=None):
    """Gap estimates and error bounds (:func:`error_bounds`) of Ritz pairs with values θ and
    residual norms ‖r‖, with the rounding floors of vectors of weight ``weight``."""
    gaps = gap_estimates(theta, rnorm, floors(n, trace, weight)[1])
    return gaps, error_bounds(rnorm, gaps, n, trace, weight)


# -- Residuals -------------------------------------------------------------------------------------


def residuals(AV: np.ndarray, V: np.ndarray, values: np.ndarray):
    """R = A·V − V·diag(values) and its column norms ‖r_i‖₂: the one residual computation
    of ntkdist (the solvers' own from their implicitly updated A·V, the fresh products'
    of :func:`judge`, the dense path's)."""
    R = AV - V * values
    return R, np.linalg.norm(R, axis=0)


def residual_norms(matmat, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """‖K v_i − λ_i v_i‖₂ for each column, with K applied by ``matmat`` (a fresh product)."""
    return residuals(matmat(vectors), vectors, values)[1]


def judge(AV: np.ndarray, V: np.ndarray, n: int, trace: float, diag=None) -> EigenResult:
    """V's columns (normalised first) judged from a fresh product AV = K·V: their Rayleigh
    quotients, residual norms, gap estimates and error bounds (``bounds``; rounding floors
    from K's diagonal ``diag``, or tr(K) alone without it)."""
    norms = np.linalg.norm(V, axis=0)
    V, AV = V / norms, AV / norms
    theta = np.einsum("ij,ij->j", V, AV)
    rnorm = residuals(AV, V, theta)[1]
    gaps, bounds = bounds_of(theta, rnorm, n, trace, weights(V, diag))
    return EigenResult(values=theta, vectors=V, residuals=rnorm, gaps=gaps, bounds=bounds)


# -- Rayleigh–Ritz ---------------------------------------------------------------------------------


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


def initial_block(n: int, block: int, precond=None, seed: int = 0, X0=None, project=None):
    """The block a solve starts from: ``X0`` if given, else a random block (seeded) through
    the preconditioner if there is one (M is positive definite, so every eigenvector keeps a
    nonzero component, and the directions the preconditioner models, the top of the
    spectrum, start damped: one pass fewer at N = 20000); then onto ``project``'s subspace."""
    if X0 is None:
        X = np.random.default_rng(seed).standard_normal((n, block))
        X = X if precond is None else precond(X)
    else:
        X = np.array(X0, dtype=np.float64)
    return X if project is None else project(X)


def svqb_map(S: np.ndarray, drop: float = 1e-10) -> np.ndarray:
    """T with S·T orthonormal (SVQB, Stathopoulos & Wu 2002), near-dependent directions
    dropped."""
    G = S.T @ S
    d = np.sqrt(np.clip(np.diag(G), 1e-300, None))
    G = G / np.outer(d, d)
    w, V = np.linalg.eigh(G)
    keep = w > drop * w.max()
    return (V[:, keep] / np.sqrt(w[keep])) / d[:, None]


def svqb(S: np.ndarray, AS: np.ndarray | None = None, drop: float = 1e-10):
    """Orthonormalise the columns of S (and map AS alike, if given); drop near-dependent
    directions."""
    T = svqb_map(S, drop)
    return S @ T, (None if AS is None else AS @ T)


def ritz(H: np.ndarray):
    """Ritz values (ascending) and coefficient vectors of a projected matrix H, symmetrised."""
    return np.linalg.eigh((H + H.T) / 2)


def fresh_ritz(X: np.ndarray, matmat):
    """Rayleigh–Ritz on span(X) with a fresh product: Ritz vectors, A times them, values."""
    X, _ = np.linalg.qr(X)
    AX = matmat(X)
    lam, C = ritz(X.T @ AX)
    return X @ C, AX @ C, lam


def next_directions(R: np.ndarray, precond=None, project=None) -> np.ndarray:
    """The block a solver adds to its space: the preconditioned residuals M·R (R itself
    without a preconditioner), mapped onto ``project``'s subspace."""
    W = precond(R) if precond is not None else R.copy()
    return W if project is None else project(W)


def broke_down(new: np.ndarray, old: np.ndarray, scale: float) -> bool:
    """Whether Rayleigh–Ritz on a space that contains the previous Ritz vectors raised the
    smallest Ritz value (it cannot rise), or sent it below 0 (not for a PSD operator), beyond
    rounding of ``scale``: the implicitly updated products' rounding broke down and the solver
    restarts from its Ritz vectors with a fresh product."""
    scale = max(scale, 1e-300)
    return bool(new[0] > old[0] + 1e-10 * scale or new[0] < -1e-8 * scale)


# -- The stopping rule -----------------------------------------------------------------------------

#: Iterations without a tenth's fall of the residuals that end a float64 solve whose λ is too
#: close to 0 for float64 to certify ``tol`` (its rounding floor alone exceeds tol·λ).
HOPELESS_STALL = 20
#: Iterations without a tenth's fall of the residuals that end a solve whose values are not
#: resolved (a bound at least the value: no digit certain). Their floor then lies above the
#: rounding floors modelled here: rows of norms decades apart, where the products' rounding
#: on the large rows swamps a vector that lives on the small ones (the scaled formulation of
#: ``--method dense`` resolves those).
STUCK_STALL = 50


class Stall:
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


class Iteration:
    """The bookkeeping and the stopping rule of one LOBPCG or Davidson solve.

    :meth:`check` after every Rayleigh–Ritz step: residuals, gap estimates, whether the k
    smallest Ritz values are certified to ``tol`` (the bounds above, with the block's rounding
    floors from K's diagonal ``diag``, or from ``trace`` = tr(K) alone), and whether to stop:
    certified, residuals at their rounding floor (``FLOOR_STOP``), stalled (no fall by a
    tenth in ``stall`` iterations), stalled while λ is too close to 0 for float64 to certify
    ``tol`` (``HOPELESS_STALL``), stalled while no value is resolved (``STUCK_STALL``), out
    of products or time, or when ``enough(X, AX, λ,
    ‖r‖)`` says so (a float32 phase at its products' noise floor, :mod:`.mixed`). Logs every
    10 iterations, and hands the block of every iteration that goes on to ``on_iterate(X, λ,
    iteration, products)`` (checkpoints). :meth:`result` is the solver's
    :class:`EigenResult`."""

    def __init__(self, n: int, k: int, tol: float, trace: float, diag, log, max_products: int,
                 max_seconds: float | None, stall: int | None, matvecs: int, on_iterate=None,
                 enough=None):
        self.n, self.k, self.tol, self.trace, self.diag, self.log = n, k, tol, trace, diag, log
        self.on_iterate, self.enough = on_iterate, enough
        self.max_products, self.max_seconds = max_products, max_seconds
        self.stalling, self.hopeless = Stall(stall), Stall(HOPELESS_STALL)
        self.stuck, self.stopped_stuck = Stall(STUCK_STALL), False
        self.products, self.matvecs = 1, matvecs  # the starting block's product
        self.iterations = self.restarts = 0
        self.history: list = []
        self.t0 = time.perf_counter()

    def product(self, columns: int) -> None:
        """Count one block product of ``columns`` columns."""
        self.products += 1
        self.matvecs += columns

    def restart(self, columns: int) -> None:
        """Count a restart after a rounding breakdown (its fresh product and its iteration)."""
        self.product(columns)
        self.restarts += 1
        self.iterations += 1

    def check(self, X: np.ndarray, AX: np.ndarray, lam: np.ndarray):
        """The residual block R = A·X − X·diag(λ) of the Ritz pairs, and whether to stop."""
        n, k, tol, trace = self.n, self.k, self.tol, self.trace
        R, rnorm = residuals(AX, X, lam)
        self.history.append(float(lam[0]))
        weight = weights(X, self.diag)
        gaps, bounds = bounds_of(lam, rnorm, n, trace, weight)
        bound = bounds["best"][:k]
        w = None if weight is None else weight[:k]
        it, t0 = self.iterations, self.t0
        if self.log and it % 10 == 0:
            self.log(f"iteration {it}: λ_1 = {lam[0]:.12g}, ‖r_1‖ = {rnorm[0]:.2e}, bound "
                     f"{bound[0] / max(abs(lam[0]), 1e-300):.1e} rel, "
                     f"{time.perf_counter() - t0:.0f} s")
        converged = certified(lam[:k], bound, tol)
        floor = not converged and at_floor(rnorm[:k], n, trace, w)
        out_of_time = (self.max_seconds is not None
                       and time.perf_counter() - t0 >= self.max_seconds)
        stalled = not converged and self.stalling(rnorm[:k])
        floor_q = floors(n, trace, weight)[0]
        beyond = (not converged and bool(np.any(np.broadcast_to(floor_q, lam.shape)[:k]
                                                >= tol * lam[:k])) and self.hopeless(rnorm[:k]))
        stuck = (self.stuck(rnorm[:k]) and not converged
                 and bool(np.any(bound >= np.abs(lam[:k]))))
        self.rnorm, self.gaps, self.converged, self.floor = rnorm, gaps, converged, floor
        self.stopped_stuck = stuck
        stop = (converged or floor or stalled or beyond or stuck
                or self.products >= self.max_products
                or out_of_time or (self.enough is not None
                                   and bool(self.enough(X, AX, lam, rnorm))))
        if not stop and self.on_iterate is not None:
            self.on_iterate(X, lam, it, self.products)
        return R, stop

    def result(self, method: str, X: np.ndarray, lam: np.ndarray, block: int) -> EigenResult:
        """The k smallest Ritz pairs of the last :meth:`check`, and the whole block."""
        k = self.k
        return EigenResult(values=lam[:k].copy(), vectors=X[:, :k].copy(),
                           residuals=self.rnorm[:k].copy(), gaps=self.gaps[:k].copy(),
                           method=method, iterations=self.iterations, products=self.products,
                           matvecs=self.matvecs, converged=self.converged,
                           restarts=self.restarts, history=self.history, ritz_block=X,
                           stalled=(self.stalling.stalled or self.hopeless.stalled
                                    or self.stopped_stuck),
                           ritz_values=lam.copy(), at_floor=self.floor, block=block)
