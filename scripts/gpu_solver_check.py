"""Check and time the GPU recompute operator (``--device gpu``) on a machine with a GPU.

    PYTHONPATH=. python3 scripts/gpu_solver_check.py [--sizes 20000,50000] [--pass-n 100000]

1. A product K·V on the GPU workers against a float64 dense K built on the CPU (N = 6000).
2. Seconds per pass at N = ``--tile-n`` (50000) for tiles of 4096, 8192 and 16384 (b = 32,
   recompute), and of the memory operator (tiles kept on the GPU) at ``--memory-pass-n``.
3. ``ntkdist run --device gpu --method davidson`` (``--operator auto``: memory where the
   tiles fit on the GPU) for each N of ``--sizes`` (sphere, d = 64, L = 3, seed 0, tol 1e-8),
   with the best tile: λ_min, passes, certificate, seconds.
4. Seconds per recompute pass at N = ``--pass-n`` (no solve; 0: skip).

Everything is printed as it comes (one line per figure).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ntkdist.cli import main as cli  # noqa: E402
from ntkdist.cluster import connect  # noqa: E402
from ntkdist.data import synthetic_rows  # noqa: E402
from ntkdist.kernels.limiting import ntk  # noqa: E402
from ntkdist.operator import gpu_info, make_operator  # noqa: E402
from ntkdist.spec import KernelSpec  # noqa: E402

KERNEL = KernelSpec(kind="ntk", depth=3, normalization="paper")


def pass_seconds(client, n, tile, b=32, repeats=3, mode="recompute"):
    X = synthetic_rows("sphere", 64, 0, 0, n)
    t0 = time.perf_counter()
    op = make_operator(client, mode, rows=X, kernel=KERNEL, tile=tile, device="gpu")
    setup = time.perf_counter() - t0
    V = np.random.default_rng(0).standard_normal((n, b))
    t0 = time.perf_counter()
    op.matmat(V)  # warm-up (CuPy compiles its kernels on first use; memory: builds the tiles)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        op.matmat(V)
    sec = (time.perf_counter() - t0) / repeats
    op.close()
    entries = n * (n + tile) / 2  # upper tiles, diagonal ones whole
    print(f"N={n} tile {tile} b={b} {op.mode}: {sec:.3f} s a pass ({entries / sec / 1e9:.2f} G "
          f"kernel entries/s), first pass {first:.2f} s, operator set-up {setup:.1f} s, "
          f"{op.cached_bytes / 1e9:.1f} GB kept on the GPU", flush=True)
    return sec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="20000,50000")
    p.add_argument("--pass-n", type=int, default=100000)
    p.add_argument("--tile-n", type=int, default=50000, help="N at which tiles are compared")
    p.add_argument("--tiles", default="4096,8192,16384", help="tiles to compare ('' = 4096)")
    p.add_argument("--memory-pass-n", type=int, default=50000,
                   help="N at which a pass of the GPU memory operator is timed (0: skip)")
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="ntkdist-gpu-"))
    args = p.parse_args()
    with connect(device="gpu") as client:
        n = 6000
        X = synthetic_rows("gaussian", 64, 3, 0, n)
        op = make_operator(client, "auto", rows=X, kernel=KERNEL, tile=2048, device="gpu")
        print(f"workers: {op.gpus}", flush=True)
        V = np.random.default_rng(1).standard_normal((n, 8))
        Y = op.matmat(V)
        ref = ntk(X, depth=3) @ V
        print(f"N={n} gaussian d=64 L=3: GPU product vs CPU dense float64: max |diff| / max |KV| "
              f"= {np.abs(Y - ref).max() / np.abs(ref).max():.1e}", flush=True)
        op.close()
        tiles = [int(t) for t in args.tiles.split(",") if t and int(t) <= args.tile_n]
        times = {t: pass_seconds(client, args.tile_n, t) for t in tiles} or {4096: 0}
        tile = min(times, key=times.get)
        if args.memory_pass_n:
            pass_seconds(client, args.memory_pass_n, tile, repeats=10, mode="memory")
            for w, (name, free, total) in client.run(gpu_info).items():
                print(f"after close(): {name} has {free / 1e9:.1f} of {total / 1e9:.1f} GB "
                      f"free (CuPy's pool included)", flush=True)
    for n in [int(s) for s in args.sizes.split(",") if s]:
        out = os.path.join(args.out, f"run-{n}")
        t0 = time.perf_counter()
        code = cli(["run", "--data", "sphere", "--n", str(n), "--d", "64", "--depth", "3",
                    "--seed", "0", "--method", "davidson", "--device", "gpu", "--tile",
                    str(tile), "--out", out])
        wall = time.perf_counter() - t0
        if code != 0:
            print(f"N={n}: run failed ({code})", flush=True)
            continue
        r = json.load(open(os.path.join(out, "result.json")))
        print(f"N={n} davidson on GPU ({r['operator']}), tile {tile}: "
              f"λ_min = {r['lambda_min']:.10f}, "
              f"passes {r['passes']}, ‖r‖ = {r['residual_norm']:.2e}, certified "
              f"{r['relative_accuracy_kato_temple']:.1e} (Kato–Temple), solver "
              f"{r['solver_seconds']:.1f} s ({r['solver_seconds'] / r['passes']:.3f} s a pass), "
              f"preconditioner set-up {r['preconditioner']['setup_seconds']:.1f} s, whole run "
              f"{wall:.1f} s, converged {r['converged']}", flush=True)
    if args.pass_n:
        with connect(device="gpu") as client:
            pass_seconds(client, args.pass_n, tile)


if __name__ == "__main__":
    main()
