"""The main job: data → kernel → λ_min → result folder with bounds."""

from __future__ import annotations

import os
import time

import numpy as np

from . import __version__
from .bounds import lambda_min_bounds
from .data import check_rows
from .errors import SpecError
from .kernels.limiting import nngp, ntk
from .results import EIGVEC_FILE, RESULT_FILE, claim_out_dir, write_json, write_npy
from .solvers.dense import dense_smallest
from .spec import RunSpec

#: Largest N for the in-memory dense path (three N×N float64 copies must fit in RAM).
DENSE_MAX_N = 25000


def run(spec: RunSpec, out: str, log=print, store: str | None = None,
        cluster: dict | None = None, tile: int | None = None, dtype: str | None = None) -> dict:
    """Compute λ_min for ``spec`` and write ``out/result.json`` and ``out/eigvec.npy``.

    With ``store``, the kernel is first assembled (or resumed) into that Zarr store on a Dask
    cluster (``cluster``: keyword arguments of :func:`ntkdist.cluster.connect`) and solved
    from there; without it the kernel is built in memory.
    """
    if spec.method == "dense" and spec.n > DENSE_MAX_N:
        raise SpecError(f"N = {spec.n} is above the dense path's limit of {DENSE_MAX_N}")
    start = time.perf_counter()
    X = spec.rows()
    check = check_rows(X, name=spec.data)
    spec_hash = spec.hash()
    claim_out_dir(out, spec.to_dict(), spec_hash)
    log(f"data: {spec.data} N={spec.n} d={spec.d}; kernel {spec.kernel} depth {spec.depth}")
    if store is None:
        gram = ntk if spec.kernel == "ntk" else nngp
        K = gram(X, depth=spec.depth, normalization=spec.normalization)
    else:
        K = _kernel_from_store(spec, store, cluster or {}, tile, dtype, log)
    eig = dense_smallest(K, k=1)
    del K
    bounds = lambda_min_bounds(X, spec.depth, spec.kernel, spec.normalization)
    wall = time.perf_counter() - start
    lam, res = eig.lambda_min, float(eig.residuals[0])
    result = {
        "lambda_min": lam,
        "residual_norm": res,
        "relative_accuracy": res / abs(lam) if lam != 0 else None,
        "method": eig.method,
        "n": spec.n,
        "d": spec.d,
        "depth": spec.depth,
        "kernel": spec.kernel,
        "normalization": spec.normalization,
        "data": spec.data,
        "seed": spec.seed,
        "input_sha256": spec.input_sha256,
        "duplicate_rows": check.duplicate_rows,
        "parallel_rows": check.parallel_rows,
        "singular_expected": check.parallel_rows > 0,
        "bounds": bounds,
        "wall_seconds": wall,
        "ntkdist_version": __version__,
        "store": os.path.abspath(store) if store else None,
        "spec": spec.to_dict(),
        "spec_hash": spec_hash,
    }
    write_npy(os.path.join(out, EIGVEC_FILE), eig.vectors[:, 0])
    write_json(os.path.join(out, RESULT_FILE), result)
    return result


def _kernel_from_store(spec, store, cluster, tile, dtype, log):
    from .assemble import assemble, resolve_store_spec
    from .cluster import connect
    from .store import open_kernel

    with connect(**cluster) as client:
        store_spec = resolve_store_spec(spec, store, client, tile, dtype)
        log(f"store: {store} (tile {store_spec.tile}, {store_spec.dtype})")
        assemble(store_spec, store, client)
        return np.asarray(open_kernel(store).compute(scheduler="threads"), dtype=np.float64)


def summary(result: dict, out: str) -> str:
    """A short human summary of a result."""
    b = result["bounds"]
    lines = [
        f"λ_min = {result['lambda_min']:.10g}  (residual ‖Kv−λv‖ = {result['residual_norm']:.2e}, "
        f"method: {result['method'].split(':')[0]})",
        f"λ_min/d = {result['lambda_min'] / result['d']:.6g}",
        f"bounds: {b['lower']:.4g} (proof chain, rigorous) ≤ λ_min ≤ "
        f"{b['upper_min_diagonal']:.6g} (min_i K_ii)",
    ]
    if result["singular_expected"]:
        lines.append(f"note: {result['parallel_rows']} row(s) repeat or are parallel to another "
                     "row, so K is singular and λ_min ≈ 0 is expected")
    lines.append(f"wall time {result['wall_seconds']:.2f} s; results in {out}/{RESULT_FILE}")
    return "\n".join(lines)
