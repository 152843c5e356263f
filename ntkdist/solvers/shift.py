"""Shift-invert preconditioning: (K − σI)⁻¹ from a float32 Cholesky factor of K − σI, with σ
just below λ_min (docs/theory.md, "Preconditioners").

With P = (K − σI)⁻¹ a preconditioned eigensolver converges like inverse iteration shifted to
σ: the error of λ_1 shrinks by about (λ_1 − σ)/(λ_{b+1} − σ) a pass (b the block), whatever
the spectrum above. So σ must be close below λ_1, which is not known before the solve. The
solve therefore runs in two stages (``ntkdist.pipeline``):

1. an *estimate*: the same solver with the harmonic preconditioner (degree 3 by its
   features where they fit, no N × N form) to a relative accuracy of
   :data:`SHIFT_ESTIMATE_TOL`, on the fast (float32) products where the run has them; it
   gives a Ritz value λ̃ ≥ λ_1 and its residual ‖r‖;
2. σ = λ̃ − max(:data:`SHIFT_MARGIN`·λ̃, ‖r‖) (:func:`shift_sigma`), K − σI formed from the rows
   with the tile function and factored in float32 on the client (less its degree-0 and
   degree-1 terms, which join by Woodbury: :func:`shift_invert`), and the solve goes on from
   the estimate's Ritz block with P, to the asked accuracy.

Where the paper's model predicts λ_1 closely (sphere rows, the NTK, d ≥ 64, depth ≥ 3,
N ≥ 1000: :func:`trusted_prediction`), the estimate stops after its start block (two
passes) and σ is first tried :data:`SHIFT_PREDICTION_MARGIN` below the prediction p, if p
lies below the estimate's Ritz value (:func:`shift_sigmas`); else the estimate goes on as
above.

If the factorisation fails (σ above λ_1, or K − σI beyond float32) σ is moved down: to
λ̃ − 4(λ̃ − σ) (after p, to p less 4 margins, then to the estimate's first σ below that);
if the last fails too, or λ̃ is below :data:`SHIFT_MIN_RATIO`·tr(K)/N, or rows
repeat, the solve goes on with the harmonic preconditioner. The
preconditioner only steers the iteration: the values, residuals and certificate come from
the products alone, whatever σ is.

Memory: 4N² bytes on the client (N ≤ 44721 under :data:`SHIFT_MAX_BYTES`), as the harmonic
preconditioner's gram form; on a GPU run the same 4N² (factored in place) on the client's
GPU. Beyond that on a CPU run, the factor's tiles on disk (:func:`disk_shift_invert`,
:mod:`ntkdist.solvers.diskfactor`: 2N² bytes in the run's result folder). Time: N³/3
float32 flops to factor, the kernel's N²/2 entries to form, and two N² triangular solves an
iteration.
"""

from __future__ import annotations

import time

import numpy as np

from .precond import Preconditioner, factor_mirrored, triangular_pair, woodbury

