"""λ_min solvers side by side, the float32-storage effect, and a solve from a large store.

    python benchmarks/solver.py side-by-side --n 20000     # dense eigh, scipy lobpcg, ntkdist
    python benchmarks/solver.py dtypes --n 10000           # float32 vs float64 storage
    python benchmarks/solver.py store --store PATH.zarr     # e.g. the N=100000 assembly store
    python benchmarks/solver.py pieces --n 20000           # preconditioner and thin GEMMs
    python benchmarks/solver.py mixed --n 20000            # what mixed precision does
    python benchmarks/solver.py strips                     # a tile's products; round trips
    python benchmarks/solver.py profile --n 20000          # where a mixed solve's time goes
    python benchmarks/solver.py passes --store PATH.zarr    # float64 and fast passes over it

All on sphere data, d = 64, L = 3, seed 0, a LocalCluster of 2 single-threaded workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla

from ntkdist.assemble import assemble
from ntkdist.cluster import connect
from ntkdist.data import synthetic_rows
from ntkdist.operator import make_operator
from ntkdist.solvers.driver import smallest_eigenpairs
from ntkdist.solvers.precond import make_preconditioner
from ntkdist.spec import make_spec, make_store_spec
from ntkdist.store import KernelStore


def ntkdist_solve(client, store, mode, precond_name, X, depth=3, tol=1e-8, max_products=600,
                  block=None, log=None, method="lobpcg", budget=None, precision="float64"):
    """Wall time from the operator's creation (memory: includes loading the tiles, and with
    mixed precision making their float32 deflated copies) to the certified result."""
    t0 = time.perf_counter()
    op = make_operator(client, mode, store=store, precision=precision)
    t_op = time.perf_counter() - t0
    P = make_preconditioner(precond_name, X, depth, "ntk", "paper")
    # With a wall-clock budget: stop iterating a minute early, in time for the last
    # iteration and the final residual product (~2 passes at N = 100000).
    left = None if budget is None else budget - (time.perf_counter() - t0) - 60.0
    sol = smallest_eigenpairs(op.matmat, len(X), method, tol=tol, precond=P.apply,
                              block=block, max_products=max_products, scale=depth * X.shape[1],
                              log=log, max_seconds=left,
                              fast_matmat=op.matmat_fast if op.mixed else None)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "lambda": float(sol.values[0]), "passes": op.passes,
           "matvecs": op.matvecs, "residual": float(sol.residuals[0]),
           "bound": sol.certificate()["rel_error_bound_kato_temple"][0],
           "converged": sol.converged, "setup": P.setup_seconds, "bytes": op.bytes_read,
           "operator_setup": t_op, "passes_float32": op.passes_fast, **op.describe()}
    op.close()
    return out


def build_store(client, folder, n, dtype, tile=4096):
    path = os.path.join(folder, f"k{n}-{dtype}.zarr")
    spec = make_store_spec(make_spec(data="sphere", n=n, d=64, depth=3, seed=0), tile, dtype)
    assemble(spec, path, client, progress=False)
    return path


def side_by_side(args):
    folder = tempfile.mkdtemp(prefix="ntkdist-solver-")
    X = synthetic_rows("sphere", 64, 0, 0, args.n)
    rows = []
    with connect(workers=2) as client:
        t0 = time.perf_counter()
        store = build_store(client, folder, args.n, "float64")
        print(f"store assembled in {time.perf_counter() - t0:.1f} s")
        runs = [("davidson", "memory", "harmonic", 16, "mixed"),
                ("davidson", "memory", "harmonic", None, "mixed"),
                ("lobpcg", "memory", "harmonic", None, "mixed"),
                ("davidson", "memory", "harmonic", 16, "float64"),
                ("davidson", "memory", "harmonic", None, "float64"),
                ("lobpcg", "memory", "harmonic", None, "float64"),
                ("lobpcg", "store", "harmonic", None, "float64"),
                ("davidson", "store", "harmonic", None, "float64"),
                ("lobpcg", "memory", "nystrom:1000", None, "float64"),
                ("lobpcg", "memory", "none", None, "float64")]
        if args.block16_only:  # the fastest pair only (a repeat of the headline figure)
            runs = [r for r in runs if r[:4] == ("davidson", "memory", "harmonic", 16)]
        for method, mode, pc, block, precision in runs:
            cap = {"none": 100, "nystrom:1000": 300}.get(pc, 600)
            block = block or args.block
            r = ntkdist_solve(client, store, mode, pc, X, max_products=cap, method=method,
                              block=block, precision=precision)
            rows.append((f"ntkdist {method}, {mode}, {pc}, {precision}"
                         + (f", block {block}" if block else ""), r))
            print(rows[-1], flush=True)
    K = KernelStore.open(store)
    from ntkdist import open_kernel

    Kd = np.asarray(open_kernel(store).compute(scheduler="threads"))
    shutil.rmtree(folder)
    del K
    t0 = time.perf_counter()
    w = scipy.linalg.eigh(Kd, subset_by_index=[0, 0], eigvals_only=True)
    t_dense = time.perf_counter() - t0
    rows.insert(0, ("dense scipy.linalg.eigh subset [0,0]", {"seconds": t_dense, "lambda": float(w[0]),
                                                           "passes": None, "matvecs": None}))
    print(rows[0], flush=True)
    count = [0]

    def mv(V):
        count[0] += V.shape[1] if V.ndim == 2 else 1
        return Kd @ V

    op = sla.LinearOperator(Kd.shape, matvec=mv, matmat=mv, dtype=np.float64)
    t0 = time.perf_counter()
    vals, _ = sla.lobpcg(op, np.random.default_rng(0).standard_normal((args.n, 1)), largest=False,
                         tol=1e-8 * w[0], maxiter=args.scipy_cap)
    rows.insert(1, (f"scipy lobpcg, no precond, block 1, capped {args.scipy_cap}",
                    {"seconds": time.perf_counter() - t0, "lambda": float(vals[0]),
                     "passes": count[0], "matvecs": count[0]}))
    print(f"\nN={args.n} d=64 L=3 sphere seed 0; dense λ_min = {w[0]:.12g}")
    print(f"{'method':55s} {'seconds':>8s} {'passes':>7s} {'fp32':>5s} {'matvecs':>8s} "
          f"{'rel err':>9s} {'speed-up':>9s} {'KT bound':>9s}")
    for name, r in rows:
        err = abs(r["lambda"] - w[0]) / w[0]
        print(f"{name:55s} {r['seconds']:8.1f} {str(r['passes']):>7s} "
              f"{str(r.get('passes_float32', '-')):>5s} {str(r['matvecs']):>8s} "
              f"{err:9.1e} {t_dense / r['seconds']:8.1f}x {_fmt(r.get('bound')):>9s}")


def _fmt(value):
    return "-" if value is None else f"{value:.1e}"


def dtypes(args):
    folder = tempfile.mkdtemp(prefix="ntkdist-dtypes-")
    X = synthetic_rows("sphere", 64, 0, 0, args.n)
    out = {}
    with connect(workers=2) as client:
        for dtype in ("float64", "float32"):
            store = build_store(client, folder, args.n, dtype)
            out[dtype] = ntkdist_solve(client, store, "memory", "harmonic", X, tol=1e-10)
            print(dtype, out[dtype], flush=True)
    shutil.rmtree(folder)
    a, b = out["float64"]["lambda"], out["float32"]["lambda"]
    print(f"N={args.n}: λ_min float64 storage {a:.12g}, float32 storage {b:.12g}, "
          f"relative difference {abs(a - b) / a:.2e}")


def from_store(args):
    X = KernelStore.open(args.store).array("X")[:]
    with connect(workers=2) as client:
        r = ntkdist_solve(client, args.store, args.operator, "harmonic", X,
                          max_products=args.max_products, block=args.block, method=args.method,
                          tol=args.tol, budget=args.budget,
                          log=lambda m: print(m, flush=True))
    per_pass = (r["seconds"] - r["operator_setup"]) / r["passes"]
    gb = r["streamed_bytes_per_pass"] / 1e9
    print(f"N={len(X)}: λ_min = {r['lambda']:.12g}, residual {r['residual']:.2e}, Kato-Temple "
          f"rel. bound {r['bound']}, converged {r['converged']}, passes {r['passes']}, "
          f"matvecs {r['matvecs']}, wall {r['seconds']:.0f} s (operator set-up "
          f"{r['operator_setup']:.0f} s: {r['cached_bytes'] / 1e9:.2f} GB of "
          f"{r['tile_bytes'] / 1e9:.2f} GB kept in worker memory), {per_pass:.1f} s per pass "
          f"streaming {gb:.2f} GB ({gb / per_pass:.2f} GB/s)")


def pieces(args):
    """The client-side pieces of a pass and the thin products, one BLAS thread unless said."""
    from threadpoolctl import threadpool_limits

    from ntkdist.kernels.limiting import row_block
    from ntkdist.solvers.precond import _sym_square_features

    def best(f, repeat=3):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    X = synthetic_rows("sphere", 64, 0, 0, args.n)
    UT = np.ascontiguousarray(row_block(X).unit.T)
    print(f"N={args.n}: degree-2 features by rows (client, all threads): "
          f"{best(lambda: _sym_square_features(UT)):.3f} s")
    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    print(f"harmonic set-up {P.setup_seconds:.2f} s (rank {P.rank})")
    rng = np.random.default_rng(0)
    for b in (16, 32):
        R = rng.standard_normal((args.n, b))
        print(f"harmonic application, b={b}: {best(lambda: P.apply(R)):.3f} s")
    t = 4096
    K = rng.standard_normal((t, t))
    with threadpool_limits(1):
        A = rng.standard_normal((2048, 2048))
        sq = best(lambda: A @ A)
        A32 = A.astype(np.float32)
        sq32 = best(lambda: A32 @ A32)
        print(f"one core, square 2048 GEMM: float64 {2 * 2048 ** 3 / sq / 1e9:.1f} GFLOP/s, "
              f"float32 {2 * 2048 ** 3 / sq32 / 1e9:.1f} GFLOP/s")
        for b in (8, 16, 32, 64):
            V = rng.standard_normal((b, t))
            s1, s2 = best(lambda: V @ K), best(lambda: V @ K.T)
            print(f"one core, b={b}: Vᵀ·K {2 * b * t * t / s1 / 1e9:.1f} GFLOP/s, "
                  f"Vᵀ·Kᵀ {2 * b * t * t / s2 / 1e9:.1f} GFLOP/s")


def mixed(args):
    """Mixed precision at N: how much the deflation shrinks the entries, the error of a fast
    product (plain float32, shifted by the mean entry, deflated), in-process Davidson
    (block 16) with float64, plain float32, shifted and deflated float32 products, and the
    distributed memory operator's passes in float32 and float64."""
    from ntkdist.kernels.limiting import kernel_tile, row_block
    from ntkdist.kernels.taylor import deflation_factor
    from ntkdist.solvers.davidson import davidson_smallest

    n, b = args.n, 16
    X = synthetic_rows("sphere", 64, 0, 0, n)
    K = np.empty((n, n))
    whole = row_block(X)
    for i in range(0, n, 4096):
        K[i:i + 4096] = kernel_tile(row_block(X[i:i + 4096]), whole, 3, "ntk", "paper")
    K = (K + K.T) / 2
    F = deflation_factor(X, 3, "ntk", "paper")
    R32 = (K - F @ F.T).astype(np.float32)
    K32 = K.astype(np.float32)
    m = min(n, 2000)
    upper = np.triu_indices(m, 1)
    rms = lambda A: float(np.sqrt(np.mean(np.asarray(A[:m, :m][upper], dtype=np.float64) ** 2)))
    print(f"N={n}: off-diagonal r.m.s. of K {rms(K):.3g}, of K − FFᵀ {rms(R32):.3g} "
          f"(first {m} rows)")

    count = [0]

    def exact(V):
        count[0] += 1
        return K @ V

    def fast(V):
        return (R32 @ V.astype(np.float32)).astype(np.float64) + F @ (F.T @ V)

    def plain(V):
        return (K32 @ V.astype(np.float32)).astype(np.float64)

    P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
    scale = float(np.trace(K)) / n
    t0 = time.perf_counter()
    ref = smallest_eigenpairs(exact, n, "davidson", block=b, precond=P.apply, scale=scale)
    t_ref, products = time.perf_counter() - t0, count[0]
    t0 = time.perf_counter()
    two = smallest_eigenpairs(exact, n, "davidson", block=b, precond=P.apply, scale=scale,
                              fast_matmat=fast)
    t_two = time.perf_counter() - t0
    lam = ref.values[0]
    print(f"in process, Davidson block {b}, tol 1e-8: float64 products {t_ref:.1f} s, "
          f"{products} products, λ = {lam:.12g}; mixed {t_two:.1f} s, phases "
          f"{[(p['products'], p['passes'], p['stopped']) for p in two.phases]}, λ differs by "
          f"{abs(two.values[0] - lam) / lam:.1e} relative, certified "
          f"{two.certificate()['rel_error_bound_kato_temple'][0]:.1e}")
    last = (n - 1) // 4096 * 4096  # c as the operator takes it: tile (0, last) of 4096²
    c = np.float32(np.mean(K32[:4096, last:], dtype=np.float64))
    R0 = (K - float(c)).astype(np.float32)  # K − c rounded once, as from a float64 store

    def shifted_fast(V, R=R0):
        return (R @ V.astype(np.float32)).astype(np.float64) + float(c) * V.sum(axis=0)

    for name, f in (("plain float32", plain), ("shifted float32", shifted_fast)):
        r = davidson_smallest(f, n, block=b, precond=P.apply, tol=1e-8, max_products=400,
                              stall=10)
        v = r.vectors[:, :1]
        print(f"{name} products: stopped after {r.products} products "
              f"({'stalled' if r.stalled else 'converged' if r.converged else 'limit'}) at "
              f"‖r‖ = {r.residuals[0]:.2e}, λ_1 off by {abs(r.values[0] - lam) / lam:.1e}, its "
              f"float64 Rayleigh quotient off by "
              f"{abs(float((v.T @ K @ v)[0, 0]) - lam) / lam:.1e}")
    V = np.linalg.qr(np.random.default_rng(2).standard_normal((n, 32)))[0]
    KV = K @ V
    shifted = shifted_fast(V)
    del R0, shifted_fast
    col = lambda Y: np.linalg.norm(Y - KV, axis=0).max()
    print(f"a random orthonormal N × 32 block, largest column error of K·V: plain float32 "
          f"{col(plain(V)):.2e}, shifted by the mean entry c = {c:.4g} {col(shifted):.2e}, "
          f"deflated {col(fast(V)):.2e}")
    v = ref.vectors[:, :1]
    w = np.random.default_rng(1).standard_normal((n, 1))
    w /= np.linalg.norm(w)
    for name, u in (("converged eigenvector", v), ("random unit vector", w)):
        Ku = K @ u
        stored = R32.astype(np.float64) @ u + F @ (F.T @ u)  # float32 values, float64 sums
        print(f"{name}: ‖fast·u − K·u‖ = {np.linalg.norm(fast(u) - Ku):.2e} (deflated), "
              f"{np.linalg.norm(plain(u) - Ku):.2e} (plain float32); the deflated copy's "
              f"rounding alone (float64 arithmetic) {np.linalg.norm(stored - Ku):.2e}")
    del K, K32, R32
    folder = tempfile.mkdtemp(prefix="ntkdist-mixed-")
    try:
        with connect(workers=2) as client:
            store = build_store(client, folder, n, "float64")
            for precision in ("float64", "mixed"):
                t0 = time.perf_counter()
                op = make_operator(client, "memory", store=store, precision=precision)
                setup = time.perf_counter() - t0
                V = np.random.default_rng(0).standard_normal((n, b))
                for f in ([op.matmat, op.matmat_fast] if op.mixed else [op.matmat]):
                    f(V)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        f(V)
                    print(f"memory operator ({precision}, set-up {setup:.1f} s): "
                          f"{'float32' if f == op.matmat_fast else 'float64'} pass "
                          f"{(time.perf_counter() - t0) / 10:.3f} s at b = {b}")
                op.close()
            VT = np.ascontiguousarray(V.T)
            ws = sorted(client.scheduler_info()["workers"])
            t0 = time.perf_counter()
            for _ in range(20):
                Vf = client.scatter(VT, broadcast=True, hash=False)
                futs = [client.submit(np.zeros_like, Vf, workers=[w], pure=False) for w in ws]
                sum(f.result() for f in futs)
            print(f"Dask round trip of a pass (scatter Vᵀ, a no-op task per worker, results "
                  f"back): {(time.perf_counter() - t0) / 20:.3f} s")
    finally:
        shutil.rmtree(folder)


