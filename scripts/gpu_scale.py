"""The GPU measurements of the large-N work in one call (an estimated 8–10 minutes on an
H200; ``--steps`` splits it), each figure printed as it comes and written to ``--out`` (JSON):

    PYTHONPATH=. python3 scripts/gpu_scale.py --out gpu_scale.json
    PYTHONPATH=. python3 scripts/gpu_scale.py --fake --out /tmp/g.json   # CPU check (stand-in)

1. ``ntkdist run --device gpu --method davidson`` at N = ``--n-end`` (100000): end-to-end
   seconds, passes, certificate (sphere, d = 64, L = 3, seed 0, tol 1e-8).
2. ``--precond shift`` (K − σI formed, factored in float32 and applied on the GPU, σ placed
   by the prediction after a two-pass estimate with the harmonic model) at each N of
   ``--pass-sizes`` and ``--n-end``: end-to-end seconds, passes (the estimate's among them), σ, set-up.
3. Passes to a certified 1e-8 at each N of ``--pass-sizes`` (20000, 50000), Davidson with
   blocks 32 and 128.
4. At N = ``--n-big`` (300000): seconds per pass (b = 128) of the ``auto`` operator, which
   keeps the tiles that fit on the GPU and rebuilds the others, against ``recompute``; the
   tiles kept and their bytes.
5. ``ntkdist bench --quick --device gpu``: the headline and the per-worker rates.
6. Passes to a certified 1e-8 with the harmonic preconditioner's degree-3 features (rank
   47905 at d = 64) built and applied on the GPU in this process, at each N of
   ``--pass-sizes`` and ``--n-end`` (Davidson block 32, tiles kept on the GPU): passes, set-up
   and solve seconds, against step 3's degree ≤ 2 passes.
7. ``--certify cholesky`` on the GPU (K formed in float64 and factorised there) after the
   shift-invert solve at the first N of ``--pass-sizes`` and at ``--n-end``: the proved
   bracket, its width, and the seconds forming K and factorising.

0. (first) The fused GPU tile kernel (:mod:`ntkdist.kernels.fused_cuda`): whether it is in
   use, its entries/s against the array-module path at tiles of 4096 and 8192 (sphere rows,
   d = 64, L = 3), against the GPU's measured float64 GEMM rate and copy bandwidth (16 bytes
   an entry), and its largest difference to the array-module path and to a 50-digit
   evaluation (hard rows).

8. ``big_run``, only when named in ``--steps``: ``ntkdist run --device gpu --method davidson``
   at N = ``--n-big`` (300000) end to end, the tiles that do not fit on the GPU rebuilt every
   pass, stopped (as Ctrl-C stops it) after ``--big-limit`` seconds. It checkpoints into
   ``--big-out`` every 20 s, so the same step run again (on the same machine) resumes there;
   it records the passes and seconds so far, and the result once there is one.

``--steps`` runs some of them (names as in the JSON: fused_tile, end_to_end, shift, passes,
big_passes, bench_quick, degree3_passes, certify, big_run), in that order.

``--fake`` runs every step on the CPU with the CuPy stand-in of tests/fakecupy.py, an
in-process cluster and tiny sizes: it checks the script, not a GPU. Steps that fail print one
line and the script goes on; its exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _cli_run(cli, args, out):
    code = cli(["run", *args, "--out", out])
    if code != 0:
        raise RuntimeError(f"ntkdist run exited {code}")
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def _pass_seconds(client, n, mode, b, repeats, tile):
    from ntkdist.data import synthetic_rows
    from ntkdist.operator import make_operator
    from ntkdist.spec import KernelSpec

    X = synthetic_rows("sphere", 64, 0, 0, n)
    t0 = time.perf_counter()
    op = make_operator(client, mode, rows=X, kernel=KernelSpec("ntk", 3, "paper"), tile=tile,
                       device="gpu")
    setup = time.perf_counter() - t0
    V = np.random.default_rng(0).standard_normal((n, b))
    t0 = time.perf_counter()
    op.matmat(V)  # builds (and keeps what fits of) the tiles
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        op.matmat(V)
    sec = (time.perf_counter() - t0) / repeats
    out = {"n": n, "requested": mode, "mode": op.mode, "block": b, "seconds_per_pass": sec,
           "first_pass_seconds": first, "setup_seconds": setup,
           "tiles_kept": len(op.plan.kept),
           "tiles": sum(len(p) for _, p in op.plan.assignment),
           "kept_bytes": op.plan.cached_bytes,
           "entries_per_s": n * (n + op.tile) / 2 / sec}
    op.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--fake", action="store_true", help="CPU check with the CuPy stand-in")
    p.add_argument("--n-end", type=int, default=100000)
    p.add_argument("--pass-sizes", default="20000,50000")
    p.add_argument("--n-big", type=int, default=300000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", default="",
                   help="comma-separated step names (default: all but big_run)")
    p.add_argument("--big-out", default="results/gpu-big",
                   help="big_run's result folder (a rerun resumes from its checkpoint)")
    p.add_argument("--big-limit", type=int, default=540,
                   help="big_run stops after this many seconds")
    args = p.parse_args()
    if args.fake:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        import fakecupy

        # free GPU memory for part of the N_big tiles only, as on a real GPU at 300000
        sys.modules["cupy"] = fakecupy.module(free=48_000_000)
        sys.modules.update(fakecupy.cupyx_modules())
        args.n_end, args.pass_sizes, args.n_big = 700, "300,600", 1500
    figures, failed = {"fake": args.fake, "date": time.strftime("%Y-%m-%d %H:%M")}, []

    def record(name, value):
        figures[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)

    from distributed import Client, LocalCluster

    from ntkdist.cli import main as cli
    from ntkdist.cluster import connect

    common = ["--data", "sphere", "--d", "64", "--depth", "3", "--seed", "0", "--device", "gpu",
              "--method", "davidson"]
    ctx = (LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                        dashboard_address=None) if args.fake else None)
    with tempfile.TemporaryDirectory() as tmp:
        with (Client(ctx) if ctx else connect(device="gpu")) as client:
            addr = ["--scheduler", client.scheduler.address]
            steps = [
                ("fused_tile", lambda: _fused_tile([512, 1024] if args.fake else [4096, 8192])),
                ("end_to_end", lambda: _end_to_end(cli, common + addr, args.n_end, tmp)),
                ("shift", lambda: _shift(
                    cli, common + addr, [*(int(v) for v in args.pass_sizes.split(",")),
                                         args.n_end], tmp)),
                ("passes", lambda: _passes(cli, common + addr, args.pass_sizes, tmp)),
                ("big_passes", lambda: [
                    _pass_seconds(client, args.n_big, mode, 128, args.repeats,
                                  512 if args.fake else None)
                    for mode in ("auto", "recompute")]),
                ("bench_quick", lambda: _bench(cli, addr, tmp, args.fake)),
                ("degree3_passes", lambda: _degree3_passes(
                    client, [*(int(v) for v in args.pass_sizes.split(",")), args.n_end],
                    16 if args.fake else 64, 512 if args.fake else None)),
                ("certify", lambda: _certify(
                    cli, common + addr, [int(args.pass_sizes.split(",")[0]), args.n_end],
                    tmp)),
                ("big_run", lambda: _big_run(cli, common + addr, args.n_big, args.big_out,
                                             args.big_limit)),
            ]
            wanted = [v for v in args.steps.split(",") if v]
            unknown = set(wanted) - {name for name, _ in steps}
            if unknown:
                print(f"unknown steps: {', '.join(sorted(unknown))}")
                return 2
            for name, step in steps:
                if (name not in wanted) if wanted else name == "big_run":
                    continue
                t0 = time.perf_counter()
                try:
                    value = step()
                except Exception as exc:  # one line, then the next step
                    failed.append(name)
                    value = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                if isinstance(value, dict):
                    value["step_seconds"] = time.perf_counter() - t0
                record(name, value)
        if ctx:
            ctx.close()
    print(f"figures in {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _end_to_end(cli, common, n, tmp):
    t0 = time.perf_counter()
    r = _cli_run(cli, [*common, "--n", str(n)], os.path.join(tmp, f"e{n}"))
    return {"n": n, "seconds": time.perf_counter() - t0, "wall_seconds": r["wall_seconds"],
            "solver_seconds": r["solver_seconds"], "lambda_min": r["lambda_min"],
            "status": r["status"], "relative_accuracy": r["relative_accuracy"],
            "passes": r["passes"], "block": r["block"], "operator": r["operator"]}


def _big_run(cli, common, n, out, limit):
    """``ntkdist run`` at N = n in this process, stopped by SIGALRM (the CLI's Ctrl-C path:
    its checkpoint stays) after ``limit`` seconds: the result, or the passes so far."""
    import signal

    def stop(*_):
        raise KeyboardInterrupt

    result = os.path.join(out, "result.json")
    t0, code, earlier = time.perf_counter(), 0, os.path.exists(result)
    if not earlier:  # a finished run of an earlier call is reported, not rerun
        before = signal.signal(signal.SIGALRM, stop)
        signal.alarm(max(1, limit))
        try:
            code = cli(["run", *common, "--n", str(n), "--checkpoint-every", "20", "--out", out])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, before)
    figures = {"n": n, "exit": code, "seconds_this_call": time.perf_counter() - t0,
               "out": os.path.abspath(out), "from_an_earlier_call": earlier}
    if code == 0 and os.path.exists(result):
        with open(result) as f:
            r = json.load(f)
        figures.update({k: r.get(k) for k in (
            "wall_seconds", "solver_seconds", "lambda_min", "status", "relative_accuracy",
            "passes", "passes_total", "block", "operator", "operator_memory", "resumed")})
        return figures
    ckpt = os.path.join(out, "checkpoint.npz")
    if os.path.exists(ckpt):
        with np.load(ckpt) as f:
            figures.update({"finished": False, "passes_so_far": int(f["products"]),
                            "iterations_so_far": int(f["iterations"]),
                            "lambda_1_so_far": float(f["lambda"])})
    else:
        figures["finished"] = False
    return figures


def _shift(cli, common, sizes, tmp):
    out = {}
    for n in sizes:
        t0 = time.perf_counter()
        r = _cli_run(cli, [*common, "--n", str(n), "--precond", "shift"],
                     os.path.join(tmp, f"s{n}"))
        p = r["preconditioner"]
        out[str(n)] = {"seconds": time.perf_counter() - t0, "wall_seconds": r["wall_seconds"],
                       "solver_seconds": r["solver_seconds"], "passes": r["passes"],
                       "status": r["status"], "lambda_min": r["lambda_min"],
                       "relative_accuracy": r["relative_accuracy"],
                       **{k: p.get(k) for k in ("name", "sigma", "estimate", "estimate_passes",
                                                "estimate_seconds", "setup_seconds",
                                                "form_seconds", "shift_skipped",
                                                "sigma_from", "prediction",
                                                "sigma_tried")}}
        print(f"  shift-invert on the GPU, N = {n}: {json.dumps(out[str(n)])}", flush=True)
    return out


def _timed(fn, repeats=3):
    import cupy as cp

    fn()  # compile, warm up
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / repeats


def _floors(m):
    """The GPU's float64 GEMM rate and copy bandwidth, on m × m arrays."""
    import cupy as cp

    a = cp.ones((m, m), dtype=cp.float64)
    b = cp.zeros((m, m), dtype=cp.float64)

    def copy():
        b[...] = a

    return {"copy_gb_per_s": 2 * a.nbytes / _timed(copy) / 1e9,
            "float64_gemm_tflops": 2.0 * m ** 3 / _timed(lambda: a @ a) / 1e12}


