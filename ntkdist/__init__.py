"""ntkdist: distributed large-N spectral solver for Neural Tangent Kernel Gram matrices."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

# Submodules the Python API documents as attributes (ntkdist.bounds.lambda_min_bounds, …).
# None of them, nor the store module, imports dask, distributed or zarr at module level (they
# import them inside the functions that need them), so `import ntkdist` stays light.
from . import bounds, data, solvers
from .config import load_config
from .errors import InputError, NtkdistError, OutputError, SpecError
from .kernels import kernel_tile, nngp, ntk, relu_hermite_coefficient, row_block
from .kernels.finite import empirical_ntk, feature_gram, random_weights
from .kernels.taylor import kernel_coefficients
from .predict import predict_lambda_min
from .spec import ClusterSpec, DataSpec, KernelSpec, RunSpec, SolverSpec, StoreSpec, make_spec
from .store import open_kernel

try:
    __version__ = _version("ntkdist")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ClusterSpec",
    "DataSpec",
    "InputError",
    "KernelSpec",
    "NtkdistError",
    "OutputError",
    "RunSpec",
    "SolverSpec",
    "SpecError",
    "StoreSpec",
    "__version__",
    "bounds",
    "data",
    "empirical_ntk",
    "feature_gram",
    "kernel_coefficients",
    "kernel_tile",
    "load_config",
    "make_spec",
    "nngp",
    "ntk",
    "open_kernel",
    "predict_lambda_min",
    "random_weights",
    "relu_hermite_coefficient",
    "row_block",
    "solvers",
]
