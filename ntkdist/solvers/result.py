"""The one result type of every eigensolver in ntkdist: :class:`EigenResult`.

Who fills what:

* every producer: ``values``, ``vectors``, ``residuals`` (‖K v − λ v‖ of each column) and
  ``method``;
* LOBPCG and Davidson (:mod:`ntkdist.solvers.lobpcg`, :mod:`ntkdist.solvers.davidson`) add
  the iteration's counts (``iterations``, ``products``, ``matvecs``, ``restarts``,
  ``history``), how they stopped (``converged``, ``stalled``, ``at_floor``) and the whole
  final Ritz block (``ritz_block``, ``ritz_values``) that a further solve can start from;
* the driver (:func:`ntkdist.solvers.driver.smallest_eigenpairs`) judges the values with a
  fresh product and adds the certificate: ``bounds``, ``status``, ``exact``, ``resolved``,
  ``resolution``, ``smallest_proved``, ``rounding_limited`` and ``notes``
  (docs/accuracy.md says what they prove). Only its results carry a meaningful ``status``;
  the others keep the default ``"unjudged"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EigenResult:
    """The k smallest eigenpairs found, how they were found, and what they are certified to."""

    values: np.ndarray  # (k,) ascending
    vectors: np.ndarray  # (N, k) unit columns
    residuals: np.ndarray  # (k,) ‖K v − λ v‖₂ (the driver's: from a fresh product after the solve)
    method: str = ""
    gaps: np.ndarray | None = None  # (k,) estimated distance to the next eigenvalue (NaN: none)
    converged: bool = False
    iterations: int = 0  # -1: not counted (ARPACK)
    # -- LOBPCG and Davidson
    products: int = 0  # block products A·V (passes)
    matvecs: int = 0  # columns multiplied
    restarts: int = 0  # restarts after rounding broke Ritz monotonicity (each costs a product)
    history: list = field(default_factory=list)  # λ_1 per iteration
    stalled: bool = False  # stopped because the residuals stopped falling
    at_floor: bool = False  # stopped with the residuals at their rounding floor
    ritz_block: np.ndarray | None = None  # (N, block) the whole final Ritz block (to start from)
    ritz_values: np.ndarray | None = None  # (block,) the Ritz values of ``ritz_block``
    block: int | None = None  # the block size used (LOBPCG, Davidson)
    # -- the driver: the solve as a whole and its certificate
    solver_seconds: float = 0.0
    resumed: dict | None = None  # the checkpoint this solve started from (iterations, passes)
    phases: list | None = None  # mixed precision: products and outcome of each phase
    bounds: dict = field(default_factory=dict)  # absolute bounds: residual, kato_temple, best
    exact: np.ndarray | None = None  # (k,) bool: exact zeros (repeated rows)
    status: str = "unjudged"  # certified|exact|below_resolution|missed|not_converged
    resolution: float = 0.0  # the smallest λ float64 can resolve for this K (absolute)
    trace: float = 0.0  # tr(K) used for the rounding floors
    smallest_proved: bool = False  # the values are the smallest (dense: all are computed)
    notes: list = field(default_factory=list)  # what the solve did that a user should know
    rounding_limited: bool = False  # float64's rounding alone exceeds tol·λ: tol unreachable
    resolved: np.ndarray | None = None  # (k,) bool: the value's first digit is certain

    @property
    def lambda_min(self) -> float:
        return float(self.values[0])

    def certificate(self) -> dict:
        """Error bounds of each value, absolute and relative (JSON-ready; None: no bound)."""
        def listed(values, relative):
            out = []
            for v, lam in zip(values, self.values):
                v = float(v) / max(abs(float(lam)), 1e-300) if relative else float(v)
                out.append(v if np.isfinite(v) else None)
            return out

        exact = self.exact if self.exact is not None else np.zeros(len(self.values), bool)
        res = np.where(exact, 0.0, self.bounds.get("residual", self.residuals))
        kt = np.where(exact, 0.0, self.bounds.get("kato_temple", np.full(len(res), np.inf)))
        best = np.where(exact, 0.0, self.bounds.get("best", res))
        rel = [0.0 if e else v for e, v in zip(exact, listed(best, True))]
        return {
            "status": self.status,
            "abs_error_bound": listed(best, False),
            "rel_error_bound": rel,
            "abs_error_bound_residual": listed(res, False),
            "abs_error_bound_kato_temple": listed(kt, False),
            "rel_error_bound_residual": [0.0 if e else v
                                         for e, v in zip(exact, listed(res, True))],
            "rel_error_bound_kato_temple": [0.0 if e else v
                                            for e, v in zip(exact, listed(kt, True))],
            "exact_zero": [bool(e) for e in exact],
            "resolved": [bool(r) for r in (self.resolved if self.resolved is not None
                                           else np.ones(len(self.values), bool))],
            "resolution": float(self.resolution),
            "trace": float(self.trace),
            "smallest_proved": bool(self.smallest_proved),
        }