def _fused_tile(sizes):
    import cupy as cp

    from ntkdist.data import synthetic_rows
    from ntkdist.kernels import fused_cuda
    from ntkdist.kernels.limiting import kernel_tile, row_block

    out = {"status": fused_cuda.status(cp), **_floors(max(sizes))}
    for t in sizes:
        A = row_block(cp.asarray(synthetic_rows("sphere", 64, 0, 0, t)))
        row = {}
        for name, fused in (("fused", True), ("array_module", False)):
            if fused and out["status"] != "in use":
                continue
            sec = _timed(lambda: kernel_tile(A, A, 3, "ntk", "paper", fused=fused))
            row[name] = {"seconds": sec, "entries_per_s": t * t / sec}
        if "fused" in row:
            got = kernel_tile(A, A, 3, fused=True)
            want = kernel_tile(A, A, 3, fused=False)
            row["max_rel_diff"] = float(cp.max(cp.abs(got - want)) / 3.0)  # unit rows: K_ii = 3
            row["speedup"] = row["array_module"]["seconds"] / row["fused"]["seconds"]
            row["of_copy_floor"] = row["fused"]["entries_per_s"] / (out["copy_gb_per_s"] * 1e9 / 16)
        out[str(t)] = row
    try:  # the 50-digit reference of the tests, where mpmath is installed
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from reference import hard_rows, paper_kernel

        X = hard_rows(np.random.default_rng(3))
        R = paper_kernel(X, 3)
        K = cp.asnumpy(kernel_tile(row_block(cp.asarray(X)), row_block(cp.asarray(X)), 3))
        scale = np.sqrt(np.outer(np.diag(R), np.diag(R)))
        out["reference_max_rel_err"] = float(np.max(np.abs(K - R) / scale))
    except ImportError as exc:
        out["reference_max_rel_err"] = f"not run: {exc}"
    return out


