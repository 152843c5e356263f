"""Limiting (infinite-width) NTK and NNGP kernels of deep ReLU networks without biases.

Paper normalisation (Nguyen, Mondelli, Montúfar 2021, Sec. 2; docs/theory.md, "Kernels"). With
G^(1) = XXᵀ and, for l ≥ 2, ρ = G^(l−1)_ij / √(G^(l−1)_ii G^(l−1)_jj), θ = arccos ρ:

    G^(l)_ij = ‖x_i‖‖x_j‖ (sin θ + (π − θ) cos θ) / π
    Ġ^(l)_ij = (π − θ) / π
    K^(1) = G^(1),   K^(l) = K^(l−1) ∘ Ġ^(l) + G^(l)

(the diagonal of every G^(l) is ‖x_i‖², so K^(L)_ii = L‖x_i‖²). ReLU is positively
homogeneous, hence K_ij = ‖x_i‖‖x_j‖ κ(ρ_ij) with κ the recursion run on unit vectors; every
function here works on unit rows and norms and scales at the end.

Accuracy near ρ = ±1. arccos loses half the digits there (an error ε in ρ is √ε in θ). We
carry, per entry, ρ together with s = 1 − ρ and t = 1 + ρ, each accurate to a few ulps
relative, and take θ = atan2(√(s t), ρ):

* first layer: ρ = x̂·ŷ from a GEMM of unit rows, which is accurate to a few ulps absolute;
  where s or t falls below ``CLOSE_PAIR_GAP`` (duplicate, nearly parallel or nearly
  antipodal rows) s = ‖x̂ − ŷ‖²/2 and t = ‖x̂ + ŷ‖²/2 are recomputed from the rows themselves;
* deeper layers: 1 − ρ_next = [π s + (θ cos θ − sin θ)] / π, with the cancelling bracket
  θ cos θ − sin θ = Σ_{k≥1} (−1)^k 2k θ^(2k+1)/(2k+1)! summed as a series for θ < 0.5.

Entries then agree with a 50-digit evaluation to ~1e-15 relative to √(K_ii K_jj), the
diagonal included (tests/test_kernels.py).

Everything below is written against the array module of its inputs (NumPy or CuPy), so
the same code runs on a CPU or a GPU block. A fused NumPy fast path lives in ``fused.py``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..errors import InputError, SpecError

KERNELS = ("ntk", "nngp")
NORMALIZATIONS = ("paper", "nt")

#: Pairs with 1 − |ρ| below this gap get s and t recomputed from the rows (see module doc).
CLOSE_PAIR_GAP = 1e-3
#: θ below which θ cos θ − sin θ is summed as a series.
SERIES_THETA = 0.5
#: Coefficients c_k of θ cos θ − sin θ = θ³ Σ_k c_k θ^(2k), k = 0..7 (error < 1e-17 at θ = 0.5).
QCOEFFS = tuple(
    float(Fraction((-1) ** k * 2 * k, math.factorial(2 * k + 1))) for k in range(1, 9)
)
# Rows recomputed per chunk in the close-pair fix-up (bounds its memory at ~chunk·d).
_FIXUP_CHUNK = 1 << 16


def array_module(a):
    """NumPy or CuPy, whichever ``a`` belongs to, as ``cupy.get_array_module`` says (an
    array of CuPy's implies CuPy is imported; NumPy arrays skip the look-up)."""
    if isinstance(a, np.ndarray):
        return np
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return np
    return cupy.get_array_module(a)


@dataclass(frozen=True)
class RowBlock:
    """Features of a row block for the limiting kernels: unit rows and their norms.

    A zero row keeps a zero unit vector and norm 0, so its kernel row is exactly 0.
    """

    unit: object  # (m, d) float64 array
    norms: object  # (m,) float64 array

    @property
    def d(self) -> int:
        return int(self.unit.shape[1])


def row_block(X, name: str = "rows") -> RowBlock:
    """Unit rows and norms of a block ``X`` (m × d), in float64, on X's array module.

    A row holding NaN or inf would silently turn its whole kernel row and column into NaN,
    so it is refused here (``name`` labels the array in the message). The test looks at the
    m norms only, which are non-finite exactly when a row is (or when its squared norm
    overflows float64, which would poison the kernel row all the same): one reduction and one
    host sync per row block, nothing per tile.
    """
    xp = array_module(X)
    X = xp.asarray(X)
    if X.dtype.kind not in "fiu":  # complex, boolean, strings, objects
        raise InputError(f"{name} must hold real numbers, got dtype {X.dtype}")
    X = X.astype(xp.float64, copy=False)
    if X.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (rows × features), got shape {X.shape}")
    norms = xp.sqrt(xp.einsum("ij,ij->i", X, X))
    finite = xp.isfinite(norms)
    if not bool(finite.all()):
        bad = int(xp.nonzero(~finite)[0][0])
        if bool(xp.isfinite(X[bad]).all()):
            raise InputError(f"{name} row {bad} is too large: its squared norm overflows float64")
        raise InputError(f"{name} has non-finite values (first in row {bad})")
    safe = xp.where(norms > 0, norms, 1.0)
    return RowBlock(unit=X / safe[:, None], norms=norms)


def check_kernel_args(depth: int, kernel: str, normalization: str) -> None:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise SpecError(f"depth must be an integer >= 1, got {depth!r}")
    if kernel not in KERNELS:
        raise SpecError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if normalization not in NORMALIZATIONS:
        raise SpecError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def normalization_factor(normalization: str, d: int) -> float:
    """Factor from the paper's K^(L) (or G^(L)) to the requested normalisation.

    neural-tangents' ``stax.serial(Dense(W_std=√2, b_std=None, parameterization='ntk'),
    Relu(), …, Dense(W_std=√2, …))`` has first-layer covariance (2/d)·XXᵀ and each
    ReLU + Dense step is the paper's map, which is positively homogeneous; hence
    Θ_NT = (2/d)·K^(L) and its NNGP = (2/d)·G^(L).
    """
    return 2.0 / d if normalization == "nt" else 1.0


def theta_cos_minus_sin(theta, xp):
    """θ cos θ − sin θ, stable for small θ (series below ``SERIES_THETA``)."""
    t2 = theta * theta
    series = xp.zeros_like(theta)
    for c in reversed(QCOEFFS):
        series = series * t2 + c
    series = series * t2 * theta
    direct = theta * xp.cos(theta) - xp.sin(theta)
    return xp.where(theta < SERIES_THETA, series, direct)


def layer_steps(rho, s, t, depth: int):
    """Run the correlation recursion of unit vectors; yield (π − θ, ρ_next) per layer 2..depth.

    The one place the stable layer map lives, so that :func:`normalized_recursion` and
    callers that need every layer's correlations (the bounds chain, which would otherwise
    restart from layer 1 for each layer) share its exact floating-point operations. ``s``
    and ``t`` are advanced only while another layer follows. Only the current layer's state
    is held. Inputs are not modified, and the caller must not modify the yielded arrays:
    the recursion goes on from them.
    """
    xp = array_module(rho)
    pi = math.pi
    for layer in range(2, depth + 1):
        sin_theta = xp.sqrt(s * t)
        theta = xp.arctan2(sin_theta, rho)
        phi = pi - theta
        rho_next = (sin_theta + phi * rho) / pi
        yield phi, rho_next
        if layer < depth:
            s = (pi * s + theta_cos_minus_sin(theta, xp)) / pi
            t = 1.0 + rho_next
        rho = rho_next


def normalized_recursion(rho, s, t, depth: int, kernel: str):
    """κ(ρ): the depth-``depth`` kernel of unit vectors at correlation ρ, elementwise.

    ``s`` = 1 − ρ and ``t`` = 1 + ρ must be given accurate to a few ulps relative (see the
    module docstring); ρ itself needs only absolute accuracy. Returns K/(‖x‖‖y‖) for
    ``kernel="ntk"`` and G^(L)/(‖x‖‖y‖) for ``"nngp"``. Inputs are not modified.
    """
    pi = math.pi
    k = rho
    for phi, rho in layer_steps(rho, s, t, depth):
        if kernel == "ntk":
            k = k * (phi / pi) + rho
    return k if kernel == "ntk" else rho


def correlation_layers(A: RowBlock, B: RowBlock, depth: int):
    """Yield P^(1), …, P^(depth): the layer-m correlations of the unit rows of A × B.

    Entry for entry the same numbers as ``kernel_tile(A', B', m, "nngp", fused=False)`` with
    unit norms, for every m, at the cost of one recursion to ``depth`` instead of one per m:
    the first layer comes from the same GEMM and close-pair fix-up, and later layers from
    :func:`layer_steps`. As there, the caller must not modify the yielded arrays.
    """
    xp = array_module(A.unit)
    if A.d != B.d:
        raise InputError(f"row blocks have different dimensions: {A.d} and {B.d}")
    rho = _correlations(A.unit, B.unit, xp)
    ii, jj = close_pairs(rho)
    rho = xp.clip(rho, -1.0, 1.0)
    s, t = 1.0 - rho, 1.0 + rho
    if ii.shape[0]:
        rho[ii, jj], s[ii, jj], t[ii, jj] = exact_gaps(A, B, ii, jj)
    yield rho
    for _, rho in layer_steps(rho, s, t, depth):
        yield rho


def close_pairs(rho, gap: float = CLOSE_PAIR_GAP):
    """Indices (i, j) of entries with 1 − |ρ| < gap, where the GEMM's ρ is not enough."""
    xp = array_module(rho)
    return xp.nonzero(xp.abs(rho) > 1.0 - gap)


def exact_gaps(A: RowBlock, B: RowBlock, i, j):
    """ρ, s = 1 − ρ, t = 1 + ρ for the listed pairs, from row differences and sums."""
    xp = array_module(A.unit)
    m = int(i.shape[0])
    rho = xp.empty(m, dtype=xp.float64)
    s = xp.empty(m, dtype=xp.float64)
    t = xp.empty(m, dtype=xp.float64)
    for lo in range(0, m, _FIXUP_CHUNK):
        hi = min(m, lo + _FIXUP_CHUNK)
        u, v = A.unit[i[lo:hi]], B.unit[j[lo:hi]]
        dot = xp.einsum("ij,ij->i", u, v)
        diff, summ = u - v, u + v
        sd = 0.5 * xp.einsum("ij,ij->i", diff, diff)
        ss = 0.5 * xp.einsum("ij,ij->i", summ, summ)
        parallel = dot > 0
        s[lo:hi] = xp.where(parallel, sd, 2.0 - ss)
        t[lo:hi] = xp.where(parallel, 2.0 - sd, ss)
        rho[lo:hi] = xp.where(parallel, 1.0 - sd, ss - 1.0)
    zero = (A.norms[i] == 0) | (B.norms[j] == 0)
    # A zero row has no direction; any finite state works since its kernel entry is scaled by 0.
    rho = xp.where(zero, 0.0, rho)
    s = xp.where(zero, 1.0, s)
    t = xp.where(zero, 1.0, t)
    return rho, s, t


def kernel_tile(A: RowBlock, B: RowBlock, depth: int, kernel: str = "ntk",
                normalization: str = "paper", fused: bool | None = None):
    """The tile K(X_I, X_J) (or G^(L)(X_I, X_J)) of the limiting kernel, float64.

    ``A`` and ``B`` come from :func:`row_block`. This is the one function that every caller
    (dense path, distributed assembly, matrix-free operators) uses to build kernel entries.
    ``fused=None`` uses the compiled CPU fast path for NumPy inputs when numba is installed,
    and the fused GPU kernel for CuPy inputs where it compiled and passed its self-check
    (:mod:`ntkdist.kernels.fused_cuda`); ``False`` forces the array-module-agnostic path,
    ``True`` requires the fused one.
    """
    check_kernel_args(depth, kernel, normalization)
    xp = array_module(A.unit)
    if A.d != B.d:
        raise InputError(f"row blocks have different dimensions: {A.d} and {B.d}")
    if xp is not np and fused is not False:
        from . import fused_cuda

        if fused_cuda.ready(xp):
            return fused_cuda.tile(A, B, depth, kernel,
                                   normalization_factor(normalization, A.d), xp=xp)
        if fused:
            raise SpecError(f"the fused GPU kernel is {fused_cuda.status(xp)}")
    rho = _correlations(A.unit, B.unit, xp)
    ii, jj = close_pairs(rho)
    use_fused = _want_fused(fused, xp)
    if use_fused:
        from .fused import normalized_recursion_fused

        k = normalized_recursion_fused(rho, depth, kernel)
    else:
        r = xp.clip(rho, -1.0, 1.0)
        k = normalized_recursion(r, 1.0 - r, 1.0 + r, depth, kernel)
    if ii.shape[0]:
        k[ii, jj] = normalized_recursion(*exact_gaps(A, B, ii, jj), depth, kernel)
    return _scaled(k, A, B, normalization)


def _scaled(k, A: RowBlock, B: RowBlock, normalization: str):
    """κ of unit rows → the tile: times ‖x_i‖‖x_j‖ and the normalisation's factor, in place."""
    k *= A.norms[:, None]
    k *= B.norms[None, :]
    factor = normalization_factor(normalization, A.d)
    if factor != 1.0:
        k *= factor
    return k


def kernel_tile_sums(A: RowBlock, B: RowBlock, depth: int, kernel: str, normalization: str,
                     layers, orders: int, same: bool, tile: bool = True, offset: int = 0):
    """(tile, rows, cols): the tile exactly as :func:`kernel_tile` makes it on the CPU with
    numba (None unless ``tile``), and the power sums the bounds chain needs of it
    (:mod:`ntkdist.chain`), from the same pass over the entries:

    ``rows[a, k, q]`` = Σ_b |P^(m_k)_ab|^(2q+2) and ``cols[b, k, q]`` = Σ_a |P^(m_k)_ab|^(2q+2)
    (None when ``same``: A's rows are B's from ``offset`` on, and the entries (a, ``offset``
    + a), their diagonal, are left out) for the correlation layers m_k in ``layers``
    (ascending, ≤ ``depth``; P^(1) the unit rows' Gram) and q < ``orders``. The layers are
    those of :func:`correlation_layers`: close pairs (1 − |ρ| < ``CLOSE_PAIR_GAP``) are left
    out of the compiled sums and added from their exact gaps. NumPy row blocks, numba
    required."""
    from .fused import recursion_sums

    check_kernel_args(depth, kernel, normalization)
    if A.d != B.d:
        raise InputError(f"row blocks have different dimensions: {A.d} and {B.d}")
    rho = _correlations(A.unit, B.unit, np)
    ii, jj = close_pairs(rho)
    k, rows, cols = recursion_sums(rho, depth, kernel, layers, orders,
                                   diagonal=offset if same else None, gap=CLOSE_PAIR_GAP,
                                   tile=tile)
    if ii.shape[0]:
        exact = exact_gaps(A, B, ii, jj)
        if tile:
            k[ii, jj] = normalized_recursion(*exact, depth, kernel)
        off = ii + offset != jj if same else slice(None)
        rho, s, t = (v[off] for v in exact)
        ii, jj = ii[off], jj[off]
        wanted = {m: q for q, m in enumerate(layers)}
        steps = layer_steps(rho, s, t, max(layers))
        for m in range(1, max(layers) + 1):
            if m > 1:
                rho = next(steps)[1]
            if m not in wanted:
                continue
            p2 = rho * rho
            power = p2.copy()
            for q in range(orders):
                if q:
                    power *= p2
                np.add.at(rows[:, wanted[m], q], ii, power)
                if cols is not None:
                    np.add.at(cols[:, wanted[m], q], jj, power)
    return (_scaled(k, A, B, normalization) if tile else None), rows, cols


_blas_controller = None
_blas_lock = threading.RLock()
_local_setters = None


def _thread_local_setters() -> list:
    """OpenBLAS's ``openblas_set_num_threads_local`` of NumPy's BLAS, where it has one (and
    every BLAS loaded is an OpenBLAS), else []. The process-wide setter that threadpoolctl
    calls does not reach threads other than the main one once OpenBLAS started with several
    threads (OpenBLAS 0.3.31), so a Dask task thread kept its threads and a tile's bytes
    changed with them (tests/test_finite_runs.py, the killed assembly resumed bitwise); the
    thread-local one reaches any thread."""
    global _local_setters
    if _local_setters is None:
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        setters = [getattr(getattr(lc, "dynlib", None), "openblas_set_num_threads_local", None)
                   for lc in libs if lc.internal_api == "openblas"]
        _local_setters = setters if setters and len(setters) == len(libs) and all(setters) \
            else []
    return _local_setters


@contextlib.contextmanager
def _one_blas_thread():
    """NumPy's BLAS on one thread, one thread of this process at a time: OpenBLAS's
    thread-local setting where there is one, else threadpoolctl's process-wide limit."""
    global _blas_controller
    with _blas_lock:
        setters = _thread_local_setters()
        if setters:
            previous = [f(1) for f in setters]
            try:
                yield
            finally:
                for f, value in zip(setters, previous):
                    f(value)
            return
        if _blas_controller is None:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()
        with _blas_controller.limit(limits=1, user_api="blas"):
            yield


def single_blas(xp):
    """A context in which NumPy's BLAS runs on one thread (nothing on CuPy): multi-threaded
    BLAS may round differently with the thread count, and a tile's bytes must depend only on
    its inputs, also where several worker threads share a process. Threads of one process
    take turns inside (two threads' concurrent GEMMs, each on one thread, still rounded a
    tile differently now and then in the killed-assembly test), so a worker process should
    run one task thread; ntkdist's local and batch clusters do."""
    if xp is not np:
        return contextlib.nullcontext()
    return _one_blas_thread()


def _correlations(U, V, xp):
    """U Vᵀ, on one BLAS thread on the CPU (:func:`single_blas`)."""
    with single_blas(xp):
        return U @ V.T


def _want_fused(fused, xp) -> bool:
    if fused is False or xp is not np:  # (CuPy's fused kernel is chosen before this)
        return False
    from .fused import available

    if fused and not available():
        raise SpecError("the fused fast path needs numba, which is not installed")
    return available()


def _gram(X, Y, depth, kernel, normalization):
    check_kernel_args(depth, kernel, normalization)
    A = row_block(X, "X")
    if Y is None:
        K = kernel_tile(A, A, depth, kernel, normalization)
        xp = array_module(K)
        upper = xp.triu(K)
        return upper + xp.triu(K, 1).T
    return kernel_tile(A, row_block(Y, "Y"), depth, kernel, normalization)


def ntk(X, Y=None, depth: int = 2, normalization: str = "paper"):
    """Limiting NTK K^(L)(X, Y) of a depth-L ReLU network without biases (float64).

    ``normalization="paper"``: K^(1) = XXᵀ, K_ii = L‖x_i‖² (Nguyen et al. 2021).
    ``normalization="nt"``: neural-tangents' ``Dense(W_std=√2, b_std=None,
    parameterization='ntk')`` stack with ``Relu()`` between layers; equals (2/d)·K^(L).
    With ``Y=None`` the result is K(X, X), exactly symmetric. See the module docstring for
    how ρ ≈ ±1 is handled.
    """
    return _gram(X, Y, depth, "ntk", normalization)


def nngp(X, Y=None, depth: int = 2, normalization: str = "paper"):
    """Limiting Gram G^(L)(X, Y) of the last hidden layer's features (float64).

    ``normalization="nt"`` gives neural-tangents' NNGP of the same stack as :func:`ntk`,
    (2/d)·G^(L). Diagonal: G^(L)_ii = ‖x_i‖² in the paper's normalisation.
    """
    return _gram(X, Y, depth, "nngp", normalization)
