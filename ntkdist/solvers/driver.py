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
  scaled formulation K = D A D, D = diag(K)^½, is tried (:func:`ntkdist.solvers.dense.
  scaled_smallest`), which resolves λ to a relative accuracy set by A's conditioning rather
  than by ‖K‖.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import NtkdistError
from .certificate import certified, error_bounds, floors, gap_estimates, resolution, weights
from .davidson import davidson_smallest
from .dense import scaled_smallest
from .lobpcg import _start_block, block_size, lobpcg_smallest

METHODS = ("lobpcg", "davidson", "lanczos", "dense")
#: Iterations without a tenth's fall of the residuals that end a float32 phase (its noise
#: floor: plain float32 tiles stall at ‖r‖ = 3.5e-4 at N = 20000, benchmarks/solver.py mixed).
MIXED_STALL = 10
#: At most this many rows (of the problem left once exact zeros are set aside), K is formed
#: from products and solved densely, whatever the method.
SMALL_N = 64
#: Columns per product when K is formed from products.
EXPLICIT_COLUMNS = 256
#: Times an iterative solve that stopped certified by its own residuals, but not by the fresh
#: product's, is continued from its block.
RESUMES = 3


@dataclass
class Eigensolution:
    values: np.ndarray  # (k,)
    vectors: np.ndarray  # (N, k)
    residuals: np.ndarray  # (k,) ‖K v − λ v‖ from a fresh product after the solve
    gaps: np.ndarray  # (k,) estimated distance to the next eigenvalue (NaN: no estimate)
    method: str
    converged: bool
    iterations: int
    solver_seconds: float
    resumed: dict | None = None  # the checkpoint this solve started from (iterations, passes)
    phases: list | None = None  # mixed precision: products and outcome of each phase
    bounds: dict = field(default_factory=dict)  # absolute bounds: residual, kato_temple, best
    exact: np.ndarray | None = None  # (k,) bool: exact zeros (repeated rows)
    status: str = "not_converged"  # certified|exact|below_resolution|missed|not_converged
    resolution: float = 0.0  # the smallest λ float64 can resolve for this K (absolute)
    trace: float = 0.0  # tr(K) used for the rounding floors
    smallest_proved: bool = False  # the values are the smallest (dense: all are computed)
    block: int | None = None  # LOBPCG/Davidson block used
    notes: list = field(default_factory=list)  # what the solve did that a user should know
    rounding_limited: bool = False  # float64's rounding alone exceeds tol·λ: tol unreachable
    resolved: np.ndarray | None = None  # (k,) bool: the value's first digit is certain

    def certificate(self) -> dict:
        """Error bounds of each value, absolute and relative (JSON-ready; None: no bound)."""
        def listed(values, relative):
            out = []
            for v, lam in zip(values, self.values):
                v = float(v) / max(abs(float(lam)), 1e-300) if relative else float(v)
                out.append(v if np.isfinite(v) else None)
            return out

        exact = self.exact if self.exact is not None else np.zeros(len(self.values), bool)
        res = np.where(exact, 0.0, self.bounds.get("residual", self.residuals))
        kt = np.where(exact, 0.0, self.bounds.get("kato_temple", np.full(len(res), np.inf)))
        best = np.where(exact, 0.0, self.bounds.get("best", res))
        rel = [0.0 if e else v for e, v in zip(exact, listed(best, True))]
        return {
            "status": self.status,
            "abs_error_bound": listed(best, False),
            "rel_error_bound": rel,
            "abs_error_bound_residual": listed(res, False),
            "abs_error_bound_kato_temple": listed(kt, False),
            "rel_error_bound_residual": [0.0 if e else v
                                         for e, v in zip(exact, listed(res, True))],
            "rel_error_bound_kato_temple": [0.0 if e else v
                                            for e, v in zip(exact, listed(kt, True))],
            "exact_zero": [bool(e) for e in exact],
            "resolved": [bool(r) for r in (self.resolved if self.resolved is not None
                                           else np.ones(len(self.values), bool))],
            "resolution": float(self.resolution),
            "trace": float(self.trace),
            "smallest_proved": bool(self.smallest_proved),
        }


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


def _judge(AV, V, n, trace, diag=None):
    """Fresh Rayleigh quotients, residual norms, gap estimates and bounds of V's columns
    (normalised first)."""
    norms = np.linalg.norm(V, axis=0)
    V, AV = V / norms, AV / norms
    theta = np.einsum("ij,ij->j", V, AV)
    rnorm = np.linalg.norm(AV - V * theta, axis=0)
    w = weights(V, diag)
    gaps = gap_estimates(theta, rnorm, floors(n, trace, w)[1])
    return theta, rnorm, gaps, error_bounds(rnorm, gaps, n, trace, w), V


