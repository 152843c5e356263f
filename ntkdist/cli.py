"""Command line: parses arguments and prints; the work happens elsewhere."""

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


def _add_data_args(p) -> None:
    p.add_argument("--data", default="sphere",
                   help="sphere | gaussian | PATH (.npy without pickles, or a Zarr array)")
    p.add_argument("--n", type=int, help="number of rows (synthetic: required; file: first N rows)")
    p.add_argument("--d", type=int, help="input dimension (synthetic: required; file: checked)")
    p.add_argument("--depth", type=int, required=True, help="network depth L (>= 1)")
    p.add_argument("--seed", type=int, help="seed of synthetic data (default 0)")
    p.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"])
    p.add_argument("--normalization", default="paper", choices=["paper", "nt"],
                   help="paper: K_ii = L||x||^2; nt: neural-tangents' stack, (2/d)K")
    p.add_argument("--dedupe", action="store_true",
                   help="drop repeated rows (first occurrences kept) and solve for the distinct "
                        "rows; without it repeated rows give λ_min = 0 exactly")


def _add_store_args(p, required: bool) -> None:
    p.add_argument("--store", required=required, help="Zarr store of the kernel (PATH.zarr)")
    p.add_argument("--tile", type=_count, help="tile side T (default: from worker memory, <= 4096)")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="storage dtype (default float64 up to N=25000, float32 above)")
    _add_cluster_args(p)


def _add_cluster_args(p, prefix: str = "") -> None:
    p.add_argument("--scheduler", help=f"{prefix}address of a running Dask scheduler")
    p.add_argument("--scheduler-file", help=f"{prefix}scheduler file of a running Dask cluster")
    p.add_argument("--workers", type=_count,
                   help=f"{prefix}local cluster: worker processes (default: cores)")
    p.add_argument("--memory-limit", help=f"{prefix}local cluster: memory per worker, e.g. 4GB")


def _add_device_arg(p) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="where the solver's products run (default cpu); gpu: tiles built on "
                        "the workers' GPUs with CuPy, kept in GPU memory when they fit "
                        "(--operator memory/auto), else rebuilt every pass (recompute); a "
                        "local cluster of one worker per GPU (dask-cuda if installed)")


def _add_solver_args(p) -> None:
    p.add_argument("--method", choices=["lobpcg", "davidson", "lanczos", "dense"],
                   help="eigensolver (default: dense in memory up to N=25000 without --store "
                        "and --device gpu, else lobpcg)")
    p.add_argument("--k", type=int, default=1, help="number of smallest eigenvalues (default 1)")
    p.add_argument("--tol", type=float, default=1e-8,
                   help="relative accuracy of the k eigenvalues to certify (default 1e-8)")
    p.add_argument("--block", type=_count,
                   help="LOBPCG/Davidson block size (default max(32, 2k+16); at least k+1)")
    p.add_argument("--precond", default="auto",
                   help="auto | harmonic | nystrom[:RANK] | none (default auto: harmonic)")
    p.add_argument("--operator", default="auto", choices=["auto", "store", "memory", "recompute"],
                   help="how K·V is computed (default auto: memory if the tiles fit, else store)")
    p.add_argument("--precision", default="auto", choices=["auto", "float64", "mixed"],
                   help="products of LOBPCG/Davidson: mixed = float32 deflated products for "
                        "most iterations, float64 to finish and certify (memory operator); "
                        "default auto: mixed where the memory operator has room for it")
    p.add_argument("--max-products", type=_count, default=600,
                   help="cap on passes over the kernel (default 600)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the solver's Ritz block to OUT/checkpoint.npz this often; a rerun "
                        "with the same --out resumes from it (default 60)")


