"""The main jobs: data → kernel (in memory, or tiles in a store) → λ_min → result folder."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import __version__
from .bounds import kernel_diagonal, lambda_min_bounds, staircase_prediction, upper_bounds
from .data import check_rows, near_null_vectors, row_norms
from .errors import OutputError, SpecError
from .kernels.limiting import nngp, ntk
from .results import (EIGVEC_FILE, RESULT_FILE, claim_out_dir, release_out_dir, write_json,
                      write_npy)
from .solvers.checkpoint import CHECKPOINT_FILE, Checkpoint
from .solvers.driver import smallest_eigenpairs
from .solvers.precond import make_preconditioner
from .spec import RunSpec

#: Largest N for the in-memory dense path (three N×N float64 copies must fit in RAM).
DENSE_MAX_N = 25000
#: Largest N for which the lower-bound chain (an O(N² L) pass over the data) is computed.
BOUNDS_MAX_N = 25000


def default_method(n: int, store: str | None, device: str = "cpu") -> str:
    if device == "gpu":
        return "lobpcg"
    return "dense" if store is None and n <= DENSE_MAX_N else "lobpcg"


def run(spec: RunSpec, out: str, log=print, store: str | None = None,
        cluster: dict | None = None, tile: int | None = None, dtype: str | None = None,
        checkpoint_every: float = 60.0) -> dict:
    """Compute the k smallest eigenvalues for ``spec``; write ``out/result.json`` and
    ``out/eigvec.npy``.

    With ``store`` the kernel is first assembled (or resumed) into that Zarr store on a Dask
    cluster (``cluster``: keyword arguments of :func:`ntkdist.cluster.connect`) and solved
    from there. Without it, ``dense`` builds the kernel in memory and iterative methods
    recompute tiles on the cluster's workers every pass. Iterative solves save their Ritz
    block to ``out/checkpoint.npz`` every ``checkpoint_every`` seconds and resume from it.
    """
    if spec.method == "dense" and spec.n > DENSE_MAX_N:
        raise SpecError(f"N = {spec.n} is above the dense path's limit of {DENSE_MAX_N}; "
                        "use --method lobpcg")
    device = (cluster or {}).get("device") or "cpu"
    if device == "gpu" and spec.precision == "mixed":
        raise SpecError("--precision mixed is for the CPU memory operator; on GPUs use "
                        "--precision float64 (or auto)")
    if store is None and (spec.operator == "store" or (spec.operator == "memory"
                                                       and device != "gpu")):
        raise SpecError(f"--operator {spec.operator} needs --store")
    if store is None and spec.precision == "mixed":
        raise SpecError("--precision mixed needs --store (its tiles kept in worker memory)")
    if device == "gpu" and store is not None:
        raise SpecError("--device gpu rebuilds the tiles on the GPUs and needs no store: leave "
                        "out --store (or solve a store's kernel with 'ntkdist solve --store S "
                        "--device gpu')")
    if device == "gpu" and spec.method not in ("lobpcg", "davidson", "lanczos"):
        raise SpecError(f"--device gpu runs the iterative solvers' products; --method "
                        f"{spec.method} runs on the CPU (use lobpcg, davidson or lanczos)")
    if store is not None:
        _check_paths(store, out)
        from .spec import make_store_spec

        make_store_spec(spec, 1 if tile is None else tile, dtype or "float64")  # validates
    t0 = time.perf_counter()
    X = spec.rows()
    check = check_rows(X, name=spec.data, depth=spec.depth)

    claimed = []

    def claim():
        claimed.append(claim_out_dir(out, spec.to_dict(), spec.hash()))

    try:
        return _run(spec, out, log, store, cluster, tile, dtype, checkpoint_every, X, check,
                    device, t0, claim)
    except BaseException:
        if claimed:  # a failed run leaves no folder that only refuses the corrected rerun
            release_out_dir(out, claimed[0])
        raise


def _run(spec, out, log, store, cluster, tile, dtype, checkpoint_every, X, check, device, t0,
         claim):
    log(f"data: {spec.data} N={spec.n} d={spec.d}; kernel {spec.kernel} depth {spec.depth}")
    if store is None and spec.method == "dense":
        if any((cluster or {}).get(key) for key in ("scheduler", "scheduler_file", "workers")):
            log("note: the dense path runs in this process; the cluster options are not used "
                "(--method lobpcg or davidson solves on the cluster)")
        claim()
        gram = ntk if spec.kernel == "ntk" else nngp
        K = gram(X, depth=spec.depth, normalization=spec.normalization)
        return _solve_and_write(spec, X, check, out, lambda V: K @ V, lambda: K, None, t0, log)
    from .assemble import assemble, resolve_store_spec
    from .cluster import connect
    from .operator import KernelOperator

    # The output folder is claimed once the cluster is up and, without a store, once the
    # operator has checked its workers (GPUs included): a refusal there writes nothing.
    with connect(**(cluster or {})) as client:
        if store is not None:
            claim()  # before the (long) assembly
            store_spec = resolve_store_spec(spec, store, client, tile, dtype)
            log(f"store: {store} (tile {store_spec.tile}, {store_spec.dtype})")
            assemble(store_spec, store, client, log=log)
            op = KernelOperator(client, spec.operator, store=store, rows=X,
                                precision=_operator_precision(spec, check), device=device)
        else:
            op = KernelOperator(client, spec.operator, rows=X, problem=spec.problem(),
                                tile=tile or 4096, device=device)
        with contextlib.closing(op):
            if store is None:
                claim()
            _log_device(op, log)
            return _solve_and_write(spec, X, check, out, op.matmat, lambda: _dense_from(op, X, spec),
                                    op, t0, log, store=store, ckpt=(spec.hash(), checkpoint_every))


def solve(store: str, out: str, log=print, cluster: dict | None = None,
          checkpoint_every: float = 60.0, **options) -> dict:
    """Solve for the smallest eigenvalues of the kernel in a complete ``store``."""
    from .cluster import connect
    from .operator import KernelOperator
    from .store import KernelStore

    t0 = time.perf_counter()
    _check_paths(store, out)
    kstore = KernelStore.open(store)
    spec = kstore.spec.run_spec().with_solver(**options)
    if spec.method == "dense" and spec.n > DENSE_MAX_N:
        raise SpecError(f"N = {spec.n} is above the dense path's limit of {DENSE_MAX_N}")
    X = kstore.rows_checked()
    check = check_rows(X, name=store, depth=spec.depth)
    device = (cluster or {}).get("device") or "cpu"
    if device == "gpu" and spec.method == "dense":
        raise SpecError("--device gpu runs the iterative solvers' products; --method dense "
                        "runs on the CPU (use lobpcg, davidson or lanczos)")
    with connect(**(cluster or {})) as client:
        op = KernelOperator(client, spec.operator, store=store, rows=X,
                            precision=_operator_precision(spec, check), device=device)
        with contextlib.closing(op):
            claimed = claim_out_dir(out, {**spec.to_dict(), "store_spec_hash": kstore.spec.hash()},
                                    _out_hash(spec, kstore))
            _log_device(op, log)
            try:
                return _solve_and_write(spec, X, check, out, op.matmat,
                                        lambda: _dense_from(op, X, spec), op, t0, log,
                                        store=store,
                                        ckpt=(_out_hash(spec, kstore), checkpoint_every))
            except BaseException:
                release_out_dir(out, claimed)
                raise


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
    if spec.depth == 1 and spec.n > spec.d:
        return (f"depth 1: K = XXᵀ has rank ≤ d = {spec.d} < N = {spec.n}: K is singular, "
                "λ_min = 0")
    return None


def _log_device(op, log) -> None:
    if op.device == "gpu":
        log(f"operator {op.mode} on {len(op.gpus)} GPU worker(s): "
            f"{', '.join(sorted(set(op.gpus.values())))}")


def _operator_precision(spec: RunSpec, check) -> str:
    """Mixed precision only serves LOBPCG and Davidson (two phases, see the driver). ``auto``
    stays in float64 when rows repeat or are parallel: λ_min ≈ 0 then needs an absolute
    accuracy far below float32 products' noise floor (measured: N = 1500 with two such rows,
    85 passes mixed against 57 in float64)."""
    if spec.method not in ("lobpcg", "davidson"):
        return "float64"
    if spec.precision == "auto" and check.parallel_rows > 0:
        return "float64"
    return spec.precision


def _out_hash(spec: RunSpec, kstore) -> str:
    from .spec import content_hash

    return content_hash({**spec.to_dict(), "store_spec_hash": kstore.spec.hash()})


def _dense_from(op, X, spec):
    if op.store is not None:  # every tile checked against its checksum (open_kernel)
        from .store import open_kernel

        return np.asarray(open_kernel(op.store.path).compute(scheduler="threads"), dtype=np.float64)
    gram = ntk if spec.kernel == "ntk" else nngp
    return gram(X, depth=spec.depth, normalization=spec.normalization)


def _solve_and_write(spec, X, check, out, matmat, dense_matrix, op, t0, log, store=None,
                     ckpt=None):
    precond = checkpoint = None
    if spec.method in ("lobpcg", "davidson"):
        if ckpt is not None:
            checkpoint = Checkpoint(os.path.join(out, CHECKPOINT_FILE),
                                    {"out_hash": ckpt[0], "method": spec.method, "n": spec.n},
                                    every=ckpt[1], log=log)
        precond = make_preconditioner(spec.precond, X, spec.depth, spec.kernel, spec.normalization)
        log(f"preconditioner {precond.name} (rank {precond.rank}), "
            f"set-up {precond.setup_seconds:.1f} s")
    cheap = upper_bounds(X, spec.depth, spec.kernel, spec.normalization)
    diag = kernel_diagonal(X, spec.depth, spec.kernel, spec.normalization)
    sol = smallest_eigenpairs(matmat, spec.n, spec.method, k=spec.k, tol=spec.tol,
                              block=spec.block, precond=precond.apply if precond else None,
                              max_products=spec.max_products, dense_matrix=dense_matrix,
                              scale=cheap["upper_trace_over_n"], log=log,
                              checkpoint=checkpoint,
                              fast_matmat=op.matmat_fast if op is not None and op.mixed else None,
                              groups=check.groups, diag=diag,
                              start=near_null_vectors(check, row_norms(X), spec.n))
    for note in sol.notes:
        log(f"note: {note}")
    if spec.n <= BOUNDS_MAX_N:
        bounds = lambda_min_bounds(X, spec.depth, spec.kernel, spec.normalization)
    else:
        bounds = cheap
    if spec.data == "sphere":
        bounds["prediction_staircase"] = staircase_prediction(
            spec.n, spec.d, spec.depth, spec.kernel, spec.normalization)
    lam, res = float(sol.values[0]), float(sol.residuals[0])
    cert = sol.certificate()
    # A value whose first digit is not certain (below float64's resolution, or above what
    # the smallest eigenvalue can be) is not reported: null, with the interval that is sure.
    shown = [float(v) if ok else None for v, ok in zip(sol.values, cert["resolved"])]
    top = cheap["upper_min_diagonal"]
    if shown[0] is None:
        below = lam + cert["abs_error_bound"][0] if sol.status == "below_resolution" else top
        interval = [0.0, min(max(below, 0.0), top)]
    else:
        interval = [max(lam - cert["abs_error_bound"][0], 0.0), lam + cert["abs_error_bound"][0]]
    why_singular = singular_reason(check, spec)
    result = {
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
        "smallest_proved": sol.smallest_proved,
        "rounding_limited": sol.rounding_limited,
        "method": sol.method,
        "block": sol.block,
        "notes": sol.notes,
        "k": spec.k,
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
        "depth": spec.depth,
        "kernel": spec.kernel,
        "normalization": spec.normalization,
        "data": spec.data,
        "seed": spec.seed,
        "input_sha256": spec.input_sha256,
        "row_norm_range": [check.min_norm, check.max_norm],
        "duplicate_rows": check.duplicate_rows,
        "parallel_rows": check.parallel_rows,
        "singular_expected": why_singular is not None,
        "singular_reason": why_singular,
        "dedupe": spec.dedupe,
        "n_input": spec.n_input if spec.dedupe else spec.n,
        "bounds": bounds,
        "wall_seconds": time.perf_counter() - t0,
        "ntkdist_version": __version__,
        "store": os.path.abspath(store) if store else None,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash(),
    }
    try:
        write_npy(os.path.join(out, EIGVEC_FILE),
                  sol.vectors[:, 0] if spec.k == 1 else sol.vectors)
        write_json(os.path.join(out, RESULT_FILE), result)
    except OSError as exc:
        reason = exc.strerror or f"{exc}; is the disk full?"
        raise OutputError(f"cannot write the results into {out!r} ({reason}); "
                          f"computed λ_min = {lam!r} ({sol.status})") from None
    if checkpoint is not None:
        checkpoint.remove()
    return result


def summary(result: dict, out: str) -> str:
    """A short human summary of a result."""
    b = result["bounds"]
    method = result["method"].split(" (")[0].split(":")[0]
    status = result.get("status", "certified")
    if status == "below_resolution":
        lines = [
            f"λ_min is below what float64 resolves for this matrix: 0 ≤ λ_min ≤ "
            f"{result['lambda_min_interval'][1]:.3g} (resolution {result['resolution']:.2e}; "
            f"computed {result['lambda_min_computed']:.3g}, no digit certified; method: {method})",
        ]
    elif status == "missed":
        lines = [
            f"λ_min not found: the {method} solver converged to {result['lambda_min_computed']:.6g}"
            f", above min_i K_ii = {b['upper_min_diagonal']:.6g} ≥ λ_min, so it missed a "
            "smaller eigenvalue; 0 ≤ λ_min ≤ min_i K_ii",
        ]
    elif status == "exact":
        lines = [f"λ_min = 0 exactly (repeated rows: e_i − e_j is a null vector of the PSD K; "
                 f"method: {method})"]
    else:
        kt = result.get("relative_accuracy_kato_temple")
        acc = f"rel. error ≤ {result['relative_accuracy']:.1e}" + (
            f" (Kato–Temple {kt:.1e})" if kt is not None else "")
        lines = [
            f"λ_min = {result['lambda_min']:.10g}  (residual ‖Kv−λv‖ = "
            f"{result['residual_norm']:.2e}, {acc}; method: {method})",
            f"λ_min/d = {result['lambda_min'] / result['d']:.6g}",
        ]
    if result.get("passes") is not None:
        gpus = f" on GPU ({', '.join(result['gpus'])})" if result.get("gpus") else ""
        lines.append(f"passes over the kernel {result['passes']}, matvecs {result['matvecs']}, "
                     f"operator {result['operator']}{gpus}"
                     + (f", preconditioner {result['preconditioner']['name']}"
                        if result.get("preconditioner") else ""))
    if result.get("phases"):
        lines.append("mixed precision: " + ", then ".join(
            f"{p['passes']} passes with {p['products']} products ({p['stopped']})"
            for p in result["phases"]))
    if status == "not_converged":
        unresolved = sum(v is None for v in result["eigenvalues"])
        lines.append(f"warning: not certified to tol = {result['spec']['tol']:g}: the bounds "
                     "reached are " + ", ".join(
                         "-" if v is None else f"{v:.1e}"
                         for v in result["accuracy"]["rel_error_bound"]) + " relative "
                     + ("(too close to 0 for float64's rounding of K to do better)"
                        if result.get("rounding_limited") or unresolved else
                        "(the solver stopped at its product or time limit)"))
    low, high = result.get("row_norm_range") or (1.0, 1.0)
    if status in ("below_resolution", "missed") and not result["method"].startswith("dense") \
            and high > 2 * low:
        lines.append("hint: rows of very different norms are resolved by --method dense (the "
                     "scaled formulation K = D A D, N ≤ 8000)")
    lower = b.get("lower")
    lines.append(f"bounds: {lower:.4g} (proof chain, rigorous) ≤ λ_min ≤ "
                 f"{b['upper_min_diagonal']:.6g} (min_i K_ii)" if lower is not None else
                 f"bounds: λ_min ≤ {b['upper_min_diagonal']:.6g} (min_i K_ii); lower chain "
                 "not computed at this N")
    if result["singular_expected"]:
        lines.append(f"note: {result['singular_reason']}")
    if result.get("store"):
        lines.append(f"store: {result['store']}")
    lines.append(f"wall time {result['wall_seconds']:.2f} s; results in {out}/{RESULT_FILE}")
    return "\n".join(lines)
