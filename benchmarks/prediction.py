"""Dense λ_min against the predictions (docs/theory.md, "Staircase prediction").

    python benchmarks/prediction.py                    # the table's rows up to N = 6000
    python benchmarks/prediction.py ntk,5000,64,3,1    # KERNEL,N,d,L[,SEED] rows of your own

Each row: rows uniform on the sphere of radius √d (`synthetic_rows("sphere", d, seed, 0, N)`),
the dense float64 λ_min (`scipy.linalg.eigh`, smallest only), the staircase formula and
`ntkdist.predict_lambda_min`, with their relative errors. The table's rows with N ≥ 8000
come from the runs in benchmarks/RESULTS.md.
"""

import sys
import time

import scipy.linalg

import ntkdist
from ntkdist.bounds import staircase_prediction
from ntkdist.data import synthetic_rows

ROWS = ["ntk,500,64,3", "ntk,1000,64,3", "ntk,2000,64,3", "ntk,3000,64,3", "ntk,5000,64,3",
        "ntk,2000,64,2", "ntk,5000,64,2", "nngp,2500,64,2", "ntk,500,32,3", "ntk,2000,32,3",
        "ntk,6000,32,3", "ntk,2000,32,2", "ntk,300,16,3", "ntk,5000,16,3", "ntk,600,8,3"]


def row(spec: str) -> str:
    kernel, n, d, depth, *seed = spec.split(",")
    n, d, depth, seed = int(n), int(d), int(depth), int(seed[0]) if seed else 0
    t = time.perf_counter()
    X = synthetic_rows("sphere", d, seed, 0, n)
    K = (ntkdist.ntk if kernel == "ntk" else ntkdist.nngp)(X, depth=depth)
    lam = float(scipy.linalg.eigh(K, subset_by_index=[0, 0], eigvals_only=True)[0])
    stair = staircase_prediction(n, d, depth, kernel)["value"]
    free = ntkdist.predict_lambda_min(n, d, depth, kernel)["lambda_min"]
    return (f"| {kernel} | {d} | {depth} | {n} (seed {seed}) | {lam:.4f} | {stair:.4f} | "
            f"{stair / lam - 1:+.1%} | {free:.4f} | {free / lam - 1:+.2%} | "
            f"{time.perf_counter() - t:.0f} s |")


if __name__ == "__main__":
    print("| kernel | d | L | N | measured λ_min | staircase | rel. | free edge | rel. | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in sys.argv[1:] or ROWS:
        print(row(spec), flush=True)