#: Stage 1's relative accuracy. Measured in process (d = 64, LOBPCG block 32, σ = λ̃ − ‖r‖;
#: passes in all, the estimate's among them): at N = 10000, 26 (17) at 1e-2, 20 (8) at 3e-2,
#: 18 (5) at 5e-2, and at 1e-1 λ̃ − ‖r‖ lay above λ_1 (the Ritz value's error, 0.12‖r‖ at
#: 1e-2 and 0.47‖r‖ at 3e-2, had reached ‖r‖), so a factorisation failed and σ went far
#: down: 55; at N = 20000, 35 (22) at 1e-2, 28 (10) at 3e-2, 26 (7) at 5e-2.
SHIFT_ESTIMATE_TOL = 3e-2
#: σ is at least this fraction of λ̃ below the estimate λ̃ (and at least its residual ‖r‖,
#: which is the larger at SHIFT_ESTIMATE_TOL). At N = 5000, d = 64, σ 0.4 %, 2 % and 7 %
#: below λ_1 took 7, 12 and 22 passes from a random start.
SHIFT_MARGIN = 1e-2
#: Where the paper's model predicts λ_1 closely (:func:`trusted_prediction`), σ is first
#: tried this fraction below the prediction: 1.5–2 times its largest errors measured in
#: that domain (+0.27 %, d = 64, L = 10, N = 3000; +0.33 % at N = 50000, L = 3, near D_3;
#: docs/theory.md). A σ above λ_1 costs a factorisation more (or, within float32's reach
#: of λ_1, a factor of an indefinite matrix, which still only steers), never a wrong value.
#: Through `ntkdist run --store` (d = 64, Davidson block 32; benchmarks/RESULTS.md), σ
#: 0.40–0.45 % below λ_1 took the shifted stage and its float64 passes 11, 14 and 16
#: passes at N = 10000, 20000 and 40000, against 14, 19 and 23 with σ = λ̃ − ‖r‖
#: (1.5–1.6 % below).
SHIFT_PREDICTION_MARGIN = 5e-3
#: Stage 1's accuracy and passes where σ comes from the prediction: the estimate then only
#: gives the shifted stage a start and checks the prediction against a Ritz value, an upper
#: bound of λ_1 after any pass. Capped at one product, it takes two passes (the start
#: block's product, and the fresh product that judges its Ritz vectors). The shifted stage
#: barely needs a better start: with this cap, 11 and 13 passes in all at N = 10000 and
#: 20000 in process (benchmarks/passes.py, d = 64; benchmarks/RESULTS.md).
SHIFT_PREDICTION_ESTIMATE_TOL = 1e-1
SHIFT_PREDICTION_ESTIMATE_PASSES = 1
#: The model's domain for σ (:func:`trusted_prediction`): rows uniform on the sphere of
#: radius √d, the limiting NTK, depth ≥ 3, d ≥ 64, N ≥ 1000 (measured: −0.16 % to +0.27 % at
#: depths 3–20, both normalisations, d = 64–200, and +0.33 % at N = 50000, d = 64, L = 3).
#: Outside it the prediction errs by more, or was not measured: N = 500, d = 64, L = 3:
#: +0.41 %; the NTK at L = 2, d = 64: +0.03 % to +1.27 %; d = 48: +0.37 %; d = 32: up to
#: +2.3 %; the NNGP at d = 64: +0.21 % to +0.42 %, growing with depth.
PREDICTION_MIN_D = 64
PREDICTION_MIN_DEPTH = 3
PREDICTION_MIN_N = 1000
#: No shift where the estimate is below this fraction of tr(K)/N: λ_1 − σ would be far
#: below what a float32 factor resolves (the sphere at d = 64: 0.17; d = 8, N = 6400: 0.03).
SHIFT_MIN_RATIO = 1e-3
#: Largest N × N float32 matrix of K − σI; also at most SHIFT_MEMORY_SHARE of the memory
#: available when it is formed.
SHIFT_MAX_BYTES = 8e9
SHIFT_MEMORY_SHARE = 0.5
#: On a GPU (``--device gpu``): K − σI and its factor within this share of the free memory.
SHIFT_DEVICE_SHARE = 0.8
#: Row blocks of K − σI formed at a time (tiles of SHIFT_BLOCK² entries).
SHIFT_BLOCK = 2048
#: ``--precond auto`` uses the shift on CPU runs from this N (where it fits). Measured at
#: d = 64 (benchmarks/RESULTS.md): in process, N = 5000 took 4.0 s against the harmonic
#: model's 2.7 s (17 passes against 38, 0.07 s a pass); through the pipeline
#: (`make demo`, N = 8000) the solve and set-ups took 10.3 s against 12.9 s, and 0.51–0.65×
#: the time at N = 10000–40000.
SHIFT_FROM = 5000


def uses_shift(name: str, n: int, depth: int, finite: bool = False,
               device: str = "cpu", recompute: bool = False) -> bool:
    """Whether ``--precond name`` runs the two-stage shift-invert solve: ``shift`` always
    (where it cannot, the run says why and keeps the harmonic model); ``auto`` for the
    limiting kernels at depth ≥ 2 on CPU runs from N ≥ :data:`SHIFT_FROM` where
    :func:`shift_fits`, and beyond it (the factor on disk) where the operator rebuilds the
    tiles every pass (``recompute``: no store), so that the passes saved are tile builds
    saved (N²/2 kernel entries a pass: about 290 s at N = 100000 at the 17.1 M entries/s
    of the assembly on 2 cores, benchmarks/RESULTS.md). (GPU runs keep the harmonic model
    under ``auto`` until the shift's time there is measured: scripts/gpu_scale.py.)"""
    if name == "shift":
        return not finite
    return (name == "auto" and not finite and depth >= 2 and device == "cpu"
            and n >= SHIFT_FROM and (recompute or shift_fits(n) is None))


