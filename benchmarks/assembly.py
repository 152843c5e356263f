"""Distributed assembly into a Zarr store: throughput, the machine's floor, peak RSS, disk.

    python benchmarks/assembly.py --n 20000            # beside in-memory NumPy and neural-tangents
    python benchmarks/assembly.py --n 100000 --no-peers --dtype float32

Runs ``ntkdist.assemble`` on a fresh LocalCluster of ``--workers`` processes (one thread
each), sampling the resident memory of every process (client with its scheduler, nannies,
workers) every 0.2 s. The floor is the slower of (a) the transcendental arithmetic, L−1
arccos per stored entry at NumPy's measured SIMD arccos rate on all cores, and (b) writing the
stored bytes at the measured disk bandwidth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from kernel_throughput import arccos_rate, neural_tangents_run, plain_numpy_tile  # noqa: E402

from ntkdist.assemble import assemble  # noqa: E402
from ntkdist.cluster import connect  # noqa: E402
from ntkdist.data import synthetic_rows  # noqa: E402
from ntkdist.spec import make_spec, make_store_spec  # noqa: E402


class RssSampler(threading.Thread):
    """Peak RSS of this process and all its descendants, per process."""

    def __init__(self, interval=0.2):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.names = interval, {}, {}
        self.stopped = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stopped.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    self.names.setdefault(p.pid, " ".join(p.cmdline()[-2:])[-50:] or p.name())
                except psutil.Error:
                    continue
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
            time.sleep(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()


def disk_write_bandwidth(folder: str, total=2 << 30, block=64 << 20) -> float:
    """Bytes/s of writing ``total`` bytes in ``block`` pieces, fsync included."""
    path = os.path.join(folder, "bandwidth.probe")
    buf = np.random.default_rng(0).bytes(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(total // block):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    os.remove(path)
    return total / seconds


def in_memory_numpy(X, depth, tile):
    n = X.shape[0]
    K = np.empty((n, n))
    t0 = time.perf_counter()
    for a in range(0, n, tile):
        for b in range(0, n, tile):
            K[a:a + tile, b:b + tile] = plain_numpy_tile(X[a:a + tile], X[b:b + tile], depth)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=None, help="where the store goes (default: a temp folder)")
    p.add_argument("--no-peers", action="store_true", help="skip the in-memory peers")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = p.parse_args()

    folder = args.dir or tempfile.mkdtemp(prefix="ntkdist-bench-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"assembly-{args.n}.zarr")
    if os.path.exists(path):
        shutil.rmtree(path)
    bw = disk_write_bandwidth(folder)
    rate = arccos_rate()
    cores = os.cpu_count()

    run = make_spec(data="sphere", n=args.n, d=args.d, depth=args.depth, seed=0)
    spec = make_store_spec(run, args.tile, args.dtype)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    with connect(workers=args.workers) as client:
        t_cluster = time.perf_counter() - t0
        report = assemble(spec, path, client)
    wall = time.perf_counter() - t0
    sampler.stop()
    b = spec.blocks
    stored_entries = sum(min(spec.tile, args.n - i * spec.tile) * min(spec.tile, args.n - j * spec.tile)
                         for i in range(b) for j in range(i, b))
    disk_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    floor_arith = stored_entries * (args.depth - 1) / (rate * cores)
    floor_disk = disk_bytes / bw
    floor = max(floor_arith, floor_disk)

    rows = [("ntkdist assemble (store, upper tiles)", report["seconds"], stored_entries)]
    if not args.no_peers:
        X = synthetic_rows("sphere", args.d, 0, 0, args.n)
        rows.append(("plain NumPy transcription, in memory", in_memory_numpy(X, args.depth, args.tile),
                     args.n * args.n))
        t_nt, _, note = neural_tangents_run(X, args.depth, 2000)
        if t_nt is not None:
            rows.append((f"{note.split(',')[0]} nt.batch, in memory", t_nt, args.n * args.n))
        else:
            print(note)
    print(f"N={args.n} d={args.d} L={args.depth} tile={spec.tile} {args.dtype}, {args.workers} workers, "
          f"{cores} cores; cluster start {t_cluster:.1f} s, total wall {wall:.1f} s")
    print(f"{'method':44s} {'seconds':>8s} {'entries':>9s} {'M entries/s':>12s} {'N^2/s (M)':>10s}")
    for name, sec, entries in rows:
        print(f"{name:44s} {sec:8.1f} {entries:9.2e} {entries / sec / 1e6:12.1f} "
              f"{args.n ** 2 / sec / 1e6:10.1f}")
    print(f"floor: arithmetic {floor_arith:.1f} s ({args.depth - 1} arccos/entry at {rate / 1e6:.0f} M/s x "
          f"{cores} cores), disk {floor_disk:.1f} s ({disk_bytes / 1e9:.2f} GB at {bw / 1e9:.2f} GB/s); "
          f"ntkdist at {floor / report['seconds']:.2f} of the floor")
    print(f"bytes on disk {disk_bytes / 1e9:.2f} GB; peak RSS per process (GB):")
    for pid, peak in sorted(sampler.peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {pid:>8d} {peak / 1e9:6.2f}  {sampler.names.get(pid, '')}")
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
