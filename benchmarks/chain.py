"""Time the paper's lower-bound chain (ntkdist/bounds.py, ntkdist/chain.py) on sphere data,
d = 64, L = 3, seed 0:

    python benchmarks/chain.py --n 8000                         # in process, as run does
    python benchmarks/chain.py --n 100000 --workers 2 --tile 4096  # on a LocalCluster

In process (no ``--workers``): ``lambda_min_bounds`` with its default row block and with
``--block``. On workers: ``lambda_min_bounds_distributed`` on a LocalCluster of single-
threaded workers, the tile as given (a run uses its store's tile), scattering included.
"""

from __future__ import annotations

import argparse
import time

from ntkdist.bounds import BOUNDS_BLOCK, lambda_min_bounds
from ntkdist.spec import make_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--workers", type=int, default=0, help="0: in process")
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--block", type=int, default=2048,
                   help="in process: a second row block to compare with the default")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    X = make_spec(data="sphere", n=args.n, d=64, depth=3, seed=0).rows()
    if not args.workers:
        for block in (BOUNDS_BLOCK, args.block):
            for _ in range(args.repeats):
                t = time.perf_counter()
                b = lambda_min_bounds(X, 3, "ntk", "paper", block=block)
                print(f"in process, N = {args.n}, row block {block}: "
                      f"{time.perf_counter() - t:.2f} s, lower bound {b['lower']:.6g}",
                      flush=True)
        return
    from distributed import Client, LocalCluster

    from ntkdist.chain import lambda_min_bounds_distributed

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True) as lc, \
            Client(lc) as client:
        for _ in range(args.repeats):
            t = time.perf_counter()
            b = lambda_min_bounds_distributed(client, X, 3, tile=args.tile)
            print(f"{args.workers} workers, N = {args.n}, tile {args.tile}: "
                  f"{time.perf_counter() - t:.1f} s, lower bound {b['lower']:.6g}", flush=True)


if __name__ == "__main__":
    main()
