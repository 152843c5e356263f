"""One entry point for the eigensolvers, with the accuracy certificate every result carries.

Whatever the method, the result is judged the same way (:mod:`ntkdist.solvers.certificate`):
after the solver stops, one fresh product K·V of the k values' vectors and of the next one
gives Rayleigh quotients, residuals and gap estimates, and from them error bounds that include
float64's rounding. ``converged`` is true only when every requested value is certified to
``tol`` by those bounds (or is an exact zero, below). Three situations are handled before any
iteration:

* **Repeated rows** (``groups``: rows with the same group id are equal): K has the exact null
  vectors e_i − e_j, so its m = N − (number of distinct rows) smallest eigenvalues are exactly
  0 (K is PSD). They are returned as exact zeros with an orthonormal basis of those vectors;
  the other eigenvalues are those of K on the orthogonal complement (vectors constant on each
  group of equal rows), which the solvers search by projecting every new direction onto it.
* **Very small N** (at most ``SMALL_N``, or too small for a block of k + 1 with room to
  iterate): K is formed from N columns of products and solved densely.
* **Rows of very different norms** (dense path): if the plain ``eigh`` cannot certify λ, the
  scaled formulation K = D A D, D = diag(K)^½, is tried
  (:func:`ntkdist.solvers.dense.scaled_smallest`), which resolves λ to a relative accuracy set by A's conditioning rather
  than by ‖K‖.

The methods themselves are in :mod:`~ntkdist.solvers.dense`, :mod:`~ntkdist.solvers.lobpcg`
and :mod:`~ntkdist.solvers.davidson` (run in phases by :mod:`~ntkdist.solvers.mixed`), and
ARPACK for ``lanczos``; every result is an :class:`~ntkdist.solvers.result.EigenResult`, whose
status is set here (:func:`_judged_solution`; docs/accuracy.md, "Status").
"""

from __future__ import annotations

import time

import numpy as np

from ..data import MAX_NEAR_PAIRS, NEAR_PARALLEL_DISTANCE
from ..errors import NtkdistError
from .certificate import (block_size, certified, floors, initial_block, judge, residuals,
                          resolution, weights)
from .davidson import davidson_smallest
from .dense import DENSE_METHOD, eigh_smallest, scaled_smallest
from .lobpcg import lobpcg_smallest
from .mixed import fast_label, solve_in_phases
from .result import EigenResult

METHODS = ("lobpcg", "davidson", "lanczos", "dense")
#: At most this many rows (of the problem left once exact zeros are set aside), K is formed
#: from products and solved densely, whatever the method.
SMALL_N = 64
#: Columns per product when K is formed from products.
EXPLICIT_COLUMNS = 256


class RepeatedRows:
    """Groups of equal rows: the exact null space of K they give, and the projector onto its
    orthogonal complement (each block's entries replaced by their mean over each group)."""

    def __init__(self, groups: np.ndarray):
        groups = np.asarray(groups)
        _, self.first, self.inverse, self.counts = np.unique(
            groups, return_index=True, return_inverse=True, return_counts=True)
        self.inverse = self.inverse.reshape(-1)
        self.n = len(self.inverse)
        self.distinct = len(self.counts)
        self.nullity = self.n - self.distinct

    def project(self, V: np.ndarray) -> np.ndarray:
        squeeze = V.ndim == 1
        V2 = V[:, None] if squeeze else V
        sums = np.zeros((self.distinct, V2.shape[1]))
        np.add.at(sums, self.inverse, V2)
        out = (sums / self.counts[:, None])[self.inverse]
        return out[:, 0] if squeeze else out

    def null_basis(self, count: int) -> np.ndarray:
        """``count`` orthonormal null vectors of K (Helmert contrasts within each group)."""
        out = np.zeros((self.n, count))
        col = 0
        order = np.argsort(self.inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        for g in np.nonzero(self.counts > 1)[0]:
            members = order[bounds[g]:bounds[g + 1]]
            for j in range(1, len(members)):
                if col == count:
                    return out
                out[members[:j], col] = 1.0
                out[members[j], col] = -float(j)
                out[:, col] /= np.sqrt(j * (j + 1.0))
                col += 1
        return out

    def reduce(self, K: np.ndarray) -> np.ndarray:
        """C^(−½) Pᵀ K P C^(−½) (P: rows to groups, C: group sizes), K on the complement: as
        equal rows give equal rows and columns of K, its entry (g, h) is √(c_g c_h) times
        K's entry for the groups' first rows (distinct² memory, no N×N temporary)."""
        c = np.sqrt(self.counts.astype(np.float64))
        return K[np.ix_(self.first, self.first)] * c[:, None] * c[None, :]

    def expand(self, W: np.ndarray) -> np.ndarray:
        """P C^(−½) W: vectors of the reduced matrix as vectors of K (norms kept)."""
        return (W / np.sqrt(self.counts)[:, None])[self.inverse]


def _explicit(matmat, n: int) -> np.ndarray:
    """K formed from products with the identity, symmetrised."""
    K = np.empty((n, n))
    for lo in range(0, n, EXPLICIT_COLUMNS):
        hi = min(n, lo + EXPLICIT_COLUMNS)
        E = np.zeros((n, hi - lo))
        E[np.arange(lo, hi), np.arange(hi - lo)] = 1.0
        K[:, lo:hi] = matmat(E)
    return (K + K.T) / 2


def _trace_estimate(matmat, n: int, seed: int) -> float:
    """tr(K) from four Rademacher probes (one product), when the caller gives no ``scale``;
    doubled, so that the rounding floors it sets err on the safe side of the estimate's
    spread."""
    Z = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=(n, 4))
    return 2.0 * float(np.mean(np.einsum("ij,ij->j", Z, matmat(Z))))


