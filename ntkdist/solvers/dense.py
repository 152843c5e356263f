"""Dense reference path: float64 ``scipy.linalg.eigh`` on a subset of the spectrum.

Every iterative solver of ntkdist is tested against this one at small N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class EigenResult:
    """The k smallest eigenpairs with residuals recomputed from a fresh product K v."""

    values: np.ndarray  # (k,) ascending
    vectors: np.ndarray  # (N, k), unit columns
    residuals: np.ndarray  # (k,) ‖K v − λ v‖₂
    method: str

    @property
    def lambda_min(self) -> float:
        return float(self.values[0])


def residual_norms(matmat, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """‖K v_i − λ_i v_i‖₂ for each column, with K applied by ``matmat`` (a fresh product)."""
    R = matmat(vectors) - vectors * values[None, :]
    return np.linalg.norm(R, axis=0)


def dense_smallest(K: np.ndarray, k: int = 1) -> EigenResult:
    """The k smallest eigenpairs of the symmetric matrix K (float64, LAPACK ``syevr``)."""
    K = np.asarray(K, dtype=np.float64)
    n = K.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    values, vectors = scipy.linalg.eigh(K, subset_by_index=[0, k - 1], driver="evr",
                                        check_finite=False)
    residuals = residual_norms(lambda V: K @ V, values, vectors)
    return EigenResult(values=values, vectors=vectors, residuals=residuals,
                       method="dense: scipy.linalg.eigh float64, driver evr, subset_by_index")
