"""``--certify cholesky``: a proof that every eigenvalue of K lies above a value σ − δ, from a
Cholesky factorisation of K − σI that succeeds in floating point.

The bound (Demmel 1989, LAPACK Working Note 14; Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., Theorem 10.3; used for verification as in Rump, BIT 46, 2006):
if the Cholesky factorisation of a symmetric A ∈ ℝ^{n×n} runs to completion in floating
point with unit roundoff u, the computed R satisfies RᵀR = A + ΔA with
|ΔA| ≤ γ_{n+1} |Rᵀ||R| (γ_k = ku / (1 − ku)), whatever the order of the inner products. Then
‖ΔA‖₂ ≤ γ_{n+1} ‖R‖_F² and ‖R‖_F² = tr(A + ΔA) ≤ tr(A) + γ_{n+1} ‖R‖_F², so

    ‖ΔA‖₂ ≤ γ_{n+1} / (1 − γ_{n+1}) · tr(A).

With A = fl(K − σI) (the shift rounds each diagonal entry: |E_ii| ≤ u |A_ii|) and RᵀR
positive definite (R's diagonal positive),

    λ_min(K) > σ − γ_{n+1}/(1 − γ_{n+1}) · tr(A) − u · max_i |A_ii|.

ntkdist takes γ_{2n+2} for γ_{n+1} (room for implementations that multiply by reciprocals or
fuse multiply–adds in the triangular solves, as blocked LAPACK does) and adds n²·2⁻¹⁰²² for
underflow: the *allowance* δ. The upper end of the bracket is the float64 Rayleigh quotient
ρ = vᵀKv / vᵀv of the solver's vector, ≥ λ_min, plus its own rounding allowance
γ_{2n+2} · |v|ᵀ|K||v| / vᵀv.

Both ends are about K as ntkdist forms it in float64 from the rows (the tile function's own
error against the exact kernel, a few ulps an entry, is not in them; docs/accuracy.md).

On a GPU (CuPy arrays: K formed, factored and multiplied there) the same blocked algorithm
runs with cuSOLVER's potrf on the diagonal blocks and cuBLAS for the panels and updates. The
bound holds for any order of the inner products; it assumes, as on the CPU, that every
library routine computes by substitution and inner products in IEEE float64 (Higham's model:
no explicitly inverted diagonal blocks in the triangular solves, no emulated or
reduced-precision GEMM). OpenBLAS's routines are open to read; cuBLAS's and cuSOLVER's are
not, so on a GPU this is an assumption, and result.json's ``certify.assumption`` says so.
"""

from __future__ import annotations

import time

import numpy as np

#: float64's unit roundoff.
UNIT_ROUNDOFF = 2.0 ** -53
#: Rows of K formed, restored and multiplied at a time (bounds the temporaries).
BLOCK = 2048
#: σ tried at θ − δ₀·STEP^k, k = 0 … ATTEMPTS − 1.
ATTEMPTS = 4
STEP = 8.0
#: The first σ sits the allowance divided by this below θ (a float64 Cholesky's actual
#: error is far below the worst case the allowance bounds), or the certified error below θ,
#: if that is larger.
FIRST_SHARE = 16.0
#: Room for K itself besides what the process has: refused above this share of the
#: available memory.
MEMORY_SHARE = 0.85
REFERENCE = ("Demmel (1989), LAPACK Working Note 14; Higham, Accuracy and Stability of "
             "Numerical Algorithms, 2nd ed. (2002), Theorem 10.3: a successful float64 "
             "Cholesky of A = fl(K − σI) gives λ_min(K) > σ − γ_{2n+2}/(1−γ_{2n+2})·tr(A) − "
             "u·max|A_ii| − n²·2^-1022")


GPU_ASSUMPTION = ("cuSOLVER's potrf and cuBLAS's trsm and GEMM compute by substitution and "
                  "inner products in IEEE float64 (Higham's model; their sources are closed), "
                  "as OpenBLAS's do on the CPU")


def gamma(k: int) -> float:
    ku = k * UNIT_ROUNDOFF
    if ku >= 1:
        return np.inf
    return ku / (1.0 - ku)


def cholesky_allowance(n: int, trace_shifted: float, max_diag: float) -> float:
    """δ: what a successful Cholesky of the n×n A = fl(K − σI) leaves unproved below σ
    (``trace_shifted`` = tr(A), ``max_diag`` = max_i |A_ii|), rounded up."""
    g = gamma(2 * n + 2)
    if not np.isfinite(g) or g >= 0.5:
        return np.inf
    delta = g / (1.0 - g) * trace_shifted + UNIT_ROUNDOFF * max_diag + n * n * 2.0 ** -1022
    return float(np.nextafter(delta * (1 + 4 * UNIT_ROUNDOFF * n), np.inf))


