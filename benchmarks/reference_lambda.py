"""Recompute the reference λ_min that ``ntkdist bench`` ships (``REFERENCE_LAMBDA``).

    python benchmarks/reference_lambda.py            # N = 2000 and 10000 (about 2 min on 2 cores)
    python benchmarks/reference_lambda.py --n 2000

For each N: the long-double Rayleigh quotient of evr's lowest eigenvector of the float64
kernel (sphere, d = 16, depth 3, seed 0), its residual, the Kato–Temple bound on its
distance to an eigenvalue, and the shipped value.
"""

import argparse

from ntkdist.bench import REFERENCE_LAMBDA, reference_value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, action="append", help="N (repeatable; default both)")
    for n in p.parse_args().n or sorted(REFERENCE_LAMBDA):
        r = reference_value(n)
        print(f"N={n}: lambda_min={r['lambda_min']!r} residual={r['residual']:.2e} "
              f"lambda_2={r['lambda_2']:.13g} kato_temple={r['kato_temple']:.1e} "
              f"shipped={REFERENCE_LAMBDA.get(n)!r}", flush=True)


if __name__ == "__main__":
    main()