def shift_fits(n: int, max_bytes: float | None = None, xp=None) -> str | None:
    """None where K − σI may be held: on the client, 4N² bytes within SHIFT_MAX_BYTES and
    SHIFT_MEMORY_SHARE of the memory available; on a device (``xp``: CuPy), the same 4N²
    (factored in place) and the blocked factorisation's N × 2048 and 2048² temporaries within
    SHIFT_DEVICE_SHARE of its free memory. Else why not (one line)."""
    device = xp is not None and xp is not np
    nb = min(n, SHIFT_BLOCK)
    need = 4.0 * n * n + ((4.0 * n * nb + 12.0 * nb * nb) if device else 0.0)
    if max_bytes is None and device:
        max_bytes = SHIFT_DEVICE_SHARE * float(xp.cuda.runtime.memGetInfo()[0])
    elif max_bytes is None:
        from .cholesky import available_memory

        max_bytes = min(SHIFT_MAX_BYTES, SHIFT_MEMORY_SHARE * available_memory())
    if need > max_bytes:
        return (f"the shift-invert preconditioner holds K − σI in float32 ({need / 1e9:.1f} GB "
                f"at N = {n}{', on the GPU' if device else ''}), more than its "
                f"{max_bytes / 1e9:.1f} GB")
    return None


def shift_sigma(estimate: float, residual: float, margin: float = SHIFT_MARGIN) -> float:
    """σ below a Ritz value ``estimate`` (≥ λ_1) with residual norm ``residual``."""
    return float(estimate) - max(margin * abs(float(estimate)), float(residual))


def in_prediction_domain(source: str, d: int, depth: int, kind: str, n: int) -> bool:
    """Whether the prediction may place σ (:func:`trusted_prediction`)."""
    return (source == "sphere" and kind == "ntk" and depth >= PREDICTION_MIN_DEPTH
            and d >= PREDICTION_MIN_D and n >= PREDICTION_MIN_N)


def trusted_prediction(source: str, n: int, d: int, depth: int, kind: str,
                       normalization: str) -> float | None:
    """The predicted λ_1 (:func:`ntkdist.predict.predict_lambda_min`, the free edge) where it
    may place σ: rows drawn uniform on the sphere (``source`` "sphere"), the limiting NTK at
    depth ≥ :data:`PREDICTION_MIN_DEPTH`, d ≥ :data:`PREDICTION_MIN_D`,
    N ≥ :data:`PREDICTION_MIN_N`; else None. The prediction only steers: a σ above λ_1 fails
    to factor and a lower σ follows."""
    if not in_prediction_domain(source, d, depth, kind, n):
        return None
    from ..predict import predict_lambda_min

    value = float(predict_lambda_min(n, d, depth, kind, normalization)["lambda_min"])
    return value if np.isfinite(value) and value > 0 else None


def shift_sigmas(estimate: float, residual: float,
                 prediction: float | None = None) -> tuple[list[float], str | None]:
    """The σ to try in turn, each lower than the last (a factorisation that fails says σ
    was above λ_1, or too close to it for float32). Without a ``prediction``:
    :func:`shift_sigma`'s λ̃ − max(1 % λ̃, ‖r‖), then λ̃ − 4(λ̃ − that). With a positive one
    below the Ritz value λ̃: p·(1 − m) and p·(1 − 4m) (m = :data:`SHIFT_PREDICTION_MARGIN`),
    then the first of the estimate's two below those, if one is. A prediction at or above
    λ̃, an upper bound of λ_1, is known to err high by an amount the margin may not cover:
    the estimate's σ serve instead. Returns (the σ, why the prediction was not used or
    None)."""
    lam = float(estimate)
    est = shift_sigma(lam, residual)
    plain = [est, lam - 4.0 * (lam - est)]
    if prediction is None:
        return plain, None
    if not (np.isfinite(prediction) and prediction > 0):
        return plain, f"the prediction {prediction!r} is not a positive number"
    if not prediction < lam:
        return plain, (f"the prediction {prediction:.6g} is not below the estimate {lam:.6g}, "
                       "an upper bound of λ_min")
    m = SHIFT_PREDICTION_MARGIN
    near = [float(prediction) * (1.0 - m), float(prediction) * (1.0 - 4.0 * m)]
    return near + [s for s in plain if s < near[-1]][:1], None


