"""Finite-width ReLU networks: seeded weights, the empirical NTK JJᵀ and hidden-feature Grams.

The network (docs/theory.md, "Finite width"): f(x) = W_L σ(W_{L−1} ⋯ σ(W_1 x)), σ = relu with
relu'(0) = 0, W_l of shape (n_l, n_{l−1}), n_0 = d, n_L = 1, no biases and no 1/√n factor.
With g_l = W_l f_{l−1}, f_l = σ(g_l), f_0 = x and the backward vectors δ_L = 1,
δ_l = (W_{l+1}ᵀ δ_{l+1}) ∘ σ'(g_l), the gradient of f with respect to W_l is δ_l f_{l−1}ᵀ, so

    JJᵀ = Σ_{l=1}^{L} (F_{l−1} F_{l−1}ᵀ) ∘ (Δ_l Δ_lᵀ)        (Δ_L Δ_Lᵀ = 1)

with F_k (N × n_k) the rows' features and Δ_l (N × n_l) their backward vectors. J itself
(N × Σ n_l n_{l−1}) is never formed: a row block's features and backward vectors are computed
once (:func:`block_features`), and a tile is a sum of L Hadamard products of GEMMs
(:func:`finite_tile`), 2·m·m'·(d + 2Σ n_l) flops for an m × m' tile.

Weights come from a counter-based stream: rows r of W_l are drawn in chunks of
:data:`WEIGHT_CHUNK` rows, chunk c from ``Philox`` keyed by ``SeedSequence(seed,
spawn_key=(l, c))``, in float64. Any process regenerates any rows of any W_l without the
others, so workers never receive weights from the client, the weights do not depend on the
row blocks or the number of workers, and layers wider than memory are streamed a few hundred
rows at a time.

Normalisation: with N(0, 1) weights, E relu(g)² = Var(g)/2 at every layer, so
(Π_{l=1}^{L−1} 2/n_l)·JJᵀ → K^(L) (the limiting NTK, :func:`ntkdist.ntk`) and
(Π_{l=1}^{k} 2/n_l)·F_k F_kᵀ → G^(k+1) (:func:`ntkdist.nngp` at depth k + 1) as the widths
grow, entries fluctuating at O(1/√width). ``"nt"`` multiplies by 2/d as for the limits.

Everything here runs on the array module of the rows (NumPy or CuPy); weights are drawn
with NumPy on the host and moved to the rows' device, so both give the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, SpecError
from .limiting import array_module, row_block

FINITE_KERNELS = ("empirical", "features")
FINITE_NORMALIZATIONS = ("raw", "paper", "nt")
#: Rows of W_l drawn from one counter-based stream (fixed: it defines the weights).
WEIGHT_CHUNK = 64
#: Bytes of weight rows drawn and multiplied at once (a multiple of WEIGHT_CHUNK rows).
WEIGHT_BYTES = 64 * 2 ** 20


def check_widths(widths) -> tuple[int, ...]:
    """The hidden widths n_1, …, n_{L−1} as a tuple of positive ints (one-line SpecError)."""
    if isinstance(widths, str):
        text = widths.replace(" ", "")
        widths = text.split(",") if text else []
        if any(not w for w in widths):
            raise SpecError(f"widths must be positive integers separated by commas, got "
                            f"{text!r}")
    try:
        out = tuple(widths)
    except TypeError:
        raise SpecError(f"widths must be a list of positive integers, got {widths!r}") from None
    for w in out:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer, str)):
            raise SpecError(f"widths must be positive integers, got {w!r}")
        try:
            value = int(w)
        except ValueError:
            raise SpecError(f"widths must be positive integers, got {w!r}") from None
        if value < 1 or str(value) != str(w).lstrip("+"):
            raise SpecError(f"widths must be positive integers, got {w!r}")
    if not out:
        raise SpecError("widths must list at least one hidden width (n_1,...,n_{L-1})")
    return tuple(int(w) for w in out)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError(f"weights seed must be an integer >= 0, got {seed!r}")
    return int(seed)


class SeededWeights:
    """The weights of the network with input dimension ``d`` and hidden ``widths``, drawn
    from the counter-based stream of ``seed`` (see the module docstring), row by row."""

    def __init__(self, d: int, widths, seed: int):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise SpecError(f"d must be an integer >= 1, got {d!r}")
        self.widths, self.seed = check_widths(widths), check_seed(seed)
        dims = (int(d), *self.widths, 1)
        self.shapes = tuple((dims[l], dims[l - 1]) for l in range(1, len(dims)))

    def rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of W_layer (layer 1..L), float64."""
        n_out, n_in = self.shapes[layer - 1]
        start, stop = max(0, start), min(stop, n_out)
        out = np.empty((max(0, stop - start), n_in))
        for c in range(start // WEIGHT_CHUNK, (stop - 1) // WEIGHT_CHUNK + 1 if stop > start
                       else 0):
            lo = c * WEIGHT_CHUNK
            hi = min(lo + WEIGHT_CHUNK, n_out)
            rng = np.random.Generator(np.random.Philox(
                np.random.SeedSequence(self.seed, spawn_key=(layer, c))))
            chunk = rng.standard_normal((hi - lo, n_in))
            a, b = max(lo, start), min(hi, stop)
            out[a - start:b - start] = chunk[a - lo:b - lo]
        return out


