"""Finite-width tile throughput against the GEMM floor (one core, as a worker runs it).

A tile of the empirical NTK between two row blocks of T rows is Σ_l (F F'ᵀ) ∘ (Δ Δ'ᵀ):
2·T²·(d + 2Σ n_l) flops of GEMMs, plus L − 1 Hadamard products and L − 1 sums of T² entries.
The features of R rows take a forward pass through W_1 … W_{L−1} and a backward one through
W_{L−1} … W_2, 2·R·(Σ_{l<L} n_l n_{l−1} + Σ_{2≤l<L} n_l n_{l−1}) flops, drawing those weights
(and W_L's row) on the way: a group of rows made at once, as the assembly does, shares the
draws.
Both are timed against a float64 GEMM of the same inner size on one BLAS thread, the rate
this machine's cores reach (``python benchmarks/finite_tile.py [--tile T] [--json FILE]``).
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np

from ntkdist.bench import best_of
from ntkdist.kernels.finite import SeededWeights, block_features, feature_columns, finite_tile
from ntkdist.kernels.limiting import single_blas


def measure(tile: int, d: int, widths, feature_rows: int, repeats: int = 3) -> dict:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((max(2 * tile, feature_rows), d))
    X *= np.sqrt(d) / np.linalg.norm(X, axis=1, keepdims=True)
    w = SeededWeights(d, widths, seed=0)
    cols = feature_columns(d, widths, "empirical")
    t_feat = best_of(lambda: block_features(X[:feature_rows], w), 1)["seconds"]
    t_draw = best_of(lambda: [w.rows(l, 0, shape[0]) for l, shape in enumerate(w.shapes, 1)],
                     1)["seconds"]
    A, B = block_features(X[:tile], w), block_features(X[tile:], w)
    t_tile = best_of(lambda: finite_tile(A, B), repeats)["seconds"]
    dims = (d, *widths, 1)
    # forward: g_l = F_{l-1} W_lᵀ for l < L; backward: Δ_l = Δ_{l+1} W_{l+1} for l + 1 < L
    forward = sum(a * b for a, b in zip(dims[:-2], dims[1:-1]))
    backward = sum(a * b for a, b in zip(dims[1:-2], dims[2:-1]))
    P = rng.standard_normal((tile, cols))
    Q = rng.standard_normal((tile, cols))
    with single_blas(np):
        t_gemm = best_of(lambda: P @ Q.T, repeats)["seconds"]
    gemm = 2.0 * tile * tile * cols / t_gemm
    tile_flops = 2.0 * tile * tile * cols
    feat_flops = 2.0 * feature_rows * (forward + backward)
    return {"tile": tile, "d": d, "widths": list(widths), "columns": cols,
            "gemm_gflops": gemm / 1e9,
            "tile_seconds": t_tile, "tile_gflops": tile_flops / t_tile / 1e9,
            "tile_fraction_of_gemm": tile_flops / t_tile / gemm,
            "entries_per_s": tile * tile / t_tile,
            "feature_rows": feature_rows, "features_seconds": t_feat, "features_gflops": feat_flops / t_feat / 1e9,
            "features_fraction_of_gemm": feat_flops / t_feat / gemm,
            "weights_normals": forward + backward + dims[-2],
            "normals_per_s": sum(a * b for a, b in w.shapes) / t_draw,
            "draws_share_of_features": (forward + backward + dims[-2])
            / (sum(a * b for a, b in w.shapes) / t_draw) / t_feat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--widths", default="625,2500,10000",
                    help="hidden widths n (both layers of an L = 3 network), comma-separated")
    ap.add_argument("--feature-rows", type=int, default=2048,
                    help="rows whose features are made at once (the assembly makes a group of "
                         "row blocks together, up to 2 GiB of features)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    rows = [measure(args.tile, args.d, (n, n), args.feature_rows)
            for n in map(int, args.widths.split(","))]
    print(f"{platform.processor() or platform.machine()}, one BLAS thread, tile {args.tile}, "
          f"d = {args.d}, L = 3, features of {args.feature_rows} rows at once")
    print(f"{'n':>7} {'cols':>7} {'GEMM GF/s':>10} {'tile GF/s':>10} {'tile/GEMM':>10} "
          f"{'M entries/s':>12} {'feat s':>8} {'feat GF/s':>10} {'feat/GEMM':>10} "
          f"{'M normals/s':>12} {'draws/feat':>10}")
    for r in rows:
        print(f"{r['widths'][0]:>7} {r['columns']:>7} {r['gemm_gflops']:>10.1f} "
              f"{r['tile_gflops']:>10.1f} {r['tile_fraction_of_gemm']:>10.2f} "
              f"{r['entries_per_s'] / 1e6:>12.2f} {r['features_seconds']:>8.2f} "
              f"{r['features_gflops']:>10.1f} {r['features_fraction_of_gemm']:>10.2f} "
              f"{r['normals_per_s'] / 1e6:>12.1f} {r['draws_share_of_features']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
