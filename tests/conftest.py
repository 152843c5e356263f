import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def file_tree(path):
    """Every file under ``path`` with its bytes, to show that nothing was touched."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


@pytest.fixture(scope="session")
def cluster():
    """An in-process Dask cluster shared by the tests (two workers, one thread each)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as c:
        yield c


@pytest.fixture
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c
