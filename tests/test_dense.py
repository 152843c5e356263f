import numpy as np

from ntkdist.solvers.dense import dense_smallest


def test_smallest_eigenpairs_against_full_eigh():
    rng = np.random.default_rng(555)
    A = rng.standard_normal((120, 120))
    K = A @ A.T + 1e-3 * np.eye(120)
    res = dense_smallest(K, k=4)
    w, V = np.linalg.eigh(K)
    np.testing.assert_allclose(res.values, w[:4], rtol=1e-10)
    for i in range(4):
        assert abs(abs(res.vectors[:, i] @ V[:, i]) - 1) < 1e-8
    direct = np.linalg.norm(K @ res.vectors - res.vectors * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, direct, rtol=1e-12, atol=1e-18)
    assert res.lambda_min == res.values[0]