def _timed(f, repeats):
    f()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t0) / repeats * 1e3


def _widened_with_temporaries(tile, vi, vj, strip=256):
    """The widening loop as it was before 2026-11-26's fifth session: a fresh product array
    per strip (each a new mmap in a Dask worker, whose malloc trim threshold is set)."""
    buf = np.empty((strip, tile.shape[1]))
    yi = np.empty((vj.shape[0], tile.shape[0]))
    yj = np.zeros((vi.shape[0], tile.shape[1]))
    for a in range(0, tile.shape[0], strip):
        s = buf[:min(strip, tile.shape[0] - a)]
        np.copyto(s, tile[a:a + strip])
        yi[:, a:a + strip] = vj @ s.T
        yj += vi[:, a:a + strip] @ s
    return yi, yj


def _fused_with_temporaries(tile, vi, vj, strip):
    """The fused loop as first written: a fresh product array per strip."""
    yi = np.empty((vj.shape[0], tile.shape[0]), dtype=tile.dtype)
    yj = np.zeros((vi.shape[0], tile.shape[1]), dtype=tile.dtype)
    for a in range(0, tile.shape[0], strip):
        s = tile[a:a + strip]
        yi[:, a:a + strip] = vj @ s.T
        yj += vi[:, a:a + strip] @ s
    return yi, yj