def _certify(cli, common, sizes, tmp):
    out = {}
    for n in sizes:
        t0 = time.perf_counter()
        r = _cli_run(cli, [*common, "--n", str(n), "--precond", "shift", "--certify",
                           "cholesky"], os.path.join(tmp, f"c{n}"))
        c = r["certify"]
        width = ((c["upper"] - c["lower"]) / r["lambda_min"]
                 if c.get("lower") and r["lambda_min"] else None)
        out[str(n)] = {"seconds": time.perf_counter() - t0, "wall_seconds": r["wall_seconds"],
                       "lambda_min": r["lambda_min"], "status": r["status"],
                       "relative_accuracy": r["relative_accuracy"], "width_over_lambda": width,
                       "factor_seconds": sum(a["seconds"] for a in c.get("attempts") or []),
                       "certify_status": c["status"], "certify_seconds": c.get("seconds"),
                       **{k: c.get(k) for k in ("device", "lower", "upper", "sigma",
                                                "allowance", "form_seconds", "reason")}}
        print(f"  --certify cholesky on the GPU, N = {n}: {json.dumps(out[str(n)])}",
              flush=True)
    return out


def _passes(cli, common, sizes, tmp):
    out = {}
    for n in (int(v) for v in sizes.split(",")):
        for b in (32, 128):
            r = _cli_run(cli, [*common, "--n", str(n), "--block", str(b)],
                         os.path.join(tmp, f"p{n}-{b}"))
            out[f"{n}/{b}"] = {"passes": r["passes"], "status": r["status"],
                               "lambda_min": r["lambda_min"], "wall_seconds": r["wall_seconds"],
                               "operator": r["operator"]}
    return out