def shifted_kernel(X: np.ndarray, kernel, sigma: float, block: int = SHIFT_BLOCK,
                   F=None, xp=np):
    """K(X, X) − σI (− FFᵀ where ``F`` is given, subtracted in float64) in float32,
    C-ordered, formed tile by tile with ``kernel.tile``, the tile function of the store and
    the operators (whose fused CPU path runs on all cores): in its lower triangle, the
    strict upper one left unset; on the device of ``xp`` (CuPy; ``F`` a device array, ``X``
    host rows) both triangles."""
    n = X.shape[0]
    device = xp is not np
    B = xp.empty((n, n), dtype=xp.float32)
    starts = list(range(0, n, block))
    feats = [kernel.features(xp.asarray(X[i:i + block]) if device else X[i:i + block])
             for i in starts]
    for bi, i in enumerate(starts):
        for bj in range(bi + 1):
            j = starts[bj]
            T = kernel.tile(feats[bi], feats[bj])
            if F is not None:
                T -= F[i:i + T.shape[0]] @ F[j:j + T.shape[1]].T
            T = T.astype(xp.float32)
            B[i:i + T.shape[0], j:j + T.shape[1]] = T
            if device and bj < bi:
                B[j:j + T.shape[1], i:i + T.shape[0]] = T.T
    idx = xp.arange(n)
    B[idx, idx] -= np.float32(sigma)
    return B


def stored_shifted_kernel(path: str, sigma: float, F: np.ndarray | None = None) -> np.ndarray:
    """:func:`shifted_kernel` from a complete store's tiles (each checked against its
    checksum; a damaged one raises its one-line StoreError) instead of the tile function:
    the store's own values (float32 or float64), read once, the lower triangle from the
    upper tiles transposed."""
    from ..store import KernelStore

    store = KernelStore.open(path).require_complete()
    n = store.spec.n
    B = np.empty((n, n), dtype=np.float32)
    for i, j in store.upper_tiles():
        rows, cols = store.tile_slices(i, j)
        T = np.array(store.read_tile_checked(i, j), dtype=np.float64)  # a writable copy
        if F is not None:
            T -= F[rows] @ F[cols].T
        B[cols, rows] = T.T  # J ≥ I: the lower triangle
    B[np.diag_indices(n)] -= np.float32(sigma)
    return B


def _deflation(X: np.ndarray, kernel) -> np.ndarray:
    """F with FFᵀ the kernel's degree-0 and degree-1 terms (N × (1 + d), float64)."""
    from ..kernels.taylor import deflation_factor

    return deflation_factor(X, kernel.depth, kernel.kind, kernel.normalization)


def _device_shift_invert(X, kernel, sigma: float, xp) -> Preconditioner | None:
    """:func:`shift_invert` on a GPU: B formed there and factored in place by the blocked
    Cholesky of :func:`ntkdist.solvers.cholesky._potrf_in_place` (cuSOLVER on its diagonal
    blocks: no second N × N matrix), each application two float32 triangular solves there
    (cuBLAS) and the Woodbury correction, from and to host arrays."""
    from cupyx.scipy.linalg import solve_triangular

    from .cholesky import _potrf_in_place

    t0 = time.perf_counter()
    F = _deflation(X, kernel)
    Fd = xp.asarray(F)
    B = shifted_kernel(X, kernel, sigma, F=Fd, xp=xp)
    formed = time.perf_counter() - t0
    if not _potrf_in_place(B):
        del B
        xp.get_default_memory_pool().free_all_blocks()
        return None
    LT = B.T  # F-ordered, Lᵀ in its upper triangle: cuBLAS solves with it as it is

    def b_inv(Z):
        Z = solve_triangular(LT, xp.asarray(Z, dtype=xp.float32), lower=False,
                             trans="T")  # (Lᵀ)ᵀ y = z
        return solve_triangular(LT, Z, lower=False)  # Lᵀ x = y

    try:
        apply = woodbury(b_inv, xp.ascontiguousarray(Fd.T, dtype=xp.float32), xp)
    except (np.linalg.LinAlgError, ValueError):  # a factor too poor for its Woodbury system
        return None
    return Preconditioner("shift", apply, time.perf_counter() - t0, X.shape[0],
                          info={"sigma": float(sigma), "form_seconds": formed,
                                "device": "gpu"})


