"""Tasks that run on the Dask workers (CPU): a worker's share of a pass, summed into one b×N
block, from tiles kept in its memory, streamed from the store, or rebuilt from the rows.

Products accumulate in float64 whatever the storage dtype. Mixed precision with deflated
copies (the plan's ``fast="deflated"``, memory mode with room for them): each worker also
keeps its tiles *deflated* in float32, R = K − F Fᵀ, where F Fᵀ is the degree-0 and
degree-1 part of the kernel's Taylor series (:func:`ntkdist.kernels.taylor.deflation_factor`); a fast pass computes R·V in float32
arithmetic (half the bytes of float64 tiles) and the client adds F(FᵀV) in float64. The
deflation removes the large, smooth part of every entry (at N = 20000, d = 64, L = 3 the
off-diagonal r.m.s. falls from 45.2 to 1.07), so float32 rounding perturbs the product
33–37× less than plain float32 tiles would (``python benchmarks/solver.py mixed``).

Where there is no room for the deflated copies (tiles streamed from the store, or kept without
room for a second copy: the plan's ``fast="shifted"``), a fast pass multiplies the tiles as
stored, less a constant c (about the mean entry), in float32 arithmetic: each strip of a tile
is rounded to float32 as K − c in a reused buffer, and the client adds c·1(1ᵀV) in float64.
Removing the mean takes most of what makes plain float32 products noisy (d = 64, L = 3:
off-diagonal entries of r.m.s. 45.2 about a mean of 44.5) at the cost of one pass over each
strip in cache.
"""

from __future__ import annotations

import numpy as np

from ..kernels.limiting import array_module
from ..store import KernelStore

#: Rows of a float32 tile widened to float64 at once, into a reused buffer (in cache, so the
#: tile is read from memory once).
STRIP = 256
#: Rows of a float32 tile multiplied at once by both blocks in a float32 pass: the strip
#: (1 MB) is still in cache for the second product (0.95-1.32× per tile, faster in 11 of 12
#: measurements). Float64 tiles lose by it in 9 of 12 (0.75-1.19×) and take two whole-tile
#: GEMMs (``python benchmarks/solver.py strips``, benchmarks/RESULTS.md).
FUSED_STRIP = 64
#: Rows of a tile rounded to float32 as K − c at once in a shifted pass (:func:`_shifted`).
#: A 4096² float32 tile at b = 32, both cores busy: 39-46 ms at 256 rows, 39-43 at 512,
#: 58-63 at 128, 50-57 at 64, against 71-80 ms for its float64 products
#: (``python benchmarks/solver.py strips``, benchmarks/RESULTS.md).
SHIFT_STRIP = 256


def _fused(tile, vi, vj, strip):
    """(vj·tileᵀ, vi·tile) reading the tile once, ``strip`` rows at a time.

    No temporaries inside the loop: Dask workers run with glibc's ``MALLOC_TRIM_THRESHOLD_``
    set, so every allocation over 128 kB is a fresh mmap with its page faults (a fresh
    product per strip made a first version slower than two GEMMs there; benchmarks/RESULTS.md)."""
    rows, cols = tile.shape
    dtype = np.result_type(tile, vj)
    yi = np.empty((rows, vj.shape[0]), dtype=dtype)  # (vj·tileᵀ)ᵀ = tile·vjᵀ, rows in order
    yj = np.zeros((vi.shape[0], cols), dtype=dtype)
    part = np.empty_like(yj)
    vjT = np.ascontiguousarray(vj.T)
    for a in range(0, rows, strip):
        s = tile[a:a + strip]
        np.matmul(s, vjT, out=yi[a:a + strip])
        np.matmul(vi[:, a:a + strip], s, out=part)
        yj += part
    return yi.T, yj


def _shifted(tile, vi, vj, shift, strip, buf):
    """(vj·(tile − c)ᵀ, vi·(tile − c)) in float32 arithmetic, ``vi``/``vj`` float32 and
    ``shift`` c a float32 scalar: each ``strip`` rows of the tile (float32 or float64) rounded
    to float32 as tile − c into ``buf`` (in cache for both products); ``vi`` None on the
    diagonal (one product)."""
    rows, cols = tile.shape
    b = vj.shape[0]
    yi = np.empty((rows, b), dtype=np.float32)  # rows in order, as in _fused
    yj = None if vi is None else np.zeros((b, cols), dtype=np.float32)
    part = None if vi is None else np.empty_like(yj)
    vjT = np.ascontiguousarray(vj.T)
    for a in range(0, rows, strip):
        s = buf[:min(strip, rows - a), :cols]
        np.subtract(tile[a:a + strip], shift, out=s, casting="same_kind")
        np.matmul(s, vjT, out=yi[a:a + strip])
        if yj is not None:
            np.matmul(vi[:, a:a + strip], s, out=part)
            yj += part
    return yi.T, yj


def _build_tile(bi, bj, kernel, diagonal: bool):
    """Tile (I, J) of ``kernel`` (a :class:`ntkdist.spec.KernelSpec`) from its row blocks, on
    their array module (NumPy or CuPy); a diagonal tile made exactly symmetric from its
    upper triangle."""
    tile = kernel.tile(bi, bj)
    if diagonal:
        xp = array_module(tile)
        tile = xp.triu(tile) + xp.triu(tile, 1).T
    return tile