def _time_tile_products(t, b, repeats=10):
    """On one worker (one core), ms for one off-diagonal t×t tile's two products
    (K_IJ·V_J, K_IJᵀ·V_I): float32 and float64 tiles with V of their dtype as two whole-tile
    GEMMs, fused strip by strip (``_fused``) and fused with a fresh product per strip; a
    float32 tile with float64 V (widened strip
    by strip, ``_products``) against the same loop with a fresh product per strip; the
    shifted float32 products of mixed precision (``_shifted``) of both, by strips of 64 to
    512 rows."""
    from threadpoolctl import threadpool_limits

    from ntkdist.operator import FUSED_STRIP, _fused, _products
    from ntkdist.operator.tasks import _shifted

    rng = np.random.default_rng(0)
    out = {}
    with threadpool_limits(1):
        for dtype in ("float32", "float64"):
            tile = rng.standard_normal((t, t)).astype(dtype)
            vi, vj = (rng.standard_normal((b, t)).astype(dtype) for _ in range(2))
            out[dtype, "read"] = _timed(lambda: tile.sum(), repeats)
            out[dtype, "two GEMMs"] = _timed(lambda: (vj @ tile.T, vi @ tile), repeats)
            out[dtype, "fused"] = _timed(lambda: _fused(tile, vi, vj, FUSED_STRIP), repeats)
            out[dtype, "fused, temporaries"] = _timed(
                lambda: _fused_with_temporaries(tile, vi, vj, FUSED_STRIP), repeats)
            vi32, vj32 = vi.astype(np.float32), vj.astype(np.float32)
            for rows in (64, 128, 256, 512):
                buf = np.empty((rows, t), dtype=np.float32)
                out[dtype, f"shifted {rows}"] = _timed(
                    lambda: _shifted(tile, vi32, vj32, np.float32(0.5), rows, buf), repeats)
        tile = rng.standard_normal((t, t)).astype(np.float32)
        VT = rng.standard_normal((b, 2 * t))
        out["widened", "per-strip temporaries"] = _timed(
            lambda: _widened_with_temporaries(tile, VT[:, :t], VT[:, t:]), repeats)
        out["widened", "_products"] = _timed(lambda: _products(tile, VT, 0, 1, t), repeats)
    return out


