"""Eigensolvers for the smallest eigenvalues of kernel Gram matrices.

The modules, in the order a solve goes through them:

* :mod:`~ntkdist.solvers.driver`: ``smallest_eigenpairs``, the one entry point: repeated
  rows, small N, the method, and the status of the result;
* :mod:`~ntkdist.solvers.dense`: the dense reference path and its scaled formulation;
* :mod:`~ntkdist.solvers.lobpcg`, :mod:`~ntkdist.solvers.davidson`: the two block iterative
  solvers;
* :mod:`~ntkdist.solvers.mixed`: an iterative solve in two phases, float32 then float64;
* :mod:`~ntkdist.solvers.certificate`: what the iterative solvers share (Rayleigh–Ritz,
  residuals, the stopping rule) and the error bounds every result is certified with;
* :mod:`~ntkdist.solvers.result`: :class:`EigenResult`, the one result type of every method;
* :mod:`~ntkdist.solvers.precond`, :mod:`~ntkdist.solvers.checkpoint`: preconditioners and
  resumable snapshots;
* :mod:`~ntkdist.solvers.shift`: ``solve_shifted``, the two-stage shift-invert solve
  (an estimate, then (K − σI)⁻¹ from a float32 factor) around ``smallest_eigenpairs``.

The maths is in docs/theory.md; what the bounds certify, in docs/accuracy.md.
"""

from .certificate import residual_norms
from .dense import dense_smallest
from .result import EigenResult

__all__ = ["EigenResult", "dense_smallest", "residual_norms"]