def _solver_options(args, n: int, store) -> dict:
    from .pipeline import default_method

    method = args.method or default_method(n, store, getattr(args, "device", "cpu"))
    return {"method": method, "k": args.k, "tol": args.tol,
            "block": args.block, "precond": args.precond, "operator": args.operator,
            "precision": args.precision, "max_products": args.max_products}


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="ntkdist", description="λ_min of deep ReLU NTK Gram matrices.")
    parser.add_argument("--version", action="version", version=f"ntkdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="compute λ_min of a kernel Gram matrix with the paper's bounds")
    _add_data_args(run)
    run.add_argument("--out", required=True, help="result folder (created; refused if another run's)")
    _add_store_args(run, required=False)
    _add_solver_args(run)
    _add_device_arg(run)
    sol = sub.add_parser("solve", help="smallest eigenvalues of the kernel in a complete store")
    sol.add_argument("--store", required=True, help="a complete kernel store (PATH.zarr)")
    sol.add_argument("--out", required=True, help="result folder (created; refused if another run's)")
    _add_cluster_args(sol)
    _add_solver_args(sol)
    _add_device_arg(sol)
    asm = sub.add_parser("assemble", help="assemble the kernel's tiles into a Zarr store (resumable)")
    _add_data_args(asm)
    _add_store_args(asm, required=True)
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
    return parser


def _spec(args):
    from .spec import make_spec

    return make_spec(data=args.data, n=args.n, d=args.d, depth=args.depth, kernel=args.kernel,
                     normalization=args.normalization, seed=args.seed, dedupe=args.dedupe)


def _cluster(args) -> dict:
    if getattr(args, "memory_limit", None) not in (None, "auto"):
        from dask.utils import parse_bytes

        try:
            if parse_bytes(args.memory_limit) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            from .errors import SpecError

            raise SpecError(f"--memory-limit must be a size such as 4GB or 500MiB, got "
                            f"{args.memory_limit!r}") from None
    return {"scheduler": args.scheduler, "scheduler_file": args.scheduler_file,
            "workers": args.workers, "memory_limit": args.memory_limit,
            "device": getattr(args, "device", "cpu")}


def _checkpoint_every(args) -> float:
    from .errors import SpecError

    every = args.checkpoint_every
    if not (every >= 0 and every != float("inf")):
        raise SpecError(f"--checkpoint-every must be a finite number of seconds >= 0, got {every}")
    return every


def _cmd_run(args) -> int:
    from .pipeline import run, summary

    spec = _spec(args)
    spec = spec.with_solver(**_solver_options(args, spec.n, args.store))
    result = run(spec, args.out, log=lambda msg: print(msg, flush=True), store=args.store,
                 cluster=_cluster(args), tile=args.tile, dtype=args.dtype,
                 checkpoint_every=_checkpoint_every(args))
    print(summary(result, args.out))
    return 0


def _cmd_solve(args) -> int:
    from .pipeline import solve, summary
    from .store import KernelStore

    n = KernelStore.open(args.store).spec.n
    result = solve(args.store, args.out, log=lambda msg: print(msg, flush=True),
                   cluster=_cluster(args), checkpoint_every=_checkpoint_every(args),
                   **_solver_options(args, n, args.store))
    print(summary(result, args.out))
    return 0


def _cmd_assemble(args) -> int:
    from .assemble import assemble, resolve_store_spec
    from .cluster import connect
    from .data import check_rows

    spec = _spec(args)
    check_rows(spec.rows(), name=spec.data)
    with connect(**_cluster(args)) as client:
        store_spec = resolve_store_spec(spec, args.store, client, args.tile, args.dtype)
        print(f"store {args.store}: N={spec.n} d={spec.d} tile {store_spec.tile} "
              f"({store_spec.blocks}x{store_spec.blocks} blocks), {store_spec.dtype}", flush=True)
        report = assemble(store_spec, args.store, client,
                          log=lambda msg: print(msg, flush=True))  # "resuming: D of T tiles …"
    print(f"done: {report['tiles_computed']} tiles computed now, {report['tiles_total']} in all, "
          f"{report['seconds']:.1f} s")
    return 0


def _cmd_info(args) -> int:
    from .store import KernelStore

    store = KernelStore.open(args.store)
    spec = store.spec
    rows, tiles = store.pending()
    total = len(store.upper_tiles())
    p = spec.problem
    source = f"seed {p['seed']}" if p["seed"] is not None else f"sha256 {p['input_sha256']}"
    print(f"store      {args.store}")
    print(f"kernel     {p['kernel']} depth {p['depth']} ({p['normalization']} normalization)")
    print(f"data       {p['data']} ({source}), N={p['n']} d={p['d']}")
    print(f"tiles      {total - len(tiles)}/{total} done, tile {spec.tile}, {spec.dtype}"
          f"{'' if not rows else f'; {len(rows)} row blocks missing'}")
    print(f"on disk    {store.bytes_on_disk() / 1e9:.3f} GB")
    print(f"spec hash  {spec.hash()}  (ntkdist {spec.ntkdist_version})")
    holder = store.lock_holder()
    if holder:
        print(f"in use     being {holder}")
    return 0


def _cmd_verify(args) -> int:
    from .assemble import repair, verify
    from .errors import SpecError

    if args.recompute < 0:
        raise SpecError(f"--recompute must be >= 0 (tiles to recompute), got {args.recompute}")
    if args.repair:
        report = repair(args.store, cluster=_cluster(args), recompute=args.recompute, seed=args.seed,
                        log=lambda msg: print(msg, flush=True))
    else:
        given = [f"--{n}" for n in ("scheduler", "scheduler-file", "workers", "memory-limit")
                 if getattr(args, n.replace("-", "_")) is not None]
        if given:
            raise SpecError(f"{', '.join(given)} only apply to 'verify --repair'")
        report = verify(args.store, recompute=args.recompute, seed=args.seed)
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


def main(argv=None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        commands = {"run": _cmd_run, "solve": _cmd_solve, "assemble": _cmd_assemble,
                    "info": _cmd_info, "verify": _cmd_verify}
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