def _round_trips(client, n, b, repeats=20):
    """Seconds of Dask's round trip of a pass: Vᵀ (b×N) to every worker, a no-op task there
    returning a block of Vᵀ's size and dtype, the blocks summed on the client."""
    ws = sorted(client.scheduler_info()["workers"])
    out = {}
    for dtype in ("float64", "float32"):
        VT = np.random.default_rng(0).standard_normal((b, n)).astype(dtype)
        for how in ("scattered", "inside the task"):
            t0 = time.perf_counter()
            for _ in range(repeats):
                Vf = client.scatter(VT, broadcast=True, hash=False) if how == "scattered" else VT
                futs = [client.submit(np.zeros_like, Vf, workers=[w], pure=False) for w in ws]
                sum(f.result() for f in futs)
            out[dtype, how] = (time.perf_counter() - t0) / repeats
    return out


def strips(args):
    """Per-tile product variants on every worker of a 2-worker LocalCluster at once (both
    cores busy, as in a pass), and Dask's round trip of a pass by dtype and transport."""
    with connect(workers=2) as client:
        for b in (16, 32):
            res = client.run(_time_tile_products, args.tile, b)
            for w, r in sorted(res.items()):
                for kind in ("float32", "float64"):
                    gb = args.tile ** 2 * np.dtype(kind).itemsize / 1e9
                    gflop = 4 * b * args.tile ** 2 / 1e9
                    print(f"b = {b}, {kind} tile {args.tile}², worker {w[-5:]}: read (sum) "
                          f"{r[kind, 'read']:.1f} ms ({gb / r[kind, 'read'] * 1e3:.1f} GB/s), "
                          f"two GEMMs {r[kind, 'two GEMMs']:.1f} ms "
                          f"({gflop / r[kind, 'two GEMMs'] * 1e3:.0f} GFLOP/s), fused "
                          f"{r[kind, 'fused']:.1f} ms ({r[kind, 'two GEMMs'] / r[kind, 'fused']:.2f}×), "
                          f"fused with a fresh product per strip "
                          f"{r[kind, 'fused, temporaries']:.1f} ms; shifted float32 products "
                          f"by strips of 64/128/256/512 rows " + "/".join(
                              f"{r[kind, f'shifted {m}']:.1f}" for m in (64, 128, 256, 512))
                          + " ms")
                print(f"b = {b}, float32 tile widened for float64 V, worker {w[-5:]}: "
                      f"per-strip temporaries {r['widened', 'per-strip temporaries']:.1f} ms, "
                      f"preallocated (_products) {r['widened', '_products']:.1f} ms")
        for (dtype, how), sec in _round_trips(client, args.n, 16).items():
            print(f"Dask round trip, N = {args.n}, b = 16, {dtype} Vᵀ and blocks, Vᵀ {how}: "
                  f"{sec * 1e3:.1f} ms")


