"""The paper's bounds on λ_min, with every constant that a given X lets us compute.

Nguyen, Mondelli, Montúfar (2021), Theorem 3.2: μ_r² Ω(d) ≤ λ_min(K^(L)) ≤ L·O(d). The Ω and
O hide constants; what can be computed for the data at hand is the chain of the proof
(docs/theory.md, "Data-dependent quantities"):

* upper: λ_min ≤ min_i K_ii (= L min‖x_i‖² for the NTK) and ≤ tr(K)/N (the theorem's form);
* lower: λ_min(K^(L)) ≥ Σ_{l=2}^{L} λ_min(G^(l)) (Weyl's inequality over the NTK's terms,
  and Schur's λ_min(A∘B) ≥ λ_min(A)·min_i B_ii with the Ġ products' unit diagonal), and G^(l) = D κ₁(P^(l−1)) D with P^(m) the layer-m correlation matrix (P^(1) = X̂X̂ᵀ) and
  κ₁(ρ) = 2 Σ_r μ_r² ρ^r (Hermite expansion of ReLU). Each P^∘r is PSD with unit diagonal,
  so Gershgorin gives, with D = diag ‖x_i‖,

      λ_min(G^(l)) ≥ min_i ‖x_i‖² Σ_{even r ≥ 2} 2 μ_r² (1 − max_i Σ_{j≠i} |P^(l−1)_ij|^r)₊.

  The paper keeps one r; summing the non-negative terms of several r is equally rigorous.
  For the NNGP G^(L) only the l = L term applies. At depth 1, K = XXᵀ and the bound is
  Gershgorin on XXᵀ itself.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels.hermite import relu_hermite_coefficient
from .kernels.limiting import (
    RowBlock,
    check_kernel_args,
    correlation_layers,
    kernel_tile_sums,
    normalization_factor,
    row_block,
)
from .kernels.taylor import kernel_coefficients

#: Even Hermite orders r used in the lower bound.
HERMITE_ORDERS = tuple(range(2, 21, 2))


#: Rows of a block of correlations whose powers :func:`power_sums` takes at once: 32 rows of
#: 2048–8192 float64 columns (0.5–2 MB) and their powers stay in a core's cache, where powers
#: of the whole block would stream it through memory some thirty times a layer.
POWER_STRIP = 32


def power_sums(P: np.ndarray, diagonal: int | None, rows: np.ndarray,
               cols: np.ndarray | None = None) -> None:
    """rows[a, q] = Σ_b |P_ab|^r and, with ``cols``, cols[b, q] += Σ_a |P_ab|^r, for r =
    HERMITE_ORDERS[q]; the entries (a, ``diagonal`` + a) are left out (as 0) unless
    ``diagonal`` is None. Taken ``POWER_STRIP`` rows at a time: the values are those of whole-
    block powers (|P|² by P * P, then each power times |P|²) up to the order of the sums."""
    strip = POWER_STRIP
    height, width = P.shape
    square = np.empty((min(strip, height), width))
    power = np.empty_like(square)
    for lo in range(0, height, strip):
        hi = min(height, lo + strip)
        p2, pw = square[:hi - lo], power[:hi - lo]
        np.abs(P[lo:hi], out=p2)  # P itself is not written: the recursion goes on from it
        if diagonal is not None:
            p2[np.arange(hi - lo), np.arange(diagonal + lo, diagonal + hi)] = 0.0
        p2 *= p2
        np.copyto(pw, p2)
        for q in range(len(HERMITE_ORDERS)):
            if q:
                pw *= p2
            rows[lo:hi, q] = pw.sum(axis=1)
            if cols is not None:
                cols[:, q] += pw.sum(axis=0)


def _max_row_power_sums(rows: RowBlock, depth: int, wanted, block: int) -> dict:
    """{m: M} for m in ``wanted``, M[r_idx] = max_i Σ_{j≠i} |P^(m)_ij|^r, r in HERMITE_ORDERS.

    The NTK chain needs every P^(m), m = 1..L−1. Building each from layer 1 would cost
    O(L²) recursion steps (minutes at depth 1000 and N = 200); instead each row block runs
    the recursion once up to ``depth`` and takes the power sums as it passes each layer,
    holding one layer's correlations at a time. Only the row maxima are kept, so memory is
    O(block · N + L) whatever the depth; with numba, one compiled pass a block
    (:func:`ntkdist.kernels.limiting.kernel_tile_sums`) holds the wanted layers of one row
    at a time and the block's sums, O(N · L + block · L).
    """
    from .kernels.fused import available

    n = rows.unit.shape[0]
    wanted = frozenset(wanted)
    maxima = {m: np.full(len(HERMITE_ORDERS), -np.inf) for m in wanted}
    if available():  # one compiled pass a block (kernel_tile_sums)
        layers = tuple(sorted(wanted))
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            part = RowBlock(unit=rows.unit[lo:hi], norms=rows.norms[lo:hi])
            _, sums, _ = kernel_tile_sums(part, rows, max(layers), "nngp", "paper", layers,
                                          len(HERMITE_ORDERS), True, tile=False, offset=lo)
            for k, m in enumerate(layers):
                np.maximum(maxima[m], sums[:, k].max(axis=0), out=maxima[m])
        return maxima
    sums = np.empty((min(block, n), len(HERMITE_ORDERS)))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        part = RowBlock(unit=rows.unit[lo:hi], norms=rows.norms[lo:hi])
        for m, P in enumerate(correlation_layers(part, rows, depth), start=1):
            if m not in wanted:
                continue
            power_sums(P, lo, sums[:hi - lo])
            np.maximum(maxima[m], sums[:hi - lo].max(axis=0), out=maxima[m])
    return maxima


def _gershgorin_first_layer(X: np.ndarray, block: int) -> float:
    n = X.shape[0]
    worst = np.inf
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        G = np.abs(X[lo:hi] @ X.T)
        diag = G[np.arange(hi - lo), np.arange(lo, hi)].copy()
        worst = min(worst, float(np.min(2.0 * diag - G.sum(axis=1))))
    return max(0.0, worst)


def kernel_diagonal(X, depth: int, kernel: str = "ntk", normalization: str = "paper"):
    """K_ii = s·c·‖x_i‖² (c = L for the NTK, 1 for the NNGP; s the normalisation factor),
    O(N d), with norms that neither overflow nor underflow in their squares' sum."""
    from .data import row_norms

    check_kernel_args(depth, kernel, normalization)
    X = np.asarray(X, dtype=np.float64)
    factor = normalization_factor(normalization, X.shape[1]) * (depth if kernel == "ntk" else 1)
    return factor * row_norms(X) ** 2