def failure_allowance(n: int, max_diag: float) -> float:
    """What a float64 Cholesky of the n×n A = fl(K − σI) that fails leaves unproved above σ,
    rounded up: by Demmel's theorem (Higham, 2nd ed., Theorem 10.7), the factorisation runs
    to completion when λ_min(H) > nγ_{n+1}/(1 − nγ_{n+1}) for H = D⁻¹AD⁻¹, D² = diag(A); so a
    failure gives λ_min(A) ≤ max_i A_ii · nγ/(1 − nγ) (a unit vector of H's, mapped by D⁻¹),
    and λ_min(K) ≤ σ + that + u·max_i A_ii (the shift's rounding). γ_{2n+2} for γ_{n+1}, as
    :func:`cholesky_allowance` takes it."""
    ng = n * gamma(2 * n + 2)
    if not np.isfinite(ng) or ng >= 0.5:
        return np.inf
    delta = (ng / (1.0 - ng) + UNIT_ROUNDOFF) * max_diag
    return float(np.nextafter(delta * (1 + 4 * UNIT_ROUNDOFF * n), np.inf))


def memory_needed(n: int, columns: int = 0) -> int:
    """Bytes the certification holds: K in float64, two row blocks of it (the Rayleigh
    quotient's |K| rows, a restore's copy) and a tile's temporaries; finite widths: every
    row block's features while K is formed (``columns`` float64 values a row)."""
    return 8 * n * n + 2 * 8 * BLOCK * n + 40 * 8 * BLOCK * BLOCK + 8 * n * columns


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_device_memory(n: int, xp, free: int | None = None, d: int = 0) -> str | None:
    """Why K (n×n float64) and the factorisation's temporaries cannot be held on the GPU of
    ``xp`` (CuPy) now, or None: :func:`memory_needed` (the row blocks of ``d`` columns, the
    panel's contiguous copy included) within MEMORY_SHARE of its free memory (CuPy's pool of
    unused blocks returned first)."""
    if free is None:
        xp.get_default_memory_pool().free_all_blocks()
        free = int(xp.cuda.runtime.memGetInfo()[0])
    need = memory_needed(n, d + 1) + 8 * BLOCK * n
    if need > MEMORY_SHARE * free:
        return (f"--certify cholesky on the GPU holds K in float64 there: {need / 1e9:.1f} GB "
                f"at N = {n}, and {free / 1e9:.1f} GB are free on it")
    return None


def check_memory(n: int, columns: int = 0, available: int | None = None) -> str | None:
    """Why K (n×n float64) cannot be held for the factorisation here, or None."""
    need = memory_needed(n, columns)
    have = available_memory() if available is None else available
    if need > MEMORY_SHARE * have:
        return (f"--certify cholesky holds K in float64 in this process: {need / 1e9:.1f} GB "
                f"at N = {n}, and {have / 1e9:.1f} GB are available (N ≤ "
                f"{max_n(have)} fits)")
    return None


def max_n(available: int) -> int:
    n = int(np.sqrt(MEMORY_SHARE * available / 8))
    while n > 1 and memory_needed(n) > MEMORY_SHARE * available:
        n -= 1
    return n