def profile(args):
    """Where the time of one mixed-precision solve goes (Davidson block 16, memory operator,
    float64 store at N): operator and preconditioner set-up, the float32 and float64 passes
    on the client's clock and the workers' task time, the preconditioner's applications, and
    the rest (Davidson's algebra)."""
    from distributed import get_task_stream

    folder = tempfile.mkdtemp(prefix="ntkdist-profile-")
    X = synthetic_rows("sphere", 64, 0, 0, args.n)
    try:
        with connect(workers=2) as client:
            store = build_store(client, folder, args.n, "float64")
            t0 = time.perf_counter()
            op = make_operator(client, "memory", store=store, precision="mixed")
            t_op = time.perf_counter() - t0
            P = make_preconditioner("harmonic", X, 3, "ntk", "paper")
            spent = {"preconditioner": 0.0, "float32 passes": 0.0, "float64 passes": 0.0}

            def timed(name, f):
                def g(V):
                    t = time.perf_counter()
                    out = f(V)
                    spent[name] += time.perf_counter() - t
                    return out
                return g
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                sol = smallest_eigenpairs(timed("float64 passes", op.matmat), args.n,
                                          "davidson", block=16, scale=3.0 * 64,  # tr K / N
                                          precond=timed("preconditioner", P.apply),
                                          fast_matmat=timed("float32 passes", op.matmat_fast))
                total = time.perf_counter() - t0
            tasks = [s["stop"] - s["start"] for t in ts.data for s in t["startstops"]
                     if s["action"] == "compute" and "pass_on_worker" in str(t["key"])]
            op.close()
    finally:
        shutil.rmtree(folder)
    fast = sol.phases[0]["passes"]
    slow = op.passes - fast
    print(f"N={args.n}, Davidson block 16, mixed: operator set-up {t_op:.1f} s, "
          f"preconditioner set-up {P.setup_seconds:.1f} s, solve {total:.1f} s")
    print(f"  {fast} float32 passes {spent['float32 passes']:.1f} s "
          f"({spent['float32 passes'] / fast:.3f} s each); {slow} float64 passes "
          f"{spent['float64 passes']:.1f} s; workers' pass tasks {np.mean(tasks):.3f} s each "
          f"(mean over {len(tasks)} tasks of both workers)")
    iters = sol.iterations
    rest = total - sum(spent.values())
    print(f"  preconditioner {spent['preconditioner']:.1f} s "
          f"({spent['preconditioner'] / iters * 1e3:.0f} ms an iteration); the rest (Davidson's "
          f"algebra) {rest:.1f} s ({rest / iters * 1e3:.0f} ms an iteration), {iters} iterations")


