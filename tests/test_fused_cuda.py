"""The fused GPU tile kernel (ntkdist.kernels.fused_cuda): its generated C source, run here by
the CuPy stand-in's ElementwiseKernel (compiled by the host's C compiler), against the
array-module path, the CPU's fused path and a 50-digit evaluation; a kernel that does not
compile or does not agree is not used."""

import shutil
import sys

import numpy as np
import pytest
from reference import hard_rows, paper_kernel

import fakecupy
from ntkdist.errors import SpecError
from ntkdist.kernels import fused_cuda
from ntkdist.kernels.limiting import kernel_tile, normalization_factor, row_block

SEED = 7103

pytestmark = pytest.mark.skipif(shutil.which("cc") is None,
                                reason="no C compiler (cc) for the stand-in's ElementwiseKernel")


@pytest.fixture
def cp(monkeypatch):
    mod = fakecupy.module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def _rel_err(K, R):
    scale = np.sqrt(np.outer(np.abs(np.diag(R)), np.abs(np.diag(R))))
    return float(np.max(np.abs(K - R) / scale))


def _rows(rng):
    """Norms spread over e^±6, a zero row, duplicates, parallel, antipodal and nearly
    parallel rows (the close-pair fix-up), beside plain ones."""
    X = rng.standard_normal((150, 6)) * np.exp(rng.uniform(-6, 6, (150, 1)))
    X[1] = X[0]
    X[2] = -3.0 * X[0]
    X[3] = X[4] * 1e3
    X[5] = X[6] + 1e-7 * np.linalg.norm(X[6]) * rng.standard_normal(6)
    X[7] = 0.0
    return X


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_fused_gpu_kernel_matches_the_common_path_entry_by_entry(cp, kernel):
    assert fused_cuda.status(cp) == "in use"
    rng = np.random.default_rng(SEED)
    X, Y = _rows(rng), rng.standard_normal((97, 6))
    for depth in (1, 2, 3, 7, 50):
        for norm in ("paper", "nt"):
            A, B = row_block(cp.asarray(X)), row_block(cp.asarray(Y))
            for (P, Q) in ((A, A), (A, B)):
                got = kernel_tile(P, Q, depth, kernel, norm)
                assert type(got) is fakecupy.FakeDeviceArray
                want = kernel_tile(P, Q, depth, kernel, norm, fused=False).get()
                cpu = kernel_tile(row_block(P.unit.get() * P.norms.get()[:, None]),
                                  row_block(Q.unit.get() * Q.norms.get()[:, None]),
                                  depth, kernel, norm)
                # √(K_ii K_jj): L‖x‖‖y‖ (NTK) or ‖x‖‖y‖ (NNGP), times the normalisation
                scale = (np.outer(P.norms.get(), Q.norms.get()) * normalization_factor(norm, 6)
                         * (depth if kernel == "ntk" else 1))
                scale[scale == 0] = 1.0
                for ref in (want, cpu):
                    assert np.max(np.abs(got.get() - ref) / scale) < 1e-14


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_fused_gpu_kernel_matches_the_50_digit_reference(cp, depth):
    X = hard_rows(np.random.default_rng(SEED + depth))
    A = row_block(cp.asarray(X))
    for kernel in ("ntk", "nngp"):
        assert _rel_err(kernel_tile(A, A, depth, kernel).get(),
                        paper_kernel(X, depth, kernel)) < 1e-12


def test_a_wrong_or_uncompilable_kernel_is_not_used(monkeypatch):
    """The self-check has teeth: a source with π to 3 digits is refused, as is one that does
    not compile; the tile then comes from the common path, and fused=True says why."""
    X = np.random.default_rng(SEED).standard_normal((60, 5))
    right = fused_cuda.recursion_source()
    for source, why in ((right.replace(repr(np.pi), "3.14"), "differs"),
                        (right + " syntax error here", "CalledProcessError")):
        cp = fakecupy.module()  # a new module: its kernel built and checked afresh
        monkeypatch.setitem(sys.modules, "cupy", cp)
        monkeypatch.setattr(fused_cuda, "recursion_source", lambda s=source: s)
        assert not fused_cuda.ready(cp)
        assert why in fused_cuda.status(cp) and fused_cuda.status(cp).startswith("not used")
        A = row_block(cp.asarray(X))
        np.testing.assert_array_equal(kernel_tile(A, A, 3).get(),
                                      kernel_tile(A, A, 3, fused=False).get())
        with pytest.raises(SpecError, match="fused GPU kernel is not used"):
            kernel_tile(A, A, 3, fused=True)


def test_a_module_without_elementwise_kernels_uses_the_common_path(monkeypatch):
    cp = fakecupy.module()
    del cp.ElementwiseKernel
    monkeypatch.setitem(sys.modules, "cupy", cp)
    assert "no ElementwiseKernel" in fused_cuda.status(cp)
    A = row_block(cp.asarray(np.eye(4)))
    np.testing.assert_array_equal(kernel_tile(A, A, 2).get(), kernel_tile(A, A, 2,
                                                                          fused=False).get())


def test_the_stand_in_kernel_refuses_what_cupy_refuses(cp):
    """Host arrays and device arrays of another dtype than declared fail, as in CuPy."""
    kern = fused_cuda._build(cp)
    rho = cp.asarray(np.full((3, 3), 0.5))
    na, nb = cp.ones((3, 1)), cp.ones((1, 3))
    assert float(kern(rho, na, nb, 1.0, np.int32(2), True)[0, 0]) > 0.5
    with pytest.raises(TypeError, match="mix-up"):
        kern(np.full((3, 3), 0.5), na, nb, 1.0, np.int32(2), True)
    with pytest.raises(TypeError, match="Type is mismatched"):
        kern(rho.astype(np.float32), na, nb, 1.0, np.int32(2), True)