def smallest_eigenpairs(matmat, n: int, method: str = "lobpcg", k: int = 1, tol: float = 1e-8,
                        block: int | None = None, precond=None, max_products: int = 600,
                        seed: int = 0, dense_matrix=None, scale: float = 0.0,
                        log=None, max_seconds: float | None = None,
                        checkpoint=None, fast_matmat=None, groups=None,
                        start: np.ndarray | None = None, diag=None,
                        ceiling: float | None = None, cluster: int = 0) -> EigenResult:
    """The k smallest eigenpairs of the PSD operator ``matmat`` (N×b ↦ K·V), certified.

    ``lobpcg``: :func:`ntkdist.solvers.lobpcg.lobpcg_smallest` with ``precond``
    (``davidson``: :func:`ntkdist.solvers.davidson.davidson_smallest`, the same interface and
    stopping rule). ``lanczos``: ARPACK (``scipy.sparse.linalg.eigsh``, which='SA'),
    unpreconditioned. ``dense``: ``scipy.linalg.eigh`` on ``dense_matrix()``, then the scaled
    formulation where the plain one cannot certify λ. Pass ``scale`` = tr(K)/N: it sets the
    rounding floors of the certificate (estimated with one product when not given).

    ``groups`` (N,): a group id per row, equal for equal rows (see the module docstring).
    ``start`` (N × s): directions put first in the random starting block (near-null vectors of
    nearly parallel rows, which the iteration would otherwise find slowly). ``diag`` (N,):
    K's diagonal, known from the rows; it sharpens the rounding floors of vectors that live
    on a few rows, and min_i K_ii ≥ λ_min exposes a value that is not the smallest.
    ``ceiling``: another upper bound on λ_min, known for certain (a value above it is
    missed). ``cluster``: the pairs of nearly parallel rows found; from two on, they put a
    cluster of eigenvalues near 0 of unknown size, and a value the solver cannot prove the
    smallest (LOBPCG, Davidson, Lanczos) is not certified as λ_min.

    ``checkpoint`` (a :class:`ntkdist.solvers.checkpoint.Checkpoint`, LOBPCG and Davidson
    only): start from its saved Ritz block if it holds a usable one, and save the block as
    the solve goes.

    ``fast_matmat`` (LOBPCG and Davidson only): a cheaper, inexact K·V (float32 deflated or
    shifted products, the distributed operator's ``matmat_fast``, named by a
    :class:`ntkdist.solvers.mixed.FastProducts`). The solve then runs in two phases
    (:mod:`ntkdist.solvers.mixed`): with ``fast_matmat`` until converged, at a third of the
    fast products' measured error, stalled or out of four fifths of the products; then with
    ``matmat`` from the first phase's Ritz block until the float64 products certify ``tol``.
    Values, residuals and the certificate come from ``matmat`` alone.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= k < n:
        raise NtkdistError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    t0 = time.perf_counter()
    notes = []
    guards = {"ceiling": ceiling, "cluster": cluster}
    rep = RepeatedRows(groups) if groups is not None else None
    if rep is not None and rep.nullity == 0:
        rep = None
    m = min(k, rep.nullity) if rep is not None else 0  # exact zeros among the k
    kk = k - m  # values left to compute
    n_left = n - m if rep is None else rep.distinct
    if method != "dense" and kk and (n_left <= SMALL_N or n_left < 4 * (kk + 1)):
        notes.append(f"N = {n_left} is small: K formed from {n} columns of products and "
                     f"solved densely instead of by {method}")
        method, dense_matrix = "dense", (lambda: _explicit(matmat, n))
    K = None
    if method == "dense" and kk:
        K = np.asarray(dense_matrix(), dtype=np.float64)
    if diag is None and K is not None:
        diag = np.diag(K).copy()
    trace = scale * n if scale > 0 else (float(np.trace(K)) if K is not None else None)
    if trace is None:
        trace = _trace_estimate(matmat, n, seed)
        notes.append("tr(K) estimated from 4 random probes and doubled (no scale given)")
    if rep is not None:
        notes.append(f"{rep.nullity} repeated row(s): {rep.nullity} eigenvalue(s) exactly 0 "
                     "(e_i − e_j null vectors of K, which is PSD)")
    if kk == 0:
        return _finish(matmat, n, k, tol, trace, rep, m, None, None, "exact: repeated rows",
                       True, 0, t0, None, None, None, notes, guards=guards)
    if method == "dense":
        V, name = _dense(K, rep, kk)
        judged = judge(matmat(V), V, n, trace, diag)
        best = judged.bounds["best"]
        if not certified(judged.values[:kk], best[:kk], tol) and rep is None:
            scaled = scaled_smallest(K, kk, log=log)
            if scaled is not None and scaled.bounds["best"][0] < best[0]:
                return _finish_scaled(scaled, matmat, n, k, tol, trace, t0, notes, diag)
        return _finish(matmat, n, k, tol, trace, rep, m, V, judged, name, True, 0, t0,
                       None, None, None, notes, diag, guards)
    project = rep.project if rep is not None else None
    if method in ("lobpcg", "davidson"):
        solver = lobpcg_smallest if method == "lobpcg" else davidson_smallest
        used_block = block_size(n_left, kk, block)
        if block is not None and block < kk + 1:
            notes.append(f"block raised from {block} to {used_block}: the gap of the k-th value "
                         "is estimated from the next Ritz value")
        X0 = checkpoint.load(n, used_block) if checkpoint is not None else None
        if X0 is None and start is not None and start.shape[1]:
            X0 = initial_block(n, used_block, precond, seed)
            # at most half the block: the rest stays random (preconditioned), so that a
            # start that sits inside a cluster does not keep the solver from its bottom
            s = min(start.shape[1], max(1, used_block // 2))
            X0[:, :s] = start[:, :s]
        r, judged = solve_in_phases(
            solver, matmat, n, kk, X0, fast_matmat=fast_matmat, checkpoint=checkpoint,
            block=used_block, precond=precond, tol=tol, seed=seed, trace=trace,
            project=project, diag=diag, max_products=max_products, max_seconds=max_seconds,
            t0=t0, log=log)
        what = ("ntkdist block LOBPCG" if method == "lobpcg"
                else "ntkdist block generalized Davidson, GD+k")
        mixed = f", mixed precision: {fast_label(fast_matmat)} then float64 products"
        name = (f"{method} ({what}, block {used_block}, "
                f"{'preconditioned' if precond is not None else 'no preconditioner'}"
                f"{mixed if r.phases is not None else ''})")
        resumed = checkpoint.resumed if checkpoint is not None else None
        out = _finish(matmat, n, k, tol, trace, rep, m, judged.vectors, judged, name, False,
                      r.iterations, t0, r.phases, resumed, used_block, notes, diag, guards)
        out.products, out.ritz_block, out.ritz_values = r.products, r.ritz_block, r.ritz_values
        if out.status in ("not_converged", "below_resolution") and not r.converged:
            how = ("with its residuals at their rounding floor" if r.at_floor else
                   "with its residuals no longer falling" if r.stalled else
                   f"at its limit (--max-products {max_products}"
                   + (f" or {max_seconds:g} s" if max_seconds else "") + ")")
            further = not r.at_floor and out.status == "not_converged"
            other = "davidson" if method == "lobpcg" else "lobpcg"
            out.notes.append(f"{method} stopped after {r.iterations} iterations {how}"
                             + (f"; --method {other}, a larger --block or --max-products may "
                                "get further" if further else ""))
        return out
    V = _lanczos(matmat, n, kk, rep, trace, tol, seed, max_products)
    return _finish(matmat, n, k, tol, trace, rep, m, V, None,
                   "lanczos (ARPACK eigsh, which='SA', no preconditioner)", False, -1, t0,
                   None, None, None, notes, diag, guards)


def _lanczos(matmat, n: int, kk: int, rep: RepeatedRows | None, trace: float, tol: float,
             seed: int, max_products: int) -> np.ndarray:
    """The kk + 1 smallest Ritz vectors (kk at least) by ARPACK (``eigsh``, which='SA'),
    restarts capped so that the products stay within ``max_products``; with repeated rows, on
    the complement of their null space (shifted beyond the spectrum)."""
    import scipy.sparse.linalg as sla

    shift = 2.0 * trace  # beyond every eigenvalue: moves the exact zeros out of the way

    def apply(V):
        if rep is None:
            return matmat(V)
        P = rep.project(V)
        return matmat(P) + shift * (V - P)

    op = sla.LinearOperator((n, n), matvec=lambda v: apply(v[:, None])[:, 0],
                            matmat=apply, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    if rep is not None:
        v0 = rep.project(v0)
    want = kk + 1
    ncv = min(n, max(2 * want + 1, 20))
    restarts = max(1, (max_products - want) // max(1, ncv - want))
    try:
        w, V = sla.eigsh(op, k=want, which="SA", tol=tol, v0=v0, ncv=ncv, maxiter=restarts)
    except sla.ArpackNoConvergence as exc:
        w, V = exc.eigenvalues, exc.eigenvectors
        if len(w) < kk:
            raise NtkdistError(
                f"lanczos (ARPACK) converged {len(w)} of {kk} eigenvalues within "
                f"--max-products {max_products}; raise it, or use --method davidson or "
                "lobpcg (preconditioned)") from None
    return V[:, np.argsort(w)]


def _dense(K: np.ndarray, rep: RepeatedRows | None, kk: int):
    """The kk + 1 smallest eigenvectors of K (on the complement of the repeated rows' null
    space when there are repeated rows), by LAPACK ``syevr``."""
    A = rep.reduce(K) if rep is not None else K
    _, W = eigh_smallest(A, min(kk, A.shape[0] - 1) + 1)
    V = rep.expand(W) if rep is not None else W
    return V, DENSE_METHOD


def _finish(matmat, n, k, tol, trace, rep, m, V, judged, name, smallest_proved, iterations,
            t0, phases, resumed, block, notes, diag=None, guards=None) -> EigenResult:
    """Exact zeros first, then the computed values, each with its bounds (``judged``: V
    judged by :func:`ntkdist.solvers.certificate.judge`, done here if None); the status
    (``guards``: :func:`_judged_solution`'s)."""
    kk = k - m
    if V is not None and judged is None:
        judged = judge(matmat(V), V, n, trace, diag)
    parts_V, values, rnorms, gaps = [], [], [], []
    best, res, kt = [], [], []
    if m:
        Z = rep.null_basis(m)
        AZ = matmat(Z)
        parts_V.append(Z)
        values += [0.0] * m
        rnorms += list(residuals(AZ, Z, np.zeros(m))[1])
        gaps += [np.nan] * m
        best += [0.0] * m
        res += [0.0] * m
        kt += [0.0] * m
    if kk:
        V, b = judged.vectors, judged.bounds
        parts_V.append(V[:, :kk])
        values += list(judged.values[:kk])
        rnorms += list(judged.residuals[:kk])
        gaps += list(judged.gaps[:kk])
        best += list(b["best"][:kk])
        res += list(b["residual"][:kk])
        kt += list(b["kato_temple"][:kk])
    values = np.array(values)
    best = np.array(best)
    exact = np.array([True] * m + [False] * kk)
    limited = bool(kk) and bool(np.any(
        floors(n, trace, weights(V[:, :kk], diag))[0] >= tol * np.abs(values[m:])))
    return _judged_solution(values, best, exact, tol, diag, notes, dict(
        vectors=np.hstack(parts_V), residuals=np.array(rnorms), gaps=np.array(gaps),
        method=name, iterations=iterations, solver_seconds=time.perf_counter() - t0,
        resumed=resumed, phases=phases,
        bounds={"best": best, "residual": np.array(res), "kato_temple": np.array(kt)},
        resolution=resolution(n, trace), trace=trace, smallest_proved=bool(smallest_proved),
        block=block, rounding_limited=limited), guards)


def _judged_solution(values, best, exact, tol, diag, notes, fields,
                     guards=None) -> EigenResult:
    """The status of k values with their bounds (``exact``: exact zeros, bound 0).

    A value is *resolved* when it exceeds its bound (its first digit is certain). λ_i is at
    most the sum of the i smallest diagonal entries (the trace of that principal
    submatrix, by interlacing), and λ_1 at most ``guards["ceiling"]`` where given, so a
    value whose lower end exceeds its ceiling is not the i-th eigenvalue: a smaller one was
    *missed*. With ``guards["cluster"]`` ≥ 2 pairs of nearly parallel rows, a result not
    proved the smallest is not certified (``not_converged``, no value resolved). An
    unresolved λ_1 is ``below_resolution`` only where it is at most ``fields["resolution"]``
    (float64 cannot resolve it for this K); above, the solver stopped short of it
    (``not_converged``)."""
    guards = guards or {}
    resolved = exact | (values > best)
    missed = np.zeros(len(values), bool)
    ceiling = np.full(len(values), np.inf)
    source = ["the sum of the {} smallest K_ii".format(i + 1) for i in range(len(values))]
    if diag is not None:
        ceiling = np.cumsum(np.sort(np.asarray(diag, dtype=np.float64)))[:len(values)]
    if guards.get("ceiling") is not None and guards["ceiling"] < ceiling[0]:
        ceiling[0] = guards["ceiling"]
        source[0] = ("the Rayleigh quotient, with its rounding, of a combination of nearly "
                     "parallel rows' differences")
    missed = ~exact & (values - best > ceiling)
    if missed.any():
        i = int(np.nonzero(missed)[0][0])
        notes.append(f"value {i + 1} found, {values[i]:.6g}, less its bound exceeds "
                     f"{source[i]}, {ceiling[i]:.6g}, an upper bound on λ_{i + 1}: the "
                     "solver missed a smaller eigenvalue")
    ok = bool(not missed.any() and (exact.all() or certified(values[~exact], best[~exact], tol)))
    pairs = guards.get("cluster", 0)
    clustered = (pairs >= 2 and not fields.get("smallest_proved") and not missed.any()
                 and not exact.all() and bool(resolved[0]))
    if clustered:
        ok = False
        resolved = exact.copy()
        notes.append(
            f"{pairs} pairs of nearly parallel rows (unit rows within {NEAR_PARALLEL_DISTANCE:g}"
            f"{'; the closest kept' if pairs >= MAX_NEAR_PAIRS else ''}) put a "
            "cluster of eigenvalues near the bottom of the spectrum, whose count the solver's "
            f"gap estimate cannot know: the value found, {values[~exact][0]:.10g}, is an "
            "eigenvalue but may not be the smallest, and is not certified as λ_min (use "
            "--method dense, or --certify cholesky for a proved bracket)")
    if missed.any():
        status = "missed"
    elif ok:
        status = "exact" if exact.all() else "certified"
    elif clustered:
        status = "not_converged"
    elif not resolved[0] and values[0] <= fields["resolution"]:
        status = "below_resolution"
    else:
        status = "not_converged"
    return EigenResult(values=values, converged=ok, exact=exact, status=status, notes=notes,
                       resolved=resolved & ~missed, **fields)


def _finish_scaled(scaled, matmat, n, k, tol, trace, t0, notes, diag) -> EigenResult:
    """The k smallest of the scaled formulation's pairs
    (:func:`ntkdist.solvers.dense.scaled_smallest`), residuals from a fresh product, bounds
    its own; the status."""
    V = scaled.vectors[:, :k]
    values = scaled.values[:k]
    rnorm = residuals(matmat(V), V, values)[1]
    best = scaled.bounds["best"][:k]
    notes.append("rows of very different norms: λ resolved through the scaled formulation "
                 "K = D A D, D = diag(K)^½ (relative perturbation bound, not the residual)")
    return _judged_solution(values, best, np.zeros(k, bool), tol, diag, notes, dict(
        vectors=V, residuals=rnorm, gaps=np.full(k, np.nan), method=scaled.method,
        iterations=0, solver_seconds=time.perf_counter() - t0,
        bounds={"best": best, "residual": best, "kato_temple": np.full(k, np.inf)},
        resolution=resolution(n, trace), trace=trace, smallest_proved=True))