def smallest_eigenpairs(matmat, n: int, method: str = "lobpcg", k: int = 1, tol: float = 1e-8,
                        block: int | None = None, precond=None, max_products: int = 600,
                        seed: int = 0, dense_matrix=None, scale: float = 0.0,
                        log=None, max_seconds: float | None = None,
                        checkpoint=None, fast_matmat=None, groups=None,
                        start: np.ndarray | None = None, diag=None) -> Eigensolution:
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

    ``checkpoint`` (a :class:`ntkdist.solvers.checkpoint.Checkpoint`, LOBPCG and Davidson
    only): start from its saved Ritz block if it holds a usable one, and save the block as
    the solve goes.

    ``fast_matmat`` (LOBPCG and Davidson only): a cheaper, inexact K·V (float32 deflated
    products, :meth:`ntkdist.operator.KernelOperator.matmat_fast`). The solve then runs in two
    phases: with ``fast_matmat`` until converged, stalled at its noise floor (residuals not
    falling by a tenth in ``MIXED_STALL`` iterations) or out of four fifths of the products;
    then with ``matmat`` from the first phase's Ritz block until the float64 products certify
    ``tol``. Values, residuals and the certificate come from ``matmat`` alone.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= k < n:
        raise NtkdistError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    t0 = time.perf_counter()
    notes = []
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
                       True, 0, t0, None, None, None, notes)
    used_block = None
    phases = resumed = None
    if method == "dense":
        V, name = _dense(K, rep, kk)
        judged = _judge(matmat(V), V, n, trace, diag)
        best = judged[3]["best"]
        if not certified(judged[0][:kk], best[:kk], tol) and rep is None:
            scaled = scaled_smallest(K, kk, log=log)
            if scaled is not None and scaled["abs_bound"][0] < best[0]:
                return _finish_scaled(scaled, matmat, n, k, tol, trace, t0, notes, diag)
        return _finish(matmat, n, k, tol, trace, rep, m, V, judged, name, True, 0, t0,
                       None, None, None, notes, diag)
    project = rep.project if rep is not None else None
    if method in ("lobpcg", "davidson"):
        solver = lobpcg_smallest if method == "lobpcg" else davidson_smallest
        used_block = block_size(n_left, kk, block)
        if block is not None and block < kk + 1:
            notes.append(f"block raised from {block} to {used_block}: the gap of the k-th value "
                         "is estimated from the next Ritz value")
        X0 = checkpoint.load(n, used_block) if checkpoint is not None else None
        if X0 is None and start is not None and start.shape[1]:
            X0 = _start_block(np.random.default_rng(seed), n, used_block, precond)
            s = min(start.shape[1], used_block - 1)
            X0[:, :s] = start[:, :s]
        common = dict(k=kk, block=used_block, precond=precond, tol=tol, seed=seed,
                      trace=trace, project=project, diag=diag)
        phases, used, done_its = (None if fast_matmat is None else []), 0, 0

        def saver(X, lam, it, products):  # counts continue across the phases
            checkpoint.save(X, lam, it + done_its, products + used)
        on_iterate = saver if checkpoint is not None else None
        resumed_stage = (checkpoint.resumed or {}).get("stage") if checkpoint is not None else None
        if fast_matmat is not None and resumed_stage != "float64":
            if log:
                log("phase 1: float32 deflated products")
            cap = max(1, max_products - max(10, max_products // 5))  # keep a fifth for phase 2
            r1 = solver(fast_matmat, n, max_products=cap,
                        max_seconds=None if max_seconds is None else 0.8 * max_seconds,
                        X0=X0, log=log, stall=MIXED_STALL, on_iterate=on_iterate, **common)
            used, done_its = r1.products, r1.iterations
            if np.all(np.isfinite(r1.block)):  # else start the float64 phase as phase 1 did
                X0 = r1.block
            phases.append({"products": "float32 deflated", "passes": r1.products,
                           "iterations": r1.iterations,
                           "stopped": ("converged" if r1.converged else
                                       "stalled" if r1.stalled else "limit"),
                           "lambda_1": float(r1.values[0]),
                           "residual_1": float(r1.residuals[0])})
            if log:
                log(f"phase 2: float64 products from the phase-1 block ({phases[0]['stopped']} "
                    f"after {r1.products} passes)")
        if checkpoint is not None and fast_matmat is not None:
            checkpoint.stage = "float64"
        start_used, start_its = used, done_its
        for attempt in range(RESUMES + 1):
            left = None if max_seconds is None else max_seconds - (time.perf_counter() - t0)
            r = solver(matmat, n, max_products=max(1, max_products - used), log=log,
                       max_seconds=left, X0=X0, on_iterate=on_iterate, **common)
            used += r.products
            done_its += r.iterations
            V = r.block[:, :kk + 1]
            judged = _judge(matmat(V), V, n, trace, diag)
            used += 1
            fresh_ok = certified(judged[0][:kk], judged[3]["best"][:kk], tol)
            if fresh_ok or not r.converged or used >= max_products or attempt == RESUMES:
                break
            if log:  # certified by the iteration's residuals, not by the fresh product's
                log("the fresh product does not certify what the iteration did: continuing")
            X0 = r.block
        if phases is not None:  # the last fresh product is the result's own (+1 in passes)
            phases.append({"products": "float64", "passes": used - start_used - 1,
                           "iterations": done_its - start_its,
                           "stopped": ("converged" if r.converged else "rounding floor"
                                       if r.at_floor else "stalled" if r.stalled
                                       else "limit")})
        what = ("ntkdist block LOBPCG" if method == "lobpcg"
                else "ntkdist block generalized Davidson, GD+k")
        mixed = ", mixed precision: float32 deflated then float64 products"
        name = (f"{method} ({what}, block {used_block}, "
                f"{'preconditioned' if precond is not None else 'no preconditioner'}"
                f"{mixed if phases is not None else ''})")
        resumed = checkpoint.resumed if checkpoint is not None else None
        return _finish(matmat, n, k, tol, trace, rep, m, V, judged, name, False, done_its, t0,
                       phases, resumed, used_block, notes, diag)
    # lanczos
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
    order = np.argsort(w)
    V = V[:, order]
    return _finish(matmat, n, k, tol, trace, rep, m, V, None,
                   "lanczos (ARPACK eigsh, which='SA', no preconditioner)", False, -1, t0,
                   None, None, None, notes, diag)


def _dense(K: np.ndarray, rep: RepeatedRows | None, kk: int):
    """The kk + 1 smallest eigenvectors of K (on the complement of the repeated rows' null
    space when there are repeated rows), by LAPACK ``syevr``."""
    import scipy.linalg

    A = rep.reduce(K) if rep is not None else K
    top = min(kk, A.shape[0] - 1)
    _, W = scipy.linalg.eigh(A, subset_by_index=[0, top], driver="evr", check_finite=False)
    V = rep.expand(W) if rep is not None else W
    return V, "dense: scipy.linalg.eigh float64, driver evr, subset_by_index"


def _finish(matmat, n, k, tol, trace, rep, m, V, judged, name, smallest_proved, iterations,
            t0, phases, resumed, block, notes, diag=None) -> Eigensolution:
    """Exact zeros first, then the computed values, each with its bounds; the status."""
    kk = k - m
    if V is not None and judged is None:
        judged = _judge(matmat(V), V, n, trace, diag)
    parts_V, values, rnorms, gaps = [], [], [], []
    best, res, kt = [], [], []
    if m:
        Z = rep.null_basis(m)
        AZ = matmat(Z)
        parts_V.append(Z)
        values += [0.0] * m
        rnorms += list(np.linalg.norm(AZ, axis=0))
        gaps += [np.nan] * m
        best += [0.0] * m
        res += [0.0] * m
        kt += [0.0] * m
    if kk:
        theta, rnorm, g, b, V = judged
        parts_V.append(V[:, :kk])
        values += list(theta[:kk])
        rnorms += list(rnorm[:kk])
        gaps += list(g[:kk])
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
        block=block, rounding_limited=limited))


