"""Check the tile function on a GPU (CuPy: the fused CUDA kernel, and the array-module path)
against the 50-digit reference and NumPy, and time both.

    PYTHONPATH=. python scripts/gpu_check.py [--n 20000] [--d 64] [--depth 3]
"""

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, "tests")
from reference import hard_rows, paper_kernel  # noqa: E402

from ntkdist.data import synthetic_rows  # noqa: E402
from ntkdist.kernels.limiting import kernel_tile, row_block  # noqa: E402


def main():
    import cupy as cp

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    args = p.parse_args()
    from ntkdist.kernels import fused_cuda

    print(f"fused CUDA kernel: {fused_cuda.status(cp)}")
    paths = (None, False) if fused_cuda.ready(cp) else (False,)
    X = hard_rows(np.random.default_rng(1))
    for depth in (1, 2, 3, 5):
        for kernel in ("ntk", "nngp"):
            R = paper_kernel(X, depth, kernel)
            A = row_block(cp.asarray(X))
            scale = np.sqrt(np.outer(np.diag(R), np.diag(R)))
            for fused in paths:
                K = cp.asnumpy(kernel_tile(A, A, depth, kernel, fused=fused))
                label = "fused" if fused is None else "array-module"
                print(f"hard rows depth {depth} {kernel} ({label}): max err / sqrt(KiiKjj) = "
                      f"{np.max(np.abs(K - R) / scale):.1e}")
    X = synthetic_rows("sphere", args.d, 0, 0, args.n)
    Ag = row_block(cp.asarray(X))
    Kc = kernel_tile(row_block(X[:2000]), row_block(X[:2000]), args.depth, fused=False)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    for fused in paths:
        kernel_tile(Ag, Ag, args.depth, fused=fused)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        Kg = kernel_tile(Ag, Ag, args.depth, fused=fused)
        cp.cuda.Device().synchronize()
        sec = time.perf_counter() - t0
        err = float(np.max(np.abs(cp.asnumpy(Kg[:2000, :2000]) - Kc)) / Kc.max())
        del Kg
        label = "fused" if fused is None else "array-module"
        print(f"N={args.n} d={args.d} L={args.depth} ({label}): one {args.n}x{args.n} tile "
              f"on the GPU in {sec:.3f} s = {args.n ** 2 / sec / 1e6:.0f} M entries/s; max rel "
              f"diff to NumPy common path {err:.1e}; device {name}")


if __name__ == "__main__":
    main()
