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

    @numba.njit(cache=True, inline="always")
    def _step(rho, s, t, k, advance):
        """One layer of the recursion at one entry: (ρ_next, s, t, k_next) with the NTK's
        k_next = k (π − θ)/π + ρ_next, and s and t advanced only if ``advance`` (another
        layer follows)."""
        pi = math.pi
        sin_theta = math.sqrt(s * t)
        if -0.9 <= rho <= 0.9:
            theta = math.acos(rho)
        else:
            theta = math.atan2(sin_theta, rho)
        phi = pi - theta
        rho_next = (sin_theta + phi * rho) / pi
        if advance:
            s = (pi * s + _theta_cos_minus_sin(theta, rho, sin_theta)) / pi
            t = 1.0 + rho_next
        return rho_next, s, t, k * (phi / pi) + rho_next

    @numba.njit(cache=True, parallel=True)
    def _recursion(rho_in, depth, ntk, out):
        rows, cols = rho_in.shape
        for i in numba.prange(rows):
            for j in range(cols):
                rho = min(1.0, max(-1.0, rho_in[i, j]))
                s = 1.0 - rho
                t = 1.0 + rho
                k = rho
                for layer in range(2, depth + 1):
                    rho, s, t, k = _step(rho, s, t, k, layer < depth)
                out[i, j] = k if ntk else rho


def normalized_recursion_fused(rho, depth: int, kernel: str):
    """κ(ρ) for every entry of the 2-D float64 array ``rho`` (a new array)."""
    if numba is None:
        raise RuntimeError("numba is not installed")
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    out = np.empty_like(rho)
    _recursion(rho, int(depth), kernel == "ntk", out)
    return out


if numba is not None:
    @numba.njit(cache=True)
    def _even_powers(values, p2, pw, sums, cols, add_cols):
        """sums[q] = Σ_j values_j^(2q+2) and, with ``add_cols``, cols[q, j] += values_j^(2q+2):
        the powers as :func:`ntkdist.bounds.power_sums` takes them (v², then times v² each
        order). Each sum runs in eight partial sums (column j in lane j mod 8, the columns
        past the last multiple of 8 in lane 0), added pairwise at the end: an order the code
        fixes, so the bits do not depend on how the compiler vectorises (with fastmath's
        reductions a fresh compilation and numba's cached one gave different last bits, and
        a resumed store other sums than a clean one)."""
        width = values.shape[0]
        for j in range(width):
            p2[j] = values[j] * values[j]
            pw[j] = 1.0
        whole = width - width % 8
        for q in range(sums.shape[0]):
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            for lo in range(0, whole, 8):
                v0 = pw[lo] * p2[lo]
                v1 = pw[lo + 1] * p2[lo + 1]
                v2 = pw[lo + 2] * p2[lo + 2]
                v3 = pw[lo + 3] * p2[lo + 3]
                v4 = pw[lo + 4] * p2[lo + 4]
                v5 = pw[lo + 5] * p2[lo + 5]
                v6 = pw[lo + 6] * p2[lo + 6]
                v7 = pw[lo + 7] * p2[lo + 7]
                pw[lo], pw[lo + 1], pw[lo + 2], pw[lo + 3] = v0, v1, v2, v3
                pw[lo + 4], pw[lo + 5], pw[lo + 6], pw[lo + 7] = v4, v5, v6, v7
                a0 += v0
                a1 += v1
                a2 += v2
                a3 += v3
                a4 += v4
                a5 += v5
                a6 += v6
                a7 += v7
            for j in range(whole, width):
                v = pw[j] * p2[j]
                pw[j] = v
                a0 += v
            if add_cols:
                for j in range(width):
                    cols[q, j] += pw[j]
            sums[q] = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))

    @numba.njit(cache=True)
    def _recursion_sums(rho_in, depth, ntk, slot, gap, diagonal, write, out, rows, cols,
                        add_cols):
        """``_recursion`` (the same operations, so ``out`` is bit for bit its output) that also
        sums the even powers of the layers m with slot[m] ≥ 0 (m = 1: ρ itself) over each
        row into rows[i, slot[m]] and, with ``add_cols``, over each column into
        cols[slot[m], :, j]; entries with |ρ| > 1 − ``gap`` (close pairs, for the caller's
        exact fix-up) and, for ``diagonal`` ≥ 0, the entries (i, ``diagonal`` + i) are left
        out of the sums."""
        n_rows, n_cols = rho_in.shape
        wanted = rows.shape[1]
        layers = np.zeros((wanted, n_cols))
        p2 = np.empty(n_cols)
        pw = np.empty(n_cols)
        for i in range(n_rows):
            for j in range(n_cols):
                raw = rho_in[i, j]
                rho = min(1.0, max(-1.0, raw))
                keep = abs(raw) <= 1.0 - gap and j != i + diagonal
                if slot[1] >= 0:
                    layers[slot[1], j] = rho if keep else 0.0
                s = 1.0 - rho
                t = 1.0 + rho
                k = rho
                for layer in range(2, depth + 1):
                    rho, s, t, k = _step(rho, s, t, k, layer < depth)
                    if slot[layer] >= 0:
                        layers[slot[layer], j] = rho if keep else 0.0
                if write:
                    out[i, j] = k if ntk else rho
            for w in range(wanted):
                _even_powers(layers[w], p2, pw, rows[i, w], cols[w], add_cols)


def recursion_sums(rho, depth: int, kernel: str, layers, orders: int, diagonal=None,
                   gap: float = 0.0, tile: bool = True):
    """κ(ρ) for every entry of the 2-D float64 array ``rho``, as
    :func:`normalized_recursion_fused` gives it (bit for bit; None unless ``tile``), with the
    even-power sums of the correlation layers m in ``layers`` (1 ≤ m ≤ ``depth``, ascending):
    ``rows[a, k, q]`` = Σ_b ρ^(m_k)_ab^(2q+2) and ``cols[b, k, q]`` = Σ_a of the same (None
    for a ``diagonal`` tile), q < ``orders``. Entries with |ρ| > 1 − ``gap`` and, with
    ``diagonal``, the entries (a, ``diagonal`` + a) are left out of both sums."""
    if numba is None:
        raise RuntimeError("numba is not installed")
    rho = np.ascontiguousarray(rho, dtype=np.float64)
    n_rows, n_cols = rho.shape
    slot = np.full(depth + 1, -1, dtype=np.int64)
    for k, m in enumerate(layers):
        slot[m] = k
    out = np.empty_like(rho) if tile else np.empty((0, 0))
    rows = np.zeros((n_rows, len(layers), orders))
    add_cols = diagonal is None
    cols = np.zeros((len(layers), orders, n_cols if add_cols else 0))
    _recursion_sums(rho, int(depth), kernel == "ntk", slot, float(gap),
                    -n_rows - 1 if diagonal is None else int(diagonal), tile, out, rows,
                    cols, add_cols)
    return (out if tile else None), rows, (cols.transpose(2, 0, 1) if add_cols else None)
