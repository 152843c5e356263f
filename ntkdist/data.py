"""Input rows: seeded synthetic generators and users' arrays, with validation.

Synthetic rows are generated in fixed chunks of ``GENERATOR_CHUNK`` rows, chunk c from the
stream ``numpy.random.default_rng([seed, c])``; so rows [a, b) are the same whoever
generates them, in whatever blocks, and the data for N rows is a prefix of the data for
more rows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .errors import InputError

SYNTHETIC = ("sphere", "gaussian")
GENERATOR_CHUNK = 1024


def synthetic_rows(kind: str, d: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a synthetic data set (float64, stop − start × d).

    ``gaussian``: i.i.d. N(0, 1) entries. ``sphere``: uniform on the sphere of radius √d
    (the paper's setting), a Gaussian row scaled to norm √d.
    """
    if kind not in SYNTHETIC:
        raise InputError(f"unknown synthetic data {kind!r}; use one of {', '.join(SYNTHETIC)}")
    if not 0 <= start <= stop:
        raise InputError(f"bad row range [{start}, {stop})")
    first, last = start // GENERATOR_CHUNK, -(-stop // GENERATOR_CHUNK)
    chunks = [
        np.random.default_rng([seed, c]).standard_normal((GENERATOR_CHUNK, d))
        for c in range(first, last)
    ]
    rows = np.concatenate(chunks) if chunks else np.empty((0, d))
    offset = start - first * GENERATOR_CHUNK
    rows = rows[offset:offset + stop - start]
    if kind == "sphere":
        rows = rows * (np.sqrt(d) / np.linalg.norm(rows, axis=1))[:, None]
    return np.ascontiguousarray(rows)


