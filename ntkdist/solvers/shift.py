"""Shift-invert preconditioning: (K − σI)⁻¹ from a float32 Cholesky factor of K − σI, with σ
just below λ_min (docs/theory.md, "Preconditioners").

With P = (K − σI)⁻¹ a preconditioned eigensolver converges like inverse iteration shifted to
σ: the error of λ_1 shrinks by about (λ_1 − σ)/(λ_{b+1} − σ) a pass (b the block), whatever
the spectrum above. So σ must be close below λ_1, which is not known before the solve. The
solve therefore runs in two stages (``ntkdist.pipeline``):

1. an *estimate*: the same solver with the cheap harmonic preconditioner (degrees ≤ 2) to a
   relative accuracy of :data:`SHIFT_ESTIMATE_TOL`, on the fast (float32) products where the
   run has them; it gives a Ritz value λ̃ ≥ λ_1 and its residual ‖r‖;
2. σ = λ̃ − max(:data:`SHIFT_MARGIN`·λ̃, ‖r‖) (:func:`shift_sigma`), K − σI formed from the rows
   with the tile function and factored in float32 on the client, and the solve goes on from
   the estimate's Ritz block with P, to the asked accuracy.

If the factorisation fails (σ above λ_1, or K − σI beyond float32) σ is moved down once, to
λ̃ − 4(λ̃ − σ); if that fails too, the solve goes on with the harmonic preconditioner. The
preconditioner only steers the iteration: the values, residuals and certificate come from
the products alone, whatever σ is.

Memory: 4N² bytes on the client (N ≤ 44721 under :data:`SHIFT_MAX_BYTES`), as the harmonic
preconditioner's gram form. Time: N³/3 float32 flops to factor, the kernel's N²/2 entries to
form, and two N² triangular solves an iteration.
"""

from __future__ import annotations

import time

import numpy as np

from .precond import Preconditioner, factor_mirrored, triangular_pair

#: Stage 1's relative accuracy: enough to place σ within about 1 % below λ_1.
SHIFT_ESTIMATE_TOL = 1e-2
#: σ is at least this fraction of λ̃ below the estimate λ̃ (and at least its residual ‖r‖).
#: Measured in process at d = 64, LOBPCG block 32 (N = 20000): σ 1.1 % below λ_1 took 13
#: passes after the estimate's 22, σ 1.7 % below 19; at N = 5000, σ 0.4 %, 2 % and 7 % below
#: λ_1 took 7, 12 and 22 passes from a random start.
SHIFT_MARGIN = 5e-3
#: Largest N × N float32 matrix of K − σI; also at most SHIFT_MEMORY_SHARE of the memory
#: available when it is formed.
SHIFT_MAX_BYTES = 8e9
SHIFT_MEMORY_SHARE = 0.5
#: On a GPU (``--device gpu``): K − σI and its factor within this share of the free memory.
SHIFT_DEVICE_SHARE = 0.8
#: Row blocks of K − σI formed at a time (tiles of SHIFT_BLOCK² entries).
SHIFT_BLOCK = 2048
#: ``--precond auto`` uses the shift on CPU runs from this N (where it fits). Measured at
#: d = 64 (benchmarks/RESULTS.md): in process, N = 5000 took 3.4 s against the harmonic
#: model's 2.9 s (20 passes against 38); through the pipeline (`make demo`, N = 8000) the
#: solve and set-ups took 9.0 s against 12.9 s, and 0.66–0.73× at N = 10000–40000.
SHIFT_FROM = 5000


def uses_shift(name: str, n: int, depth: int, finite: bool = False,
               device: str = "cpu") -> bool:
    """Whether ``--precond name`` runs the two-stage shift-invert solve: ``shift`` always
    (where it cannot, the run says why and keeps the harmonic model); ``auto`` for the
    limiting kernels at depth ≥ 2 on CPU runs from N ≥ :data:`SHIFT_FROM` where
    :func:`shift_fits`. (GPU runs keep the harmonic model: their passes cost less than the
    client's N × N solves.)"""
    if name == "shift":
        return True
    return (name == "auto" and not finite and depth >= 2 and device == "cpu"
            and n >= SHIFT_FROM and shift_fits(n) is None)


def shift_fits(n: int, max_bytes: float | None = None, xp=None) -> str | None:
    """None where K − σI may be held: on the client, 4N² bytes within SHIFT_MAX_BYTES and
    SHIFT_MEMORY_SHARE of the memory available; on a device (``xp``: CuPy), 8N² bytes (the
    matrix and CuPy's factor of it) within SHIFT_DEVICE_SHARE of its free memory. Else why
    not (one line)."""
    device = xp is not None and xp is not np
    need = (8.0 if device else 4.0) * n * n
    if max_bytes is None and device:
        max_bytes = SHIFT_DEVICE_SHARE * float(xp.cuda.runtime.memGetInfo()[0])
    elif max_bytes is None:
        from .cholesky import available_memory

        max_bytes = min(SHIFT_MAX_BYTES, SHIFT_MEMORY_SHARE * available_memory())
    if need > max_bytes:
        return (f"the shift-invert preconditioner holds K − σI in float32 ({need / 1e9:.1f} GB "
                f"at N = {n}{' with its factor, on the GPU' if device else ''}), more than its "
                f"{max_bytes / 1e9:.1f} GB")
    return None