class GivenWeights:
    """Weights given as matrices [W_1, …, W_L], checked to chain as a network from d inputs
    to one output."""

    def __init__(self, weights, d: int):
        if isinstance(weights, np.ndarray) or not isinstance(weights, (list, tuple)) or \
                not weights:
            raise InputError("weights must be a non-empty list of matrices [W_1, ..., W_L]")
        mats, n_in = [], d
        for l, W in enumerate(weights, 1):
            W = np.asarray(W.get() if hasattr(W, "get") else W, dtype=np.float64)
            if W.ndim != 2 or W.shape[1] != n_in:
                raise InputError(f"W_{l} must have shape (n_{l}, {n_in}), got {W.shape}")
            if W.shape[0] < 1:
                raise InputError(f"W_{l} has no rows")
            if not np.isfinite(W).all():
                raise InputError(f"W_{l} has non-finite values")
            mats.append(W)
            n_in = W.shape[0]
        if mats[-1].shape[0] != 1:
            raise InputError(f"the output layer W_{len(mats)} must have one row (one output), "
                             f"got shape {mats[-1].shape}")
        self.mats = mats
        self.widths = tuple(W.shape[0] for W in mats[:-1])
        self.shapes = tuple(W.shape for W in mats)

    def rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        return self.mats[layer - 1][start:stop]


def random_weights(d: int, widths, seed: int) -> list[np.ndarray]:
    """[W_1, …, W_L]: the paper's standard Gaussian weights of the network with input
    dimension ``d`` and hidden ``widths`` (n_1, …, n_{L−1}); W_l has shape (n_l, n_{l−1}),
    n_0 = d, n_L = 1. The same as every worker draws for ``--weights-seed seed``."""
    w = SeededWeights(d, widths, seed)
    import psutil  # installed with distributed

    need = 8 * sum(a * b for a, b in w.shapes)
    have = int(psutil.virtual_memory().available)
    if need > have:
        raise SpecError(f"the weights of widths {list(w.widths)} take {need / 1e9:.3g} GB, "
                        f"more than the {have / 1e9:.3g} GB available (runs draw them a few "
                        "rows at a time instead: ntkdist run --kernel empirical)")
    return [w.rows(l, 0, shape[0]) for l, shape in enumerate(w.shapes, 1)]


