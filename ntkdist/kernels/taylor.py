"""Taylor coefficients a_r of the normalised kernel function κ(ρ) = Σ_r a_r ρ^r.

For unit vectors at correlation ρ the depth-L NTK is κ(ρ) (κ(1) = L) and the NNGP is the
L-fold layer map (value 1 at ρ = 1); on the sphere of radius √d, K = d Σ_r a_r (X̂X̂ᵀ)^∘r
(docs/theory.md, "Taylor coefficients"). All a_r are ≥ 0.

Computed by exact power-series algebra in float64, layer by layer. With the layer map
κ₁(ρ) = (√(1−ρ²) + (π − arccos ρ) ρ)/π and its derivative Ġ(ρ) = (π − arccos ρ)/π, whose
derivative is 1/(π√(1−ρ²)): if P_{l−1}(ρ) = c + h(ρ) with h(0) = 0, then
P_l = κ₁(c + h) and K_l = K_{l−1} · Ġ(c + h) + P_l, where κ₁ and Ġ are expanded around c
by integrating the binomial series of (1 − (c + h)²)^(−1/2) in h. Series in h compose
exactly up to the truncation order because h has no constant term.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SpecError
from .limiting import KERNELS


def _mul(a: np.ndarray, b: np.ndarray, order: int) -> np.ndarray:
    return np.convolve(a, b)[:order + 1]


def _compose(f: np.ndarray, h: np.ndarray, order: int) -> np.ndarray:
    """f(h(ρ)) truncated at ``order``, for a series h with h(0) = 0 (Horner)."""
    out = np.zeros(order + 1)
    for coef in f[::-1]:
        out = _mul(out, h, order)
        out[0] += coef
    return out


def _inverse_sqrt_series(c: float, order: int) -> np.ndarray:
    """Coefficients in h of (1 − (c + h)²)^(−1/2) = u(h)^α, α = −1/2, by u f' = α u' f."""
    u = np.zeros(order + 1)
    u[0], u[1:3] = 1.0 - c * c, (-2.0 * c, -1.0)[:max(0, min(2, order))]
    alpha = -0.5
    f = np.zeros(order + 1)
    f[0] = u[0] ** alpha
    for n in range(1, order + 1):
        acc = 0.0
        for k in range(1, min(n, 2) + 1):
            acc += ((alpha + 1.0) * k - n) * u[k] * f[n - k]
        f[n] = acc / (n * u[0])
    return f


def _layer_series(c: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(κ₁(c + h), Ġ(c + h)) as series in h."""
    g = _inverse_sqrt_series(c, order) / math.pi
    theta = math.acos(c)
    gdot = np.zeros(order + 1)
    gdot[0] = (math.pi - theta) / math.pi
    gdot[1:] = g[:-1] / np.arange(1, order + 1)
    kappa = np.zeros(order + 1)
    kappa[0] = (math.sqrt(1.0 - c * c) + (math.pi - theta) * c) / math.pi
    kappa[1:] = gdot[:-1] / np.arange(1, order + 1)
    return kappa, gdot


def kernel_coefficients(depth: int, kernel: str = "ntk", r_max: int = 20) -> np.ndarray:
    """a_0 … a_{r_max} of κ(ρ) = Σ_r a_r ρ^r for the depth-L limiting NTK or NNGP.

    Paper normalisation on unit vectors: Σ_r a_r = L for the NTK, 1 for the NNGP. Multiply
    by d for rows on the sphere of radius √d, by 2/d more for ``normalization="nt"``.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise SpecError(f"depth must be an integer >= 1, got {depth!r}")
    if kernel not in KERNELS:
        raise SpecError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(r_max, bool) or not isinstance(r_max, (int, np.integer)) or r_max < 0:
        raise SpecError(f"r_max must be an integer >= 0, got {r_max!r}")
    order = max(int(r_max), 2)
    rho = np.zeros(order + 1)
    rho[1] = 1.0
    k = rho.copy()
    for _ in range(2, depth + 1):
        c = rho[0]
        h = rho.copy()
        h[0] = 0.0
        kappa, gdot = _layer_series(c, order)
        rho = _compose(kappa, h, order)
        k = _mul(k, _compose(gdot, h, order), order) + rho
    out = k if kernel == "ntk" else rho
    return out[:r_max + 1].copy()


def deflation_factor(X: np.ndarray, depth: int, kernel: str = "ntk",
                     normalization: str = "paper") -> np.ndarray:
    """F (N × (1+d)) with F Fᵀ the degree-0 and degree-1 terms of the kernel's Taylor series
    on the rows X: K = s D κ(X̂X̂ᵀ) D with κ(ρ) = Σ a_r ρ^r, so F = √s·[√a₀·‖x‖, √a₁·‖x‖ x̂]
    (zero columns for a kernel without known coefficients). Mixed precision keeps K − F Fᵀ
    in float32 (:mod:`ntkdist.operator`)."""
    from .limiting import normalization_factor, row_block

    if kernel not in KERNELS:
        return np.zeros((len(X), 0))
    a = kernel_coefficients(depth, kernel, 1)
    block = row_block(np.asarray(X, dtype=np.float64))
    s = normalization_factor(normalization, X.shape[1])
    norms = block.norms[:, None]
    return np.hstack([np.sqrt(s * a[0]) * norms, np.sqrt(s * a[1]) * norms * block.unit])
