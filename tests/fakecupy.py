"""A stand-in for CuPy on machines without a GPU: the names ntkdist's GPU path calls, backed
by NumPy, so that the GPU plumbing (device checks, task placement, results back to the host)
runs in CI. The arrays stay NumPy arrays, so the tile function takes its NumPy path; the real
CuPy path is checked on a GPU by scripts/gpu_check.py."""

import types

import numpy as np

NAME = "fake GPU (NumPy stand-in)"


def module(devices: int = 1, free: int = 8 * 2 ** 30):
    cp = types.ModuleType("cupy")
    cp.float64 = np.float64
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype)  # a copy, as a transfer is
    cp.asnumpy = lambda a: np.array(a)
    cp.zeros = np.zeros

    def count():
        if devices < 1:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return devices

    runtime = types.SimpleNamespace(getDeviceCount=count,
                                    getDeviceProperties=lambda i: {"name": NAME.encode()},
                                    memGetInfo=lambda: (free, 2 * free))
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda *a: types.SimpleNamespace(id=0))
    pool = types.SimpleNamespace(free_all_blocks=lambda: None, free_bytes=lambda: 0)
    cp.get_default_memory_pool = lambda: pool
    return cp
