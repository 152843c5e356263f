"""Command line: parses arguments (flags and --config run files) and prints; the jobs in
:mod:`ntkdist.pipeline` do the work."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .errors import NtkdistError

EXIT_USER_ERROR = 2


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (workers, tiles, blocks, products)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2."""

    def error(self, message):
        raise NtkdistError(f"{message} (see '{self.prog} --help')")


def _add_config_arg(p, tables: str) -> None:
    p.add_argument("--config", metavar="FILE.toml",
                   help=f"a TOML run file ({tables} tables; docs/cli.md); flags override it")


def _add_data_args(p) -> None:
    p.add_argument("--data", help="sphere | gaussian | PATH (.npy without pickles, or a Zarr "
                                  "array); default sphere")
    p.add_argument("--n", type=int, help="number of rows (synthetic: required; file: first N rows)")
    p.add_argument("--d", type=int, help="input dimension (synthetic: required; file: checked)")
    p.add_argument("--depth", type=int, help="network depth L (>= 1); required")
    p.add_argument("--seed", type=int, help="seed of synthetic data (default 0)")
    p.add_argument("--kernel", choices=["ntk", "nngp", "empirical", "features"],
                   help="ntk (default) or nngp: the infinite-width limits; empirical: a "
                        "finite network's NTK JJ^T; features: a hidden layer's feature Gram")
    p.add_argument("--widths", help="empirical/features: hidden widths n1,...,n_(L-1) (the "
                                    "depth follows from them)")
    p.add_argument("--weights-seed", type=int, help="empirical/features: seed of the network's "
                                                    "N(0,1) weights (default 0)")
    p.add_argument("--layer", type=int, help="features: the hidden layer k, 1..L-1 "
                                             "(default L-1)")
    p.add_argument("--normalization", choices=["paper", "nt", "raw"],
                   help="paper (default): K_ii = L||x||^2 in the limit (finite widths: scaled "
                        "by prod 2/n_l to converge to it); nt: neural-tangents' stack, (2/d)K; "
                        "raw: the finite network's unscaled matrix")
    p.add_argument("--dedupe", action="store_true", default=None,
                   help="drop repeated rows (first occurrences kept) and solve for the distinct "
                        "rows; without it repeated rows give λ_min = 0 exactly")


def _add_store_args(p) -> None:
    p.add_argument("--store", help="Zarr store of the kernel (PATH.zarr)")
    p.add_argument("--tile", type=_count, help="tile side T of the store, or of the recompute "
                                              "operator (default: from worker memory, <= 4096)")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="storage dtype (default float64 up to N=25000, float32 above)")
    _add_cluster_args(p)


def _add_cluster_args(p, prefix: str = "") -> None:
    p.add_argument("--scheduler", help=f"{prefix}address of a running Dask scheduler")
    p.add_argument("--scheduler-file", help=f"{prefix}scheduler file of a running Dask cluster")
    p.add_argument("--workers", type=_count,
                   help=f"{prefix}local cluster: worker processes (default: cores)")
    p.add_argument("--memory-limit", help=f"{prefix}local cluster: memory per worker, e.g. 4GB")
    b = p.add_argument_group("batch cluster (workers as Slurm or PBS jobs, dask-jobqueue)")
    b.add_argument("--cluster", help="local (default), slurm or pbs")
    b.add_argument("--queue", help="partition or queue of the worker jobs")
    b.add_argument("--account", help="account (project) the jobs are charged to")
    b.add_argument("--walltime", help="walltime per job, HH:MM:SS or D-HH:MM:SS (default "
                                      "00:30:00); workers retire before it and are replaced")
    b.add_argument("--cores", type=_count, help="cores per job")
    b.add_argument("--memory", help="memory per job, e.g. 16GB")
    b.add_argument("--jobs", type=_count, help="jobs to keep running (default 1)")
    b.add_argument("--processes", type=_count,
                   help="workers per job (default: one a core; GPU jobs: one a GPU)")
    b.add_argument("--gpus-per-job", type=_count, help="GPUs per job (with --device gpu: "
                                                       "dask-cuda workers, one a GPU)")
    b.add_argument("--interface", help="network interface of scheduler and workers, e.g. ib0")
    b.add_argument("--local-directory", help="workers' scratch directory on the nodes")
    b.add_argument("--job-prologue", action="append", metavar="LINE",
                   help="a line for the job script before the worker starts (repeatable), "
                        "e.g. 'module load cuda'")
    b.add_argument("--adapt", metavar="MIN:MAX", help="adaptive: between MIN and MAX jobs "
                                                      "(instead of --jobs)")
    b.add_argument("--worker-timeout", type=float, metavar="SECONDS",
                   help="give up when the workers have not all connected after this long "
                        "(default 1800)")
    b.add_argument("--job-logs", metavar="DIR", help="the jobs' output files (default "
                                                     "./ntkdist-jobs)")


