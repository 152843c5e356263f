"""The shift-invert factor out of core: K − σI (less its deflation) factored in float32 tile by
tile into a folder on disk, for N where its 4N² bytes do not fit in memory
(:mod:`ntkdist.solvers.shift`; docs/theory.md, "Preconditioners").

The factorisation is left-looking by tile columns: column k of L is K − σI's column k less
the products L_ij L_kjᵀ of the columns before it (read back from disk), then the diagonal
tile's Cholesky factor and a triangular solve for the tiles below it. Each finished column's
tiles are written (``L.I.J.npy``, atomically) with their BLAKE2b checksums and the column
count in ``manifest.json``, so a killed run resumes at the first unfinished column: the
manifest must name the same N, tiling, σ and matrix (``identity``), and every tile of the
finished columns must match its checksum, else the folder is cleared and the factor begun
again. An application (LLᵀ)⁻¹Z reads every tile twice: the forward solve row by row, the
backward one in the reverse order (so what the page cache kept of the forward pass serves
the backward one first).

Cost at N = 100000 with tiles of 4096: the lower tiles take 2N²(1 + 1/T) bytes (20.8 GB),
the factorisation N³/3 float32 flops in 4096³ GEMMs and reads about T/3 times the factor
(T = 25 tile columns), an application two reads of it and 4N²·m flops (m the block).
Memory: one column panel (N × tile float32) and four tiles (read ahead by a thread).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import NtkdistError
from ..results import existing_parent

#: Largest share of the free disk the factor may take.
DISK_SHARE = 0.9
#: Tile of the factor where no store gives one.
DISK_TILE = 4096
#: Tiles read ahead of the one in use (a thread reads while the GEMMs run).
READ_AHEAD = 2
MANIFEST = "manifest.json"
#: The factor's folder in a run's result folder.
FACTOR_DIR = "shift-factor"


class DiskFactorError(NtkdistError):
    """The factor could not be written or read (permissions, full disk): one line."""


def tiling(n: int, tile: int) -> list[slice]:
    return [slice(s, min(n, s + tile)) for s in range(0, n, tile)]


def disk_bytes(n: int, tile: int) -> float:
    """Bytes of the factor's lower tiles (float32)."""
    sizes = np.array([b.stop - b.start for b in tiling(n, tile)], dtype=np.float64)
    return 4.0 * (float(sizes.sum()) ** 2 + float((sizes ** 2).sum())) / 2.0


def panel_bytes(n: int, tile: int) -> float:
    """Memory of the factorisation: its column panel (N × tile float32), a float64 tile of
    K − σI being formed (with its copies), and the tiles read ahead."""
    return 4.0 * n * tile + 8.0 * 3 * tile * tile + 4.0 * (READ_AHEAD + 2) * tile * tile


def disk_fits(path: str, n: int, tile: int, memory: float | None = None) -> str | None:
    """None where the factor's tiles fit in :data:`DISK_SHARE` of the free disk at ``path``
    (what a factor there already holds counted as free), the folder can be written, and its
    :func:`panel_bytes` within ``memory`` (bytes; not checked where None); else why not
    (one line)."""
    if memory is not None and panel_bytes(n, tile) > memory:
        return (f"the shift's factor on disk works on an N × {tile} column panel "
                f"({panel_bytes(n, tile) / 1e9:.1f} GB at N = {n}), more than "
                f"{memory / 1e9:.1f} GB of memory (a store of smaller tiles needs less)")
    need = disk_bytes(n, tile)
    where = existing_parent(path)
    if not os.access(where, os.W_OK):
        return f"the shift's factor folder {path!r} cannot be written"
    held = 0
    if os.path.isdir(path):
        held = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if _ours(f))
    free = shutil.disk_usage(where).free + held
    if need > DISK_SHARE * free:
        return (f"the shift's factor on disk takes {need / 1e9:.1f} GB at N = {n}, and "
                f"{free / 1e9:.1f} GB are free at {where!r}")
    return None


def _ours(name: str) -> bool:
    """A file the factor writes: its manifest and tiles ``L.I.J.npy`` (``.tmp`` while
    written)."""
    return name == MANIFEST or re.fullmatch(r"L\.\d+\.\d+\.(npy|tmp)", name) is not None


