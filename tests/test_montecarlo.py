"""Finite ReLU networks converge to the limiting kernels at the 1/√width rate.

The empirical NTK JJᵀ is built from explicit per-sample gradients (backpropagation written
out here, independent of ntkdist), with N(0, 1) weights and no 1/√n factor (docs/theory.md):
(Π_{l<L} 2/n_l)·JJᵀ → K^(L) and (Π_{l<L} 2/n_l)·F_{L−1}F_{L−1}ᵀ → G^(L).
"""

import numpy as np

import ntkdist

SEED = 2718
DEPTH = 3


def _network_jacobian(X, widths, rng):
    """Per-sample gradients of f(x) = W_Lᵀ relu(… relu(W_1ᵀ x)) w.r.t. all weights."""
    dims = [X.shape[1], *widths, 1]
    Ws = [rng.standard_normal((dims[k], dims[k + 1])) for k in range(len(dims) - 1)]
    rows, feats = [], None
    for x in X:
        fs, gs = [x], []
        for W in Ws[:-1]:
            gs.append(W.T @ fs[-1])
            fs.append(np.maximum(gs[-1], 0.0))
        grads, b = [], np.ones(1)
        for layer in range(len(Ws) - 1, -1, -1):
            grads.append(np.outer(fs[layer], b).ravel())  # ∂f/∂W_{layer+1}
            if layer:
                b = (Ws[layer] @ b) * (gs[layer - 1] > 0)
        rows.append(np.concatenate(grads))
        feats = fs[-1][None] if feats is None else np.vstack([feats, fs[-1]])
    return np.array(rows), feats


def test_empirical_ntk_converges_at_inverse_sqrt_width():
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((5, 4))
    K = ntkdist.ntk(X, depth=DEPTH)
    G = ntkdist.nngp(X, depth=DEPTH)
    widths, trials = [64, 256, 1024], 16
    errors, nngp_errors = [], []
    for n in widths:
        scale = (2.0 / n) ** (DEPTH - 1)
        e_k, e_g = [], []
        for _ in range(trials):
            J, F = _network_jacobian(X, [n] * (DEPTH - 1), rng)
            e_k.append(np.linalg.norm(scale * J @ J.T - K) / np.linalg.norm(K))
            e_g.append(np.linalg.norm(scale * F @ F.T - G) / np.linalg.norm(G))
        errors.append(np.sqrt(np.mean(np.square(e_k))))
        nngp_errors.append(np.sqrt(np.mean(np.square(e_g))))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.7 < slope < -0.35, (slope, errors)
    assert errors[-1] < 0.15
    slope_g = np.polyfit(np.log(widths), np.log(nngp_errors), 1)[0]
    assert -0.7 < slope_g < -0.35, (slope_g, nngp_errors)


def test_jacobian_gram_equals_feature_backward_decomposition():
    """JJᵀ = Σ_k (F_k F_kᵀ) ∘ (B_{k+1} B_{k+1}ᵀ): the gradient code above is right."""
    rng = np.random.default_rng(SEED + 1)
    X = rng.standard_normal((4, 3))
    J, _ = _network_jacobian(X, [7, 5], np.random.default_rng(11))
    r = np.random.default_rng(11)
    W1, W2, W3 = r.standard_normal((3, 7)), r.standard_normal((7, 5)), r.standard_normal((5, 1))
    g1 = X @ W1
    F1 = np.maximum(g1, 0)
    g2 = F1 @ W2
    F2 = np.maximum(g2, 0)
    B2 = np.broadcast_to(W3.T, g2.shape) * (g2 > 0)
    B1 = (B2 @ W2.T) * (g1 > 0)
    expected = (X @ X.T) * (B1 @ B1.T) + (F1 @ F1.T) * (B2 @ B2.T) + F2 @ F2.T
    np.testing.assert_allclose(J @ J.T, expected, rtol=1e-12)
