"""The jobs: data → kernel (in memory, or tiles in a store) → λ_min → result folder, and the
store jobs (assemble, info, verify).

Each job takes typed specs (:mod:`ntkdist.spec`), asks the plan what to run
(:func:`ntkdist.operator.plan.make_plan`, first before anything starts, then with the
cluster's facts) and returns a typed result (:class:`ntkdist.results.RunResult` for run and
solve, a dict for the store jobs); the command line only parses arguments and prints.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import __version__
from .bounds import kernel_diagonal, lambda_min_bounds, staircase_prediction, upper_bounds
from .data import check_rows, near_null_vectors, row_norms
from .errors import SpecError
from .operator.plan import (DENSE_MAX_N, Facts, check_feature_memory, default_method,
                            make_plan, store_layout)
from .results import OutClaim, RunResult, write_result
from .solvers.checkpoint import CHECKPOINT_FILE, Checkpoint
from .solvers.diskfactor import FACTOR_DIR
from .solvers.driver import smallest_eigenpairs
from .solvers.precond import make_preconditioner
from .solvers.shift import uses_shift
from .spec import (BATCH_KINDS, ClusterSpec, RunSpec, content_hash, make_solver_spec,
                   make_store_spec)

__all__ = ["BOUNDS_MAX_N", "DENSE_MAX_N", "assemble", "bounds", "info", "run", "solve", "sweep",
           "verify"]

#: Most bytes the solvers' start vectors from nearly parallel rows take (N × m float64).
START_BYTES = 1 << 28
#: Largest N for which the lower-bound chain (an O(N² L) pass over the data) is computed.
BOUNDS_MAX_N = 25000


def run(spec: RunSpec, out: str, cluster: ClusterSpec | None = None, store: str | None = None,
        tile: int | None = None, dtype: str | None = None, log=print,
        client=None) -> RunResult:
    """Compute the k smallest eigenvalues for ``spec``; write ``out/result.json`` and
    ``out/eigvec.npy``.

    With ``store`` the kernel is first assembled (or resumed) into that Zarr store on the
    Dask cluster ``cluster`` and solved from there. Without it, ``dense`` builds the kernel
    in this process and iterative methods recompute tiles on the workers every pass
    (``tile``: their side). Iterative solves save their Ritz block to ``out/checkpoint.npz``
    every ``spec.solver.checkpoint_every`` seconds and resume from it. ``client``: a
    ``distributed.Client`` to use instead of connecting to ``cluster`` (a sweep's points
    share one); ``cluster`` still says the device.
    """
    cluster = cluster or ClusterSpec()
    if store is not None:
        _check_paths(store, out)
        make_store_spec(spec, 1 if tile is None else tile, dtype or "float64")  # validates
    t0 = time.perf_counter()
    make_plan(spec.solver, cluster, Facts(n=spec.n, store="assemble" if store else None,
                                          feature_columns=spec.kernel.feature_columns(spec.d)),
              tile, dtype)  # refuses before the rows are read
    check_before_solve(spec, store is None and spec.solver.method == "dense", cluster.device)
    X = spec.rows()
    check = check_rows(X, name=spec.data.source, growth=spec.kernel.growth())
    facts = Facts(n=spec.n, store="assemble" if store else None,
                  parallel_rows=check.parallel_rows,
                  feature_columns=spec.kernel.feature_columns(spec.d))
    plan = make_plan(spec.solver, cluster, facts, tile, dtype)
    # a failed run leaves no folder that only refuses the corrected rerun
    with OutClaim(out, spec.to_dict(), spec.hash()) as claim:
        return _run(spec, out, cluster, store, tile, dtype, log, X, check, facts, plan, t0,
                    claim, client)


def _run(spec, out, cluster, store, tile, dtype, log, X, check, facts, plan, t0, claim,
         client=None):
    log(f"data: {spec.data.source} N={spec.n} d={spec.d}; kernel {spec.kernel.kind} depth "
        f"{spec.kernel.depth}")
    for note in plan.notes:
        log(f"note: {note}")
    if plan.in_process:
        claim()
        K = spec.kernel.gram(X)
        return _solve_and_write(spec, X, check, out, lambda V: K @ V, lambda: K, None, t0, log,
                                in_process=True)
    from .assemble import assemble as assemble_tiles
    from .assemble import existing_layout
    from .operator import KernelOperator, cluster_facts

    # The output folder is claimed once the cluster is up and, without a store, once the
    # operator has checked its workers (GPUs included): a refusal there writes nothing.
    shared = contextlib.nullcontext(client) if client is not None else None
    with shared or cluster.connect(log) as client:
        workers, gpus, names = cluster_facts(client, cluster.device)
        if store is not None:
            had_tile, had_dtype = existing_layout(store, spec)
            facts = Facts(**{**facts.__dict__, "store_tile": had_tile, "store_dtype": had_dtype})
        plan = make_plan(spec.solver, cluster, Facts(**{**facts.__dict__, "workers": workers,
                                                       "gpus": gpus}), tile, dtype)
        if store is not None:
            claim()  # before the (long) assembly
            store_spec = make_store_spec(spec, plan.tile, plan.dtype)
            log(f"store: {store} (tile {store_spec.tile}, {store_spec.dtype})")
            assemble_tiles(store_spec, store, client, log=log)
            facts = Facts(**{**facts.__dict__, "store": "complete", "store_tile": plan.tile,
                             "store_dtype": plan.dtype})
        pending = [(plan, names)]  # the first operator's plan; a resumed one plans anew

        def make_op():
            layout = () if store is not None else (tile, dtype)  # a store's is its own
            p, gpu_names = pending.pop() if pending else _replan(client, cluster, spec, facts,
                                                                 *layout)
            return KernelOperator(client, p, kernel=spec.kernel, rows=X, store=store,
                                  gpus=gpu_names)

        def solve_with(op):
            if not claimed_out:
                claim()
                claimed_out.append(True)
            _log_device(op, log)
            return _solve_and_write(spec, X, check, out, op.matmat, lambda: _dense_from(op, X, spec),
                                    op, t0, log, store=store, ckpt_hash=spec.hash(),
                                    cluster=cluster)

        claimed_out = [True] if store is not None else []
        return _resuming(client, cluster, make_op, solve_with, log,
                         lambda: _checkpoint_mtime(out))


#: Times a solve on a batch cluster resumes from its checkpoint after losing a worker.
MAX_RESUMES = 20


def _replan(client, cluster, spec, facts, tile=None, dtype=None):
    """(plan, GPU worker names) for the workers the cluster has now."""
    from .operator import cluster_facts

    workers, gpus, names = cluster_facts(client, cluster.device)
    plan = make_plan(spec.solver, cluster, Facts(**{**facts.__dict__, "workers": workers,
                                                   "gpus": gpus}), tile, dtype)
    return plan, names


def _resuming(client, cluster, make_op, solve_with, log, progress=lambda: None):
    """``solve_with(make_op())``; on a batch cluster (whose lost jobs are replaced, and whose
    workers retire before their walltime) a lost worker is waited out: the operator is
    rebuilt on the workers there are then and the solve resumes from its checkpoint. Up to
    :data:`MAX_RESUMES` losses in a row without progress (``progress()``: a value that
    changes when the checkpoint moves on). Elsewhere the loss is one line (rerun to
    resume)."""
    from .operator.client import WorkerLostError

    losses = 0
    while True:
        before = progress()
        try:
            op = make_op()
            with contextlib.closing(op):
                return solve_with(op)
        except WorkerLostError as exc:
            losses = 1 if progress() != before else losses + 1
            if cluster.kind not in BATCH_KINDS or losses > MAX_RESUMES:
                raise
            log(f"{str(exc).split(' (')[0]}; waiting for the batch cluster's replacement, "
                f"then resuming from the checkpoint ({losses}/{MAX_RESUMES} in a row)")
            from .batch import submit_failures, wait_for_workers

            wait_for_workers(client, None, cluster.min_workers, cluster.worker_timeout, log,
                             cluster.kind, cluster.job_logs, submit_failures(client))


def _checkpoint_mtime(out: str):
    """When the solve's checkpoint in ``out`` was last written (None: none yet)."""
    try:
        return os.stat(os.path.join(out, CHECKPOINT_FILE)).st_mtime_ns
    except OSError:
        return None


