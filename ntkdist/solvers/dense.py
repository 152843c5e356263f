"""Dense reference path: float64 ``scipy.linalg.eigh`` on a subset of the spectrum.

Every iterative solver of ntkdist is tested against this one at small N.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from .certificate import ENTRY_ERROR, EPS, residual_norms
from .result import EigenResult

#: The method name of the plain dense path.
DENSE_METHOD = "dense: scipy.linalg.eigh float64, driver evr, subset_by_index"


def eigh_smallest(K: np.ndarray, count: int):
    """The ``count`` smallest eigenvalues and eigenvectors of the symmetric K (float64,
    LAPACK ``syevr``)."""
    return scipy.linalg.eigh(K, subset_by_index=[0, count - 1], driver="evr",
                             check_finite=False)


def dense_smallest(K: np.ndarray, k: int = 1) -> EigenResult:
    """The k smallest eigenpairs of the symmetric matrix K (float64, LAPACK ``syevr``), with
    residuals recomputed from a fresh product K v."""
    K = np.asarray(K, dtype=np.float64)
    n = K.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    values, vectors = eigh_smallest(K, k)
    residuals = residual_norms(lambda V: K @ V, values, vectors)
    return EigenResult(values=values, vectors=vectors, residuals=residuals, method=DENSE_METHOD,
                       smallest_proved=True)


#: The scaled formulation is tried when the diagonal of K varies by more than this factor
#: (with equal diagonals it is the plain problem again).
SCALED_MIN_RATIO = 4.0
#: Largest N for the scaled formulation (one-sided Jacobi SVD is O(N³) with a large constant).
SCALED_MAX_N = 8000


def scaled_smallest(K: np.ndarray, k: int, log=None) -> EigenResult | None:
    """The k + 1 smallest eigenpairs of a PSD K = D A D (D = diag(K)^½, A with unit diagonal)
    to high *relative* accuracy, or None where the formulation does not apply.

    Rows of very different norms make K's eigenvalues span many orders of magnitude, and the
    plain ``eigh`` resolves none below ~ε‖K‖. Demmel & Veselić (1992): the eigenvalues of
    D A D are determined by A to relative accuracy ‖δA‖₂/λ_min(A), however wild D is. So
    A = D⁻¹KD⁻¹ (kernel entries are accurate relative to √(K_ii K_jj), i.e. A's entries to
    ``ENTRY_ERROR`` absolute), A = L Lᵀ (Cholesky: backward error |δA| ≤ (N+1)ε|L||Lᵀ|, whose
    entries are ≤ 1), K = (D L)(D L)ᵀ, and the singular values of Lᵀ D, a column-scaled
    well-conditioned matrix, by LAPACK's preconditioned one-sided Jacobi ``dgejsv`` (Drmač &
    Veselić 2008), accurate to O(ε κ(L)) relative. Each λ_i = σ_i² is then within
    λ_i · [N (``ENTRY_ERROR`` + (N+1)ε) / λ_min(A) + 4Nε√κ(A)] of the exact one.

    The result's ``bounds`` hold those absolute bounds (``best`` and ``residual``; no
    Kato–Temple bound), its residuals are from a fresh product K v.
    """
    from scipy.linalg.lapack import dgejsv

    n = K.shape[0]
    diag = np.diag(K).copy()
    if n > SCALED_MAX_N or not np.all(diag > 0):
        return None
    if diag.max() / diag.min() <= SCALED_MIN_RATIO:
        return None
    t0 = time.perf_counter()
    D = np.sqrt(diag)
    A = K / D[:, None]
    A /= D[None, :]
    A = (A + A.T) / 2
    wA = scipy.linalg.eigvalsh(A, check_finite=False)
    lo = wA[0] - n * EPS * abs(wA[-1])
    if not lo > 0:
        return None  # A itself is singular to working accuracy: scaling cannot help
    try:
        L = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        return None
    M = np.asfortranarray(L.T * D[None, :])
    sva, _, V, work, _, info = dgejsv(M, joba=0, jobu=3, jobv=0, jobr=1, jobt=0, jobp=0)
    if info != 0:
        return None
    sigma = sva * (work[0] / work[1])  # dgejsv returns scaled values when they would overflow
    order = np.argsort(sigma)[:k + 1]
    values = sigma[order] ** 2
    rel = n * (ENTRY_ERROR + (n + 1) * EPS) / lo + 4 * n * EPS * np.sqrt(wA[-1] / lo)
    if log:
        log(f"scaled formulation K = D A D: λ_min(A) = {wA[0]:.3g}, relative accuracy "
            f"{rel:.1e}, {time.perf_counter() - t0:.1f} s")
    vectors = np.ascontiguousarray(V[:, order])
    bound = values * rel
    return EigenResult(
        values=values, vectors=vectors, residuals=residual_norms(lambda W: K @ W, values, vectors),
        method="dense, scaled: K = D A D, D = diag(K)^½, A = LLᵀ, Jacobi SVD of LᵀD "
               "(LAPACK dgejsv)",
        gaps=np.full(len(values), np.nan), smallest_proved=True,
        bounds={"best": bound, "residual": bound, "kato_temple": np.full(len(values), np.inf)})