def passes(args):
    """The auto operator over a complete store, as a run builds it (precision auto): seconds
    of its float64 passes and of its fast (float32) passes at b = 32, alternated, and the
    largest column error of a fast product against the float64 one."""
    with connect(workers=2) as client:
        t0 = time.perf_counter()
        op = make_operator(client, "auto", store=args.store, precision="auto")
        print(f"operator {op.mode}, fast products {op.fast_kind or 'none'}: set-up "
              f"{time.perf_counter() - t0:.1f} s, {op.cached_bytes / 1e9:.2f} GB kept in "
              f"worker memory, {op.streamed_bytes_per_pass / 1e9:.2f} GB streamed a pass")
        V = np.linalg.qr(np.random.default_rng(0).standard_normal((op.n, 32)))[0]
        products = [("float64", op.matmat)] + ([("fast", op.matmat_fast)] if op.mixed else [])
        exact = None
        for _ in range(2):
            for name, f in products:
                seconds = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    Y = f(V)
                    seconds.append(time.perf_counter() - t0)
                print(f"{name} passes: " + ", ".join(f"{x:.2f}" for x in seconds) + " s")
                if name == "float64":
                    exact = Y
                else:
                    err = np.linalg.norm(Y - exact, axis=0).max()
                    size = np.linalg.norm(exact, axis=0).min()
                    print(f"fast product's largest column error {err:.2e} (smallest column "
                          f"norm of K·V {size:.4g})")
        op.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("side-by-side")
    s.add_argument("--n", type=int, default=20000)
    s.add_argument("--scipy-cap", type=int, default=300)
    s.add_argument("--block", type=int, default=None)
    s.add_argument("--block16-only", action="store_true",
                   help="only Davidson block 16, mixed and float64 (and the dense reference)")
    t = sub.add_parser("dtypes")
    t.add_argument("--n", type=int, default=10000)
    f = sub.add_parser("store")
    f.add_argument("--store", required=True)
    f.add_argument("--max-products", type=int, default=600)
    f.add_argument("--operator", default="auto", choices=["auto", "store"])
    f.add_argument("--block", type=int, default=None)
    f.add_argument("--method", default="lobpcg", choices=["lobpcg", "davidson"])
    f.add_argument("--tol", type=float, default=1e-8)
    f.add_argument("--budget", type=float, default=None,
                   help="wall-clock seconds for the whole solve (stop iterating in time)")
    q = sub.add_parser("pieces")
    q.add_argument("--n", type=int, default=20000)
    x = sub.add_parser("mixed")
    x.add_argument("--n", type=int, default=20000)
    r = sub.add_parser("strips")
    r.add_argument("--tile", type=int, default=4096)
    r.add_argument("--n", type=int, default=20000)
    o = sub.add_parser("profile")
    o.add_argument("--n", type=int, default=20000)
    a = sub.add_parser("passes")
    a.add_argument("--store", required=True)
    a.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    {"side-by-side": side_by_side, "dtypes": dtypes, "store": from_store,
     "pieces": pieces, "mixed": mixed, "strips": strips, "profile": profile,
     "passes": passes}[args.what](args)


if __name__ == "__main__":
    main()
