"""The public surface: one exception family for user errors, and the documented attributes of
a bare ``import ntkdist``."""

import subprocess
import sys

import numpy as np
import pytest

import ntkdist
from ntkdist.kernels.limiting import kernel_tile, row_block


def _one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def test_input_and_spec_errors_are_also_value_errors():
    for cls in (ntkdist.InputError, ntkdist.SpecError):
        assert issubclass(cls, ntkdist.NtkdistError) and issubclass(cls, ValueError)
    assert not issubclass(ntkdist.OutputError, ValueError)


@pytest.mark.parametrize("call, match", [
    (lambda: ntkdist.kernel_coefficients(0), "depth"),
    (lambda: ntkdist.kernel_coefficients(2, "rbf"), "kernel"),
    (lambda: ntkdist.kernel_coefficients(2, "ntk", r_max=-1), "r_max"),
    (lambda: ntkdist.ntk(np.ones((3, 2)), depth=0), "depth"),
    (lambda: ntkdist.nngp(np.ones((3, 2)), depth=1.5), "depth"),
    (lambda: ntkdist.ntk(np.ones((3, 2)), depth=2, normalization="other"), "normalization"),
    (lambda: kernel_tile(row_block(np.ones((3, 2))), row_block(np.ones((3, 2))), 2, "rbf"),
     "kernel"),
    (lambda: ntkdist.relu_hermite_coefficient(-2), "Hermite"),
])
def test_bad_arguments_raise_spec_error(call, match):
    with pytest.raises(ntkdist.SpecError, match=match) as excinfo:
        call()
    _one_line(excinfo)


@pytest.mark.parametrize("call, match", [
    (lambda: ntkdist.ntk(np.ones((3, 2)), np.ones((2, 3)), depth=2), "dimensions"),
    (lambda: kernel_tile(row_block(np.ones((3, 2))), row_block(np.ones((3, 4))), 2),
     "dimensions"),
    (lambda: ntkdist.row_block(np.ones(4)), "2-D"),
    (lambda: ntkdist.ntk(np.ones((2, 2, 2)), depth=2), "2-D"),
])
def test_bad_arrays_raise_input_error(call, match):
    with pytest.raises(ntkdist.InputError, match=match) as excinfo:
        call()
    _one_line(excinfo)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("gram", [ntkdist.ntk, ntkdist.nngp])
def test_non_finite_rows_are_refused_not_turned_into_nan(gram, bad):
    X = np.random.default_rng(1).standard_normal((8, 5))
    X[5, 3] = bad
    X[6, 0] = bad
    with pytest.raises(ntkdist.InputError, match=r"X has non-finite values \(first in row 5\)") as e:
        gram(X, depth=3)
    _one_line(e)
    Y = X[:4].copy()
    with pytest.raises(ntkdist.InputError, match=r"^Y has .* row 5"):
        gram(Y, X, depth=3)
    with pytest.raises(ntkdist.InputError, match="row 5"):
        ntkdist.row_block(X)


def test_rows_whose_squared_norm_overflows_are_refused():
    X = np.ones((3, 4))
    X[1] = 1e200
    with pytest.raises(ntkdist.InputError, match="row 1 is too large") as excinfo:
        ntkdist.ntk(X, depth=2)
    _one_line(excinfo)


def test_finite_rows_give_the_same_kernel_as_the_tile_function():
    X = np.random.default_rng(2).standard_normal((30, 6))
    X[4] = 0.0  # zero rows stay allowed: their kernel row is exactly 0
    A = row_block(X)
    K = ntkdist.ntk(X, depth=4)
    T = kernel_tile(A, A, 4)
    np.testing.assert_array_equal(K, np.triu(T) + np.triu(T, 1).T)
    assert np.all(K[4] == 0)


BARE_IMPORT = """
import sys
import ntkdist
print(ntkdist.bounds.lambda_min_bounds.__name__, ntkdist.solvers.dense_smallest.__name__,
      ntkdist.data.synthetic_rows.__name__)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"dask", "distributed", "zarr"})
print(heavy)
"""


def test_documented_submodules_are_attributes_of_a_bare_import():
    """In a fresh interpreter, so that no other test's imports make the attributes appear."""
    done = subprocess.run([sys.executable, "-c", BARE_IMPORT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    names, heavy = done.stdout.splitlines()
    assert names == "lambda_min_bounds dense_smallest synthetic_rows"
    assert heavy == "[]"
    for name in ("bounds", "data", "solvers"):
        assert name in ntkdist.__all__
