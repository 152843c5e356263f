"""GPU residency: a GPU worker's share of a pass, with tiles built on its GPU (CuPy) from
the row blocks by the same array-module-agnostic tile function as the CPU, applied there in
float64, and kept there between passes in memory mode (by operator token); only the b×N
result returns to the host."""

from __future__ import annotations

from ..errors import NtkdistError
from .tasks import _build_tile

#: GPU memory mode: tiles built on this worker's GPU, kept between passes, by operator token.
_GPU_TILES: dict = {}


def _pass_on_gpu(VT, n, t, pairs, blocks, kernel, token=None, keep=None):
    """One GPU worker's share of a pass: tiles built on its GPU with CuPy (and, with a
    ``token``, kept there for the next passes: all of them, or those in ``keep``) and
    applied there in float64; only the b×N result returns to the host."""
    import cupy as cp

    from ..kernels.finite import on_module

    V = cp.asarray(VT, dtype=cp.float64)
    Y = cp.zeros((VT.shape[0], n), dtype=cp.float64)
    kept = _GPU_TILES.setdefault(token, {}) if token is not None else {}
    gpu = {}

    def block(i):
        if i not in gpu:
            gpu[i] = on_module(blocks[i], cp)
        return gpu[i]

    for i, j in pairs:
        tile = kept.get((i, j))
        if tile is None:
            tile = _build_tile(block(i), block(j), kernel, i == j)
            if token is not None and (keep is None or (i, j) in keep):
                kept[(i, j)] = tile
        rows, cols = tile.shape
        Y[:, i * t:i * t + rows] += V[:, j * t:j * t + cols] @ tile.T
        if i != j:
            Y[:, j * t:j * t + cols] += V[:, i * t:i * t + rows] @ tile
        del tile
    return cp.asnumpy(Y)


def _drop_gpu_tiles(token) -> None:
    """Forget an operator's kept tiles (``token``; None: none kept) and hand CuPy's pooled
    blocks back to the device (the pool would otherwise keep them, the recompute passes'
    temporaries too, hidden from the next free-memory check and from other processes)."""
    _GPU_TILES.pop(token, None)
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()


def gpu_info() -> tuple:
    """(name, free bytes, total bytes) of this process's GPU (CuPy's current device), or a
    NtkdistError saying why there is none; run on every worker before a GPU operator uses it."""
    try:
        import cupy as cp
    except ImportError:
        raise NtkdistError("--device gpu needs CuPy on every worker "
                           "(pip install 'ntkdist[gpu]')") from None
    try:
        count = cp.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device")
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        free, total = cp.cuda.runtime.memGetInfo()
        free += cp.get_default_memory_pool().free_bytes()  # pooled by CuPy, reusable here
    except Exception as exc:  # CUDA's errors come in several types
        raise NtkdistError(f"--device gpu: a worker sees no usable GPU "
                           f"({type(exc).__name__}: {exc})") from None
    return (name.decode() if isinstance(name, bytes) else str(name)), int(free), int(total)