def _judged_solution(values, best, exact, tol, diag, notes, fields) -> Eigensolution:
    """The status of k values with their bounds (``exact``: exact zeros, bound 0).

    A value is *resolved* when it exceeds its bound (its first digit is certain). λ_i is at
    most the sum of the i smallest diagonal entries (the trace of that principal
    submatrix, by interlacing), so a value whose lower end exceeds it is not the i-th
    eigenvalue: a smaller one was *missed*."""
    resolved = exact | (values > best)
    missed = np.zeros(len(values), bool)
    if diag is not None:
        ceiling = np.cumsum(np.sort(np.asarray(diag, dtype=np.float64)))[:len(values)]
        missed = ~exact & (values - best > ceiling)
    if missed.any():
        i = int(np.nonzero(missed)[0][0])
        notes.append(f"value {i + 1} found, {values[i]:.6g}, exceeds the sum of the {i + 1} "
                     f"smallest K_ii, {ceiling[i]:.6g}, an upper bound on λ_{i + 1}: the solver "
                     "missed a smaller eigenvalue")
    ok = bool(not missed.any() and (exact.all() or certified(values[~exact], best[~exact], tol)))
    if missed.any():
        status = "missed"
    elif ok:
        status = "exact" if exact.all() else "certified"
    elif not resolved[0]:
        status = "below_resolution"
    else:
        status = "not_converged"
    return Eigensolution(values=values, converged=ok, exact=exact, status=status, notes=notes,
                         resolved=resolved & ~missed, **fields)


def _finish_scaled(scaled, matmat, n, k, tol, trace, t0, notes, diag) -> Eigensolution:
    V = scaled["vectors"][:, :k]
    values = scaled["values"][:k]
    rnorm = np.linalg.norm(matmat(V) - V * values, axis=0)
    best = scaled["abs_bound"][:k]
    notes.append("rows of very different norms: λ resolved through the scaled formulation "
                 "K = D A D, D = diag(K)^½ (relative perturbation bound, not the residual)")
    return _judged_solution(values, best, np.zeros(k, bool), tol, diag, notes, dict(
        vectors=V, residuals=rnorm, gaps=np.full(k, np.nan), method=scaled["method"],
        iterations=0, solver_seconds=time.perf_counter() - t0,
        bounds={"best": best, "residual": best, "kato_temple": np.full(k, np.inf)},
        resolution=resolution(n, trace), trace=trace, smallest_proved=True))
