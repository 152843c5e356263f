"""Y = K·V on Dask workers: the plan, the worker tasks, GPU residency, the client operator.

* :mod:`.plan`: the one planning point, a pure function from the specs and the facts of the
  environment to what runs (operator mode, precision, device, tile, what is kept in memory
  and what streamed), with every refusal;
* :mod:`.tasks`: a CPU worker's share of a pass (tiles kept, streamed or rebuilt; mixed
  precision's float32 products, from deflated copies or the shifted stored tiles);
* :mod:`.gpu`: a GPU worker's share of a pass, tiles built and kept on its GPU;
* :mod:`.client`: :class:`KernelOperator`, the client-side operator that carries out a plan.
"""

from .client import KernelOperator, cluster_facts, make_operator
from .gpu import _GPU_TILES, gpu_info
from .plan import (CACHE_FRACTION, DENSE_MAX_N, GPU_MEMORY_FRACTION, Facts, Plan, default_dtype,
                   default_method, default_tile, make_plan)
from .tasks import FUSED_STRIP, STRIP, _fused, _products

__all__ = ["CACHE_FRACTION", "DENSE_MAX_N", "FUSED_STRIP", "GPU_MEMORY_FRACTION", "STRIP",
           "Facts", "KernelOperator", "Plan", "_GPU_TILES", "_fused", "_products",
           "cluster_facts", "default_dtype", "default_method", "default_tile", "gpu_info",
           "make_operator", "make_plan"]