def shift_sigma(estimate: float, residual: float, margin: float = SHIFT_MARGIN) -> float:
    """σ below a Ritz value ``estimate`` (≥ λ_1) with residual norm ``residual``."""
    return float(estimate) - max(margin * abs(float(estimate)), float(residual))


def shifted_kernel(X: np.ndarray, kernel, sigma: float, block: int = SHIFT_BLOCK,
                   threads: int | None = None) -> np.ndarray:
    """K(X, X) − σI in float32, C-ordered, formed in its lower triangle (block row by block
    row with ``kernel.tile``, the tile function of the store and the operators; tiles on
    ``threads`` threads); the strict upper triangle is left unset."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    n = X.shape[0]
    B = np.empty((n, n), dtype=np.float32)
    starts = list(range(0, n, block))
    feats = [kernel.features(X[i:i + block]) for i in starts]

    def row(bi):
        i = starts[bi]
        for bj in range(bi + 1):
            j = starts[bj]
            T = kernel.tile(feats[bi], feats[bj])
            B[i:i + T.shape[0], j:j + T.shape[1]] = T

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for _ in pool.map(row, reversed(range(len(starts)))):  # longest rows first
            pass
    B[np.diag_indices(n)] -= np.float32(sigma)
    return B


def device_shifted_kernel(X, kernel, sigma: float, xp, block: int = SHIFT_BLOCK):
    """K(X, X) − σI in float32 on the device of ``xp`` (CuPy), both triangles, from host rows
    ``X`` (the tile function on device row blocks, as the GPU operator builds its tiles)."""
    n = X.shape[0]
    B = xp.empty((n, n), dtype=xp.float32)
    starts = list(range(0, n, block))
    feats = [kernel.features(xp.asarray(X[i:i + block])) for i in starts]
    for bi, i in enumerate(starts):
        for bj in range(bi + 1):
            j = starts[bj]
            T = kernel.tile(feats[bi], feats[bj]).astype(xp.float32)
            B[i:i + T.shape[0], j:j + T.shape[1]] = T
            if bj < bi:
                B[j:j + T.shape[1], i:i + T.shape[0]] = T.T
    idx = xp.arange(n)
    B[idx, idx] -= np.float32(sigma)
    return B


def _device_shift_invert(X, kernel, sigma: float, xp) -> Preconditioner | None:
    """:func:`shift_invert` on a GPU: K − σI formed and factored there (CuPy's Cholesky),
    each application two float32 triangular solves there (cuBLAS), from and to host arrays."""
    from cupyx.scipy.linalg import solve_triangular

    t0 = time.perf_counter()
    B = device_shifted_kernel(X, kernel, sigma, xp)
    formed = time.perf_counter() - t0
    try:
        L = xp.linalg.cholesky(B)
    except np.linalg.LinAlgError:
        return None
    del B
    diag = xp.diagonal(L)
    if not bool(xp.all(xp.isfinite(diag))) or not bool(xp.all(diag > 0)):
        return None

    def apply(R):
        Z = solve_triangular(L, xp.asarray(R, dtype=xp.float32), lower=True)
        Z = solve_triangular(L, Z, lower=True, trans="T")
        return xp.asnumpy(Z).astype(np.float64)

    return Preconditioner("shift", apply, time.perf_counter() - t0, X.shape[0],
                          info={"sigma": float(sigma), "form_seconds": formed,
                                "device": "gpu"})


def shift_invert(X: np.ndarray, kernel, sigma: float, xp=None) -> Preconditioner | None:
    """P = (K − σI)⁻¹ applied through a float32 Cholesky factor (two triangular solves), or
    None where K − σI does not factor in float32. ``kernel``: a
    :class:`ntkdist.spec.KernelSpec` with a closed form. ``xp``: CuPy to form, factor and
    apply it on the GPU (host arrays in and out)."""
    if xp is not None and xp is not np:
        return _device_shift_invert(np.asarray(X, dtype=np.float64), kernel, sigma, xp)
    t0 = time.perf_counter()
    B = shifted_kernel(np.asarray(X, dtype=np.float64), kernel, sigma)
    formed = time.perf_counter() - t0
    LT = factor_mirrored(B)
    if LT is None:
        return None
    b_inv = triangular_pair(LT)

    def apply(R):
        return b_inv(np.asfortranarray(R, dtype=np.float32)).astype(np.float64)

    return Preconditioner("shift", apply, time.perf_counter() - t0, X.shape[0],
                          info={"sigma": float(sigma), "form_seconds": formed})