def _degree3_passes(client, sizes, d, tile):
    import cupy

    from ntkdist.bounds import upper_bounds
    from ntkdist.data import synthetic_rows
    from ntkdist.operator import make_operator
    from ntkdist.solvers.driver import smallest_eigenpairs
    from ntkdist.solvers.precond import harmonic
    from ntkdist.spec import KernelSpec

    out = {}
    for n in sizes:
        X = synthetic_rows("sphere", d, 0, 0, n)
        op = make_operator(client, "memory", rows=X, kernel=KernelSpec("ntk", 3, "paper"),
                           tile=tile, device="gpu")
        pre = None
        try:
            t0 = time.perf_counter()
            pre = harmonic(X, 3, "ntk", "paper", xp=cupy, max_rank=50000, max_bytes=1e12)
            setup = time.perf_counter() - t0
            passes = []

            def matmat(V):
                passes.append(1)
                return op.matmat(V)

            t0 = time.perf_counter()
            sol = smallest_eigenpairs(matmat, n, "davidson", k=1, tol=1e-8, block=32,
                                      precond=pre.apply, max_products=600,
                                      scale=upper_bounds(X, 3, "ntk", "paper")[
                                          "upper_trace_over_n"], log=lambda *a: None)
            out[str(n)] = {"passes": len(passes), "status": sol.status,
                           "lambda_min": float(sol.values[0]), "degree": pre.degree,
                           "rank": pre.rank, "setup_seconds": setup,
                           "solve_seconds": time.perf_counter() - t0}
        finally:
            op.close()
            del pre
            cupy.get_default_memory_pool().free_all_blocks()
        print(f"  degree 3 on the GPU, N = {n}: {json.dumps(out[str(n)])}", flush=True)
    return out


def _bench(cli, addr, tmp, fake):
    out = os.path.join(tmp, "bench")
    code = cli(["bench", "--quick", "--device", "gpu", *addr, "--out", out]
               + (["--n", "1024"] if fake else []))
    if code != 0:
        raise RuntimeError(f"ntkdist bench exited {code}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return {"exit": code, "headline": report.get("headline"),
            "workers": report.get("workers"), "passes": report.get("passes")}


if __name__ == "__main__":
    sys.exit(main())