def _products(tile, VT, i, j, t, buf=None, shift=None):
    """((K_IJ V_J)ᵀ, (K_IJᵀ V_I)ᵀ) in float64; the second is None on the diagonal. With a
    float32 ``VT`` (deflated tiles of a mixed-precision pass), in float32 arithmetic; with
    ``shift`` c too, of the tile less c (:func:`_shifted`, ``buf`` float32).

    The vectors travel transposed (b×N): Vᵀ·K and Vᵀ·Kᵀ with a C-ordered tile run at ~1.6× the
    speed of K·V with a thin V on one core (OpenBLAS, measured in benchmarks/RESULTS.md).
    """
    rows, cols = tile.shape
    vi = np.ascontiguousarray(VT[:, i * t:i * t + rows])
    vj = np.ascontiguousarray(VT[:, j * t:j * t + cols])
    if shift is not None:
        if buf is None or buf.dtype != np.float32 or buf.shape[1] < cols:
            buf = np.empty((SHIFT_STRIP, cols), dtype=np.float32)
        return _shifted(tile, None if i == j else vi, vj, shift, len(buf), buf)
    if tile.dtype == np.float64 or VT.dtype == np.float32:
        if i == j:
            return vj @ tile.T, None
        if tile.dtype == np.float32:
            return _fused(tile, vi, vj, FUSED_STRIP)
        return vj @ tile.T, vi @ tile
    if buf is None or buf.shape[1] < cols:
        buf = np.empty((STRIP, cols))
    b = VT.shape[0]
    yi = np.empty((rows, b))  # (vj·tileᵀ)ᵀ, rows in order
    yj = None if i == j else np.zeros((b, cols))
    part = None if i == j else np.empty((b, cols))  # no temporaries in the loop (_fused)
    vjT = np.ascontiguousarray(vj.T)
    for a in range(0, rows, STRIP):
        strip = buf[:min(STRIP, rows - a), :cols]
        np.copyto(strip, tile[a:a + STRIP])
        np.matmul(strip, vjT, out=yi[a:a + STRIP])
        if yj is not None:
            np.matmul(vi[:, a:a + STRIP], strip, out=part)
            yj += part
    return yi.T, yj


def _pass_on_worker(VT, n, t, cached, streamed, path, recompute, blocks, kernel,
                    check=False, single=False, shift=None):
    """One worker's share of a pass, summed into one b×N block.

    ``cached``: (i, j, tile) held in this worker's memory (or (i, j, (tile, deflated tile))
    with mixed precision); ``streamed``: (i, j) read from the
    store at ``path``, the next tile read on a second thread while this one is multiplied
    (file reads release the GIL), and checked against its recorded checksum if ``check``
    (the first pass); ``recompute``: (i, j) rebuilt from ``blocks`` (row blocks by index)
    with the tile function. ``single``: use the float32 deflated copies of the cached tiles,
    in float32 arithmetic (summed over tiles in float64, returned rounded to float32: that
    rounding, 6e-8 of |R·V|, is far below the float32 products' own error). ``shift`` (with
    ``single``, the plan's ``fast="shifted"``): every tile, cached or streamed, is used as
    stored less this constant (:func:`_shifted`); the caller adds c·1(1ᵀV).
    """
    from concurrent.futures import ThreadPoolExecutor

    if single:
        VT = VT.astype(np.float32, copy=False)
    if single and shift is not None and recompute:
        raise ValueError("a shifted pass applies stored tiles only")
    shift = np.float32(shift) if single and shift is not None else None

    YT = np.zeros((VT.shape[0], n))
    buf = (np.empty((SHIFT_STRIP, t), dtype=np.float32) if shift is not None
           else np.empty((STRIP, t)))

    def add(i, j, tile):
        yi, yj = _products(tile, VT, i, j, t, buf, shift)
        YT[:, i * t:i * t + yi.shape[1]] += yi
        if yj is not None:
            YT[:, j * t:j * t + yj.shape[1]] += yj

    store = KernelStore.open(path) if streamed else None
    read = (store.read_tile_checked if check else store.read_tile) if streamed else None
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, *streamed[0]) if streamed else None
        for i, j, tile in cached:
            if isinstance(tile, tuple):  # mixed precision: (float64 tile, deflated float32)
                tile = tile[1] if single else tile[0]
            add(i, j, tile)
        for k, (i, j) in enumerate(streamed):
            tile = pending.result()
            if k + 1 < len(streamed):
                pending = reader.submit(read, *streamed[k + 1])
            add(i, j, tile)
            del tile
    for i, j in recompute:
        add(i, j, _build_tile(blocks[i], blocks[j], kernel, i == j))
    return YT.astype(np.float32) if single else YT


def _load_tile(path, i, j, FI=None, FJ=None):
    """A tile copied into this worker's memory (a read may map the file's pages), checked
    against its recorded checksum; with the low-rank parts FI, FJ (mixed precision), the pair
    (tile, its float32 deflated copy)."""
    tile = KernelStore.open(path).read_tile_checked(i, j, copy=True)
    return tile if FI is None else (tile, _deflate_tile(tile, FI, FJ))


def _deflate_tile(tile, FI, FJ):
    """float32(K_IJ − F_I F_Jᵀ): the tile less its low-rank part (see the module's notes),
    made STRIP rows at a time (no float64 temporary of the tile's size). Entries beyond
    float32's range become inf without a warning: such a kernel's solve uses no float32
    products (:func:`ntkdist.solvers.mixed.float32_unsafe`)."""
    out = np.empty(tile.shape, dtype=np.float32)
    FJT = np.ascontiguousarray(FJ.T)
    buf = np.empty((STRIP, tile.shape[1]))  # one buffer: no fresh mmap per strip (_fused)
    for a in range(0, tile.shape[0], STRIP):
        low = buf[:min(STRIP, tile.shape[0] - a)]
        np.matmul(FI[a:a + STRIP], FJT, out=low)
        np.subtract(tile[a:a + STRIP], low, out=low)
        with np.errstate(over="ignore"):
            out[a:a + STRIP] = low
    return out