def solve(store: str, out: str, cluster: ClusterSpec | None = None, log=print,
          problem: RunSpec | None = None, **options) -> RunResult:
    """Solve for the smallest eigenvalues of the kernel in a complete ``store``; ``options``:
    the solver's (:class:`ntkdist.spec.SolverSpec` fields; ``method`` None or left out: the
    default for a store). ``problem``: the data and kernel the caller expects (a run file's);
    a store of another problem is refused, naming the fields that differ."""
    from .operator import KernelOperator
    from .store import KernelStore

    cluster = cluster or ClusterSpec()
    t0 = time.perf_counter()
    _check_paths(store, out)
    kstore = KernelStore.open(store)
    n = kstore.spec.n
    if problem is not None and problem.problem() != kstore.spec.problem:
        from .spec import spec_differences

        raise SpecError(f"store {store!r} holds another kernel than the run file's: it differs "
                        f"in {', '.join(spec_differences(kstore.spec.problem, problem.problem()))}")
    if options.get("method") is None:
        options["method"] = default_method(n, True, cluster.device)
    spec = kstore.spec.run_spec(make_solver_spec(n, **options))
    facts = Facts(n=n, store="complete", store_tile=kstore.spec.tile,
                  store_dtype=kstore.spec.dtype,
                  feature_columns=spec.kernel.feature_columns(spec.d))
    make_plan(spec.solver, cluster, facts)  # refuses before the rows are read
    check_before_solve(spec, device=cluster.device)
    X = kstore.rows_checked()
    check = check_rows(X, name=store, growth=spec.kernel.growth())
    facts = Facts(**{**facts.__dict__, "parallel_rows": check.parallel_rows})
    out_spec = {**spec.to_dict(), "store_spec_hash": kstore.spec.hash()}
    out_hash = content_hash(out_spec)
    with cluster.connect(log) as client, OutClaim(out, out_spec, out_hash) as claim:
        pending = [_replan(client, cluster, spec, facts)]  # a resumed solve plans anew

        def make_op():
            plan, names = pending.pop() if pending else _replan(client, cluster, spec, facts)
            return KernelOperator(client, plan, rows=X, store=store, gpus=names)

        def solve_with(op):
            claim()
            _log_device(op, log)
            return _solve_and_write(spec, X, check, out, op.matmat,
                                    lambda: _dense_from(op, X, spec), op, t0, log,
                                    store=store, ckpt_hash=out_hash, cluster=cluster)

        return _resuming(client, cluster, make_op, solve_with, log,
                         lambda: _checkpoint_mtime(out))


