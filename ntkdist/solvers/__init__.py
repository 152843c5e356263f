"""Eigensolvers for the smallest eigenvalues of kernel Gram matrices."""

from .dense import EigenResult, dense_smallest, residual_norms

__all__ = ["EigenResult", "dense_smallest", "residual_norms"]