def recorded_sigma(path: str | None, n: int, identity: str = "") -> float | None:
    """σ of a factor begun under ``path`` (at least one column finished) for this N and
    ``identity``, or None."""
    if path is None:
        return None
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
        if m.get("n") != int(n) or m.get("identity") != str(identity) or not (
                int(m.get("columns", 0)) > 0):
            return None
        sigma = float(m["sigma"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return None
    return sigma if np.isfinite(sigma) else None


def remove_factor(path: str) -> None:
    """Delete a factor's files under ``path`` (only those it writes) and the folder if then
    empty."""
    if not os.path.isdir(path):
        return
    names = sorted(os.listdir(path), key=lambda name: name != MANIFEST)  # the manifest first
    for name in names:
        if _ours(name) or name == MANIFEST + ".tmp":
            try:
                os.remove(os.path.join(path, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class DiskFactor:
    """L with LLᵀ = A (N × N, symmetric positive definite in float32), in tiles under
    ``path``. ``sigma`` and ``identity`` (a string naming the matrix) key the resume."""

    def __init__(self, path: str, n: int, tile: int, sigma: float, identity: str = "",
                 log=None):
        self.path, self.n, self.tile = path, int(n), int(tile)
        self.bounds = tiling(self.n, self.tile)
        self.T = len(self.bounds)
        self.key = {"n": self.n, "tile": self.tile, "sigma": repr(float(sigma)),
                    "identity": str(identity), "dtype": "float32"}
        self.log = log or (lambda *a: None)
        self.checksums: dict[str, str] = {}
        self.columns = 0

    # --- files -------------------------------------------------------------------------
    def _file(self, i: int, j: int) -> str:
        return os.path.join(self.path, f"L.{i}.{j}.npy")

    def _load(self, i: int, j: int) -> np.ndarray:
        try:
            with open(self._file(i, j), "rb") as f:
                a = np.lib.format.read_array(f)
        except (OSError, ValueError) as exc:
            raise DiskFactorError(f"the shift's factor tile {self._file(i, j)!r} cannot be "
                                  f"read ({exc.__class__.__name__}: {exc})") from None
        return a

    def _save(self, i: int, j: int, a: np.ndarray) -> None:
        file = self._file(i, j)
        tmp = file[:-4] + ".tmp"
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a, dtype=np.float32))
            os.replace(tmp, file)
        except OSError as exc:
            raise DiskFactorError(f"the shift's factor cannot be written to {self.path!r} "
                                  f"({exc.strerror or exc})") from None

    def _write_manifest(self) -> None:
        tmp = os.path.join(self.path, MANIFEST + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({**self.key, "columns": self.columns, "checksums": self.checksums}, f)
            os.replace(tmp, os.path.join(self.path, MANIFEST))
        except OSError as exc:
            raise DiskFactorError(f"the shift's factor cannot be written to {self.path!r} "
                                  f"({exc.strerror or exc})") from None

    def remove(self) -> None:
        remove_factor(self.path)

    def _resume(self) -> int:
        """Finished columns of a factor already in the folder, each of their tiles checked
        against its checksum; 0 (and the folder cleared) where it is not this matrix's."""
        from ..store import checksum

        try:
            with open(os.path.join(self.path, MANIFEST)) as f:
                m = json.load(f)
            same = all(m.get(k) == v for k, v in self.key.items())
            done = int(m.get("columns", 0))
            sums = {(int(key.split(".")[0]), int(key.split(".")[1])): str(v)
                    for key, v in dict(m.get("checksums", {})).items()}
        except (OSError, ValueError, TypeError, AttributeError, IndexError, OverflowError):
            same, done, sums = False, 0, {}
        if not same or done <= 0:
            self.remove()
            return 0
        good = 0
        for k in range(min(done, self.T)):
            try:
                ok = all(checksum(self._load(i, k)) == sums.get((i, k))
                         for i in range(k, self.T))
            except DiskFactorError:
                ok = False
            if not ok:
                self.log(f"note: the shift's factor on disk is damaged at column {k + 1}: "
                         "factored again from there")
                break
            good = k + 1
        self.checksums = {f"{i}.{j}": v for (i, j), v in sums.items() if j < good}
        return good

    def _reader(self, keys):
        """The tiles of ``keys`` in order, read :data:`READ_AHEAD` ahead by a thread."""
        keys = iter(keys)
        with ThreadPoolExecutor(1) as pool:
            pending = deque()
            for key in keys:
                pending.append((key, pool.submit(self._load, *key)))
                if len(pending) >= READ_AHEAD:
                    break
            while pending:
                key, fut = pending.popleft()
                nxt = next(keys, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._load, *nxt)))
                yield key, fut.result()

    # --- factorisation -----------------------------------------------------------------
    def factor(self, lower_tile) -> bool:
        """Factor A given ``lower_tile(i, j)`` (i ≥ j): tile (I, J) of A, any float dtype.
        True where it factored (its tiles on disk), False where A is not positive definite
        in float32. Raises :class:`DiskFactorError` where the folder fails."""
        from scipy.linalg import get_lapack_funcs, solve_triangular

        from ..store import checksum

        start = self._resume()
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise DiskFactorError(f"the shift's factor folder {self.path!r} cannot be made "
                                  f"({exc.strerror or exc})") from None
        if start == self.T:
            self.log(f"shift factor on disk: complete in {self.path}, reused")
        elif start:
            self.log(f"shift factor on disk: resuming at column {start + 1} of {self.T} "
                     f"({self.path})")
        self.columns = start
        potrf, = get_lapack_funcs(("potrf",), (np.zeros(1, np.float32),))
        work = [(self.T - k) * (k + 1) for k in range(self.T)]  # tile GEMMs (and forms)
        t0, done_work = time.perf_counter(), 0
        for k in range(start, self.T):
            bk = self.bounds[k]
            s, w = bk.start, bk.stop - bk.start
            P = np.empty((self.n - s, w), dtype=np.float32)
            for i in range(k, self.T):
                bi = self.bounds[i]
                P[bi.start - s:bi.stop - s] = lower_tile(i, k)
            Lkj = None
            keys = [(i, j) for j in range(k) for i in range(k, self.T)]
            for (i, j), Lij in self._reader(keys):
                if i == k:
                    Lkj = Lij
                bi = self.bounds[i]
                P[bi.start - s:bi.stop - s] -= Lij @ Lkj.T
            L, info = potrf(P[:w], lower=1, clean=1, overwrite_a=0)
            d = np.diagonal(L)
            if info != 0 or not (np.all(np.isfinite(d)) and np.all(d > 0)):
                return False
            P[:w] = L
            if w < len(P):  # below: P ← P L⁻ᵀ, solved in place on Pᵀ (F-ordered)
                Y = solve_triangular(L, P[w:].T, lower=True, check_finite=False,
                                     overwrite_b=True)
                if not np.shares_memory(Y, P):
                    P[w:] = Y.T
                del Y
                if not all(np.isfinite(P[b.start - s:b.stop - s]).all()
                           for b in self.bounds[k + 1:]):
                    return False
            for i in range(k, self.T):
                bi = self.bounds[i]
                tile = P[bi.start - s:bi.stop - s]
                self._save(i, k, tile)
                self.checksums[f"{i}.{k}"] = checksum(np.ascontiguousarray(tile))
            self.columns = k + 1
            self._write_manifest()
            done_work += work[k]
            left = sum(work[k + 1:])
            spent = time.perf_counter() - t0
            self.log(f"shift factor on disk: column {k + 1} of {self.T} "
                     f"({spent:.0f} s, about {spent / done_work * left:.0f} s left)")
        return True

    # --- application -------------------------------------------------------------------
    def solve(self, Z) -> np.ndarray:
        """(LLᵀ)⁻¹Z in float32 (Z: N × m)."""
        from scipy.linalg import solve_triangular

        Y = np.array(Z, dtype=np.float32, order="C")
        one = Y.ndim == 1
        if one:
            Y = Y[:, None]
        b = self.bounds
        forward = [(i, j) for i in range(self.T) for j in range(i + 1)]
        for (i, j), Lij in self._reader(forward):  # L y = z, row by row
            if j < i:
                Y[b[i]] -= Lij @ Y[b[j]]
            else:
                Y[b[i]] = solve_triangular(Lij, Y[b[i]], lower=True, check_finite=False)
        for (i, j), Lij in self._reader(reversed(forward)):  # Lᵀ x = y, rows in reverse
            if j == i:
                Y[b[i]] = solve_triangular(Lij, Y[b[i]], lower=True, trans=1,
                                           check_finite=False)
            else:
                Y[b[j]] -= Lij.T @ Y[b[i]]
        return Y[:, 0] if one else Y
