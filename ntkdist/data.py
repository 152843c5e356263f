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


@dataclass(frozen=True)
class RowCheck:
    """What validation found in a row set that is not an error."""

    n: int
    d: int
    duplicate_rows: int  # rows equal to an earlier row
    parallel_rows: int  # rows that are a positive multiple of an earlier one (duplicates included)
    min_norm: float
    max_norm: float


def check_rows(X, name: str = "input", block: int = 65536) -> RowCheck:
    """Validate a 2-D row set; raise :class:`InputError` with one line if unusable.

    Refused: not 2-D, not numeric, N < 2, d < 1, non-finite values, all-zero rows.
    Duplicate and parallel rows are allowed (they make K singular; λ_min ≈ 0 is then the
    right answer) and counted.
    """
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise InputError(f"{name} must be a 2-D array (rows × features), got shape {shape}")
    n, d = (int(v) for v in shape)
    if n < 2:
        raise InputError(f"{name} has {n} row(s); at least 2 are needed")
    if d < 1:
        raise InputError(f"{name} has no columns")
    kind = np.dtype(X.dtype).kind
    if kind not in "fiu":
        raise InputError(f"{name} has dtype {X.dtype}; a real numeric array is needed")
    norms = np.empty(n)
    for lo in range(0, n, block):
        rows = np.asarray(X[lo:lo + block], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            bad = lo + int(np.nonzero(~np.all(np.isfinite(rows), axis=1))[0][0])
            raise InputError(f"{name} has non-finite values (first in row {bad})")
        norms[lo:lo + block] = np.linalg.norm(rows, axis=1)
    zero = np.nonzero(norms == 0)[0]
    if zero.size:
        raise InputError(f"{name} has {zero.size} all-zero row(s) (first: row {zero[0]}); "
                         "the ReLU kernel of a zero row is identically 0")
    duplicates, parallel = _count_repeats(X, norms, n)
    return RowCheck(n=n, d=d, duplicate_rows=duplicates, parallel_rows=parallel,
                    min_norm=float(norms.min()), max_norm=float(norms.max()))


def _count_repeats(X, norms, n) -> tuple[int, int]:
    rows = np.asarray(X[:], dtype=np.float64)
    dup = n - np.unique(rows, axis=0).shape[0]
    unit = rows / norms[:, None]
    # Parallel rows give unit vectors equal up to rounding; compare them at 1e-12.
    par = n - np.unique(np.round(unit, 12), axis=0).shape[0]
    return int(dup), int(max(par, dup))