def shift_invert(X: np.ndarray, kernel, sigma: float, xp=None,
                 store: str | None = None) -> Preconditioner | None:
    """P = (K − σI)⁻¹, or None where it does not factor in float32. ``kernel``: a
    :class:`ntkdist.spec.KernelSpec` with a closed form. ``xp``: CuPy to form, factor and
    apply it on the GPU (host arrays in and out). ``store``: a complete store of this K to
    read it from (at N = 40000 faster than forming it: the tile function ran at 18 M
    entries/s on 2 cores); where a tile of it is damaged K is formed from the rows.

    K − σI = B + FFᵀ with FFᵀ the kernel's degree-0 and degree-1 terms (the deflation of
    mixed precision): B = K − FFᵀ − σI, whose largest eigenvalue is 18–68× below K's (d = 16
    to 64, N = 3000) and so within float32's reach at a far smaller λ_min − σ, is factored in
    float32; F joins by Woodbury (:func:`ntkdist.solvers.precond.woodbury`). (K − FFᵀ is
    PSD, its smallest eigenvalue a little below K's: 42.801 against 42.811 at d = 64,
    N = 3000.) An application: two float32 triangular solves with the N × N factor and three
    thin products with F."""
    X = np.asarray(X, dtype=np.float64)
    if xp is not None and xp is not np:
        return _device_shift_invert(X, kernel, sigma, xp)
    t0 = time.perf_counter()
    F = _deflation(X, kernel)
    B = None
    if store is not None:
        from ..store import StoreError

        try:
            B = stored_shifted_kernel(store, sigma, F)
        except StoreError:  # the operator says so where it matters; here, the rows suffice
            B = None
        if B is not None and B.shape[0] != X.shape[0]:
            B = None
    if B is None:
        B = shifted_kernel(X, kernel, sigma, F=F)
    formed = time.perf_counter() - t0
    LT = factor_mirrored(B)
    if LT is None:
        return None
    b_inv = triangular_pair(LT)
    try:
        apply = woodbury(lambda Z: b_inv(np.asfortranarray(Z, dtype=np.float32)),
                         np.ascontiguousarray(F.T, dtype=np.float32))
    except (np.linalg.LinAlgError, ValueError):  # a factor too poor for its Woodbury system
        return None
    return Preconditioner("shift", apply, time.perf_counter() - t0, X.shape[0],
                          info={"sigma": float(sigma), "form_seconds": formed})


def _lower_tiles(X: np.ndarray, kernel, sigma: float, F: np.ndarray, store: str | None,
                 tile: int):
    """(the tile size, (I, J) ↦ tile (I, J) of K − FFᵀ − σI for I ≥ J, float64, and the
    seconds spent forming them so far): from a complete store of this K where given (its
    tiling; each tile checked against its checksum, a damaged one formed from the rows
    instead), else formed from the rows with the tile function in tiles of ``tile``."""
    from .diskfactor import tiling

    from ..store import StoreError

    n = X.shape[0]
    kernel_store = _complete_store(store, n)
    if kernel_store is not None:
        tile = kernel_store.spec.tile
    bounds = tiling(n, tile)
    feats, spent = {}, [0.0]

    def formed(i):
        if i not in feats:
            feats[i] = kernel.features(X[bounds[i]])
        return feats[i]

    def lower_tile(i, j):
        t = time.perf_counter()
        T = None
        if kernel_store is not None:
            try:
                T = np.array(kernel_store.read_tile_checked(j, i), dtype=np.float64).T
            except StoreError:
                T = None
        if T is None:
            T = np.asarray(kernel.tile(formed(i), formed(j)), dtype=np.float64)
        T = T - F[bounds[i]] @ F[bounds[j]].T
        if i == j:
            T[np.diag_indices(len(T))] -= sigma
        spent[0] += time.perf_counter() - t
        return T

    return tile, lower_tile, spent


