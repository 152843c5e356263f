"""The paper's bounds on λ_min, with every constant that a given X lets us compute.

Nguyen, Mondelli, Montúfar (2021), Theorem 3.2: μ_r² Ω(d) ≤ λ_min(K^(L)) ≤ L·O(d). The Ω and
O hide constants; what can be computed for the data at hand is the chain of the proof
(theory.md, "Data-dependent quantities"):

* upper: λ_min ≤ min_i K_ii (= L min‖x_i‖² for the NTK) and ≤ tr(K)/N (the theorem's form);
* lower: K^(L) ⪰ Σ_{l=2}^{L} G^(l) (Schur product bound, the Ġ products have unit diagonal),
  and G^(l) = D κ₁(P^(l−1)) D with P^(m) the layer-m correlation matrix (P^(1) = X̂X̂ᵀ) and
  κ₁(ρ) = 2 Σ_r μ_r² ρ^r (Hermite expansion of ReLU). Each P^∘r is PSD with unit diagonal,
  so Gershgorin gives, with D = diag ‖x_i‖,

      λ_min(G^(l)) ≥ min_i ‖x_i‖² Σ_{even r ≥ 2} 2 μ_r² (1 − max_i Σ_{j≠i} |P^(l−1)_ij|^r)₊.

  The paper keeps one r; summing the non-negative terms of several r is equally rigorous.
  For the NNGP G^(L) only the l = L term applies. At depth 1, K = XXᵀ and the bound is
  Gershgorin on XXᵀ itself.
"""

from __future__ import annotations

import numpy as np

from .kernels.hermite import relu_hermite_coefficient
from .kernels.limiting import RowBlock, kernel_tile, normalization_factor, row_block
from .kernels.taylor import kernel_coefficients

#: Even Hermite orders r used in the lower bound.
HERMITE_ORDERS = tuple(range(2, 21, 2))


def _row_power_sums(X: np.ndarray, layer: int, block: int) -> np.ndarray:
    """S[r_idx, i] = Σ_{j≠i} |P^(layer)_ij|^r for r in HERMITE_ORDERS."""
    unit = row_block(X).unit
    ones = np.ones(unit.shape[0])
    full = RowBlock(unit=unit, norms=ones)
    n = unit.shape[0]
    sums = np.zeros((len(HERMITE_ORDERS), n))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        part = RowBlock(unit=unit[lo:hi], norms=ones[lo:hi])
        P = np.abs(kernel_tile(part, full, layer, "nngp"))
        P[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
        P2 = P * P
        power = P2.copy()
        for idx, _ in enumerate(HERMITE_ORDERS):
            if idx:
                power *= P2
            sums[idx, lo:hi] = power.sum(axis=1)
    return sums


def _gershgorin_first_layer(X: np.ndarray, block: int) -> float:
    n = X.shape[0]
    worst = np.inf
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        G = np.abs(X[lo:hi] @ X.T)
        diag = G[np.arange(hi - lo), np.arange(lo, hi)].copy()
        worst = min(worst, float(np.min(2.0 * diag - G.sum(axis=1))))
    return max(0.0, worst)


def upper_bounds(X, depth: int, kernel: str = "ntk", normalization: str = "paper") -> dict:
    """min_i K_ii and tr(K)/N: O(N d), for any N."""
    X = np.asarray(X, dtype=np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    factor = normalization_factor(normalization, X.shape[1]) * (depth if kernel == "ntk" else 1)
    return {"upper_min_diagonal": factor * float(sq.min()),
            "upper_trace_over_n": factor * float(sq.mean())}


def lambda_min_bounds(X, depth: int, kernel: str = "ntk", normalization: str = "paper",
                      block: int = 2048) -> dict:
    """Rigorous data-dependent bounds on λ_min of the limiting kernel Gram of rows ``X``.

    Returns a JSON-ready dict; all values in the requested normalisation. Costs O(N² L).
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    sq = np.einsum("ij,ij->i", X, X)
    factor = normalization_factor(normalization, d)
    out = upper_bounds(X, depth, kernel, normalization)
    if depth == 1:
        out["lower_gershgorin"] = factor * _gershgorin_first_layer(X, block)
        out["lower"] = out["lower_gershgorin"]
        out["lower_note"] = "depth 1: K = XXᵀ, Gershgorin on XXᵀ"
        return out
    layers = range(2, depth + 1) if kernel == "ntk" else (depth,)
    mu2 = np.array([relu_hermite_coefficient(r) ** 2 for r in HERMITE_ORDERS])
    terms = {}
    total = 0.0
    for layer in layers:
        sums = _row_power_sums(X, layer - 1, block)
        gersh = np.clip(1.0 - sums.max(axis=1), 0.0, None)
        contrib = factor * float(sq.min()) * 2.0 * mu2 * gersh
        terms[f"G{layer}"] = {f"r={r}": float(c) for r, c in zip(HERMITE_ORDERS, contrib)}
        total += float(contrib.sum())
    out["lower_hermite_gershgorin"] = total
    out["lower_hermite_gershgorin_terms"] = terms
    out["lower"] = total
    out["lower_note"] = ("Σ over layers l and even r of 2μ_r² min‖x‖² (1 − max_i Σ_j≠i "
                         "|P^(l−1)_ij|^r)₊; Theorem 3.2's Ω(d) constant is not computable")
    return out


def staircase_prediction(n: int, d: int, depth: int, kernel: str = "ntk",
                         normalization: str = "paper") -> dict:
    """theory.md's heuristic for data on the sphere of radius √d (not a bound).

    With D_r = C(d+r−1, r) and ℓ such that D_ℓ ≤ N < D_{ℓ+1}:
    λ_min ≈ d·[Σ_{r>ℓ+1} a_r + a_{ℓ+1} (1 − √(N/D_{ℓ+1}))₊²].
    """
    from math import comb

    ell = 0
    while comb(d + ell, ell + 1) <= n:
        ell += 1
    a = kernel_coefficients(depth, kernel, ell + 1)
    total = float(depth if kernel == "ntk" else 1.0)
    tail = total - float(a.sum())
    D_next = comb(d + ell, ell + 1)
    value = d * (tail + a[ell + 1] * max(0.0, 1.0 - (n / D_next) ** 0.5) ** 2)
    return {"value": value * normalization_factor(normalization, d), "degree": ell,
            "D_next": D_next, "note": "heuristic for sphere data (theory.md), not a bound"}