def upper_bounds(X, depth: int, kernel: str = "ntk", normalization: str = "paper") -> dict:
    """min_i K_ii and tr(K)/N: O(N d), for any N."""
    diag = kernel_diagonal(X, depth, kernel, normalization)
    return {"upper_min_diagonal": float(diag.min()), "upper_trace_over_n": float(diag.mean())}


#: Rows of X whose correlations with all N rows :func:`lambda_min_bounds` builds at once: with
#: numba, N = 8000 took 2.5–2.7 s in 256-row blocks and 2.4–3.5 s in 2048-row blocks
#: (``python benchmarks/chain.py --n 8000``); without it, 256 rows keep a layer (256 × N)
#: near the cache as its recursion and powers run.
BOUNDS_BLOCK = 256


def lambda_min_bounds(X, depth: int, kernel: str = "ntk", normalization: str = "paper",
                      block: int = BOUNDS_BLOCK) -> dict:
    """Rigorous data-dependent bounds on λ_min of the limiting kernel Gram of rows ``X``.

    Returns a JSON-ready dict; all values in the requested normalisation. Costs O(N² L): one
    pass of the layer recursion over all pairs, whatever the number of layers in the chain,
    ``block`` rows at a time.
    """
    X, rows, factor, min_sq, out = chain_start(X, depth, kernel, normalization)
    if depth == 1:
        return gershgorin_result(out, factor, _gershgorin_first_layer(X, block))
    layers = chain_layers(depth, kernel)
    maxima = _max_row_power_sums(rows, depth - 1, [layer - 1 for layer in layers], block)
    return chain_result(out, maxima, layers, factor * min_sq)


def chain_start(X, depth: int, kernel: str, normalization: str):
    """What every evaluation of the chain starts from: (X as float64, its row block, the
    normalisation factor s, min_i ‖x_i‖², the dict with the upper bounds). Refuses bad
    arguments and non-2-D or non-finite rows before any work."""
    check_kernel_args(depth, kernel, normalization)
    X = np.asarray(X, dtype=np.float64)
    rows = row_block(X, "X")
    factor = normalization_factor(normalization, X.shape[1])
    min_sq = float(np.einsum("ij,ij->i", X, X).min())
    return X, rows, factor, min_sq, upper_bounds(X, depth, kernel, normalization)