def _spans(n_out: int, n_in: int):
    """Row ranges of W (n_out × n_in) drawn and multiplied at once."""
    step = max(WEIGHT_CHUNK, WEIGHT_BYTES // (8 * n_in) // WEIGHT_CHUNK * WEIGHT_CHUNK)
    return [(a, min(a + step, n_out)) for a in range(0, n_out, step)]


@dataclass(frozen=True)
class FiniteBlock:
    """A row block's factors: ``terms`` ((F, Δ) pairs, Δ None for the output layer's term)
    whose tile is ``factor`` · Σ (F_a F_bᵀ) ∘ (Δ_a Δ_bᵀ)."""

    terms: tuple
    factor: float = 1.0

    @property
    def rows(self) -> int:
        return int(self.terms[0][0].shape[0])

    def to_array(self):
        """All factors side by side (rows × columns), as the store's feature cache keeps them."""
        xp = array_module(self.terms[0][0])
        return xp.concatenate([a for pair in self.terms for a in pair if a is not None], axis=1)

    @classmethod
    def from_array(cls, A, sizes: tuple, factor: float) -> "FiniteBlock":
        """The inverse of :meth:`to_array`: ``sizes`` gives the column counts of the terms,
        as ((n_F, n_Δ or None), …) (:attr:`sizes`, :func:`term_sizes`)."""
        terms, c = [], 0
        for nf, nd in sizes:
            F = A[:, c:c + nf]
            c += nf
            D = None
            if nd is not None:
                D = A[:, c:c + nd]
                c += nd
            terms.append((F, D))
        if c != A.shape[1]:
            raise InputError(f"feature block has {A.shape[1]} columns, expected {c}")
        return cls(tuple(terms), factor)

    @property
    def sizes(self) -> tuple:
        return tuple((F.shape[1], None if D is None else D.shape[1]) for F, D in self.terms)


def term_sizes(d: int, widths, kind: str, layer: int | None = None) -> tuple:
    """((columns of F, of Δ or None), …) of a block's terms (see :class:`FiniteBlock`)."""
    dims = (d, *widths)
    if kind == "features":
        return ((dims[layer], None),)
    L = len(widths) + 1
    return tuple((dims[k], dims[k + 1] if k + 1 < L else None) for k in range(L))


def feature_columns(d: int, widths, kind: str, layer: int | None = None) -> int:
    """Float64 columns a row block's factors hold per row (d + 2Σ n_l for the empirical NTK,
    n_k for layer k's features)."""
    return sum(a + (b or 0) for a, b in term_sizes(d, widths, kind, layer))


def normalization_factor(widths, kind: str, normalization: str, d: int,
                         layer: int | None = None) -> float:
    """Factor from the raw matrix to the requested normalisation (module docstring)."""
    if normalization == "raw":
        return 1.0
    scaled = widths if kind == "empirical" else widths[:layer]
    factor = math.prod(2.0 / n for n in scaled)
    return factor * (2.0 / d if normalization == "nt" else 1.0)


def _forward(X, weights, upto: int, xp):
    """[F_0 = X, F_1, …, F_upto] of the rows ``X`` (float64 on X's module)."""
    F = [X]
    for l in range(1, upto + 1):
        n_out, n_in = weights.shapes[l - 1]
        g = xp.empty((X.shape[0], n_out))
        for a, b in _spans(n_out, n_in):
            W = xp.asarray(weights.rows(l, a, b))
            g[:, a:b] = F[-1] @ W.T
        xp.maximum(g, 0.0, out=g)
        F.append(g)
    return F


def _backward(F, weights, xp):
    """[Δ_1, …, Δ_{L−1}] from the features F_0..F_{L−1} (Δ_L = 1 is left out)."""
    L = len(weights.shapes)
    if L == 1:
        return []
    w_out = xp.asarray(weights.rows(L, 0, 1))[0]
    deltas = [w_out[None, :] * (F[L - 1] > 0)]
    for l in range(L - 2, 0, -1):  # Δ_l = (Δ_{l+1} W_{l+1}) ∘ σ'(g_l)
        n_out, n_in = weights.shapes[l]
        acc = xp.zeros((F[0].shape[0], n_in))
        upper = deltas[0]
        for a, b in _spans(n_out, n_in):
            acc += upper[:, a:b] @ xp.asarray(weights.rows(l + 1, a, b))
        acc *= F[l] > 0
        deltas.insert(0, acc)
    return deltas


def block_features(X, weights, kind: str = "empirical", layer: int | None = None,
                   factor: float = 1.0, name: str = "rows") -> FiniteBlock:
    """The factors of the row block ``X`` (m × d) for the empirical NTK (``kind="empirical"``)
    or layer ``layer``'s feature Gram (``"features"``); ``weights``: :class:`SeededWeights`
    or :class:`GivenWeights`. On the CPU every product runs on one BLAS thread, so a block's
    bytes depend only on its rows (stores stay bitwise reproducible)."""
    from .limiting import single_blas

    xp = array_module(X)
    row_block(X, name)  # refuses non-real dtypes, non-finite rows, overflowing norms: one line
    X = xp.asarray(X, dtype=xp.float64)
    d = weights.shapes[0][1]
    if X.shape[1] != d:
        raise InputError(f"{name} has {X.shape[1]} columns, the network takes d = {d}")
    L = len(weights.shapes)
    with single_blas(xp):
        if kind == "features":
            F = _forward(X, weights, layer, xp)
            return FiniteBlock(((F[layer], None),), factor)
        F = _forward(X, weights, L - 1, xp)
        deltas = _backward(F, weights, xp)
    return FiniteBlock(tuple(zip(F, [*deltas, None])), factor)


def finite_tile(A: FiniteBlock, B: FiniteBlock):
    """factor · Σ (F_a F_bᵀ) ∘ (Δ_a Δ_bᵀ) between two blocks' factors, float64."""
    from .limiting import single_blas

    if A.sizes != B.sizes:
        raise InputError(f"feature blocks of different networks: {A.sizes} and {B.sizes}")
    xp = array_module(A.terms[0][0])
    out = None
    with single_blas(xp):
        for (Fa, Da), (Fb, Db) in zip(A.terms, B.terms):
            P = Fa @ Fb.T
            if Da is not None:
                P *= Da @ Db.T
            if out is None:
                out = P
            else:
                out += P
    if A.factor != 1.0:
        out *= A.factor
    return out


def on_module(block, xp):
    """A row block's features (a :class:`FiniteBlock` or a limiting ``RowBlock``) with its
    arrays moved to the array module ``xp`` (NumPy or CuPy)."""
    from .limiting import RowBlock

    if isinstance(block, RowBlock):
        return RowBlock(unit=xp.asarray(block.unit), norms=xp.asarray(block.norms))
    return FiniteBlock(tuple((xp.asarray(F), None if D is None else xp.asarray(D))
                             for F, D in block.terms), block.factor)


def finite_diagonal(A: FiniteBlock):
    """The diagonal of :func:`finite_tile` (A, A): factor · Σ ‖F_i‖² ‖Δ_i‖², rowwise."""
    xp = array_module(A.terms[0][0])
    out = xp.zeros(A.rows)
    for F, D in A.terms:
        part = xp.einsum("ij,ij->i", F, F)
        if D is not None:
            part *= xp.einsum("ij,ij->i", D, D)
        out += part
    return out * A.factor


def _normalized(normalize) -> str:
    if normalize is True:
        return "paper"
    if normalize is False or normalize is None:
        return "raw"
    if normalize not in FINITE_NORMALIZATIONS:
        raise SpecError(f"normalize must be True, False or one of {FINITE_NORMALIZATIONS}, "
                        f"got {normalize!r}")
    return normalize


def _finite_gram(X, Y, weights, kind, layer, normalize):
    xp = array_module(X)
    row_block(X, "X")  # refuses non-real dtypes, bad shapes and non-finite rows: one line
    X = xp.asarray(X, dtype=xp.float64)
    w = GivenWeights(weights, X.shape[1])
    L = len(w.shapes)
    if kind == "features":
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or \
                not 1 <= layer <= L - 1:
            raise SpecError(f"layer must be an integer in 1..{L - 1} (the hidden layers of "
                            f"a network with {L} weight matrices), got {layer!r}")
    factor = normalization_factor(w.widths, kind, _normalized(normalize), X.shape[1], layer)
    A = block_features(X, w, kind, layer, factor, "X")
    if Y is None:
        K = finite_tile(A, A)
        upper = xp.triu(K)
        return upper + xp.triu(K, 1).T
    return finite_tile(A, block_features(Y, w, kind, layer, factor, "Y"))


def empirical_ntk(X, Y=None, weights=None, normalize=False):
    """The exact empirical NTK J(X) J(Y)ᵀ of f(x) = W_L σ(W_{L−1} ⋯ σ(W_1 x)) with respect to
    all weights, for the given ``weights`` [W_1, …, W_L] (W_l of shape (n_l, n_{l−1}), the last
    with one row), float64, without forming J. ``normalize``: False (the raw matrix), True or
    ``"paper"`` (× Π_{l<L} 2/n_l, which tends to :func:`ntkdist.ntk` as the widths grow), or
    ``"nt"`` (that × 2/d). With ``Y=None`` the result is exactly symmetric."""
    if weights is None:
        raise InputError("empirical_ntk needs weights=[W_1, ..., W_L] (ntkdist.random_weights)")
    return _finite_gram(X, Y, weights, "empirical", None, normalize)


def feature_gram(X, Y=None, weights=None, layer: int = 1, normalize=False):
    """F_k(X) F_k(Y)ᵀ, F_k the post-activation features of hidden layer ``layer`` = k
    (1 ≤ k ≤ L−1) of the network with ``weights`` [W_1, …, W_L], float64. ``normalize`` as
    in :func:`empirical_ntk`, with the factor Π_{l≤k} 2/n_l (the limit is
    :func:`ntkdist.nngp` at depth k + 1)."""
    if weights is None:
        raise InputError("feature_gram needs weights=[W_1, ..., W_L] (ntkdist.random_weights)")
    return _finite_gram(X, Y, weights, "features", layer, normalize)
