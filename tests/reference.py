"""Independent references for the tests: 50-digit mpmath transcriptions of docs/theory.md."""

import mpmath
import numpy as np

mpmath.mp.dps = 50


def _mp_dot(x, y):
    return mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(x, y))


def paper_kernel(X, depth, kernel="ntk"):
    """K^(L) (or G^(L)) of docs/theory.md, entry by entry with plain arccos at 50 digits."""
    n = X.shape[0]
    out = np.empty((n, n))
    norms = [mpmath.sqrt(_mp_dot(x, x)) for x in X]
    for i in range(n):
        for j in range(n):
            ni, nj = norms[i], norms[j]
            g = _mp_dot(X[i], X[j])
            k = g
            for _ in range(2, depth + 1):
                rho = g / (ni * nj)
                rho = max(min(rho, mpmath.mpf(1)), mpmath.mpf(-1))
                theta = mpmath.acos(rho)
                gdot = (mpmath.pi - theta) / mpmath.pi
                g = ni * nj * (mpmath.sin(theta) + (mpmath.pi - theta) * mpmath.cos(theta)) / mpmath.pi
                k = k * gdot + g
            out[i, j] = float(k if kernel == "ntk" else g)
    return out


def neural_tangents_stack(X, depth, kernel="ntk"):
    """neural-tangents' formulas for Dense(W_std=√2, b_std=None, 'ntk') / Relu() stacks.

    Input covariance x·y/d; Dense: nngp ← σ² nngp, ntk ← nngp + σ² ntk; Relu:
    nngp ← √(c_ii c_jj)/(2π) (sin θ + (π−θ) cos θ), ntk ← ntk (π−θ)/(2π).
    """
    n, d = X.shape
    two = mpmath.mpf(2)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            cii, cjj, cij = (_mp_dot(a, b) / d for a, b in ((X[i], X[i]), (X[j], X[j]), (X[i], X[j])))
            nngp, ntk = two * cij, two * cij
            # ReLU halves each variance and Dense(σ² = 2) doubles it back: c_ii stays.
            cii, cjj = two * cii, two * cjj
            for _ in range(2, depth + 1):
                rho = max(min(nngp / mpmath.sqrt(cii * cjj), mpmath.mpf(1)), mpmath.mpf(-1))
                theta = mpmath.acos(rho)
                relu_nngp = mpmath.sqrt(cii * cjj) / (2 * mpmath.pi) * (
                    mpmath.sin(theta) + (mpmath.pi - theta) * mpmath.cos(theta))
                relu_ntk = ntk * (mpmath.pi - theta) / (2 * mpmath.pi)
                nngp = two * relu_nngp
                ntk = nngp + two * relu_ntk
            out[i, j] = float(ntk if kernel == "ntk" else nngp)
    return out


def hard_rows(rng, d=9):
    """Rows that break a plain float64 arccos transcription: duplicates, 1e-9 and 1e-13
    perturbations, antipodes (exact and perturbed), parallel rows, norm ratios up to 1e12."""
    base = rng.standard_normal((5, d))
    rows = [
        base[0], base[0].copy(), base[0] + 1e-9 * rng.standard_normal(d),
        base[0] + 1e-13 * rng.standard_normal(d), -base[1], base[1],
        -base[1] + 1e-10 * rng.standard_normal(d), 3.0 * base[2], base[2],
        1e6 * base[3], 1e-6 * base[4], base[4],
    ]
    return np.array(rows)
