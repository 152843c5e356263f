"""Kernel mathematics: limiting NTK/NNGP recursions and ReLU Hermite coefficients.

No dask or zarr here: every function works on in-memory NumPy (or CuPy) blocks.
"""

from .hermite import relu_hermite_coefficient
from .limiting import (
    KERNELS,
    NORMALIZATIONS,
    RowBlock,
    kernel_tile,
    nngp,
    normalization_factor,
    normalized_recursion,
    ntk,
    row_block,
)

__all__ = [
    "KERNELS",
    "NORMALIZATIONS",
    "RowBlock",
    "kernel_tile",
    "nngp",
    "normalization_factor",
    "normalized_recursion",
    "ntk",
    "relu_hermite_coefficient",
    "row_block",
]
