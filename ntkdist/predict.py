"""Predicted λ_min of the limiting kernel Gram of N i.i.d. rows uniform on the sphere of radius √d.

A heuristic, not a bound (docs/theory.md, "Staircase prediction"). On the unit sphere S^(d−1)
the kernel function has the exact eigen-decomposition (Funk–Hecke)

    κ(⟨x, y⟩) = Σ_k c_k P_k(⟨x, y⟩) = Σ_k (c_k / N_k) Σ_j Y_kj(x) Y_kj(y),

with P_k the Gegenbauer (Legendre) polynomial of degree k in dimension d, P_k(1) = 1,
N_k = C(d+k−1, k) − C(d+k−3, k−2) the number of degree-k spherical harmonics Y_kj
(orthonormal under the uniform measure), c_k = N_k E[κ(t) P_k(t)] ≥ 0 and Σ_k c_k = κ(1).
So the Gram matrix is K = s·d·Σ_k c_k W_k, W_k = Y_k Y_kᵀ / N_k, a sum of Wishart-like blocks
of aspect ratio γ_k = N/N_k with unit diagonal. Modelling the blocks as free
Marchenko–Pastur (free Poisson) laws, the bulk of the spectrum is their free additive
convolution, whose R-transform is R(z) = Σ_k c_k / (1 − c_k γ_k z); its lower edge is the
prediction. ``method="staircase"`` gives the older formula of
:func:`ntkdist.bounds.staircase_prediction` instead (also returned as ``staircase``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .errors import SpecError
from .kernels.limiting import check_kernel_args, normalization_factor

METHODS = ("free", "staircase")
#: Degrees whose multiplicity exceeds this multiple of N are lumped into c·I.
TAIL_RATIO = 1000.0
#: Most Gegenbauer degrees computed (matters only for d ≤ 4 at large N).
DEGREE_CAP = 400
#: Degrees with more harmonics than this are refused (their c_k would be rounding noise).
MAX_MULTIPLICITY = 1e20
#: The old (Taylor) staircase is evaluated for ℓ below this only (small d at huge N).
STAIRCASE_MAX_DEGREE = 100


def _monomial_degree(n: int, d: int) -> tuple[int, int]:
    """(ℓ, D_{ℓ+1}) with D_r = C(d+r−1, r) and D_ℓ ≤ N < D_{ℓ+1} (bounds.staircase_prediction)."""
    if d == 1:  # D_r = 1 for every r: no finite ℓ
        raise SpecError("d must be >= 2 for the prediction")
    if d == 2:  # D_r = r + 1
        ell = max(0, n - 1)
        return ell, ell + 2
    ell, D_next = 0, d  # D_1 = d
    while D_next <= n:
        ell += 1
        D_next = D_next * (d + ell) // (ell + 1)
    return ell, D_next


def harmonic_multiplicity(k: int, d: int) -> int:
    """N_k: the dimension of the degree-k spherical harmonics on S^(d−1)."""
    if k == 0:
        return 1
    if k == 1:
        return d
    return math.comb(d + k - 1, k) - math.comb(d + k - 3, k - 2)


@lru_cache(maxsize=64)
def _nodes(d: int, n: int):
    """Gauss–Jacobi nodes and weights (summing to 1) for t = ⟨x, e⟩, x uniform on S^(d−1):
    density ∝ (1 − t²)^α, α = (d−3)/2. Golub–Welsch on the Jacobi matrix of the
    ultraspherical polynomials (β_1 = 1/(2α+3), β_k = k(k+2α)/((2k+2α)² − 1)), which stays
    accurate where scipy's roots_jacobi fails (α in the hundreds with n in the hundreds)."""
    from scipy.linalg import eigh_tridiagonal

    alpha = 0.5 * (d - 3)
    k = np.arange(2, n, dtype=float)
    beta = np.empty(n - 1)
    beta[0] = 1.0 / (2.0 * alpha + 3.0)
    beta[1:] = k * (k + 2.0 * alpha) / ((2.0 * k + 2.0 * alpha) ** 2 - 1.0)
    t, v = eigh_tridiagonal(np.zeros(n), np.sqrt(beta))
    w = v[0] ** 2
    return t, w / w.sum()


