"""Fused GPU fast path of :func:`ntkdist.kernels.limiting.kernel_tile` (a CuPy
``ElementwiseKernel``).

The array-module path makes ~15 passes over a T×T tile per layer, each a read and a write of
the tile in GPU memory; this one reads the Gram tile's ρ once and writes K once per entry,
the norms' and the normalisation's scaling fused in. Its C source is generated here from the
same recursion and constants as the CPU paths (:mod:`ntkdist.kernels.limiting`: the layer
map, the series of θ cos θ − sin θ below ``SERIES_THETA``; the cheaper ``acos`` where
|ρ| ≤ 0.9, as in :mod:`ntkdist.kernels.fused`). As there, it is only relied on for entries
with 1 − |ρ| ≥ ``CLOSE_PAIR_GAP``: the caller recomputes the others with exact gaps.

Before its first use in a process the kernel is compiled and checked against the
array-module path on a sample tile (:func:`ready`); if it does not compile or does not agree
to ``CHECK_RTOL``, the array-module path is used and :func:`status` says why. The same
source is compiled by the host's C compiler in the tests and checked there against the
array-module path and a 50-digit evaluation.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .limiting import QCOEFFS, SERIES_THETA

#: Largest relative difference to the array-module path allowed in the self-check, on
#: entries scaled by √(K_ii K_jj) (both paths agree with a 50-digit evaluation to ~1e-15).
CHECK_RTOL = 1e-13
#: |ρ| up to which θ = acos ρ (dθ/dρ ≤ 2.3 there); beyond it atan2(√(s t), ρ).
ACOS_LIMIT = 0.9
#: ElementwiseKernel parameters: the tile's ρ, the row and column norms (broadcast), the
#: normalisation factor, the depth, NTK (else NNGP).
IN_PARAMS = "float64 rho_in, float64 na, float64 nb, float64 factor, int32 depth, bool ntk"
OUT_PARAMS = "float64 out"
NAME = "ntkdist_kernel_tile"

_lock = threading.Lock()
_state: dict = {}  # id(array module) -> (the module, its kernel or None, status line)


def _literal(x: float) -> str:
    return repr(float(x))


def recursion_source() -> str:
    """The C body of one entry: from ``rho_in``, ``depth`` and ``ntk`` to ``out`` (scaled by
    ``na``, ``nb`` and ``factor`` in the common path's order). Plain C99 with <math.h>
    functions, valid in CUDA device code and for a host C compiler alike."""
    horner = "0.0"
    for c in reversed(QCOEFFS):
        horner = f"({horner}) * t2 + {_literal(c)}"
    pi = _literal(math.pi)
    return f"""
double rho = (double)rho_in;
rho = rho > 1.0 ? 1.0 : (rho < -1.0 ? -1.0 : rho);  /* as the common path's clip (NaN kept) */
double s = 1.0 - rho;
double t = 1.0 + rho;
double k = rho;
for (int layer = 2; layer <= (int)depth; ++layer) {{
    double sin_theta = sqrt(s * t);
    double theta = (rho >= -{_literal(ACOS_LIMIT)} && rho <= {_literal(ACOS_LIMIT)})
        ? acos(rho) : atan2(sin_theta, rho);
    double phi = {pi} - theta;
    double rho_next = (sin_theta + phi * rho) / {pi};
    k = k * (phi / {pi}) + rho_next;
    if (layer < (int)depth) {{
        double q;
        if (theta < {_literal(SERIES_THETA)}) {{
            double t2 = theta * theta;
            q = ({horner}) * t2 * theta;
        }} else {{
            q = theta * rho - sin_theta;
        }}
        s = ({pi} * s + q) / {pi};
        t = 1.0 + rho_next;
    }}
    rho = rho_next;
}}
double value = ntk ? k : rho;
value *= na;
value *= nb;
value *= factor;
out = value;
"""


def _build(xp):
    return xp.ElementwiseKernel(IN_PARAMS, OUT_PARAMS, recursion_source(), NAME)


def _self_check(kern, xp) -> str | None:
    """Why ``kern`` is not to be used (it differs from the array-module path on a sample
    tile, or fails), or None."""
    from .limiting import kernel_tile, normalization_factor, row_block

    rng = np.random.default_rng(0)
    X = rng.standard_normal((96, 5)) * np.exp(rng.uniform(-3, 3, (96, 1)))
    X[1] = X[0] * 2.5  # a parallel pair: the caller's exact-gap fix-up
    A = row_block(xp.asarray(X))
    for depth, kernel, norm in ((1, "ntk", "paper"), (3, "ntk", "nt"), (4, "nngp", "nt"),
                                (6, "ntk", "paper")):
        want = kernel_tile(A, A, depth, kernel, norm, fused=False)
        got = tile(A, A, depth, kernel, normalization_factor(norm, A.d), kern, xp)
        scale = xp.sqrt(xp.abs(xp.diagonal(want)))
        err = float(xp.max(xp.abs(got - want) / (scale[:, None] * scale[None, :])))
        if not err <= CHECK_RTOL:
            return (f"its sample tile (depth {depth}, {kernel}, {norm}) differs from the "
                    f"array-module path by {err:.2g} (relative)")
    return None


def ready(xp) -> bool:
    """True when the fused kernel compiles on ``xp`` (CuPy) and passes its self-check; done
    once per process and module."""
    return _kernel(xp) is not None


def _kernel(xp):
    key = id(xp)
    with _lock:
        if key not in _state:
            if not hasattr(xp, "ElementwiseKernel"):
                kern, why = None, "this array module has no ElementwiseKernel"
            else:
                try:
                    kern = _build(xp)
                    why = _self_check(kern, xp)
                except MemoryError:  # no room for the sample now: checked again next time
                    return None
                except Exception as exc:  # a compiler or driver failure: the common path
                    lines = [v for v in f"{type(exc).__name__}: {exc}".splitlines() if v]
                    kern, why = None, lines[0]
            _state[key] = (xp, kern if why is None else None,
                           "in use" if why is None else f"not used: {why}")
        return _state[key][1]


def status(xp) -> str:
    """One line: whether the fused GPU kernel is in use in this process, or why not."""
    _kernel(xp)
    with _lock:
        entry = _state.get(id(xp))
    return entry[2] if entry else "not used: out of GPU memory for its self-check (for now)"


def tile(A, B, depth: int, kernel: str, factor: float, kern=None, xp=None):
    """The tile of :func:`ntkdist.kernels.limiting.kernel_tile` with the fused kernel (row
    blocks on the device; close pairs recomputed with exact gaps by the common recursion)."""
    from .limiting import _correlations, close_pairs, exact_gaps, normalized_recursion

    if kern is None:
        kern = _kernel(xp)
    rho = _correlations(A.unit, B.unit, xp)
    ii, jj = close_pairs(rho)
    k = kern(rho, A.norms[:, None], B.norms[None, :], float(factor), np.int32(depth),
             kernel == "ntk")
    if ii.shape[0]:
        fix = normalized_recursion(*exact_gaps(A, B, ii, jj), depth, kernel)
        fix *= A.norms[ii]
        fix *= B.norms[jj]
        if factor != 1.0:
            fix *= factor
        k[ii, jj] = fix
    return k