def assemble(spec: RunSpec, store: str, cluster: ClusterSpec | None = None,
             tile: int | None = None, dtype: str | None = None, log=print) -> dict:
    """Assemble (or resume) the kernel of ``spec`` into the Zarr store ``store`` on the
    cluster; ``tile``/``dtype`` None: those of a store of the same problem already there,
    else the defaults (tile from the workers' memory, dtype from N). Logs the store's layout
    first; returns the assembly's report with ``store_spec``."""
    from .assemble import assemble as assemble_tiles
    from .assemble import existing_layout
    from .operator import cluster_facts

    make_store_spec(spec, 1 if tile is None else tile, dtype or "float64")  # validates
    check_rows(spec.rows(), name=spec.data.source)
    with (cluster or ClusterSpec()).connect(log) as client:
        workers, _, _ = cluster_facts(client)
        had = existing_layout(store, spec)
        tile, dtype = store_layout(spec.n, tile, dtype, *had, [m for _, m in workers],
                                   spec.kernel.feature_columns(spec.d))
        check_feature_memory(tile, spec.kernel.feature_columns(spec.d), [m for _, m in workers])
        store_spec = make_store_spec(spec, tile, dtype)
        log(f"store {store}: N={spec.n} d={spec.d} tile {store_spec.tile} "
            f"({store_spec.blocks}x{store_spec.blocks} blocks), {store_spec.dtype}")
        report = assemble_tiles(store_spec, store, client, log=log)
    return {**report, "store_spec": store_spec}


def bounds(spec: RunSpec, cluster: ClusterSpec | None = None, log=print) -> dict:
    """The bounds of ``spec``'s rows (the upper bounds, the proof chain's lower bound and its
    terms) and, for sphere rows, the predictions. Up to ``BOUNDS_MAX_N`` rows the chain runs
    in this process, above on the workers of ``cluster``."""
    if spec.kernel.finite:
        raise SpecError(f"'ntkdist bounds' gives the limiting kernels' bounds; for --kernel "
                        f"{spec.kernel.kind} run 'ntkdist run': its result.json holds the "
                        "finite-width theorem's scale and its assumptions")
    X = spec.rows()
    check_rows(X, name=spec.data.source, growth=spec.kernel.growth())
    k = spec.kernel
    if spec.n <= BOUNDS_MAX_N:
        out = lambda_min_bounds(X, k.depth, k.kind, k.normalization)
    else:
        from .chain import lambda_min_bounds_distributed

        with (cluster or ClusterSpec()).connect(log) as client:
            out = lambda_min_bounds_distributed(client, X, k.depth, k.kind, k.normalization,
                                                log=log)
    if spec.data.source == "sphere":  # the model's rows: uniform on the sphere of radius √d
        out["prediction_staircase"] = staircase_prediction(spec.n, spec.d, k.depth, k.kind,
                                                           k.normalization)
        out["prediction"] = _prediction(spec)
    return out


def _prediction(spec: RunSpec) -> dict:
    """:func:`ntkdist.predict.predict_lambda_min` for the spec, as a JSON-ready dict with
    ``value`` (the predicted λ_min) beside its ingredients."""
    from .predict import predict_lambda_min

    k = spec.kernel
    p = predict_lambda_min(spec.n, spec.d, k.depth, k.kind, k.normalization)
    return {"value": p["lambda_min"], "degree": p["degree"], "D_next": p["D_next"],
            "tail": p["tail"], "edge": p["edge"], "method": p["method"], "note": p["note"]}


def sweep(path: str, out: str, cluster: dict | None = None, dry_run: bool = False,
          log=print, report_only: bool = False) -> dict:
    """Run the study file ``path`` into the folder ``out`` (:mod:`ntkdist.study`);
    ``cluster``: cluster options overriding the file's ``[cluster]``; ``report_only``: only
    write the table, fits and figures of the points finished so far."""
    from .study import load_study, sweep as run_study

    return run_study(load_study(path, out, cluster), log=log, dry_run=dry_run,
                     report_only=report_only)


def info(store: str) -> dict:
    """What a store holds and how far its assembly is: spec, tiles done, bytes, lock holder."""
    from .store import KernelStore

    kstore = KernelStore.open(store)
    rows, tiles = kstore.pending()
    total = len(kstore.upper_tiles())
    return {"store": store, "spec": kstore.spec, "spec_hash": kstore.spec.hash(),
            "tiles_total": total, "tiles_done": total - len(tiles), "rows_missing": len(rows),
            "bytes_on_disk": kstore.bytes_on_disk(), "lock_holder": kstore.lock_holder()}


def verify(store: str, recompute: int = 0, seed: int | None = None, repair: bool = False,
           cluster: ClusterSpec | None = None, log=print) -> dict:
    """Check every piece of a store against its checksum (and ``recompute`` random tiles);
    with ``repair``, recompute the bad pieces on the cluster and check them again."""
    from .assemble import repair as repair_store
    from .assemble import verify as verify_store

    if repair:
        return repair_store(store, cluster=cluster, recompute=recompute, seed=seed, log=log)
    return verify_store(store, recompute=recompute, seed=seed)


