"""Command line: parses arguments and prints; the work happens elsewhere."""

from __future__ import annotations

import argparse
import sys

from .errors import NtkdistError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2."""

    def error(self, message):
        raise NtkdistError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="ntkdist", description="λ_min of deep ReLU NTK Gram matrices.")
    parser.add_argument("--version", action="version", version=f"ntkdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="compute λ_min of a kernel Gram matrix with the paper's bounds")
    run.add_argument("--data", default="sphere",
                     help="sphere | gaussian | PATH (.npy without pickles, or a Zarr array)")
    run.add_argument("--n", type=int, help="number of rows (synthetic: required; file: first N rows)")
    run.add_argument("--d", type=int, help="input dimension (synthetic: required; file: checked)")
    run.add_argument("--depth", type=int, required=True, help="network depth L (≥ 1)")
    run.add_argument("--seed", type=int, help="seed of synthetic data (default 0)")
    run.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"])
    run.add_argument("--normalization", default="paper", choices=["paper", "nt"],
                     help="paper: K_ii = L‖x‖²; nt: neural-tangents' stack, (2/d)·K")
    run.add_argument("--out", required=True, help="result folder (created; refused if another run's)")
    return parser


def _cmd_run(args) -> None:
    from .pipeline import run, summary
    from .spec import make_spec

    spec = make_spec(data=args.data, n=args.n, d=args.d, depth=args.depth, kernel=args.kernel,
                     normalization=args.normalization, seed=args.seed)
    result = run(spec, args.out, log=lambda msg: print(msg, flush=True))
    print(summary(result, args.out))


def main(argv=None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        {"run": _cmd_run}[args.command](args)
    except NtkdistError as exc:
        print(f"ntkdist: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ntkdist: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