def load_array(path: str):
    """A user's 2-D array from a ``.npy`` file (no pickles) or a Zarr array, lazily.

    Returns a NumPy memory map or a Zarr array; rows are read when sliced.
    """
    if not os.path.exists(path):
        raise InputError(f"input {path!r} does not exist")
    if os.path.isdir(path):
        return _open_zarr(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise InputError(f"input {path!r} cannot be read ({exc.strerror})") from None
    if magic != b"\x93NUMPY":
        raise InputError(f"input {path!r} is not a readable .npy file (no NumPy header)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            raise InputError(f"input {path!r} holds Python objects (pickle); "
                             "save a numeric array with numpy.save") from None
        raise InputError(f"input {path!r} is not a readable .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"input {path!r} is not a readable .npy file ({exc})") from None


def _open_zarr(path: str):
    import zarr

    try:
        arr = zarr.open_array(path, mode="r")
    except Exception as exc:  # zarr raises many kinds for a folder that is not an array
        raise InputError(f"input {path!r} is a folder but not a readable Zarr array "
                         f"({type(exc).__name__})") from None
    return arr


def file_sha256(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                _hash_file(full, h)
    else:
        _hash_file(path, h)
    return h.hexdigest()


def _hash_file(path: str, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


#: Rows whose squared norm times N·L exceeds this are refused: kernel entries, traces and
#: products reach it, and the squares of residuals and of Gram matrices in the solvers would
#: overflow float64 (max ~1.8e308).
MAX_SCALE = 1e150
#: Rows whose squared norm is below this are refused: it underflows (or is subnormal), and
#: the row's kernel entries lose every digit.
MIN_SQUARED_NORM = 1e-290
#: Unit rows within this Euclidean distance of each other are nearly parallel: each such
#: pair gives a near-null vector that starts the iterative solvers, and two or more withhold
#: an iterative certificate (:func:`ntkdist.solvers.driver.smallest_eigenpairs`). Such
#: pairs are found up to the scan's caps (:func:`near_parallel_pairs`), the closest first.
NEAR_PARALLEL_DISTANCE = 4e-6
#: Unit rows equal after rounding at this many decimals count as parallel.
PARALLEL_DECIMALS = 12
#: Neighbours in the sorted projection scanned per row for nearly parallel pairs; random
#: projections a candidate pair must be that close on; pairs found before the scan stops.
NEAR_SCAN = 64
NEAR_PROBES = 8
NEAR_ENOUGH = 8192
#: Nearly parallel pairs kept as hints: each puts an eigenvalue near 0, and the solvers
#: start from the bottom of the space they span (:func:`ntkdist.pipeline._near_null_start`).
MAX_NEAR_PAIRS = 1024


def row_norms(rows: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows without overflow or underflow of the squares."""
    scale = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(len(rows))
    safe = np.where(scale > 0, scale, 1.0)
    return scale * np.sqrt(np.einsum("ij,ij->i", rows / safe[:, None], rows / safe[:, None]))


def check_dtype(X, name: str = "input") -> None:
    """Refuse arrays that are not real numbers (complex, strings, booleans, objects)."""
    kind = np.dtype(getattr(X, "dtype", np.float64)).kind
    if kind == "c":
        raise InputError(f"{name} is complex ({X.dtype}); the kernels need real rows "
                         "(take the real part, or stack real and imaginary parts, yourself)")
    if kind not in "fiu":
        raise InputError(f"{name} has dtype {X.dtype}; a real numeric array is needed")


@dataclass(frozen=True)
class RowCheck:
    """What validation found in a row set that is not an error."""

    n: int
    d: int
    duplicate_rows: int  # rows equal to an earlier row
    parallel_rows: int  # rows that are a positive multiple of an earlier one (duplicates included)
    min_norm: float
    max_norm: float
    groups: np.ndarray | None = None  # (N,) id of each row's group of equal rows, if any repeat
    near_pairs: tuple = ()  # (i, j) pairs of nearly parallel rows (hints for the solvers)


def check_rows(X, name: str = "input", block: int = 65536, growth: float = 1) -> RowCheck:
    """Validate a 2-D row set; raise :class:`InputError` with one line if unusable.

    Refused: not 2-D, not real numbers, N < 2, d < 1, non-finite values, all-zero rows, norms
    whose squares underflow, and norms so large that N·g·‖x‖² overflows float64 (``growth``
    = g, the kernel's K_ii/‖x_i‖²: L for the limits, :meth:`ntkdist.spec.KernelSpec.growth`). Duplicate and parallel rows are allowed (they make K singular; λ_min = 0, or ≈ 0, is
    then the right answer) and counted.
    """
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise InputError(f"{name} must be a 2-D array (rows × features), got shape {shape}")
    n, d = (int(v) for v in shape)
    if n < 2:
        raise InputError(f"{name} has {n} row(s); at least 2 are needed (N < 2)")
    if d < 1:
        raise InputError(f"{name} has no columns")
    check_dtype(X, name)
    norms = np.empty(n)
    for lo in range(0, n, block):
        rows = np.asarray(X[lo:lo + block], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            bad = lo + int(np.nonzero(~np.all(np.isfinite(rows), axis=1))[0][0])
            raise InputError(f"{name} has non-finite values (first in row {bad})")
        norms[lo:lo + block] = row_norms(rows)
    zero = np.nonzero(norms == 0)[0]
    if zero.size:
        raise InputError(f"{name} has {zero.size} all-zero row(s) (first: row {zero[0]}); "
                         "the ReLU kernel of a zero row is identically 0")
    tiny = np.nonzero(norms < np.sqrt(MIN_SQUARED_NORM))[0]
    if tiny.size:
        raise InputError(f"{name} has {tiny.size} row(s) whose squared norm underflows float64 "
                         f"(row {tiny[0]}: ‖x‖ = {norms[tiny[0]]:.3g}); rescale the data "
                         "(λ_min scales with the square of a common factor)")
    top = float(norms.max())
    if not 2 * np.log10(top) + np.log10(float(n)) + np.log10(float(max(growth, 1))) <= \
            np.log10(MAX_SCALE):
        raise InputError(f"{name} has rows too large for float64 (‖x‖ up to {top:.3g}: N·max K_ii "
                         f"exceeds {MAX_SCALE:.0e}, the solver's squares would overflow); "
                         "rescale the data (λ_min scales with the square of a "
                         "common factor)")
    duplicates, parallel, groups, near = _repeats(X, norms, n)
    return RowCheck(n=n, d=d, duplicate_rows=duplicates, parallel_rows=parallel,
                    min_norm=float(norms.min()), max_norm=top, groups=groups,
                    near_pairs=near)


def _repeats(X, norms, n):
    """Duplicates, parallel rows (counted with duplicates), the group of equal rows of each
    row (None when no row repeats), and up to MAX_NEAR_PAIRS pairs of nearly parallel
    rows."""
    rows = np.asarray(X[:], dtype=np.float64)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    dup = n - len(first)
    groups = first[inverse] if dup else None  # id: the group's first row
    unit = rows / norms[:, None]
    par = n - len(np.unique(np.round(unit, PARALLEL_DECIMALS), axis=0))
    distinct = np.sort(first)  # a pair of equal rows is an exact zero, not a hint
    near = tuple((int(distinct[i]), int(distinct[j]))
                 for i, j in near_parallel_pairs(unit[distinct]))
    return int(dup), int(max(par, dup)), groups, near


def near_parallel_pairs(unit: np.ndarray, distance: float = NEAR_PARALLEL_DISTANCE,
                        limit: int = MAX_NEAR_PAIRS) -> tuple:
    """Pairs (i, j), i < j, of unit rows at most ``distance`` apart, the closest first, at
    most ``limit``.

    The rows are sorted by their projection on a fixed random unit vector g₁; since
    |gᵀ(u_i − u_j)| ≤ ‖u_i − u_j‖ for a unit g, every such pair lies within ``distance``
    in that order, so each row's next neighbours are scanned while their projections stay
    that close. Candidates pass NEAR_PROBES − 1 more projections the same way before their
    distance is computed, so that rows merely close on g₁ (many, at large N and d) cost
    NEAR_PROBES numbers each, not d. Every pair is found unless more than NEAR_SCAN rows
    crowd within ``distance`` on g₁, or NEAR_ENOUGH pairs are found first (then the
    closest of those found): pairs enough either way."""
    n, d = unit.shape
    G = np.random.default_rng(0).standard_normal((d, NEAR_PROBES))
    G /= np.linalg.norm(G, axis=0)
    P = unit @ G
    order = np.argsort(P[:, 0], kind="stable")
    P = P[order]
    slack = distance + 4 * d * np.finfo(np.float64).eps  # the projections' rounding
    chunk = max(1024, (1 << 24) // d)  # rows of each 128 MB difference block
    found_a, found_b, found_d, total = [], [], [], 0
    for k in range(1, min(n, NEAR_SCAN + 1)):
        close = np.nonzero(P[k:, 0] - P[:-k, 0] <= slack)[0]
        if not close.size:
            break  # the order is sorted: farther neighbours are farther still
        close = close[np.all(np.abs(P[close + k, 1:] - P[close, 1:]) <= slack, axis=1)]
        for lo in range(0, close.size, chunk):
            a, b = order[close[lo:lo + chunk]], order[close[lo:lo + chunk] + k]
            dist = np.linalg.norm(unit[a] - unit[b], axis=1)
            keep = dist <= distance
            found_a.append(np.minimum(a, b)[keep])
            found_b.append(np.maximum(a, b)[keep])
            found_d.append(dist[keep])
            total += int(keep.sum())
        if total >= NEAR_ENOUGH:
            break
    if not total:
        return ()
    a, b, dist = (np.concatenate(v) for v in (found_a, found_b, found_d))
    best = np.lexsort((b, a, dist))[:limit]
    return tuple((int(i), int(j)) for i, j in zip(a[best], b[best]))


def near_null_vectors(check: RowCheck, norms: np.ndarray, n: int) -> np.ndarray:
    """Unit vectors ‖x_j‖ e_i − ‖x_i‖ e_j of nearly parallel pairs (K's near-null directions),
    to start the iterative solvers with (N × pairs)."""
    pairs = check.near_pairs
    V = np.zeros((n, len(pairs)))
    for c, (i, j) in enumerate(pairs):
        V[i, c], V[j, c] = norms[j], -norms[i]
        V[:, c] /= np.hypot(norms[i], norms[j])
    return V


def distinct_rows(X: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in order (``--dedupe``)."""
    _, first = np.unique(np.asarray(X, dtype=np.float64), axis=0, return_index=True)
    return np.sort(first)
