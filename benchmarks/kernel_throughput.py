"""Kernel entries per second of the tile function, beside a plain NumPy transcription of the
recursion and neural-tangents' ``nt.batch`` kernel (when the ``bench`` extra is installed),
measured in one run on the same data.

    python benchmarks/kernel_throughput.py [--n 20000] [--d 64] [--depth 3] [--tile 4096]

Every method computes the full N×N Gram in float64, tile by tile (neural-tangents in its own
batches) and discards it. Agreement with ntkdist is checked on the first tile.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ntkdist.data import synthetic_rows
from ntkdist.kernels.limiting import kernel_tile, row_block


def plain_numpy_tile(XI, XJ, depth):
    """The textbook recursion with arccos, as a user would write it (docs/theory.md, "Kernels")."""
    G = XI @ XJ.T
    n = np.sqrt(np.sum(XI * XI, 1))[:, None] * np.sqrt(np.sum(XJ * XJ, 1))[None, :]
    K = G.copy()
    for _ in range(2, depth + 1):
        theta = np.arccos(np.clip(G / n, -1.0, 1.0))
        G = n * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / np.pi
        K = K * (np.pi - theta) / np.pi + G
    return K


def time_tiles(X, tile, fn):
    """Seconds to compute every tile of the full Gram with ``fn(I, J)`` and the first tile."""
    n = X.shape[0]
    starts = range(0, n, tile)
    first = None
    t0 = time.perf_counter()
    for a in starts:
        for b in starts:
            out = fn(slice(a, min(n, a + tile)), slice(b, min(n, b + tile)))
            if first is None:
                first = out
    return time.perf_counter() - t0, first


def neural_tangents_run(X, depth, batch):
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import neural_tangents as nt
        from neural_tangents import stax
    except Exception as exc:  # the bench extra is optional
        return None, None, f"neural-tangents unavailable ({type(exc).__name__}: {exc})"
    layers = []
    for _ in range(depth - 1):
        layers += [stax.Dense(1, W_std=np.sqrt(2), b_std=None, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(1, W_std=np.sqrt(2), b_std=None, parameterization="ntk"))
    _, _, kernel_fn = stax.serial(*layers)
    kfn = nt.batch(kernel_fn, batch_size=batch, store_on_device=False)
    Xj = jax.numpy.asarray(X)
    small = np.asarray(kfn(Xj[:batch], Xj[:batch], "ntk"))  # compile outside the timing
    t0 = time.perf_counter()
    K = kfn(Xj, None, "ntk")
    K = np.asarray(K)
    seconds = time.perf_counter() - t0
    d = X.shape[1]
    return seconds, small * (d / 2.0), f"neural-tangents {nt.__version__}, jax {jax.__version__}"


def arccos_rate():
    x = np.random.default_rng(0).uniform(-0.9, 0.9, 1 << 24)
    np.arccos(x)
    t0 = time.perf_counter()
    np.arccos(x)
    return x.size / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--nt-batch", type=int, default=2000)
    p.add_argument("--skip-nt", action="store_true")
    args = p.parse_args()
    X = synthetic_rows("sphere", args.d, 0, 0, args.n)
    entries = args.n * args.n
    blocks = {}

    def ntkdist_tile(I, J):
        if I.start not in blocks:
            blocks[I.start] = row_block(X[I])
        if J.start not in blocks:
            blocks[J.start] = row_block(X[J])
        return kernel_tile(blocks[I.start], blocks[J.start], args.depth)

    kernel_tile(row_block(X[:64]), row_block(X[:64]), args.depth)  # numba JIT outside timing
    rows = []
    t_ours, ref = time_tiles(X, args.tile, ntkdist_tile)
    rows.append(("ntkdist kernel_tile (fused numba)", t_ours, 0.0))
    t_plain, first = time_tiles(X, args.tile, lambda I, J: plain_numpy_tile(X[I], X[J], args.depth))
    rows.append(("plain NumPy transcription", t_plain, float(np.max(np.abs(first - ref)) / ref.max())))
    note = "skipped"
    if not args.skip_nt:
        t_nt, small, note = neural_tangents_run(X, args.depth, args.nt_batch)
        if t_nt is not None:
            b = args.nt_batch
            err = float(np.max(np.abs(small - ref[:b, :b])) / ref.max())
            rows.append(("neural-tangents nt.batch (x64)", t_nt, err))
    rate = arccos_rate()
    cores = os.cpu_count()
    floor = entries * (args.depth - 1) / (rate * cores)
    print(f"N={args.n} d={args.d} L={args.depth} tile={args.tile}; {platform.processor() or platform.machine()},"
          f" {cores} cores; {note}")
    print(f"{'method':40s} {'seconds':>9s} {'M entries/s':>12s} {'vs ntkdist':>11s} {'max rel diff':>13s}")
    for name, sec, err in rows:
        print(f"{name:40s} {sec:9.2f} {entries / sec / 1e6:12.1f} {sec / t_ours:10.2f}x {err:13.1e}")
    print(f"floor: {args.depth - 1} arccos/entry at NumPy's {rate / 1e6:.0f} M/s x {cores} cores "
          f"= {floor:.2f} s; ntkdist at {floor / t_ours:.2f} of it")


if __name__ == "__main__":
    main()