def _check_paths(store: str, out: str) -> None:
    """The result folder and the store must be different places, neither inside the other."""
    a, b = os.path.realpath(store), os.path.realpath(out)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise SpecError(f"--store {store!r} and --out {out!r} must be different folders, "
                        "neither inside the other")


def singular_reason(check, spec: RunSpec) -> str | None:
    """Why K is singular for reasons the rows show, or None."""
    if check.duplicate_rows:
        return (f"{check.duplicate_rows} row(s) repeat an earlier row: K is singular, "
                "λ_min = 0 exactly (e_i − e_j is a null vector)")
    if check.parallel_rows:
        return (f"{check.parallel_rows} row(s) are parallel to another row: K is singular, "
                "λ_min ≈ 0 up to rounding")
    if spec.kernel.depth == 1 and spec.n > spec.d:
        return (f"depth 1: K = XXᵀ has rank ≤ d = {spec.d} < N = {spec.n}: K is singular, "
                "λ_min = 0")
    k = spec.kernel
    if k.kind == "features" and spec.n > k.widths[k.layer - 1]:
        return (f"the Gram of layer {k.layer}'s features has rank ≤ its width "
                f"{k.widths[k.layer - 1]} < N = {spec.n}: it is singular, λ_min = 0")
    if k.kind == "empirical":
        dims = (spec.d, *k.widths, 1)
        params = sum(a * b for a, b in zip(dims, dims[1:]))
        if spec.n > params:
            return (f"JJᵀ has rank ≤ the network's {params} parameters < N = {spec.n}: it is "
                    "singular, λ_min = 0")
    return None


def check_before_solve(spec: RunSpec, in_process: bool = False,
                       device: str = "cpu") -> None:
    """Refuse, before the solve starts: ``--certify cholesky`` where K cannot be held in
    float64 here (``device`` "gpu": nor on the client's GPU, all of whose memory it may
    have once the run's tiles leave it); a preconditioner of the limits for a finite-width
    kernel; the in-process dense path (``in_process``) where a finite network's features and
    K do not fit here."""
    if spec.kernel.finite and in_process:
        from .solvers.cholesky import available_memory

        need = 3 * 8 * spec.n ** 2 + 3 * 8 * spec.n * spec.kernel.feature_columns(spec.d)
        if need > 0.8 * available_memory():
            raise SpecError(f"the dense path forms the features of all N = {spec.n} rows and "
                            f"K in this process: {need / 1e9:.1f} GB, more than is available; "
                            "give --store (assembled on the workers) or --method lobpcg")
    if spec.kernel.finite and spec.solver.precond.partition(":")[0] not in (
            "auto", "none", "nystrom"):
        raise SpecError(f"--precond {spec.solver.precond} models the limiting kernels; for "
                        f"--kernel {spec.kernel.kind} use nystrom[:RANK] (auto) or none")
    if spec.solver.certify == "cholesky":
        from .solvers.cholesky import check_memory

        reason = check_memory(spec.n, spec.kernel.feature_columns(spec.d))
        if reason and device == "gpu" and not spec.kernel.finite and not in_process:
            from .solvers.cholesky import check_device_memory

            try:
                import cupy

                total = int(cupy.cuda.runtime.memGetInfo()[1])
            except Exception:  # no GPU on the client: the host's refusal stands
                cupy, total = None, 0
            if check_device_memory(spec.n, cupy, free=total, d=spec.d) is None:
                reason = None
            else:
                reason = f"{reason}; the client's GPU has {total / 1e9:.1f} GB in all"
        if reason:
            raise SpecError(reason)


def _certify_cholesky(spec, X, sol, cert, log, K=None, device: str = "cpu") -> dict:
    """The Cholesky bracket of λ_min (:func:`ntkdist.solvers.cholesky.certify_cholesky`) on K
    formed in float64 in this process (``K``: the in-process one, overwritten); for
    ``device`` "gpu" (a closed-form kernel) formed and factorised on the client's GPU where
    it fits there now, else on the host."""
    from .solvers.cholesky import _restore, certify_cholesky, check_memory, dense_kernel

    if sol.exact is not None and bool(sol.exact[0]):
        return {"method": "cholesky", "status": "skipped", "lower": None, "upper": None,
                "reason": "λ_min = 0 exactly (repeated rows): nothing to bracket"}
    err = cert["abs_error_bound"][0]
    proof, why = None, None
    if K is None and device == "gpu" and not spec.kernel.finite:
        proof, why = _certify_on_gpu(spec, X, sol, err, log)
    if proof is None:
        if K is None:
            reason = check_memory(spec.n, spec.kernel.feature_columns(spec.d))
            if reason:  # the memory went elsewhere since the start: the solve's result stays
                log(f"note: {why + '; ' if why else ''}{reason}; not certified by Cholesky")
                return {"method": "cholesky", "status": "skipped", "lower": None,
                        "upper": None, "reason": f"{why + '; ' if why else ''}{reason}"}
            if why:
                log(f"note: {why}; K is formed on the host instead")
            log(f"--certify cholesky: forming K (N = {spec.n}) in float64 in this process")
            t = time.perf_counter()
            K = dense_kernel(X, spec.kernel)
            formed = time.perf_counter() - t
        else:
            _restore(K, np.diagonal(K).copy())  # exactly symmetric: the triangle LAPACK reads
            formed = 0.0
        proof = certify_cholesky(K, float(sol.values[0]), err, sol.vectors[:, 0], log=log)
        proof["form_seconds"] = formed
    if proof["status"] == "proved":
        log(f"certified bracket: {proof['lower']:.12g} ≤ λ_min ≤ {proof['upper']:.12g} "
            f"(Cholesky at σ = {proof['sigma']:.12g}, allowance {proof['allowance']:.2e})")
    else:
        log(f"note: --certify cholesky {proof['status']}: {proof['reason']}")
    return proof