def _add_device_arg(p) -> None:
    p.add_argument("--device", choices=["cpu", "gpu"],
                   help="where the solver's products run (default cpu); gpu: tiles built on "
                        "the workers' GPUs with CuPy, kept in GPU memory when they fit "
                        "(--operator memory/auto), else rebuilt every pass (recompute); a "
                        "local cluster of one worker per GPU (dask-cuda if installed)")


def _add_solver_args(p) -> None:
    p.add_argument("--method", choices=["lobpcg", "davidson", "lanczos", "dense"],
                   help="eigensolver (default: dense in memory up to N=25000 without --store "
                        "and --device gpu, else davidson on the CPU and lobpcg on GPUs)")
    p.add_argument("--k", type=int, help="number of smallest eigenvalues (default 1)")
    p.add_argument("--tol", type=float,
                   help="relative accuracy of the k eigenvalues to certify (default 1e-8)")
    p.add_argument("--block", type=_count,
                   help="LOBPCG/Davidson block size (default max(32, 2k+16), max(128, 2k+16) "
                        "with the recompute operator; at least k+1)")
    p.add_argument("--precond", help="auto | harmonic[:DEGREE] | nystrom[:RANK] | shift | none "
                                     "(default auto: shift on CPU runs from N = 5000 where "
                                     "it fits, else harmonic, degrees <= 3 where they fit; "
                                     "shift: (K - sigma I)^-1 in float32, sigma just below a "
                                     "first estimate)")
    p.add_argument("--operator", choices=["auto", "store", "memory", "recompute"],
                   help="how K·V is computed (default auto: with a store, memory if the "
                        "tiles fit, else store; without one, recompute)")
    p.add_argument("--precision", choices=["auto", "float64", "mixed"],
                   help="products of LOBPCG/Davidson: mixed = float32 products for most "
                        "iterations (deflated copies of the tiles where memory holds them, "
                        "else the stored tiles less their mean), float64 to finish and "
                        "certify; needs a store; default auto: mixed for lobpcg/davidson on a "
                        "store (not --operator recompute) unless rows repeat")
    p.add_argument("--max-products", type=_count,
                   help="cap on passes over the kernel (default 600)")
    p.add_argument("--certify", choices=["none", "cholesky"],
                   help="cholesky: after the solve, prove λ_min > σ − δ by a float64 Cholesky "
                        "of K − σI (K held in this process: N up to ~30000 in 8 GB) and report "
                        "the bracket lambda_min_lower_certified … lambda_min_upper_certified "
                        "(default none)")
    p.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="save the solver's Ritz block to OUT/checkpoint.npz this often; a rerun "
                        "with the same --out resumes from it (default 60)")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="ntkdist", description="λ_min of deep ReLU NTK Gram matrices.")
    parser.add_argument("--version", action="version", version=f"ntkdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="compute λ_min of a kernel Gram matrix with the paper's bounds")
    _add_config_arg(run, "out, and the [data] [kernel] [solver] [store] [cluster]")
    _add_data_args(run)
    run.add_argument("--out", help="result folder (created; refused if another run's); required")
    _add_store_args(run)
    _add_solver_args(run)
    _add_device_arg(run)
    sol = sub.add_parser("solve", help="smallest eigenvalues of the kernel in a complete store")
    _add_config_arg(sol, "out, [store] path, and the [solver] [cluster]")
    sol.add_argument("--store", help="a complete kernel store (PATH.zarr); required")
    sol.add_argument("--out", help="result folder (created; refused if another run's); required")
    _add_cluster_args(sol)
    _add_solver_args(sol)
    _add_device_arg(sol)
    asm = sub.add_parser("assemble", help="assemble the kernel's tiles into a Zarr store (resumable)")
    _add_config_arg(asm, "the [data] [kernel] [store] [cluster]")
    _add_data_args(asm)
    _add_store_args(asm)
    swp = sub.add_parser("sweep", help="a scaling study: a grid of runs from a TOML file, "
                                       "results.csv, fits.csv and figures (resumable)")
    swp.add_argument("study", metavar="STUDY.toml", help="the study file (docs/studies.md)")
    swp.add_argument("--out", required=True, help="the study's folder (a rerun resumes it)")
    swp.add_argument("--report-only", action="store_true",
                     help="write results.csv, fits.csv and the figures from the points "
                          "finished so far; run nothing")
    swp.add_argument("--dry-run", action="store_true",
                     help="print each point with its estimated disk, memory and time; run "
                          "nothing")
    _add_cluster_args(swp)
    _add_device_arg(swp)
    bnd = sub.add_parser("bounds", help="the paper's bounds, the proof chain's quantities and "
                                        "the prediction for a data set")
    _add_data_args(bnd)
    _add_cluster_args(bnd, prefix="above N = 25000 (the chain on workers): ")
    info = sub.add_parser("info", help="spec, size and progress of a kernel store")
    info.add_argument("--store", required=True)
    ver = sub.add_parser("verify", help="check every tile of a store against its checksum "
                                        "(--repair: and recompute the bad ones)")
    ver.add_argument("--store", required=True)
    ver.add_argument("--recompute", type=int, default=0, metavar="K",
                     help="also recompute K random tiles from the data and compare")
    ver.add_argument("--seed", type=int, help="seed for choosing the recomputed tiles")
    ver.add_argument("--repair", action="store_true",
                     help="recompute the bad pieces on Dask workers (row blocks from the data "
                          "source, tiles from the stored rows), then check them again")
    _add_cluster_args(ver, prefix="--repair: ")
    from .bench import add_bench_parser

    add_bench_parser(sub)  # bench [options] --out DIR | bench compare A B (ntkdist/bench.py)
    return parser


_NOT_OPTIONS = ("command", "config", "recompute", "repair")


def _options(args):
    """The command's options: its --config file's, overridden by the flags given."""
    from .config import load_config, merge

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    config = getattr(args, "config", None)
    return merge(load_config(config) if config else None, flags)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cmd_run(args) -> int:
    from .config import required, run_request, store_request
    from .pipeline import run

    o = _options(args)
    out = required(o, "out", "--out")
    spec, cluster = run_request(o)
    store, tile, dtype = store_request(o)
    with o.blaming():
        result = run(spec, out, cluster, store=store, tile=tile, dtype=dtype, log=_log)
    print(summary(result.to_dict(), out))
    return 0


#: Options of the data and the kernel: in a file given to 'solve', checked against the store.
_PROBLEM_OPTIONS = {"data", "n", "d", "seed", "dedupe", "kernel", "depth", "normalization",
                    "widths", "weights_seed", "layer"}


def _cmd_solve(args) -> int:
    from .config import cluster_request, problem_request, required, solver_options
    from .pipeline import solve

    o = _options(args)
    store, out = required(o, "store", "--store"), required(o, "out", "--out")
    cluster = cluster_request(o)
    problem = problem_request(o) if _PROBLEM_OPTIONS & set(o) else None
    with o.blaming():
        result = solve(store, out, cluster, log=_log, problem=problem, **solver_options(o))
    print(summary(result.to_dict(), out))
    return 0


def _cmd_assemble(args) -> int:
    from .config import (cluster_request, problem_request, required, solver_options,
                         store_request)
    from .errors import SpecError
    from .spec import make_solver_spec
    from .pipeline import assemble

    o = _options(args)
    store = required(o, "store", "--store")
    spec, cluster = problem_request(o), cluster_request(o)
    _, tile, dtype = store_request(o)
    with o.blaming():  # a run file's [solver] is checked too, though assembly needs none
        make_solver_spec(spec.n, **{k: v for k, v in solver_options(o).items()
                                    if v is not None})
    if cluster.device != "cpu":
        raise o.blame(SpecError(f"device {cluster.device} does not apply to assemble (its "
                                "tiles are built on CPU workers); it is for run and solve"))
    report = assemble(spec, store, cluster, tile=tile, dtype=dtype, log=_log)
    print(f"done: {report['tiles_computed']} tiles computed now, {report['tiles_total']} in all, "
          f"{report['seconds']:.1f} s")
    return 0


def _cmd_sweep(args) -> int:
    from .pipeline import sweep

    from .config import TABLES

    flags = {k: getattr(args, k) for k in TABLES["cluster"].values()}
    if args.dry_run and args.report_only:
        from .errors import SpecError

        raise SpecError("give --dry-run or --report-only, not both")
    report = sweep(args.study, args.out, flags, dry_run=args.dry_run,
                   report_only=args.report_only, log=_log)
    if args.report_only:
        print(f"{report['finished']} of {report['points']} point(s) finished; "
              f"{report['results']}, {report['fits']}" + "".join(f", {f}" for f in
                                                            report["figures"]))
    elif not args.dry_run:
        print(f"done: {report['ran']} point(s) run now, {report['points']} in all, "
              f"{report['seconds']:.1f} s; {report['results']}, {report['fits']}"
              + "".join(f", {f}" for f in report["figures"]))
    return 0


def _cmd_bounds(args) -> int:
    from .config import cluster_request, problem_request
    from .pipeline import bounds

    o = _options(args)
    spec = problem_request(o)
    b = bounds(spec, cluster_request(o), log=_log)
    k = spec.kernel
    print(f"data       {spec.data.source}, N={spec.n} d={spec.d}; kernel {k.describe()}")
    print(f"upper      λ_min ≤ min_i K_ii = {b['upper_min_diagonal']:.6g}; "
          f"tr(K)/N = {b['upper_trace_over_n']:.6g}")
    print(f"lower      λ_min ≥ {b['lower']:.6g}  ({b['lower_note']})")
    for layer, terms in (b.get("lower_hermite_gershgorin_terms") or {}).items():
        shown = ", ".join(f"{r} {v:.3g}" for r, v in terms.items() if v > 0) or "all 0"
        print(f"  {layer:<8} {shown}")
    if "prediction" not in b:
        print("prediction none: the model is for rows uniform on the sphere of radius √d "
              "(--data sphere)")
        return 0
    p, s = b["prediction"], b["prediction_staircase"]
    print(f"prediction λ_min ≈ {p['value']:.6g} (rows on the sphere; degree ℓ = {p['degree']}, "
          f"D_ℓ+1 = {p['D_next']}, tail {p['tail']:.6g} + edge {p['edge']:.6g}; a heuristic, "
          f"not a bound: docs/theory.md)")
    print(f"staircase  λ_min ≈ {s['value']:.6g} (the simpler formula)")
    return 0


def _cmd_info(args) -> int:
    from .pipeline import info

    r = info(args.store)
    spec = r["spec"]
    data, kernel = spec.data, spec.kernel
    source = f"seed {data.seed}" if data.seed is not None else f"sha256 {data.input_sha256}"
    rows = r["rows_missing"]
    print(f"store      {args.store}")
    print(f"kernel     {kernel.describe()}")
    print(f"data       {data.source} ({source}), N={data.n} d={data.d}")
    print(f"tiles      {r['tiles_done']}/{r['tiles_total']} done, tile {spec.tile}, {spec.dtype}"
          f"{'' if not rows else f'; {rows} row blocks missing'}")
    print(f"on disk    {r['bytes_on_disk'] / 1e9:.3f} GB")
    print(f"spec hash  {r['spec_hash']}  (ntkdist {spec.ntkdist_version})")
    if r["lock_holder"]:
        print(f"in use     being {r['lock_holder']}")
    return 0


def _cmd_verify(args) -> int:
    from .config import cluster_request
    from .errors import SpecError
    from .pipeline import verify

    if args.recompute < 0:
        raise SpecError(f"--recompute must be >= 0 (tiles to recompute), got {args.recompute}")
    if not args.repair:
        from .config import TABLES

        given = [f"--{n.replace('_', '-')}" for n in TABLES["cluster"].values()
                 if n != "device" and getattr(args, n, None) is not None]
        if given:
            raise SpecError(f"{', '.join(given)} only apply to 'verify --repair'")
    cluster = cluster_request(_options(args)) if args.repair else None
    report = verify(args.store, recompute=args.recompute, seed=args.seed, repair=args.repair,
                    cluster=cluster, log=_log)
    for r in report["recomputed"]:
        print(f"recomputed tile {tuple(r['tile'])}: max |diff| {r['max_abs_diff']:.3g}")
    if args.repair and report["repaired"]:
        print(f"repaired {len(report['repaired'])} piece(s): {', '.join(report['repaired'])} "
              f"({report['seconds']:.1f} s)")
        if report["changed"]:
            print(f"note: {', '.join(report['changed'])} now differ from the checksum recorded "
                  "before (a damaged marker, or a tile that failed recomputation)")
    bad = report["bad_after"] if args.repair else report["bad"]
    if bad:
        if args.repair:
            print(f"ntkdist: {len(bad)} bad piece(s) in {args.store} after repair: "
                  f"{', '.join(bad)}", file=sys.stderr)
        else:
            print(f"ntkdist: {len(bad)} bad piece(s) in {args.store}: {', '.join(bad)}; run "
                  f"'ntkdist verify --store {args.store} --repair' to recompute them",
                  file=sys.stderr)
        return 1
    missing = report["missing"]
    state = "complete" if not missing else (
        f"incomplete, {len(missing)} missing: run 'ntkdist assemble' with the same arguments "
        "to finish it")
    if args.repair and not report["repaired"]:
        print("nothing to repair")
    print(f"sound: {report['checked']} pieces match their checksums ({state})")
    return 0


def _cmd_bench(args) -> int:
    from .bench import cmd_bench

    return cmd_bench(args, log=_log)


def summary(result: dict, out: str) -> str:
    """A short human summary of a result (result.json's dict)."""
    b = result["bounds"]
    method = result["method"].split(" (")[0].split(":")[0]
    status = result.get("status", "certified")
    if status == "below_resolution":
        lines = [
            f"λ_min is below what float64 resolves for this matrix: 0 ≤ λ_min ≤ "
            f"{result['lambda_min_interval'][1]:.3g} (resolution {result['resolution']:.2e}; "
            f"computed {result['lambda_min_computed']:.3g}, no digit certified; method: {method})",
        ]
    elif status == "missed" and (result.get("certify") or {}).get("status") == "failed":
        lines = [
            f"λ_min not certified: the {method} solver converged to "
            f"{result['lambda_min_computed']:.10g}, but --certify cholesky found "
            f"{result['certify']['reason'].split(': ', 1)[0]}, so K very likely has a smaller "
            f"eigenvalue; 0 ≤ λ_min ≤ min_i K_ii = {b['upper_min_diagonal']:.6g}",
        ]
    elif status == "missed" and (result.get("certify") or {}).get("upper_from_failure"):
        lo, hi = result["lambda_min_interval"]
        lines = [
            f"λ_min not found: the {method} solver converged to "
            f"{result['lambda_min_computed']:.10g}, but a float64 Cholesky of K − σI failed "
            f"where it proves λ_min ≤ {result['certify']['upper_from_failure']:.10g}, so it "
            f"missed a smaller eigenvalue; {lo:.10g} ≤ λ_min ≤ {hi:.10g}",
        ]
    elif status == "missed":
        lines = [
            f"λ_min not found: the {method} solver converged to {result['lambda_min_computed']:.6g}"
            f", above min_i K_ii = {b['upper_min_diagonal']:.6g} ≥ λ_min, so it missed a "
            "smaller eigenvalue; 0 ≤ λ_min ≤ min_i K_ii",
        ]
    elif result["lambda_min"] is None and (result["relative_accuracy"] is None
                                           or result["relative_accuracy"] >= 1):
        lo, hi = result["lambda_min_interval"]  # stopped before its first digit was sure
        lines = [
            f"λ_min not certified: the {method} solver stopped at "
            f"{result['lambda_min_computed']:.6g} with an error bound "
            f"{result['abs_error_bound'] or float('inf'):.2g} not below it, above float64's "
            f"resolution {result['resolution']:.2e} (see notes); {lo:.6g} ≤ λ_min ≤ {hi:.6g}",
        ]
    elif result["lambda_min"] is None:  # computed, but not certified as the smallest
        lo, hi = result["lambda_min_interval"]
        lines = [
            f"λ_min not certified: the {method} solver converged to "
            f"{result['lambda_min_computed']:.10g}, an eigenvalue that may not be the "
            f"smallest (see notes); {lo:.6g} ≤ λ_min ≤ {hi:.6g}",
        ]
    elif status == "exact":
        lines = [f"λ_min = 0 exactly (repeated rows: e_i − e_j is a null vector of the PSD K; "
                 f"method: {method})"]
    else:
        kt = result.get("relative_accuracy_kato_temple")
        by_bracket = (result.get("certify") or {}).get("certified_value")
        acc = f"rel. error ≤ {result['relative_accuracy']:.1e}" + (
            " (the proved Cholesky bracket)" if by_bracket else
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
            f"{p['passes']} pass{'' if p['passes'] == 1 else 'es'} with {p['products']} "
            f"products ({p['stopped']}"
            + ("" if p.get("product_error") is None else
               f"; their error {p['product_error']:.2e}, measured by one float64 pass of these")
            + ")" for p in result["phases"]))
    if status == "not_converged" and result["lambda_min"] is not None:  # else said above
        unresolved = sum(v is None for v in result["eigenvalues"])
        lines.append(f"warning: not certified to tol = {result['spec']['tol']:g}: the bounds "
                     "reached are " + ", ".join(
                         "-" if v is None else f"{v:.1e}"
                         for v in result["accuracy"]["rel_error_bound"]) + " relative "
                     + ("(too close to 0 for float64's rounding of K to do better)"
                        if result.get("rounding_limited") or unresolved else
                        "(the solver stopped at its product or time limit)"))
    low, high = result.get("row_norm_range") or (1.0, 1.0)
    if (status in ("below_resolution", "missed") or result["lambda_min"] is None) \
            and not result["method"].startswith("dense") and high > 2 * low:
        lines.append("hint: rows of very different norms are resolved by --method dense (the "
                     "scaled formulation K = D A D, N ≤ 8000)")
    proof = result.get("certify")
    if proof and proof.get("status") == "proved":
        lines.append(f"certified bracket (Cholesky of K − σI, float64 K): "
                     f"{proof['lower']:.12g} ≤ λ_min ≤ {proof['upper']:.12g}")
    elif proof and proof.get("status") == "skipped":
        lines.append(f"--certify cholesky: nothing proved ({proof['reason']})")
    lower = b.get("lower")
    if b.get("theorem"):  # a finite network: the theorem's scale, not a numerical bound
        lines.append(f"bounds: λ_min ≤ {b['upper_min_diagonal']:.6g} (min_i K_ii); "
                     f"{b['theorem'].split(' (')[0]}: λ_min = Θ({b['theorem_scale']:.4g}), "
                     f"its width condition {'holds' if b['assumptions_hold'] else 'fails'} "
                     f"({b['assumptions_note'].split(':')[0]})")
    else:
        lines.append(f"bounds: {lower:.4g} (proof chain, rigorous) ≤ λ_min ≤ "
                     f"{b['upper_min_diagonal']:.6g} (min_i K_ii)" if lower is not None else
                     f"bounds: λ_min ≤ {b['upper_min_diagonal']:.6g} (min_i K_ii); lower "
                     "chain not computed at this N")
    if result["singular_expected"]:
        lines.append(f"note: {result['singular_reason']}")
    if result.get("store"):
        lines.append(f"store: {result['store']}")
    lines.append(f"wall time {result['wall_seconds']:.2f} s; results in {out}/result.json")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        commands = {"run": _cmd_run, "solve": _cmd_solve, "assemble": _cmd_assemble,
                    "sweep": _cmd_sweep, "bounds": _cmd_bounds, "info": _cmd_info,
                    "verify": _cmd_verify, "bench": _cmd_bench}
        return commands[args.command](args)
    except NtkdistError as exc:
        print(f"ntkdist: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader of our output went away (… | head): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the environment: permissions, a full disk, a read-only store
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"ntkdist: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print("ntkdist: error: out of memory; use a larger --memory-limit, fewer workers, or "
              "--store for large N", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ntkdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
