"""Time the paper's lower-bound chain (ntkdist/bounds.py, ntkdist/chain.py) on sphere data,
d = 64, L = 3, seed 0:

    python benchmarks/chain.py --n 8000                         # in process, as run does
    python benchmarks/chain.py --n 100000 --workers 2 --tile 4096  # on a LocalCluster
    python benchmarks/chain.py --n 100000 --store K.zarr        # from a store's power sums
    python benchmarks/chain.py --n 8192 --tile-cost             # one tile, three ways

In process (no ``--workers``): ``lambda_min_bounds`` with its default row block and with
``--block``. On workers: ``lambda_min_bounds_distributed`` on a LocalCluster of single-
threaded workers, the tile as given (a run uses its store's tile), scattering included.
``--store``: ``lambda_min_bounds_from_store`` on a store of these rows (``ntkdist assemble
--data sphere --n N --d 64 --depth 3 --seed 0``), reading the power sums assembly kept.
``--tile-cost``: one off-diagonal tile of side ``--tile`` (rows 0.. and tile..; N ≥ 2 tiles)
on one core: the tile alone (``kernel_tile``), the tile with its power sums as assembly
makes them (``kernel_tile_sums``), and the sums alone as the chain on the workers makes them
(``chain.chain_tile``), best of ``--repeats``.
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
    p.add_argument("--store", help="time the chain from this store's power sums")
    p.add_argument("--tile-cost", action="store_true", help="one tile's cost, three ways")
    args = p.parse_args()
    X = make_spec(data="sphere", n=args.n, d=64, depth=3, seed=0).rows()
    if args.store:
        from ntkdist.chain import lambda_min_bounds_from_store
        from ntkdist.store import KernelStore

        store = KernelStore.open(args.store)
        for _ in range(args.repeats):
            t = time.perf_counter()
            b = lambda_min_bounds_from_store(store, X, log=print)
            if b is None:
                raise SystemExit(f"{args.store} keeps no sound power sums")
            print(f"from the store's power sums, N = {args.n}: {time.perf_counter() - t:.1f} s, "
                  f"lower bound {b['lower']:.6g}", flush=True)
        return
    if args.tile_cost:
        tile_cost(X, args.tile, args.repeats)
        return
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


def tile_cost(X, side: int, repeats: int) -> None:
    from threadpoolctl import threadpool_limits

    from ntkdist.bounds import HERMITE_ORDERS
    from ntkdist.chain import chain_tile
    from ntkdist.kernels.limiting import kernel_tile, kernel_tile_sums, row_block

    if X.shape[0] < 2 * side:
        raise SystemExit(f"--tile-cost needs N >= 2 * --tile ({2 * side})")
    A, B = row_block(X[:side]), row_block(X[side:2 * side])
    ways = {"tile (kernel_tile)": lambda: kernel_tile(A, B, 3, "ntk", "paper"),
            "tile and power sums (kernel_tile_sums)":
                lambda: kernel_tile_sums(A, B, 3, "ntk", "paper", (1, 2), len(HERMITE_ORDERS),
                                         False),
            "power sums alone (chain.chain_tile)": lambda: chain_tile(A, B, False, (1, 2))}
    import numba

    numba.set_num_threads(1)
    with threadpool_limits(1):
        for name, f in ways.items():
            f()  # compiled or loaded from numba's cache
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t)
            print(f"tile {side}, one core, {name}: {best:.3f} s", flush=True)


if __name__ == "__main__":
    main()