def _certify_on_gpu(spec, X, sol, err, log):
    """(the proof, None) from K formed and factorised on the client's GPU, or (None, why
    not: no GPU here, no room on it now, or a failure there, each left behind)."""
    from .solvers.cholesky import certify_cholesky, check_device_memory, dense_kernel

    try:
        import cupy

        why = check_device_memory(spec.n, cupy, d=spec.d)
    except Exception as exc:  # no CuPy, no GPU on the client: the host
        return None, f"no GPU on the client ({type(exc).__name__}: {exc})".splitlines()[0]
    if why is not None:
        return None, why
    log(f"--certify cholesky: forming K (N = {spec.n}) in float64 on the client's GPU")
    proof, why = None, None
    try:
        t = time.perf_counter()
        K = dense_kernel(X, spec.kernel, xp=cupy)
        cupy.cuda.Device().synchronize()
        formed = time.perf_counter() - t
        proof = certify_cholesky(K, float(sol.values[0]), err, sol.vectors[:, 0], log=log)
        proof["form_seconds"] = formed
    except MemoryError:  # CuPy's OutOfMemoryError
        why = "out of GPU memory forming or factorising K in float64"
    except Exception as exc:  # a CUDA, cuBLAS or cuSOLVER error: the host path instead
        why = f"the GPU failed ({type(exc).__name__}: {exc})".splitlines()[0]
    K = None  # the N × N matrix (or what was formed of it) goes from the GPU now
    cupy.get_default_memory_pool().free_all_blocks()
    return proof, why


def _bound_or_inf(cert: dict) -> float:
    """λ_min's absolute error bound from a certificate (None there: no finite bound)."""
    bound = cert["abs_error_bound"][0]
    return np.inf if bound is None else float(bound)


def _certified_by_bracket(sol, proof, tol: float, log) -> bool:
    """Certify λ_min (k = 1) on the Cholesky bracket alone where the solver could not (a
    cluster of nearly parallel rows, a solve stopped short) and the bracket is tight
    enough: lower ≤ λ_min ≤ upper rests on no gap estimate, so the value θ found (≥ lower)
    is within max(θ − lower, upper − θ) of λ_min of K as formed in float64, and within that
    plus ``sol.resolution`` (≥ the entries' error, ENTRY_ERROR·tr(K) ≥ its 2-norm) of the
    exact kernel's. Marks ``proof["certified_value"]``; updates ``sol``; True where it did."""
    if (proof is None or proof.get("status") != "proved" or len(sol.values) != 1
            or sol.status != "not_converged"):
        return False
    lower, upper, theta = proof["lower"], proof["upper"], float(sol.values[0])
    if lower is None or upper is None or not 0 < lower <= theta:
        return False
    err = max(theta - lower, upper - theta, 0.0) + sol.resolution
    if err > tol * theta:
        return False
    sol.bounds = {**sol.bounds, "best": np.array([err])}
    sol.status, sol.converged, sol.smallest_proved = "certified", True, True
    sol.resolved = np.ones(1, bool)
    proof["certified_value"] = True
    assumed = " (on the GPU's IEEE float64 arithmetic)" if proof.get("assumption") else ""
    sol.notes.append(f"λ_min certified by the Cholesky bracket [{lower:.10g}, {upper:.10g}] "
                     f"alone{assumed} (relative error ≤ {err / theta:.2g} ≤ tol {tol:g}), not "
                     "by the solver's gap estimate, whose Kato–Temple figure is not used")
    log(f"note: {sol.notes[-1]}")
    return True


def _solve_shifted(spec, X, check, matmat, fast, estimate, common, log, device="cpu",
                   store=None, factor_dir=None, identity=""):
    """The shift-invert solve (:func:`ntkdist.solvers.shift.solve_shifted`) of a run: K − σI
    read from ``store`` where the run has one, on the client's GPU for ``device`` "gpu", in
    tiles on disk under ``factor_dir`` where it does not fit in memory. Returns (the solve,
    the preconditioner it finished with)."""
    from .solvers.shift import solve_shifted, trusted_prediction

    xp = None
    if device == "gpu":  # formed, factored and applied on the client's GPU
        import cupy as xp
    s = spec.solver
    repeated = ("rows repeat: K is singular, and K − σI indefinite for every σ > 0"
                if check.duplicate_rows else None)

    def fallback():  # the harmonic model as the run would have had it without the shift
        kern = spec.kernel
        return make_preconditioner("harmonic" if s.precond == "shift" else s.precond, X,
                                   kern.depth, kern.kind, kern.normalization, device=device)

    kern = spec.kernel
    prediction = trusted_prediction(spec.data.source, spec.n, spec.d, kern.depth, kern.kind,
                                    kern.normalization)
    sol, pre = solve_shifted(matmat, spec.n, s.method, X, kern, estimate, tol=s.tol,
                             fast_matmat=fast, xp=xp, skip=repeated, fallback=fallback,
                             store=store, prediction=prediction, factor_dir=factor_dir,
                             identity=identity, **common)
    pre.info["asked"] = s.precond
    return sol, pre


