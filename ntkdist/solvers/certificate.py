"""What a computed eigenpair proves about K, and the rule every solver stops on.

For a symmetric K, a unit vector v, its Rayleigh quotient θ and residual r = Kv − θv:

* **residual bound**: some eigenvalue of K lies within ‖r‖ of θ (any symmetric K);
* **Kato–Temple**: if δ is the distance from θ to the rest of the spectrum, the eigenvalue
  nearest θ lies within ‖r‖²/δ of it.

Neither proves that this eigenvalue is the *smallest*: that comes from the dense path (all
eigenvalues are computed) or, for the iterative solvers, from the random start having
components along every eigenvector (README, "Accuracy").

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

import numpy as np

EPS = float(np.finfo(np.float64).eps)
#: Error of a computed kernel entry relative to √(K_ii K_jj) (tests/test_kernels.py).
ENTRY_ERROR = 2e-15
#: Rounding of a Rayleigh quotient from a float64 product, in units of ε·tr(K).
RQ_ROUNDING = 4.0
#: A residual within this factor of its rounding floor cannot fall further: the solvers stop.
FLOOR_STOP = 10.0


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