def _kappa(t: np.ndarray, depth: int, kernel: str) -> np.ndarray:
    """κ(t) on unit vectors (paper normalisation): κ(1) = L for the NTK, 1 for the NNGP."""
    rho = np.clip(t, -1.0, 1.0)
    k = rho.copy()
    for _ in range(2, depth + 1):
        theta = np.arccos(rho)
        rho = (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / math.pi
        k = k * (math.pi - theta) / math.pi + rho
    return k if kernel == "ntk" else rho


def gegenbauer_weights(depth: int, kernel: str, d: int, k_max: int) -> np.ndarray:
    """c_0 … c_{k_max}: κ(t) = Σ_k c_k P_k(t) on S^(d−1) (P_k(1) = 1), c_k ≥ 0, Σ c_k = κ(1).

    c_k = N_k E[κ(t) P_k(t)], by Gauss–Jacobi quadrature in t with ≥ k_max + 200 nodes and the
    three-term recurrence (k + d − 2) P_{k+1} = (2k + d − 2) t P_k − k P_{k−1}. κ has
    square-root branch points at t = ±1, damped by the weight (1 − t²)^((d−3)/2): the error
    falls like n^(−d), ~1e-10 relative for d ≥ 8 at low degree (tests/test_predict.py).
    Rounding leaves an absolute error of about 1e-16·√N_k·κ(1) in c_k, so degrees with
    N_k beyond ``MAX_MULTIPLICITY`` are refused; the prediction never needs them.
    """
    return _gegenbauer_weights(int(depth), kernel, int(d), int(k_max)).copy()


@lru_cache(maxsize=256)
def _gegenbauer_weights(depth: int, kernel: str, d: int, k_max: int) -> np.ndarray:
    check_kernel_args(depth, kernel, "paper")
    if d < 2:
        raise SpecError("d must be >= 2 for the Gegenbauer expansion")
    if harmonic_multiplicity(k_max, d) > MAX_MULTIPLICITY:
        raise SpecError(f"degree {k_max} has over {MAX_MULTIPLICITY:.0e} harmonics in d = {d}: "
                        "its weight would be rounding noise")
    t, w = _nodes(d, 256 if k_max <= 56 else 64 * (-(-(int(k_max) + 200) // 64)))
    f = w * _kappa(t, depth, kernel)
    out = np.empty(k_max + 1)
    p_prev, p = np.ones_like(t), t.copy()
    out[0] = f.sum()
    for k in range(1, k_max + 1):
        out[k] = harmonic_multiplicity(k, d) * float(f @ p)
        p_prev, p = p, ((2 * k + d - 2) * t * p - k * p_prev) / (k + d - 2)
    return np.clip(out, 0.0, None)


@lru_cache(maxsize=64)
def _taylor(depth: int, kernel: str, r_max: int) -> np.ndarray:
    from .kernels.taylor import kernel_coefficients

    return kernel_coefficients(depth, kernel, r_max)


def _degree_range(n: int, d: int, ell: int) -> int:
    """Highest degree modelled as its own block: N_K ≥ TAIL_RATIO·N and K ≥ ℓ + 3, capped."""
    k = min(ell + 3, DEGREE_CAP)
    while k < DEGREE_CAP and harmonic_multiplicity(k, d) < TAIL_RATIO * n:
        k += 1
    while k > ell + 1 and harmonic_multiplicity(k, d) > MAX_MULTIPLICITY:  # d in the millions
        k -= 1
    return k


def free_edge(c, gamma, rest: float = 0.0) -> float:
    """Lower edge of rest·δ ⊞ (⊞_k MP(c_k, γ_k)), MP(c, γ) the law of c·GGᵀ/p (G: N × p
    Gaussian, γ = N/p; for γ > 1 it has an atom at 0), whose R-transform is c/(1 − cγz).

    Below the support u = −G(x) > 0 and x(u) = rest − 1/u + Σ_k c_k/(1 + c_k γ_k u), the
    inverse of the Cauchy transform. u²·x'(u) = 1 − Σ_k (c_k γ_k u)²/(γ_k (1 + c_k γ_k u)²)
    decreases in u, from 1 to 1 − Σ_k 1/γ_k: x has one maximum, the edge, when the blocks'
    ranks N/γ_k add up to more than N; otherwise x rises to ``rest``, the edge (the blocks
    leave a null space).
    """
    c = np.asarray(c, dtype=float)
    g = np.asarray(gamma, dtype=float)
    keep = c > 0
    c, g = c[keep], g[keep]
    cg = c * g
    if len(c) == 0 or float(np.sum(1.0 / g)) <= 1.0:
        return float(rest)

    def slope(u):  # u² x'(u)
        s = cg * u
        return 1.0 - float(np.sum(s * s / (g * (1.0 + s) ** 2)))

    lo = 0.5 / math.sqrt(float(np.sum(c * cg)))  # slope(lo) ≥ 3/4
    hi = 2.0 * lo
    while slope(hi) > 0:
        lo, hi = hi, 10.0 * hi
    for _ in range(200):  # bisection in log u
        mid = math.sqrt(lo * hi)
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    u = math.sqrt(lo * hi)
    return float(rest - 1.0 / u + np.sum(c / (1.0 + cg * u)))


def predict_lambda_min(n: int, d: int, depth: int, kernel: str = "ntk",
                       normalization: str = "paper", method: str = "free") -> dict:
    """Predicted λ_min of the N × N limiting kernel Gram for rows uniform on the sphere of
    radius √d (docs/theory.md, "Staircase prediction"). A heuristic, not a bound.

    Returns ``lambda_min``, ``degree`` ℓ (D_ℓ ≤ N < D_{ℓ+1}, D_r = C(d+r−1, r)), ``D_next``
    (D_{ℓ+1}), ``tail`` (s·d·Σ_{k>ℓ+1} of the kernel's weights: Gegenbauer c_k for
    ``method="free"``, Taylor a_r for ``"staircase"``), ``edge`` (lambda_min − tail),
    ``staircase`` (the old formula's value), ``weights`` (s·d·c_k, k ≤ ℓ + 2),
    ``multiplicities`` (N_k, k ≤ ℓ + 2), ``method`` and ``note``.
    """
    check_kernel_args(depth, kernel, normalization)
    if method not in METHODS:
        raise SpecError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("n", n), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SpecError(f"{name} must be an integer >= 1, got {value!r}")
    n, d = int(n), int(d)
    if d < 2:
        raise SpecError("d must be >= 2 for the prediction (on S^0 rows repeat)")
    scale = d * normalization_factor(normalization, d)
    total = float(depth if kernel == "ntk" else 1.0)
    ell, D_next = _monomial_degree(n, d)

    # The older formula: Taylor coefficients, the degree-(ℓ+1) term as MP(N/D_{ℓ+1}).
    if ell < STAIRCASE_MAX_DEGREE:
        a = _taylor(depth, kernel, ell + 1)
        old_tail = total - float(a.sum())
        old_edge = a[ell + 1] * max(0.0, 1.0 - math.sqrt(n / D_next)) ** 2
        staircase = scale * (old_tail + old_edge)
    else:  # the Taylor series to order ℓ + 1 would cost O(ℓ³) and lose its digits
        old_tail = old_edge = staircase = math.nan

    K = _degree_range(n, d, ell)
    c = _gegenbauer_weights(depth, kernel, d, K)
    mult = np.array([harmonic_multiplicity(k, d) for k in range(K + 1)], dtype=float)
    shown = min(K, ell + 2) + 1
    out = {"degree": ell, "D_next": D_next, "staircase": float(staircase),
           "weights": (scale * c[:shown]).tolist(),
           "multiplicities": [harmonic_multiplicity(k, d) for k in range(shown)]}
    if method == "staircase":
        out.update(lambda_min=float(staircase), tail=float(scale * old_tail),
                   edge=float(scale * old_edge),
                   method="staircase",
                   note=("d·[Σ_{r>ℓ+1} a_r + a_{ℓ+1}(1 − √(N/D_{ℓ+1}))₊²], a_r Taylor "
                         "coefficients; heuristic for sphere data, not a bound"))
        return out
    rest = max(0.0, total - float(c.sum()))
    edge = free_edge(c, n / mult, rest)
    tail = rest + float(c[ell + 2:].sum())
    capped = K >= DEGREE_CAP and harmonic_multiplicity(K, d) < TAIL_RATIO * n
    note = ("lower edge of the free convolution of Marchenko–Pastur laws, one per harmonic "
            "degree k (weight c_k of the Gegenbauer expansion of κ on S^(d−1), exact; ratio "
            "N/N_k). As d → ∞ with N/D_{ℓ+1} fixed it tends to the staircase limit; at "
            "finite d the model (MP shape, freeness) is a heuristic, not a bound: measured "
            "within 1.3 % at d = 64, 2.7 % at d = 32 (NTK), too high by 4-20 % at d = 16 "
            "(docs/theory.md)")
    if capped:
        note += (f"; degrees above {DEGREE_CAP} lumped as c·I (d too small for this N: "
                 "not meaningful)")
    out.update(lambda_min=scale * edge, tail=scale * tail, edge=scale * (edge - tail),
               method="free", note=note)
    return out