def _columns(matmat, n: int):
    """idx ↦ K[:, idx] by one product with the unit vectors (kernels without a closed form)."""
    def columns(idx):
        E = np.zeros((n, len(idx)))
        E[idx, np.arange(len(idx))] = 1.0
        return matmat(E)

    return columns


def _log_device(op, log) -> None:
    if op.device == "gpu":
        kept = len(op.plan.kept)
        total = sum(len(pairs) for _, pairs in op.plan.assignment)
        resident = ("" if op.mode == "memory" or not kept else
                    f"; {kept} of {total} tiles kept on the GPUs "
                    f"({op.plan.cached_bytes / 1e9:.1f} GB), the others rebuilt every pass")
        log(f"operator {op.mode} on {len(op.gpus)} GPU worker(s): "
            f"{', '.join(sorted(set(op.gpus.values())))}{resident}")


def _dense_from(op, X, spec):
    if op.store is not None:  # every tile checked against its checksum (open_kernel)
        from .store import open_kernel

        return np.asarray(open_kernel(op.store.path).compute(scheduler="threads"), dtype=np.float64)
    return spec.kernel.gram(X)


#: The default block of LOBPCG/Davidson with the recompute operator: a pass costs the tile
#: build whatever the block, so a wider block is almost free and saves passes (d = 64,
#: N = 20000, block 32 → 128: LOBPCG 120 → 74 passes, Davidson 104 → 63; benchmarks/RESULTS.md).
RECOMPUTE_BLOCK = 128


def _bounds_from_store(store: str, X, log) -> dict | None:
    """The proof chain's bounds from the power sums ``store`` keeps beside its tiles (made
    with them by the assembly), or None where it keeps none."""
    from .chain import lambda_min_bounds_from_store
    from .store import KernelStore

    kstore = KernelStore.open(store)
    t0 = time.perf_counter()
    bounds = lambda_min_bounds_from_store(kstore, X, log)
    if bounds is not None:
        log(f"lower-bound chain from the store's power sums of its "
            f"{len(kstore.upper_tiles())} tiles ({time.perf_counter() - t0:.1f} s)")
    return bounds


def _default_block(solver, op) -> int | None:
    """The block asked for, else :data:`RECOMPUTE_BLOCK` with the recompute operator, else
    None (the solvers' default, max(32, 2k + 16))."""
    if solver.block is not None:
        return solver.block
    if op is not None and op.mode == "recompute":
        return max(RECOMPUTE_BLOCK, 2 * solver.k + 16)
    return None


