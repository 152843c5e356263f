"""Fused CPU fast path of :func:`ntkdist.kernels.limiting.normalized_recursion` (numba).

The common path makes ~15 passes over a T×T tile per layer; this one makes one, in
parallel over rows, and uses the cheaper ``acos`` where it is well conditioned
(|ρ| ≤ 0.9, where dθ/dρ ≤ 2.3). It is only called for entries with 1 − |ρ| ≥
``CLOSE_PAIR_GAP`` (the caller recomputes the others with exact gaps), so s = 1 − ρ and
t = 1 + ρ formed from ρ here are accurate. Tested entry by entry against the common path.
"""

from __future__ import annotations

import math

import numpy as np

from .limiting import QCOEFFS, SERIES_THETA

try:
    import numba
except ImportError:  # numba is an optional speed-up
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:
    _Q = np.array(QCOEFFS)

    @numba.njit(cache=True, inline="always")
    def _theta_cos_minus_sin(theta, rho, sin_theta):
        if theta < SERIES_THETA:
            t2 = theta * theta
            acc = 0.0
            for c in _Q[::-1]:
                acc = acc * t2 + c
            return acc * t2 * theta
        return theta * rho - sin_theta

    @numba.njit(cache=True, parallel=True)
    def _recursion(rho_in, depth, ntk, out):
        pi = math.pi
        rows, cols = rho_in.shape
        for i in numba.prange(rows):
            for j in range(cols):
                rho = min(1.0, max(-1.0, rho_in[i, j]))
                s = 1.0 - rho
                t = 1.0 + rho
                k = rho
                for layer in range(2, depth + 1):
                    sin_theta = math.sqrt(s * t)
                    if -0.9 <= rho <= 0.9:
                        theta = math.acos(rho)
                    else:
                        theta = math.atan2(sin_theta, rho)
                    phi = pi - theta
                    rho_next = (sin_theta + phi * rho) / pi
                    k = k * (phi / pi) + rho_next
                    if layer < depth:
                        s = (pi * s + _theta_cos_minus_sin(theta, rho, sin_theta)) / pi
                        t = 1.0 + rho_next
                    rho = rho_next
                out[i, j] = k if ntk else rho


def normalized_recursion_fused(rho, depth: int, kernel: str):
    """κ(ρ) for every entry of the 2-D float64 array ``rho`` (a new array)."""
    if numba is None:
        raise RuntimeError("numba is not installed")
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    out = np.empty_like(rho)
    _recursion(rho, int(depth), kernel == "ntk", out)
    return out
