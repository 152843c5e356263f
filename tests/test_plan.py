"""The planning point, run through a table of cases without a cluster."""

import pytest

from ntkdist.errors import SpecError
from ntkdist.operator.plan import (CACHE_FRACTION, DENSE_MAX_N, Facts, default_method,
                                   default_tile, make_plan, store_layout, tile_sizes)
from ntkdist.spec import ClusterSpec, SolverSpec

GB = 10 ** 9
CPU = ClusterSpec()
GPU = ClusterSpec(device="gpu")


def _workers(*memories):
    return tuple((f"tcp://w{i}", m) for i, m in enumerate(memories))


def _plan(n=1000, store="complete", tile=100, dtype="float64", workers=(4 * GB, 4 * GB),
          gpus=None, cluster=CPU, parallel_rows=0, **solver):
    solver = SolverSpec(**{"method": "lobpcg", **solver})
    facts = Facts(n=n, store=store, store_tile=tile if store else None,
                  store_dtype=dtype if store else None,
                  workers=None if workers is None else _workers(*workers), gpus=gpus,
                  parallel_rows=parallel_rows)
    return make_plan(solver, cluster, facts, tile=None if store else tile)


@pytest.mark.parametrize("solver, cluster, store, words", [
    (dict(method="dense", precision="mixed"), CPU, "complete", "applies to --method lobpcg"),
    (dict(precision="mixed", operator="recompute"), CPU, "complete", "not --operator recompute"),
    (dict(precision="mixed"), GPU, None, "CPU operator over a store"),
    (dict(operator="store"), CPU, None, "--operator store needs --store"),
    (dict(operator="memory"), CPU, None, "--operator memory needs --store"),
    (dict(precision="mixed"), CPU, None, "--precision mixed needs --store"),
    (dict(), GPU, "assemble", "needs no store"),
    (dict(method="dense"), GPU, None, "runs on the CPU"),
    (dict(operator="store"), GPU, "complete", "not store"),
])
def test_refusals_before_anything_starts(solver, cluster, store, words):
    with pytest.raises(SpecError, match=words):
        _plan(store=store, workers=None, cluster=cluster, **solver)


def test_dense_is_in_process_up_to_its_limit():
    plan = _plan(store=None, workers=None, method="dense")
    assert plan.in_process and plan.complete and plan.precision == "float64"
    assert not plan.notes
    noted = _plan(store=None, workers=None, method="dense", cluster=ClusterSpec(workers=3))
    assert "not used" in noted.notes[0]
    for method in ("dense", "lanczos"):
        shifted = _plan(store=None, workers=None, method=method, precond="shift")
        assert any("--precond shift serves LOBPCG and Davidson only" in x for x in shifted.notes)
    assert not _plan(store=None, workers=None, method="davidson", precond="shift").notes
    with pytest.raises(SpecError, match="dense path's limit"):
        _plan(n=DENSE_MAX_N + 1, store=None, workers=None, method="dense")
    assert default_method(DENSE_MAX_N, False) == "dense"
    assert default_method(DENSE_MAX_N + 1, False) == "davidson"
    assert default_method(100, True) == "davidson"
    assert default_method(100, False, "gpu") == "lobpcg" == default_method(10 ** 6, True, "gpu")


def test_a_plan_before_the_cluster_is_incomplete():
    plan = _plan(workers=None)
    assert not plan.complete and plan.operator is None


def test_auto_keeps_tiles_in_memory_when_they_fit_and_goes_mixed():
    plan = _plan()
    sizes = tile_sizes(1000, 100)
    assert plan.operator == "memory" and plan.precision == "mixed" and plan.fast == "deflated"
    assert set(plan.kept) == set(sizes) and not plan.streamed
    assert plan.tile_bytes == 8 * 1000 * 1000 // 2 + 8 * 100 * 100 * 10 // 2
    assert plan.deflated_bytes == plan.tile_bytes // 2 and plan.cached_bytes == plan.tile_bytes
    assert _plan(precision="float64").precision == "float64"
    # Parallel rows: λ_min ≈ 0 needs float64 products throughout.
    assert _plan(parallel_rows=2).precision == "float64"
    assert _plan(parallel_rows=2, precision="mixed").precision == "mixed"
    # Methods without two phases.
    assert _plan(method="lanczos").precision == "float64"