def _near_null_start(spec, X, check):
    """(start vectors for the solvers, an upper bound on λ_min or None) from the nearly
    parallel pairs of rows (:attr:`RowCheck.near_pairs`), each an eigenvalue near 0.

    For a closed-form kernel, Rayleigh–Ritz on the space their differences span, with K
    formed on the rows they touch alone (≤ 2·MAX_NEAR_PAIRS rows): the start is its Ritz
    vectors, lowest first, so that the solvers begin at the bottom of the cluster the pairs
    make rather than anywhere in it; and the float64 Rayleigh quotient of the lowest one
    plus its rounding allowance (:func:`ntkdist.solvers.cholesky.rayleigh_upper`) is ≥ λ_min
    (interlacing: K's principal submatrix on those rows). Finite widths: the pairs'
    difference vectors themselves, and no bound."""
    start = near_null_vectors(check, row_norms(X), spec.n)
    if start.shape[1] < 2 or spec.kernel.finite:
        return start, None
    from .solvers.cholesky import rayleigh_upper

    rows = np.unique(np.nonzero(start)[0])
    Q, R = np.linalg.qr(start[rows])
    keep = np.abs(np.diagonal(R)) > 1e-8 * np.abs(np.diagonal(R)).max()
    Q = Q[:, keep]  # pairs that share rows span fewer directions
    KR = spec.kernel.gram(np.asarray(X[rows], dtype=np.float64))
    theta, Y = np.linalg.eigh(Q.T @ KR @ Q)
    m = min(len(theta), 512, max(2, START_BYTES // (8 * spec.n)))  # the lowest m go on
    vectors = Q @ Y[:, np.argsort(theta)[:m]]
    _, upper = rayleigh_upper(KR, vectors[:, 0])
    out = np.zeros((spec.n, m))
    out[rows] = vectors
    return out, upper


def checkpoint_every(solver, cluster) -> float:
    """Seconds between checkpoints: the solver's, and on a batch cluster at most a third of
    a worker's shortest lifetime (so that a solve whose workers retire keeps its progress)."""
    every = solver.checkpoint_every
    if cluster is not None and cluster.kind in BATCH_KINDS:
        from .batch import lifetime, parse_walltime

        life = lifetime(parse_walltime(cluster.walltime))
        if life:
            every = min(every, max(5.0, (life[0] - life[1]) / 3))
    return every


def _solve_and_write(spec, X, check, out, matmat, dense_matrix, op, t0, log, store=None,
                     ckpt_hash=None, cluster=None, in_process=False) -> RunResult:
    """Solve, judge, bound, certify (``--certify``) and write the result folder.
    ``in_process``: ``dense_matrix()`` is the in-process K, which the certification may
    overwrite."""
    precond = checkpoint = None
    s, kern = spec.solver, spec.kernel
    device = op.device if op is not None else "cpu"
    shift = s.method in ("lobpcg", "davidson") and uses_shift(
        s.precond, spec.n, kern.depth, kern.finite, device,
        recompute=op is not None and getattr(op, "mode", None) == "recompute")
    if s.method in ("lobpcg", "davidson"):
        if ckpt_hash is not None:
            checkpoint = Checkpoint(os.path.join(out, CHECKPOINT_FILE),
                                    {"out_hash": ckpt_hash, "method": s.method, "n": spec.n},
                                    every=checkpoint_every(s, cluster), log=log)
        log("preconditioner: setting up")
        precond = make_preconditioner("shift" if shift else s.precond, X, kern.depth,
                                      kern.kind, kern.normalization,
                                      columns=_columns(matmat, spec.n) if kern.finite else None,
                                      device=device)
        held = {"features": ", degree 3 by features",
                "gram": ", degree 3 held N × N"}.get(precond.form, "")
        log(f"preconditioner {precond.name} (rank {precond.rank}{held}), "
            f"set-up {precond.setup_seconds:.1f} s")
    if kern.finite:  # no closed form: the diagonal of the matrix itself
        diag = np.diagonal(dense_matrix()).copy() if op is None else op.diagonal()
        cheap = {"upper_min_diagonal": float(diag.min()),
                 "upper_trace_over_n": float(diag.mean())}
    else:
        cheap = upper_bounds(X, kern.depth, kern.kind, kern.normalization)
        diag = kernel_diagonal(X, kern.depth, kern.kind, kern.normalization)
    common = dict(k=s.k, block=_default_block(s, op), max_products=s.max_products,
                  dense_matrix=dense_matrix, scale=cheap["upper_trace_over_n"], log=log,
                  checkpoint=checkpoint, groups=check.groups, diag=diag)
    common["start"], common["ceiling"] = _near_null_start(spec, X, check)
    common["cluster"] = len(check.near_pairs)
    fast, unsafe = None, None
    if op is not None and op.mixed:
        from .solvers.mixed import FastProducts, float32_unsafe

        unsafe = float32_unsafe(diag, spec.n)  # said once, by the solve's notes
        if not unsafe:
            fast = FastProducts(op.matmat_fast, f"float32 {op.fast_kind}")
    if shift:
        sol, precond = _solve_shifted(spec, X, check, matmat, fast, precond, common, log,
                                      device, store, os.path.join(out, FACTOR_DIR),
                                      ckpt_hash or spec.hash())
    else:
        sol = smallest_eigenpairs(matmat, spec.n, s.method, tol=s.tol,
                                  precond=precond.apply if precond else None,
                                  fast_matmat=fast, **common)
    if precond is not None:
        precond.apply = None  # its factor (N × N for the shift and the gram form) goes now
    if unsafe:
        sol.notes.append(unsafe)
    if (op is not None and op.mode != "recompute"
            and getattr(getattr(op, "plan", None), "dtype", None) == "float32"):
        sol.notes.append(
            "the products read the store's float32-rounded entries: the bound certifies the "
            "eigenvalue of that rounded K, and the exact kernel's λ_min may differ from it by "
            "about 1e-7 relative (4.2e-8 measured at N = 10000, docs/accuracy.md); for a tol "
            "below that, use a float64 store (--dtype float64)")
    for note in sol.notes:
        log(f"note: {note}")
    stored = _bounds_from_store(store, X, log) if store and not kern.finite else None
    if kern.finite:
        from .bounds import finite_width_bounds

        bounds = finite_width_bounds(spec.n, spec.d, kern, cheap)
    elif stored is not None:  # the chain the assembly made with the tiles
        bounds = stored
    elif spec.n <= BOUNDS_MAX_N:
        bounds = lambda_min_bounds(X, kern.depth, kern.kind, kern.normalization)
    elif op is not None and op.device == "cpu":  # O(N² L): on the workers, tile by tile
        from .chain import lambda_min_bounds_distributed

        log(f"lower-bound chain on the workers (N = {spec.n} > {BOUNDS_MAX_N})")
        bounds = lambda_min_bounds_distributed(op.client, X, kern.depth, kern.kind,
                                               kern.normalization, tile=op.tile, log=log)
    else:
        bounds = cheap
    if spec.data.source == "sphere" and not kern.finite:
        bounds["prediction_staircase"] = staircase_prediction(
            spec.n, spec.d, kern.depth, kern.kind, kern.normalization)
        bounds["prediction"] = _prediction(spec)
    lam, res = float(sol.values[0]), float(sol.residuals[0])
    cert = sol.certificate()
    proof = None
    if s.certify == "cholesky":
        if device == "gpu" and op is not None and not in_process:
            op.close()  # its tiles leave the GPU (one GPU holds them and K alike)
        proof = _certify_cholesky(spec, X, sol, cert, log,
                                  dense_matrix() if in_process else None, device)
        cap = proof.get("upper_from_failure")
        low = lam - _bound_or_inf(cert)
        below = cap is not None and cap < low
        if (proof["status"] == "failed" or below) and sol.status in (
                "certified", "not_converged"):
            sol.status, sol.converged = "missed", False
            sol.resolved = np.zeros(len(sol.values), bool)
            sigma = min((a for a in proof["attempts"] if "lambda_min_at_most" in a),
                        key=lambda a: a["lambda_min_at_most"])["sigma"] if below else None
            sol.notes.append(f"--certify cholesky: {proof['reason']}" if not below else
                             f"--certify cholesky: the float64 Cholesky of K − σI failed at "
                             f"σ = {sigma:.10g}, which proves λ_min ≤ {cap:.10g} (Demmel; "
                             f"Higham, Theorem 10.7), below the lower end "
                             f"{low:.10g} of the solver's "
                             f"value {lam:.10g}: the solver missed a smaller eigenvalue")
            cert = sol.certificate()
        elif _certified_by_bracket(sol, proof, s.tol, log):
            cert = sol.certificate()
    # A value whose first digit is not certain (below float64's resolution, or above what
    # the smallest eigenvalue can be) is not reported: null, with the interval that is sure.
    shown = [float(v) if ok else None for v, ok in zip(sol.values, cert["resolved"])]
    top = cheap["upper_min_diagonal"]
    if shown[0] is None and proof is not None and proof.get("upper") is not None:
        interval = [proof["lower"] or 0.0, min(proof["upper"], top)]  # what Cholesky proved
    elif shown[0] is None:
        # θ, a Rayleigh quotient from a fresh product, is ≥ λ_min up to its rounding, which
        # both the bound and the resolution exceed
        err = min(_bound_or_inf(cert), sol.resolution)
        below = lam + err if sol.status in ("below_resolution", "not_converged") else top
        interval = [0.0, min(max(below, 0.0), top)]
    else:
        interval = [max(lam - cert["abs_error_bound"][0], 0.0), lam + cert["abs_error_bound"][0]]
    why_singular = singular_reason(check, spec)
    result = RunResult(**{
        "lambda_min": shown[0],
        "status": sol.status,
        "converged": sol.converged,
        "residual_norm": res,
        "relative_accuracy": cert["rel_error_bound"][0],
        "relative_accuracy_residual": cert["rel_error_bound_residual"][0],
        "relative_accuracy_kato_temple": cert["rel_error_bound_kato_temple"][0],
        "abs_error_bound": cert["abs_error_bound"][0],
        "resolution": sol.resolution,
        "lambda_min_interval": interval,
        "lambda_min_computed": lam,
        "lambda_min_lower_certified": proof["lower"] if proof else None,
        "lambda_min_upper_certified": proof["upper"] if proof else None,
        "certify": proof,
        "smallest_proved": sol.smallest_proved,
        "rounding_limited": sol.rounding_limited,
        "method": sol.method,
        "block": sol.block,
        "notes": sol.notes,
        "k": s.k,
        "eigenvalues": shown,
        "eigenvalues_computed": [float(v) for v in sol.values],
        "residual_norms": [float(v) for v in sol.residuals],
        "gaps": [float(v) if np.isfinite(v) else None for v in sol.gaps],
        "accuracy": cert,
        "iterations": sol.iterations,
        "passes": op.passes if op is not None else None,
        "precision": ("mixed" if sol.phases is not None else "float64"),
        "phases": sol.phases,
        "matvecs": op.matvecs if op is not None else None,
        "bytes_read": op.bytes_read if op is not None else None,
        "resumed_from_checkpoint": sol.resumed,
        "passes_total": (op.passes + (sol.resumed or {}).get("passes", 0)
                         if op is not None else None),
        "operator": op.mode if op is not None else "memory (dense, in process)",
        "device": op.device if op is not None else "cpu",
        "gpus": (op.describe()["gpus"] or None) if op is not None else None,
        "operator_memory": op.memory() if op is not None else None,
        "preconditioner": precond.describe() if precond else None,
        "solver_seconds": sol.solver_seconds,
        "n": spec.n,
        "d": spec.d,
        "depth": kern.depth,
        "kernel": kern.kind,
        "normalization": kern.normalization,
        "data": spec.data.source,
        "seed": spec.data.seed,
        "input_sha256": spec.data.input_sha256,
        "row_norm_range": [check.min_norm, check.max_norm],
        "duplicate_rows": check.duplicate_rows,
        "parallel_rows": check.parallel_rows,
        "singular_expected": why_singular is not None,
        "singular_reason": why_singular,
        "dedupe": spec.data.dedupe,
        "n_input": spec.data.n_input if spec.data.dedupe else spec.n,
        "bounds": bounds,
        "wall_seconds": time.perf_counter() - t0,
        "ntkdist_version": __version__,
        "store": os.path.abspath(store) if store else None,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash(),
    })
    write_result(out, result, sol.vectors[:, 0] if s.k == 1 else sol.vectors)
    if checkpoint is not None:
        checkpoint.remove()
    return result


