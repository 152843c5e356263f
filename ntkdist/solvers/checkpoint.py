"""Snapshots of an iterative solve, so that a killed solve resumes where it stopped.

LOBPCG and Davidson hand their block of Ritz vectors to :meth:`Checkpoint.save` after every
iteration; it is written (atomically: a temporary file, then a rename) at most every
``every`` seconds, to ``OUT/checkpoint.npz``. A rerun with the same ``--out`` (so the same
spec: the folder is claimed by the spec's hash) loads it and starts from those vectors
instead of random ones. The snapshot keeps the Ritz block only, not the search space or
the conjugate directions, so a resumed run spends a few extra passes rebuilding them; it
does not start over. A snapshot that cannot be read, or that belongs to another problem
(size, block, method), is reported and ignored, never trusted. After the result is written
the snapshot is removed.
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile

import numpy as np

CHECKPOINT_FILE = "checkpoint.npz"


class Checkpoint:
    """The snapshot file of one solve; ``key`` names what it must match on load."""

    def __init__(self, path: str, key: dict, every: float = 60.0, log=None):
        self.path = path
        self.key = {k: str(v) for k, v in key.items()}
        self.every = float(every)
        self.log = log
        self._last = time.perf_counter()
        self.resumed: dict | None = None  # what was loaded, for the result
        self.stage = ""  # saved with the block: "float64" once a mixed solve is in its last phase
        self._warned = False
        self._primed: np.ndarray | None = None
        self._base: dict | None = None  # the counts of the stages before this one (prime)

    def prime(self, X: np.ndarray, lam: np.ndarray, iterations: int, products: int) -> None:
        """A finished stage of a solve (``--precond shift``'s estimate): its block saved now,
        and returned by the next :meth:`load` (which is then no resume)."""
        self._primed = np.asarray(X, dtype=np.float64)
        self._last = -np.inf
        self.save(X, lam, iterations, products)
        done = self._base or self.resumed or {"iterations": 0, "passes": 0}
        self._base = {"iterations": done["iterations"] + iterations,
                      "passes": done["passes"] + products}  # the next stage's saves add to it

    def load(self, n: int, block: int) -> np.ndarray | None:
        """The saved Ritz block if a usable snapshot of this problem exists, else None."""
        if self._primed is not None:
            X, self._primed = self._primed, None
            return X if X.shape[1] == block else _fit_block(X, block)
        if not os.path.exists(self.path):
            return None
        why = None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                meta = {k[5:]: str(f[k]) for k in f.files if k.startswith("meta_")}
                X = np.array(f["X"], dtype=np.float64)
                iterations, products = int(f["iterations"]), int(f["products"])
                lam = float(f["lambda"])
                stage = str(f["stage"]) if "stage" in f.files else ""
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            why = f"unreadable ({type(exc).__name__})"
        else:
            if any(meta.get(k) != v for k, v in self.key.items()):
                why = "of another problem"
            elif X.ndim != 2 or X.shape[0] != n or X.shape[1] < 1:
                why = f"of shape {X.shape}, not ({n}, {block})"
            elif not np.all(np.isfinite(X)) or np.linalg.matrix_rank(X) < X.shape[1]:
                why = "not a usable basis (non-finite or rank-deficient)"
            elif X.shape[1] != block:  # saved with another block: keep its lowest Ritz vectors
                X = _fit_block(X, block)
        if why is not None:
            if self.log:
                self.log(f"checkpoint {self.path} is {why}: ignored, starting afresh")
            return None
        self.resumed = {"iterations": iterations, "passes": products, "lambda_1": lam,
                        "stage": stage}
        if self.log:
            self.log(f"resuming from checkpoint {self.path}: {iterations} iterations and "
                     f"{products} passes done, λ_1 = {lam:.12g}")
        return X

    def save(self, X: np.ndarray, lam: np.ndarray, iterations: int, products: int) -> None:
        now = time.perf_counter()
        if now - self._last < self.every:
            return
        done = self._base or self.resumed or {"iterations": 0, "passes": 0}
        tmp = self.path + ".tmp.npz"
        try:
            np.savez(tmp, X=np.asarray(X, dtype=np.float64),
                     iterations=done["iterations"] + iterations,
                     products=done["passes"] + products,
                     **{"lambda": float(lam[0])}, stage=np.array(self.stage),
                     **{f"meta_{k}": np.array(v) for k, v in self.key.items()})
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop the solve: the last snapshot stays
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if self.log and not self._warned:
                self.log(f"warning: cannot save the checkpoint {self.path} "
                         f"({exc.strerror or exc}); the solve goes on without it")
            self._warned = True
        self._last = now

    def remove(self) -> None:
        for p in (self.path, self.path + ".tmp.npz"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def _fit_block(X: np.ndarray, block: int) -> np.ndarray:
    """A saved Ritz block (columns in ascending Ritz order) of another width fitted to
    ``block`` columns: its first ``block`` columns, or all of them and seeded random ones."""
    if X.shape[1] >= block:
        return np.ascontiguousarray(X[:, :block])
    extra = np.random.default_rng(X.shape[1]).standard_normal((X.shape[0], block - X.shape[1]))
    return np.hstack([X, extra])
