"""Preconditioners for the smallest eigenvalues of kernel Gram matrices (approximate K⁻¹).

Both are built from the data alone, without a pass over the stored matrix.

* ``harmonic`` (docs/theory.md, "Preconditioners"): K = s D κ(X̂X̂ᵀ) D with
  κ(ρ) = Σ_r a_r ρ^r (a_r ≥ 0 from :func:`ntkdist.kernel_coefficients`), D = diag ‖x_i‖ and s
  the normalisation factor. Degrees r ≤ 3 are kept exactly through explicit features
  Φ = [√a₀·1, √a₁·X̂, √a₂·sym(X̂ ⊗ X̂), √a₃·sym(X̂^⊗3)] (rank 1 + d + C(d+1, 2) + C(d+2, 3);
  degree 3 only where it fits, :func:`harmonic_plan`) and the tail as c·I,
  c = κ(1) − Σ a_r, since (X̂X̂ᵀ)^∘r ≈ I for large r in high dimension. Then
  K ≈ s D (ΦΦᵀ + cI) D, inverted by Woodbury: (cI + ΦΦᵀ)⁻¹ = (I − Φ (cI + ΦᵀΦ)⁻¹ Φᵀ)/c, with
  the small system factored once in float64 and Φ held in float32. Where the degree-3
  features are too many (C(d+2, 3) = 45760 at d = 64) but N × N float32 fits, the degree-3
  and degree-2 blocks are held in N-space instead (the ``gram`` form):
  B = cI + a₂(X̂X̂ᵀ)^∘2 + a₃(X̂X̂ᵀ)^∘3 is factored once in float32 and the degree ≤ 1
  features Φ₁ (the large constant and linear directions) join by Woodbury,
  (B + Φ₁Φ₁ᵀ)⁻¹ = B⁻¹ − W (I + Φ₁ᵀW)⁻¹ Wᵀ with W = B⁻¹Φ₁. When d(d+1)/2 exceeds
  ``max_rank`` the degree-2 block joins the tail. c is then lowered by ``HARMONIC_SHIFT``
  (a shift towards λ_min: the preconditioner stays positive definite for any shift < 1).
* ``nystrom``: m landmark rows S drawn with a seed, C = K(X, X_S) computed from the data,
  K̂ = C K_SS⁻¹ Cᵀ = U Λ̂ Uᵀ (stabilised Cholesky + SVD, Frangella, Tropp & Udell 2023), and
  P⁻¹ = (λ̂_m + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ) with μ = λ̂_m. Works for any kernel.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..kernels.limiting import kernel_tile, normalization_factor, row_block
from ..kernels.taylor import kernel_coefficients

PRECONDITIONERS = ("auto", "harmonic", "nystrom", "none")
DEFAULT_NYSTROM_RANK = 1000
#: Fraction of the tail c removed from the harmonic model: the model then approximates
#: (K − σI)⁻¹ with σ ≈ 0.9·s·c·‖x‖², a shift towards the bottom of the spectrum that, measured
#: at N = 5000 (d = 64, L = 3, block 8), cut LOBPCG's passes to a certified 1e-8 from 162 to 67.
HARMONIC_SHIFT = 0.9
#: Largest rank of the harmonic features (1 + d + C(d+1, 2) [+ C(d+2, 3)]).
HARMONIC_MAX_RANK = 6000
#: Largest set-up of the harmonic features (N × rank in float64 and float32).
HARMONIC_MAX_BYTES = 4e9
#: Largest N × N float32 factor of the degree-3 block in N-space (the ``gram`` form): N up to
#: 44721; also at most HARMONIC_GRAM_MEMORY_SHARE of the memory available when it is built.
HARMONIC_GRAM_MAX_BYTES = 8e9
HARMONIC_GRAM_MEMORY_SHARE = 0.5
#: ``auto`` and ``harmonic`` use the gram form from N ≥ C(d+2, 3) / HARMONIC_GRAM_FROM
#: (``harmonic:3`` wherever it fits): below, its set-up and its solves (each about a pass of
#: the kernel in memory) cost more time than the passes it saves. Measured at d = 64 on
#: 2 cores (`ntkdist run` defaults, benchmarks/RESULTS.md): solve time with it 1.20× at
#: N = 10000 (46 passes against 65), 1.04× at 20000 (57 against 125), 0.93× at 40000 (62
#: against 200); at N = 5000 it saved no pass (35 → 36, an in-process scratch measurement).
HARMONIC_GRAM_FROM = 4


@dataclass
class Preconditioner:
    """An applicable approximation of K⁻¹ with its description and set-up time."""

    name: str
    apply: object  # callable (N, b) -> (N, b), or None for the identity
    setup_seconds: float
    rank: int
    degree: int | None = None  # harmonic: the highest degree kept exactly
    form: str | None = None  # harmonic degree 3: "features" or "gram" (held N × N)
    info: dict | None = None  # more of what it did, for result.json (shift: σ, its estimate)
    release: object = None  # callable freeing what it holds outside memory (a factor on disk)

    def describe(self) -> dict:
        out = {"name": self.name, "rank": self.rank, "setup_seconds": self.setup_seconds}
        out.update(self.info or {})
        if self.degree is not None:
            out["degree"] = self.degree
        if self.form is not None:
            out["degree3_form"] = self.form
        return out


def _sym_square_features(UT: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Transposed features: column i of the result is φ(x̂_i) with ⟨φ(x̂), φ(ŷ)⟩ = (x̂·ŷ)²,
    i.e. x̂_k² and √2 x̂_k x̂_l (k < l), from ``UT`` = X̂ᵀ (d × N); written row block by row
    block, each a contiguous product (into ``out``, d(d+1)/2 × N, if given)."""
    d, n = UT.shape
    if out is None:
        out = np.empty((d * (d + 1) // 2, n), dtype=UT.dtype)
    np.multiply(UT, UT, out=out[:d])
    row = d
    for k in range(d - 1):
        w = d - 1 - k
        np.multiply(UT[k + 1:], np.sqrt(2.0) * UT[k], out=out[row:row + w])
        row += w
    return out


def _sym_cube_features(UT: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Transposed degree-3 features: ⟨φ(x̂), φ(ŷ)⟩ = (x̂·ŷ)³, one row per multiset
    {k ≤ l ≤ m} (C(d+2, 3) rows), weighted by √(3! / multiplicities!)."""
    d = UT.shape[0]
    row = 0
    for k in range(d):
        for l in range(k, d):
            kl = UT[k] * UT[l]
            w = d - l
            np.multiply(UT[l:], kl, out=out[row:row + w])
            # √(3!/multiplicities!) for m = l … d−1 (scalars: any array module)
            if k == l:  # k = l = m: 1; k = l < m: √3
                out[row + 1:row + w] *= np.sqrt(3.0)
            else:  # k < l = m: √3; k < l < m: √6
                out[row] *= np.sqrt(3.0)
                out[row + 1:row + w] *= np.sqrt(6.0)
            row += w
    return out


def _feature_sizes(d: int) -> list:
    """Rows of the harmonic features of degree 0, 1, 2, 3: C(d+r−1, r)."""
    return [1, d, d * (d + 1) // 2, d * (d + 1) * (d + 2) // 6]


def harmonic_plan(n: int, d: int, degree: int = 3, max_rank: int = HARMONIC_MAX_RANK,
                  max_bytes: float = HARMONIC_MAX_BYTES, gram_bytes: float | None = None,
                  gram_from: float = HARMONIC_GRAM_FROM) -> tuple:
    """(the highest degree ≤ ``degree`` kept exactly (at least 1), how the degree-3 block is
    held: "features" | "gram" | None). Degree r's features are kept while the rank
    Σ_{r' ≤ r} C(d+r'−1, r') is at most ``max_rank`` and, for degree 3, the set-up's N × rank
    float64 and float32 copies at most ``max_bytes``. Else degree 3 is held in N-space
    ("gram") where the degree-2 features are kept, N ≥ C(d+2, 3)/``gram_from`` and its
    4N² bytes are at most ``gram_bytes`` (default: HARMONIC_GRAM_MAX_BYTES and
    HARMONIC_GRAM_MEMORY_SHARE of the memory available now)."""
    sizes = _feature_sizes(d)
    kept = 1
    while kept < min(degree, 3):
        rank = sum(sizes[:kept + 2])
        if rank > max_rank or (kept == 2 and 12 * rank * n > max_bytes):
            break
        kept += 1
    if kept == 3:
        return 3, "features"
    if kept == 2 and degree >= 3 and n * gram_from >= sizes[3]:
        if gram_bytes is None:
            from .cholesky import available_memory

            gram_bytes = min(HARMONIC_GRAM_MAX_BYTES,
                             HARMONIC_GRAM_MEMORY_SHARE * available_memory())
        if 4.0 * n * n <= gram_bytes:
            return 3, "gram"
    return kept, None


def _degree3_gram(UT: np.ndarray, a2: float, a3: float, c: float) -> np.ndarray:
    """The Cholesky factor of B = cI + a₂(ÛÛᵀ)^∘2 + a₃(ÛÛᵀ)^∘3 (Û's rows unit, ``UT`` = Ûᵀ),
    formed and factored in float32 in place, row block by row block, then mirrored: returns
    an F-ordered array holding L in its lower triangle and Lᵀ in its upper one, so that both
    triangular solves of an application run as LAPACK's fast transposed kind (0.10 s each at
    N = 8000, b = 32 on 2 cores, against 0.22 s for the untransposed one: an in-process
    scratch measurement). None if the factorisation fails in float32 (B's condition too large
    for it)."""
    from .cholesky import BLOCK

    n = UT.shape[1]
    U32 = np.ascontiguousarray(UT.T, dtype=np.float32)
    B = np.empty((n, n), dtype=np.float32)
    for i in range(0, n, BLOCK):
        rows = B[i:i + BLOCK]
        np.matmul(U32[i:i + BLOCK], U32.T, out=rows)  # g
        square = rows * rows
        rows *= np.float32(a3)
        rows += np.float32(a2)
        rows *= square  # a₂g² + a₃g³
    B[np.diag_indices(n)] += np.float32(c)
    return factor_mirrored(B)


def factor_mirrored(B: np.ndarray) -> np.ndarray | None:
    """Cholesky-factor the C-ordered symmetric ``B`` (its lower triangle read) in place and
    mirror the factor: returns the F-ordered view holding L in its lower triangle and Lᵀ in
    its upper one (for :func:`triangular_pair`), or None where the factorisation fails in
    ``B``'s precision."""
    from .cholesky import BLOCK, _potrf_in_place

    n = B.shape[0]
    if not _potrf_in_place(B):
        return None
    for i in range(0, n, BLOCK):  # B's strict upper triangle ← L's strict lower, transposed
        e = min(i + BLOCK, n)
        B[i:e, e:] = B[e:, i:e].T
        D = B[i:e, i:e]
        upper = np.triu_indices(e - i, 1)
        D[upper] = D.T[upper]
    return B.T


def triangular_pair(LT: np.ndarray):
    """Z ↦ (LLᵀ)⁻¹Z with ``LT`` from :func:`factor_mirrored`: both triangular solves as
    LAPACK's fast transposed kind, in ``LT``'s precision (Z F-ordered in it)."""
    solve = scipy.linalg.solve_triangular

    def b_inv(Z):
        Z = solve(LT, Z, lower=False, trans=1, check_finite=False)  # (Lᵀ)ᵀ y = z
        return solve(LT, Z, lower=True, trans=1, check_finite=False)  # Lᵀ x = y

    return b_inv


def harmonic(X: np.ndarray, depth: int, kernel: str, normalization: str,
             max_rank: int = HARMONIC_MAX_RANK, shift: float = HARMONIC_SHIFT,
             feature_dtype=np.float32, degree: int = 3, gram_bytes: float | None = None,
             max_bytes: float = HARMONIC_MAX_BYTES, xp=None,
             gram_from: float = HARMONIC_GRAM_FROM) -> Preconditioner:
    """The harmonic preconditioner of rows ``X`` (module docstring). ``xp``: an array module
    (CuPy) to build and apply the features on, from and to host arrays; it holds the features
    in float32 and takes no gram form (a GPU has room for the degree-3 features: set
    ``max_rank`` and ``max_bytes`` for it)."""
    t0 = time.perf_counter()
    device = xp is not None and xp is not np
    if device:
        gram_bytes = 0.0
    block = row_block(X)
    U, norms = block.unit, block.norms
    n, d = U.shape
    a = kernel_coefficients(depth, kernel, 3)
    total = float(depth if kernel == "ntk" else 1.0)
    sizes = _feature_sizes(d)
    kept_degree, form = harmonic_plan(n, d, degree, max_rank, max_bytes, gram_bytes,
                                      gram_from)

    def tail(kept):  # c: the degrees above ``kept``, lowered by the shift
        rest = total - float(a[:kept + 1].sum())
        if rest <= 1e-12 * total:
            rest = 1e-6 * total  # depth 1: κ(ρ) = ρ exactly; keep the model definite
        return rest * (1.0 - shift)

    c = tail(kept_degree)
    UT = np.ascontiguousarray(U.T)
    factor = None
    if form == "gram":
        factor = _degree3_gram(UT, float(a[2]), float(a[3]), c)
        if factor is None:  # degree 3 joins the tail
            kept_degree, form = 2, None
            c = tail(2)
    rank = sum(sizes[:(1 if form == "gram" else kept_degree) + 1])
    if device:
        UT = xp.asarray(UT)
    # Φᵀ: features by rows, each row contiguous (float32 on a device: its memory)
    PhiT = (xp if device else np).empty((rank, n), dtype=feature_dtype if device else None)
    PhiT[0] = np.sqrt(a[0])
    np.multiply(UT, np.sqrt(a[1]), out=PhiT[1:1 + d])
    if kept_degree >= 2 and form != "gram":
        _sym_square_features(UT, out=PhiT[1 + d:1 + d + sizes[2]])
        PhiT[1 + d:1 + d + sizes[2]] *= np.sqrt(a[2])
    if form == "features":
        _sym_cube_features(UT, out=PhiT[1 + d + sizes[2]:])
        PhiT[1 + d + sizes[2]:] *= np.sqrt(a[3])
    scale = normalization_factor(normalization, d)
    inv_d = 1.0 / norms
    if form == "gram":
        return _gram_form(factor, PhiT.astype(np.float32), inv_d, scale, t0,
                          min(n, sum(sizes)))
    # (cI + ΦΦᵀ)⁻¹ = (I − Φ G Φᵀ)/c with G = (cI + ΦᵀΦ)⁻¹ formed once in float64 from its
    # Cholesky factor (rank × rank: a small GEMM per application instead of two triangular
    # solves), and Φᵀ kept in float32 in C order (rank × N, each feature row contiguous).
    if device:
        G = _device_inverse_spd(_features_gram(PhiT, xp), c, xp)
        inv_d = xp.asarray(inv_d)
    else:
        G = _inverse_spd(c * np.eye(rank) + PhiT @ PhiT.T)
        PhiT = PhiT.astype(feature_dtype)
    outer = inv_d / (c * scale)

    def apply(R):
        Z = (xp.asarray(R) if device else R) * inv_d[:, None]
        C = G @ (PhiT @ Z.astype(feature_dtype)).astype(np.float64)
        Z -= ((xp if device else np).ascontiguousarray(C.T, dtype=feature_dtype) @ PhiT).T
        Z *= outer[:, None]
        return xp.asnumpy(Z) if device else Z

    return Preconditioner("harmonic", apply, time.perf_counter() - t0, rank, kept_degree,
                          form)


def _inverse_spd(A: np.ndarray) -> np.ndarray:
    """A⁻¹ of a symmetric positive definite float64 A, from its Cholesky factor."""
    L = scipy.linalg.cholesky(A, lower=True)
    G, info = scipy.linalg.lapack.dpotri(L, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"harmonic preconditioner: dpotri failed ({info})")
    return np.tril(G) + np.tril(G, -1).T


def _features_gram(PhiT, xp, chunk: int = 4096):
    """ΦᵀΦ in float64 from float32 Φᵀ (rank × N), a float64 copy of ``chunk`` columns at a
    time."""
    rank, n = PhiT.shape
    A = xp.zeros((rank, rank), dtype=xp.float64)
    for j in range(0, n, chunk):
        P = PhiT[:, j:j + chunk].astype(xp.float64)
        A += P @ P.T
    return A


def _device_inverse_spd(A, c: float, xp):
    """(cI + A)⁻¹ on the array module's device, A overwritten (a GPU's solver; refused in
    one line where it is not finite, i.e. cI + A not safely definite)."""
    idx = xp.arange(A.shape[0])
    A[idx, idx] += c
    G = xp.linalg.inv(A)
    if not bool(xp.isfinite(G).all()):
        raise np.linalg.LinAlgError("harmonic preconditioner: the device's inverse of "
                                    "cI + ΦᵀΦ is not finite")
    return G


def _gram_form(LT: np.ndarray, PhiT: np.ndarray, inv_d: np.ndarray, scale: float,
               t0: float, rank: int) -> Preconditioner:
    """The degree ≤ 3 model in N-space: (B + Φ₁Φ₁ᵀ)⁻¹ (:func:`woodbury`) with B = LLᵀ
    (``LT``: F-ordered float32, L in its lower triangle and Lᵀ in its upper one), between
    the scalings D⁻¹ (and 1/s). An application: two float32 triangular solves with the
    N × N factor (as costly as a pass of K in memory) and three thin products with the
    N × (1 + d) features. ``rank``: the rank of the degree ≤ 3 part it keeps exactly."""
    b_inv = triangular_pair(LT)
    inner = woodbury(lambda Z: b_inv(np.asfortranarray(Z, dtype=np.float32)), PhiT)

    def apply(R):
        return inner(R * inv_d[:, None]) * (inv_d / scale)[:, None]

    return Preconditioner("harmonic", apply, time.perf_counter() - t0, rank, 3, "gram")


def woodbury(b_inv, PhiT, xp=np):
    """Z ↦ (B + ΦΦᵀ)⁻¹Z = B⁻¹Z − W S WᵀZ with W = B⁻¹Φ and S = (I + ΦᵀW)⁻¹, given
    ``b_inv``: Z ↦ B⁻¹Z in float32 (Z a float32 device block or a host block of any
    precision, converted once by ``b_inv``), and ``PhiT`` = Φᵀ (r × N, float32) on the array
    module ``xp`` (S, r × r, formed in float64 on the host). Host float64 blocks in and out."""
    W = b_inv(PhiT.T)  # N × r, float32
    M = PhiT @ W
    M = (xp.asnumpy(M) if xp is not np else M).astype(np.float64)
    S = _inverse_spd(np.eye(len(M)) + (M + M.T) / 2)
    S = xp.asarray(S) if xp is not np else S

    def apply(R):
        Y = b_inv(R)
        C = S @ (PhiT @ Y).astype(xp.float64)
        Y = Y.astype(xp.float64) - W @ C.astype(xp.float32)
        return xp.asnumpy(Y) if xp is not np else Y

    return apply


def nystrom(n: int, columns, rank: int = DEFAULT_NYSTROM_RANK,
            seed: int = 0) -> Preconditioner:
    """The Nyström preconditioner of rank min(rank, n) from ``columns``: idx ↦ K[:, idx]
    (the tile function on the rows for the limits, one pass of the operator for a finite
    network), with the columns sampled at random (``seed``)."""
    t0 = time.perf_counter()
    m = min(rank, n)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    C = np.asarray(columns(idx), dtype=np.float64)  # the top of K's spectrum, as seen by
    W = C[idx]                                      # the columns, flattened to its m-th value
    W = (W + W.T) / 2
    shift = np.finfo(float).eps * np.trace(W)
    L = scipy.linalg.cholesky(W + shift * np.eye(m), lower=True)
    B = scipy.linalg.solve_triangular(L, C.T, lower=True).T
    U, sig, _ = scipy.linalg.svd(B, full_matrices=False)
    lam = np.clip(sig ** 2 - shift, 0.0, None)
    mu = max(lam[-1], 1e-12 * lam[0])
    weights = (lam[-1] + mu) / (lam + mu) - 1.0

    def apply(R):
        return R + U @ (weights[:, None] * (U.T @ R))

    return Preconditioner(f"nystrom:{m}", apply, time.perf_counter() - t0, m)


def harmonic_request(name: str, depth: int, finite: bool = False,
                     device: str = "cpu") -> dict | None:
    """What ``name`` (as ``--precond`` takes it) asks of :func:`harmonic`, or None where the
    preconditioner is not the harmonic one: ``harmonic:3`` degree 3 wherever it fits,
    ``auto`` and ``harmonic`` where it repays its cost (``HARMONIC_GRAM_FROM``); on GPU runs
    no gram form, whose N × N solves on the client would cost more than the GPU's passes.
    ``shift`` (the first stage of :mod:`ntkdist.solvers.shift`'s solve): degree 3 by its
    features where they fit, no gram form."""
    base, _, arg = name.partition(":")
    if base == "shift" and not finite:  # its first stage: no N × N form (the shift holds one)
        return {"degree": 3, "gram_from": math.inf, "gram_bytes": 0.0}
    if finite or base not in ("auto", "harmonic") or (base == "auto" and depth < 2):
        return None
    return {"degree": int(arg) if arg else 3,
            "gram_from": math.inf if arg else HARMONIC_GRAM_FROM,
            "gram_bytes": 0.0 if device == "gpu" else None}


def make_preconditioner(name: str, X, depth: int, kernel: str, normalization: str,
                        seed: int = 0, columns=None, device: str = "cpu") -> Preconditioner:
    """``auto`` | ``harmonic[:DEGREE]`` | ``nystrom[:RANK]`` | ``none``, and ``shift`` for the
    first stage of a shift-invert solve (the harmonic model without its gram form). ``columns``: a
    function idx ↦ K[:, idx] for a kernel without a closed form (a finite network's: one
    pass of its operator), which takes ``nystrom`` (``auto``: rank ``DEFAULT_NYSTROM_RANK``)
    and ``none`` only. ``device``: where the solver's products run
    (:func:`harmonic_request`)."""
    base, _, arg = name.partition(":")
    if columns is not None and base == "auto":
        base = "nystrom"
    if columns is not None and base not in ("nystrom", "none"):
        raise ValueError(f"preconditioner {name!r} needs the kernel's closed form")
    if base == "auto":
        base = "harmonic" if depth >= 2 else "none"
    if base == "none":
        return Preconditioner("none", None, 0.0, 0)
    if base in ("harmonic", "shift"):
        return harmonic(np.asarray(X, dtype=np.float64), depth, kernel, normalization,
                        **harmonic_request(name, depth, device=device))
    if base == "nystrom":
        if columns is None:
            X = np.asarray(X, dtype=np.float64)
            rows = row_block(X)

            def columns(idx):
                return kernel_tile(rows, row_block(X[idx]), depth, kernel, normalization)

        return nystrom(len(X), columns, int(arg) if arg else DEFAULT_NYSTROM_RANK, seed)
    raise ValueError(f"unknown preconditioner {name!r}")