def _module(a):
    """NumPy for a NumPy array, else the array module CuPy gives for it."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(a)


def dense_kernel(X: np.ndarray, kernel, xp=np):
    """K(X, X) in float64, formed block by block with ``kernel.tile`` (the tile function the
    store and the operators use), C-ordered and exactly symmetric; on the GPU of ``xp``
    (CuPy; ``X`` host rows) where given."""
    n = X.shape[0]
    K = xp.empty((n, n), dtype=xp.float64)
    blocks = [kernel.features(X[i:i + BLOCK] if xp is np else xp.asarray(X[i:i + BLOCK]))
              for i in range(0, n, BLOCK)]
    for bi, A in enumerate(blocks):
        i = bi * BLOCK
        for bj in range(bi, len(blocks)):
            j = bj * BLOCK
            T = xp.asarray(kernel.tile(A, blocks[bj]), dtype=xp.float64)
            K[i:i + T.shape[0], j:j + T.shape[1]] = T
            if bj != bi:
                K[j:j + T.shape[1], i:i + T.shape[0]] = T.T
        D = K[i:i + BLOCK, i:i + BLOCK]
        D[...] = xp.triu(D) + xp.triu(D, 1).T  # the diagonal tile exactly symmetric
    return K


def rayleigh_upper(K: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """(ρ, ρ + its rounding allowance): ρ = vᵀKv / vᵀv in float64, and a value that is
    ≥ λ_min(K) for certain. K on a GPU: ``v`` (host or device) goes there."""
    xp = _module(K)
    v = xp.asarray(v, dtype=xp.float64)
    n = v.shape[0]
    w = xp.empty(n, dtype=xp.float64)
    bound = 0.0
    av = xp.abs(v)
    for i in range(0, n, BLOCK):
        rows = K[i:i + BLOCK]
        w[i:i + BLOCK] = rows @ v
        bound += float(av[i:i + BLOCK] @ (xp.abs(rows) @ av))
    vv = float(v @ v)
    rho = float(v @ w) / vv
    slack = gamma(2 * n + 2) * bound / (vv * (1 - gamma(n + 1)))
    return rho, float(np.nextafter(rho + slack, np.inf))


def _potrf_in_place(K, nb: int | None = None) -> bool:
    """Factorise K = LLᵀ (C-ordered, symmetric) in place on its lower triangle, leaving its
    strict upper triangle untouched: right-looking blocked Cholesky, LAPACK's potrf on the
    nb × nb diagonal blocks, triangular solves for the panels and GEMMs for the trailing
    updates. (One potrf call on the whole matrix overflows OpenBLAS's stack above
    N ≈ 15000 under the default 8 MB limit.) True when it ran to completion with a positive
    diagonal. float32 or float64, as K is (LAPACK's spotrf or dpotrf). K on a GPU: the same
    steps there (cuSOLVER's potrf through CuPy on the diagonal blocks, cuBLAS's triangular
    solves and GEMMs), with nb × nb and N × nb temporaries only."""
    xp = _module(K)
    if xp is np:
        from scipy.linalg import get_lapack_funcs, solve_triangular

        potrf, = get_lapack_funcs(("potrf",), (K,))

        def factor(D):
            L, info = potrf(np.array(D), lower=1, clean=1)
            return L if info == 0 else None
    else:
        import cupyx
        from cupyx.scipy.linalg import solve_triangular

        def factor(D):
            D = xp.tril(D)
            D += xp.tril(D, -1).T  # from the lower triangle, whichever one cuSOLVER reads
            try:
                with cupyx.errstate(linalg="raise"):  # else a failed factor goes unsaid
                    return xp.linalg.cholesky(D)
            except np.linalg.LinAlgError:
                return None

    n = K.shape[0]
    nb = nb or BLOCK
    for k in range(0, n, nb):
        e = min(k + nb, n)
        L = factor(K[k:e, k:e])
        if L is None:
            return False
        d = xp.diagonal(L)
        if not (bool(xp.all(xp.isfinite(d))) and bool(xp.all(d > 0))):
            return False
        _write_lower(K[k:e, k:e], L)
        if e == n:
            break
        # panel: K[e:, k:e] ← K[e:, k:e] · L⁻ᵀ
        K[e:, k:e] = solve_triangular(L, K[e:, k:e].T, lower=True, check_finite=False).T
        P = K[e:, k:e] if xp is np else xp.ascontiguousarray(K[e:, k:e])  # (one copy, N × nb)
        for j in range(e, n, nb):  # trailing update of the lower triangle, a row block at a time
            j2 = min(j + nb, n)
            Pj = P[j - e:j2 - e]
            if j > e:
                K[j:j2, e:j] -= Pj @ P[:j - e].T
            _write_lower(K[j:j2, j:j2], K[j:j2, j:j2] - Pj @ Pj.T)
    return True


def _write_lower(D, T) -> None:
    """D's lower triangle (with the diagonal) ← T's; D's strict upper triangle untouched."""
    xp = _module(D)
    if xp is np:
        np.copyto(D, T, where=np.tri(D.shape[0], dtype=bool))
    else:
        D[...] = xp.where(xp.tri(D.shape[0], dtype=bool), T, D)


def _restore(K, diag) -> None:
    """Rebuild K's lower triangle from its untouched strict upper one, and its diagonal
    from ``diag``, block by block."""
    xp = _module(K)
    n = K.shape[0]
    for i in range(0, n, BLOCK):
        e = min(i + BLOCK, n)
        K[i:e, :i] = K[:i, i:e].T
        D = K[i:e, i:e]
        D[...] = xp.triu(D, 1) + xp.triu(D, 1).T
    _set_diagonal(K, diag)


def _set_diagonal(K, values) -> None:
    xp = _module(K)
    idx = xp.arange(K.shape[0])
    K[idx, idx] = values


def certify_cholesky(K, theta: float, abs_error: float | None,
                     vector: np.ndarray | None = None, log=None) -> dict:
    """A two-sided bracket on λ_min(K) that rests on no gap estimate: ``lower`` from the
    first σ = θ − δ₀·8^k (k < 4; δ₀ = max(allowance/16, the solver's certified
    error)) at which float64 Cholesky of K − σI succeeds, less the
    allowance; ``upper`` from the Rayleigh quotient of ``vector``. K (float64, C-ordered,
    symmetric; a NumPy array, or a CuPy one to factorise it on its GPU) is overwritten by
    the factor: pass one that is not needed afterwards.

    ``theta``: the solver's λ_min; ``abs_error``: its certified absolute error (None: none).
    Returns a JSON-ready dict: ``status`` (proved | failed | skipped), ``lower``, ``upper``,
    ``rayleigh_quotient``, ``sigma``, ``allowance``, ``attempts`` [{sigma, factorised,
    seconds, and for a failure lambda_min_at_most (:func:`failure_allowance`)}],
    ``upper_from_failure`` (the least of those, where one failed; ``upper`` takes it if it
    is lower), ``reason`` (why not proved), ``bound`` (the theorem used)."""
    n = K.shape[0]
    t0 = time.perf_counter()
    xp = _module(K)  # NumPy, or CuPy for K on a GPU (factorised there)
    out = {"method": "cholesky", "status": "skipped", "lower": None, "upper": None,
           "rayleigh_quotient": None, "sigma": None, "allowance": None, "attempts": [],
           "reason": None, "bound": REFERENCE, "matrix": "K formed in float64 from the rows",
           "device": "cpu" if xp is np else "gpu", "seconds": None}
    if xp is not np:
        out["assumption"] = GPU_ASSUMPTION
    upper = None
    if vector is not None:
        rho, upper = rayleigh_upper(K, vector)
        out.update(rayleigh_quotient=rho, upper=upper)
    diag = xp.diagonal(K).copy()
    top = min(theta, upper) if upper is not None else theta
    trace = float(xp.sum(diag))
    delta0 = cholesky_allowance(n, max(trace - n * top, 0.0),
                                float(xp.max(xp.abs(diag - top)))) / FIRST_SHARE
    if abs_error is not None and np.isfinite(abs_error):
        delta0 = max(delta0, float(abs_error))
    if not np.isfinite(delta0) or top - delta0 <= 0:
        out["reason"] = (f"the rounding allowance of a float64 Cholesky at N = {n} "
                         f"({delta0:.3g}) is not below the Ritz value {top:.6g}: nothing "
                         "above 0 can be proved")
        out["seconds"] = time.perf_counter() - t0
        return out
    for attempt in range(ATTEMPTS):
        sigma = top - delta0 * STEP ** attempt
        if sigma <= 0:
            break
        if attempt:
            _restore(K, diag)
        shifted = diag - sigma
        if bool(xp.any(shifted <= 0)):  # a diagonal entry at or below σ: cannot factorise
            out["attempts"].append({"sigma": sigma, "factorised": False, "seconds": 0.0,
                                    "lambda_min_at_most": float(xp.min(diag))})
            continue
        _set_diagonal(K, shifted)
        t = time.perf_counter()
        ok = _potrf_in_place(K)
        seconds = time.perf_counter() - t
        out["attempts"].append({"sigma": sigma, "factorised": ok, "seconds": seconds})
        if not ok:  # a failure proves an eigenvalue near or below σ
            out["attempts"][-1]["lambda_min_at_most"] = float(np.nextafter(
                sigma + failure_allowance(n, float(xp.max(shifted))), np.inf))
        if log is not None:
            log(f"cholesky of K − σI at σ = {sigma:.12g}: "
                f"{'factorised' if ok else 'not positive definite'} ({seconds:.1f} s)")
        if ok:
            allowance = cholesky_allowance(n, float(xp.sum(shifted)), float(xp.max(shifted)))
            lower = sigma - allowance
            out.update(sigma=sigma, allowance=allowance)
            if lower > 0:
                out.update(status="proved", lower=float(lower))
            else:
                out["reason"] = (f"factorised at σ = {sigma:.6g}, but the allowance "
                                 f"{allowance:.3g} leaves nothing above 0 proved")
            break
    tried = out["attempts"]
    caps = [a["lambda_min_at_most"] for a in tried if "lambda_min_at_most" in a]
    if caps:  # the tightest upper end: a failed factorisation's, if below the quotient's
        out["upper_from_failure"] = min(caps)
        if out["upper"] is None or out["upper_from_failure"] < out["upper"]:
            out["upper"] = out["upper_from_failure"]
    if out["status"] != "proved" and out["sigma"] is None:
        if tried and not any(a["factorised"] for a in tried):
            out["status"] = "failed"
            out["reason"] = (f"K − σI is not positive definite in float64 at any σ tried "
                             f"(down to {tried[-1]['sigma']:.6g}): K very likely has an "
                             f"eigenvalue below the solver's λ_min {theta:.10g}")
        else:
            out["reason"] = "σ reached 0 before a factorisation succeeded"
    out["seconds"] = time.perf_counter() - t0
    return out