def gershgorin_result(out: dict, factor: float, worst: float) -> dict:
    """Depth 1: ``worst`` = min_i (2|XXᵀ|_ii − Σ_j |XXᵀ|_ij), Gershgorin on K = s·XXᵀ."""
    out["lower_gershgorin"] = factor * max(0.0, worst)
    out["lower"] = out["lower_gershgorin"]
    out["lower_note"] = "depth 1: K = XXᵀ, Gershgorin on XXᵀ"
    return out


def chain_layers(depth: int, kernel: str):
    """The layers l whose G^(l) enter the lower bound: 2..L for the NTK, L for the NNGP."""
    return range(2, depth + 1) if kernel == "ntk" else (depth,)


def chain_result(out: dict, maxima: dict, layers, scale: float) -> dict:
    """The lower bound from the row maxima {m: max_i Σ_j≠i |P^(m)_ij|^r for r in
    HERMITE_ORDERS}: Σ over ``layers`` l and r of ``scale``·2μ_r²(1 − maxima[l−1])₊, with
    ``scale`` = s·min‖x‖²; its terms and note are added to ``out`` (returned)."""
    mu2 = np.array([relu_hermite_coefficient(r) ** 2 for r in HERMITE_ORDERS])
    terms = {}
    total = 0.0
    for layer in layers:
        gersh = np.clip(1.0 - maxima[layer - 1], 0.0, None)
        contrib = scale * 2.0 * mu2 * gersh
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
    """A heuristic for data on the sphere of radius √d, not a bound (docs/theory.md,
    "Staircase prediction").

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
            "D_next": D_next, "note": "heuristic for sphere data (docs/theory.md), not a bound"}


#: δ of the finite-width theorems' width condition n_k ≥ N log N log(N/δ), as evaluated here.
WIDTH_DELTA = 0.01


def width_needed(n: int) -> float:
    """N log N log(N/δ), δ = :data:`WIDTH_DELTA`: the width Theorems 4.1 and 5.1 ask of a
    layer, up to their unstated constant."""
    return n * math.log(n) * math.log(n / WIDTH_DELTA)


def finite_width_bounds(n: int, d: int, kernel, cheap: dict) -> dict:
    """What the paper says about a finite network's kernel (``kernel``: a finite-width
    :class:`ntkdist.spec.KernelSpec`), beside the upper bounds in ``cheap`` (min_i K_ii,
    tr(K)/N of the matrix itself).

    Theorem 4.1 (empirical NTK) and Theorem 5.1 (layer k's feature Gram) give λ_min the
    scale d·Π n_l (over all hidden layers, resp. l ≤ k) with N(0, 1) weights, times the
    normalisation's factor, up to constants they do not state (the lower one carries μ_r²),
    provided one hidden layer (Theorem 5.1: layer k itself) has width n ≥ N log N log(N/δ),
    again up to a constant. The condition is evaluated here with constant 1 and δ = 0.01 and
    reported as ``assumptions_hold``; no numerical lower bound follows from the theorems."""
    widths = kernel.widths
    if kernel.kind == "empirical":
        theorem = "Theorem 4.1 (empirical NTK, one wide layer)"
        scaled = widths
        wide = max(range(len(widths)), key=lambda k: widths[k])
    else:
        theorem = "Theorem 5.1 (feature Gram of layer k)"
        scaled = widths[:kernel.layer]
        wide = kernel.layer - 1
    need = width_needed(n)
    holds = widths[wide] >= need
    scale = d * math.prod(float(w) for w in scaled) * kernel.factor(d)
    note = (f"layer {wide + 1} has width {widths[wide]}" + (" ≥ " if holds else " < ")
            + f"N log N log(N/δ) = {need:.3g} (δ = {WIDTH_DELTA}, constant 1)"
            + ("" if holds else ": the theorem's width condition does not hold, its scale "
                                "need not describe λ_min"))
    return {**cheap, "lower": None,
            "lower_note": "the finite-width theorems give a scale with unstated constants, "
                          "not a numerical lower bound",
            "theorem": theorem, "theorem_scale": scale,
            "theorem_scale_note": "λ_min = Θ(d Π n_l) with N(0,1) weights, times the "
                                  "normalisation's factor; the lower constant carries μ_r²",
            "wide_layer": wide + 1, "wide_layer_width": widths[wide],
            "wide_layer_needed": need, "assumptions_hold": bool(holds),
            "assumptions_note": note}