def disk_shift_invert(X: np.ndarray, kernel, sigma: float, path: str, identity: str = "",
                      store: str | None = None, log=None) -> Preconditioner | None:
    """:func:`shift_invert` with the factor of K − FFᵀ − σI in tiles on disk under ``path``
    (:class:`ntkdist.solvers.diskfactor.DiskFactor`: resumed where a killed run left it for
    the same ``identity`` and σ), for N where it does not fit in memory; None where it does
    not factor in float32 (its folder then cleared). The preconditioner's ``release``
    deletes the folder. Raises DiskFactorError where the folder cannot be written or read."""
    from .diskfactor import DISK_TILE, DiskFactor, DiskFactorError, disk_bytes

    X = np.asarray(X, dtype=np.float64)
    t0 = time.perf_counter()
    F = _deflation(X, kernel)
    n = X.shape[0]
    tile, lower_tile, spent = _lower_tiles(X, kernel, sigma, F, store, min(n, DISK_TILE))
    factor = DiskFactor(path, n, tile, sigma, identity, log=log)
    try:
        ok = factor.factor(lower_tile)
    except DiskFactorError:  # a full disk or a lost folder: free what was written
        factor.remove()
        raise
    if not ok:
        factor.remove()
        return None
    factored = time.perf_counter() - t0
    try:
        apply = woodbury(factor.solve, np.ascontiguousarray(F.T, dtype=np.float32))
    except (np.linalg.LinAlgError, ValueError):  # a factor too poor for its Woodbury system
        factor.remove()
        return None
    return Preconditioner("shift", apply, time.perf_counter() - t0, n, release=factor.remove,
                          info={"sigma": float(sigma), "form_seconds": spent[0],
                                "factor_on_disk": {"path": path, "tile": tile,
                                                   "gigabytes": round(disk_bytes(n, tile) / 1e9,
                                                                      3),
                                                   "factor_seconds": factored}})


def _complete_store(store: str | None, n: int):
    """The complete KernelStore at ``store`` for this N, or None."""
    if store is None:
        return None
    from ..store import KernelStore, StoreError

    try:
        kernel_store = KernelStore.open(store).require_complete()
    except StoreError:
        return None
    return kernel_store if kernel_store.spec.n == n else None


def _factor_tile(n: int, store: str | None) -> int:
    """The tile of the factor on disk: the store's where it is complete for this N (as
    :func:`_lower_tiles` reads it), else :data:`ntkdist.solvers.diskfactor.DISK_TILE`."""
    from .diskfactor import DISK_TILE

    kernel_store = _complete_store(store, n)
    return int(kernel_store.spec.tile) if kernel_store is not None else min(n, DISK_TILE)