def test_auto_streams_what_does_not_fit_keeping_the_largest_tiles():
    n, t = 1000, 300  # tiles of 300², 300×100 and 100²
    sizes = tile_sizes(n, t)
    total = sum(8 * r * c for r, c in sizes.values())
    memory = int(total * 0.5 / CACHE_FRACTION / 2)  # half the tiles' bytes, over 2 workers
    plan = _plan(n=n, tile=t, workers=(memory, memory))
    assert plan.operator == "store" and plan.precision == "mixed" and plan.fast == "shifted"
    assert plan.deflated_bytes == 0
    assert 0 < plan.cached_bytes <= total * 0.5
    assert set(plan.kept) | set(plan.streamed) == set(sizes)
    assert not set(plan.kept) & set(plan.streamed)
    assert plan.streamed_bytes_per_pass == total - plan.cached_bytes
    budget = CACHE_FRACTION * 2 * memory  # kept largest first; a streamed tile did not fit
    assert all(plan.cached_bytes + 8 * sizes[p][0] * sizes[p][1] > budget
               for p in plan.streamed)
    assert any(sizes[p] == (300, 300) for p in plan.kept)
    with pytest.raises(SpecError, match="do not fit"):
        _plan(n=n, tile=t, workers=(memory, memory), operator="memory")
    assert _plan(n=n, tile=t, workers=(memory, memory), precision="float64").precision == (
        "float64")
    # --operator store keeps nothing; its fast products are the shifted tiles.
    plain = _plan(operator="store")
    assert plain.operator == "store" and not plain.kept
    assert plain.precision == "mixed" and plain.fast == "shifted"
    assert _plan(operator="store", parallel_rows=1).precision == "float64"
    assert _plan(operator="recompute").precision == "float64"


def test_mixed_without_room_for_copies_shifts_the_kept_tiles():
    sizes = tile_sizes(1000, 100)
    total = sum(8 * r * c for r, c in sizes.values())
    memory = int(total * 1.2 / CACHE_FRACTION / 2)  # the tiles fit, not their float32 copies
    for precision in ("auto", "mixed"):
        plan = _plan(workers=(memory, memory), precision=precision)
        assert plan.operator == "memory" and plan.precision == "mixed"
        assert plan.fast == "shifted" and plan.deflated_bytes == 0


def test_workers_without_a_limit_keep_everything():
    assert _plan(n=30000, tile=4096, workers=(0,)).operator == "memory"


def test_every_tile_is_assigned_once_and_the_load_is_balanced():
    for plan in (_plan(), _plan(operator="store"), _plan(store=None, tile=128)):
        pairs = [p for _, ps in plan.assignment for p in ps]
        assert sorted(pairs) == sorted(tile_sizes(1000, plan.tile))
        sizes = tile_sizes(1000, plan.tile)
        loads = [sum(sizes[p][0] * sizes[p][1] * (1 if p[0] == p[1] else 2) for p in ps)
                 for _, ps in plan.assignment]
        assert max(loads) - min(loads) <= 2 * max(r * c for r, c in sizes.values())


def test_no_workers_is_refused():
    with pytest.raises(SpecError, match="no workers"):
        _plan(workers=())


def test_recompute_tile_follows_worker_memory():
    assert _plan(store=None, tile=None, n=50000).tile == 4096
    small = _plan(store=None, tile=None, n=50000, workers=(GB, GB))
    assert small.operator == "recompute" and small.tile == default_tile(50000, GB) == 2048
    assert _plan(store=None, tile=None, n=300).tile == 300
    assert _plan(store=None, tile=700, n=500).tile == 500


def test_store_layout_prefers_the_user_then_the_existing_store():
    assert store_layout(30000, None, None, None, None, [GB]) == (2048, "float32")
    assert store_layout(3000, None, None, None, None, [0]) == (3000, "float64")
    assert store_layout(30000, None, None, 1024, "float64", [GB]) == (1024, "float64")
    assert store_layout(30000, 512, "float32", 1024, "float64", [GB]) == (512, "float32")
    plan = _plan(store="assemble", tile=None, dtype=None, n=30000, workers=(GB,))
    assert (plan.tile, plan.dtype) == (2048, "float32")


def test_gpu_keeps_tiles_on_the_gpus_where_they_fit():
    gpus = (("tcp://w0", 80 * GB), ("tcp://w1", 80 * GB))
    plan = _plan(store=None, cluster=GPU, gpus=gpus, tile=100)
    assert plan.operator == "memory" and plan.kept_on_gpu and plan.device == "gpu"
    assert plan.cached_bytes == 8 * (1000 * 1000 + 10 * 100 * 100) // 2
    tight = (("tcp://w0", 10 ** 6), ("tcp://w1", 10 ** 6))
    fallback = _plan(store=None, cluster=GPU, gpus=tight, tile=100)
    assert fallback.operator == "recompute" and not fallback.kept_on_gpu
    with pytest.raises(SpecError, match="GPU's free memory"):
        _plan(store=None, cluster=GPU, gpus=tight, tile=100, operator="memory")
    assert _plan(store=None, cluster=GPU, gpus=gpus, tile=100,
                 operator="recompute").operator == "recompute"
    # A store's kernel on GPUs: rebuilt from its rows with the store's tile.
    assert _plan(cluster=GPU, gpus=gpus).tile == 100