def solve_shifted(matmat, n: int, method: str, X: np.ndarray, kernel, estimate, *,
                  tol: float = 1e-8, k: int = 1, fast_matmat=None, xp=None,
                  skip: str | None = None, fallback=None, store: str | None = None,
                  prediction: float | None = None, factor_dir: str | None = None,
                  identity: str = "", log=None, **options):
    """The two-stage shift-invert solve (module docstring) of K's k smallest eigenpairs,
    certified to ``tol`` as :func:`ntkdist.solvers.driver.smallest_eigenpairs` certifies:
    ``estimate`` (a :class:`Preconditioner`, the harmonic model) for the first stage, on
    ``fast_matmat`` where given; ``X`` and ``kernel`` (with a closed form) to form K − σI
    (on the GPU of ``xp`` where given). ``skip``: a reason not to shift (the solve then runs
    with ``fallback``'s preconditioner alone). ``store``: a complete store of K to read
    K − σI from (:func:`shift_invert`). ``prediction``: a model's λ_1 to place σ by
    (:func:`trusted_prediction`, :func:`shift_sigmas`; the estimate then stops after
    its start block, two passes, and goes on only where the prediction is not
    below its Ritz value). ``factor_dir``: a folder for K − σI's factor on disk where it
    does not fit in memory (CPU runs; :func:`disk_shift_invert`, resumed for the same
    ``identity`` and σ, deleted when the solve ends). ``fallback``: a function giving the
    preconditioner to solve or finish with where the shift is not used (default:
    ``estimate``).
    ``options``: the driver's other arguments (``block``, ``max_products``, a cap on both
    stages' passes together, ``scale``, tr(K)/N, ``checkpoint``, ``start``, ...). Returns
    (the solve, the preconditioner it finished with, whose ``info`` says what the shift
    did)."""
    from .driver import SMALL_N, smallest_eigenpairs
    from .diskfactor import DiskFactorError, disk_fits, recorded_sigma, remove_factor
    from .mixed import Checked, NonFiniteProducts, fast_label, fast_log

    log = log or (lambda *a: None)
    max_products = options.pop("max_products", 600)
    why, on_disk = skip or shift_fits(n, xp=xp), False
    if why is not None and not skip and factor_dir is not None and (xp is None or xp is np):
        from .cholesky import available_memory

        disk_why = disk_fits(factor_dir, n, _factor_tile(n, store),
                             SHIFT_MEMORY_SHARE * available_memory())
        why, on_disk = (None, True) if disk_why is None else (f"{why}; {disk_why}", False)
    if factor_dir is not None and not on_disk:  # a killed run's factor, of no use now
        remove_factor(factor_dir)
    if why is None and (n <= SMALL_N or n < 4 * (k + 1)):
        why = f"N = {n} is solved densely"
    if why is not None:  # said once, by the solve's notes
        pre = fallback() if fallback is not None else estimate
        sol = smallest_eigenpairs(matmat, n, method, k=k, tol=tol, precond=pre.apply,
                                  fast_matmat=fast_matmat, max_products=max_products, log=log,
                                  **options)
        sol.notes.append(f"shift-invert not used ({why}); the harmonic model instead")
        pre.info = {**(pre.info or {}), "shift_skipped": why}
        return sol, pre
    on = " on the float32 products" if fast_matmat else ""
    t = time.perf_counter()
    cap = max(1, max_products // 2)
    base = dict(k=k, precond=estimate.apply, **options)
    overflowed = None

    def run_estimate(tol_e, cap_e, start=None):
        nonlocal fast_matmat, overflowed
        opts = {**base, "tol": tol_e, "max_products": cap_e}
        if start is not None:
            opts["start"] = start
        counted = Checked(fast_matmat) if fast_matmat else None
        try:
            return smallest_eigenpairs(counted or matmat, n, method,
                                       log=fast_log(log) if fast_matmat else log, **opts)
        except NonFiniteProducts:  # entries beyond float32's range: float64 from here on
            overflowed = ("a float32 product overflowed in the shift's estimate: float64 "
                          "products from there on")
            fast_matmat = None
            r = smallest_eigenpairs(matmat, n, method, log=log, **opts)
            r.products += counted.calls  # the passes the float32 attempt spent count too
            r.notes.append(overflowed)
            return r

    tol1, first = max(tol, SHIFT_ESTIMATE_TOL), None
    checkpoint, primed = options.get("checkpoint"), (0, 0)  # primed: iterations, passes
    if prediction is not None:
        tol1 = max(tol, SHIFT_PREDICTION_ESTIMATE_TOL)  # what the first call is judged to
        log(f"shift-invert, stage 1: the Ritz values of the harmonic preconditioner's start "
            f"block{on}, to check the prediction {prediction:.10g} against")
        first = run_estimate(tol1, min(cap, SHIFT_PREDICTION_ESTIMATE_PASSES))
        lam0 = float(first.values[0])
        if (not prediction < lam0 and first.products < cap  # the prediction will not serve,
                and float(first.residuals[0]) > SHIFT_ESTIMATE_TOL * abs(lam0)):  # nor λ̃
            tol1 = max(tol, SHIFT_ESTIMATE_TOL)  # so the estimate goes on
            log(f"note: the prediction {prediction:.6g} is not below the Ritz value "
                f"{lam0:.6g}: the estimate goes on to {tol1:g}")
            if checkpoint is not None and first.ritz_block is not None:  # go on from here
                checkpoint.prime(first.ritz_block, first.ritz_values, first.iterations,
                                 first.products)
                primed = (first.iterations, first.products)
            more = run_estimate(tol1, cap - first.products, start=first.ritz_block)
            more.products += first.products
            more.iterations += first.iterations
            more.notes = first.notes + more.notes
            first = more
    else:
        log(f"shift-invert, stage 1: λ_min to {tol1:g} with the harmonic preconditioner "
            f"(degrees ≤ {estimate.degree}){on}")
        first = run_estimate(tol1, cap)
    first_seconds = time.perf_counter() - t
    lam, res = float(first.values[0]), float(first.residuals[0])
    if fast_matmat is None and tol1 == tol and first.status == "certified":
        if on_disk:
            remove_factor(factor_dir)
        estimate.info = {"shift_skipped": f"the estimate is certified to tol = {tol:g}"}
        if prediction is not None:
            estimate.info["prediction"] = float(prediction)
        return first, estimate  # nothing left to do
    info = {"estimate": lam, "estimate_residual": res, "estimate_passes": first.products,
            "estimate_seconds": first_seconds, "sigma_tried": []}
    if checkpoint is not None and first.ritz_block is not None:  # before the factorisation
        checkpoint.prime(first.ritz_block, first.ritz_values, first.iterations - primed[0],
                         first.products - primed[1])  # what was not primed before
    sigmas, unused = shift_sigmas(lam, res, prediction)
    if prediction is not None:
        info["prediction"] = float(prediction)
        if unused:
            info["prediction_unused"] = unused
            log(f"note: σ from the estimate: {unused}")
    pre, predicted = None, sigmas[:2] if prediction is not None and not unused else []
    resumed = recorded_sigma(factor_dir, n, identity) if on_disk else None
    if resumed is not None and resumed in sigmas:  # those before it failed to factor
        sigmas = sigmas[sigmas.index(resumed):]
    elif resumed is not None and sigmas and 0 < resumed < lam and (
            0.5 <= (lam - resumed) / (lam - sigmas[0]) <= 2.0):
        sigmas = [resumed, *sigmas]  # a killed run's factor, at a σ as good as this one's
    else:
        resumed = None
    if resumed is not None:
        log(f"note: the factor on disk was begun at σ = {resumed:.10g}: resumed at that σ")
    if max_products - first.products < 1:  # a factorisation would serve no pass
        info["shift_skipped"] = (f"no passes left for a shifted stage (--max-products "
                                 f"{max_products}, the estimate took {first.products})")
    elif lam < SHIFT_MIN_RATIO * float(options.get("scale") or 0.0):
        info["shift_skipped"] = (f"the estimate {lam:.3g} is below {SHIFT_MIN_RATIO:g}·tr(K)/N, "
                                 "too close to 0 for a float32 factor of K − σI")
    for sigma in ([] if "shift_skipped" in info else sigmas):
        if not sigma > 0:
            break
        info["sigma_tried"].append(sigma)
        log(f"shift-invert, stage 2: forming and factoring K − σI in float32, σ = {sigma:.10g} "
            f"(estimate {lam:.10g}, residual {res:.2e})"
            + (f", in tiles on disk under {factor_dir}" if on_disk else ""))
        try:
            pre = (disk_shift_invert(X, kernel, sigma, factor_dir, identity, store, log)
                   if on_disk else shift_invert(X, kernel, sigma, xp=xp, store=store))
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError
            info["shift_skipped"] = (f"out of {'GPU ' if xp is not None else ''}memory "
                                     "forming or factoring K − σI")
            break
        except DiskFactorError as exc:
            info["shift_skipped"] = str(exc)
            break
        if pre is not None:
            break
        log(f"note: K − σI does not factor in float32 at σ = {sigma:.10g}: σ lowered")
    if pre is None:
        if on_disk:  # what a killed run's factor left there serves nothing now
            remove_factor(factor_dir)
        why = info.get("shift_skipped") or (
            "the estimate leaves no positive σ" if not info["sigma_tried"] else
            "K − σI did not factor in float32")
        log(f"note: no shift-invert ({why}); the solve goes on with the harmonic "
            "preconditioner")
        pre = fallback() if fallback is not None else estimate
        info["shift_skipped"] = why
    else:
        info["sigma_from"] = ("resumed factor" if sigma == resumed else "prediction"
                              if sigma in predicted else "estimate")
        log(f"shift-invert preconditioner: σ = {sigma:.10g} (from the {info['sigma_from']}), "
            f"set-up {pre.setup_seconds:.1f} s "
            f"({pre.info['form_seconds']:.1f} s forming K − σI)")
    pre.info = {**(pre.info or {}), **info}
    if first.ritz_block is not None:
        options["start"] = first.ritz_block
    sol = smallest_eigenpairs(matmat, n, method, k=k, tol=tol, precond=pre.apply,
                              fast_matmat=fast_matmat, log=log,
                              max_products=max(1, max_products - first.products), **options)
    release = getattr(pre, "release", None)
    if release is not None:  # a factor on disk; kept above for a killed run's rerun
        release()
    sol.iterations += first.iterations
    sol.products += first.products
    sol.solver_seconds += first_seconds
    if overflowed:
        sol.notes.append(overflowed)
    if sol.phases is not None:
        sol.phases.insert(0, {"products": fast_label(fast_matmat) if fast_matmat else "float64",
                              "passes": first.products, "iterations": first.iterations,
                              "stage": "shift estimate",
                              "stopped": "the shift's estimate" + (
                                  "" if first.converged else ", at its pass limit")})
    return sol, pre
