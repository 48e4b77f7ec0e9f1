"""Shared test setup: the ``gpu`` marker skips cleanly on machines without CUDA."""

import os

import pytest
import torch

# Under pytest-xdist every worker would start one CPU thread per core: N workers x N threads oversubscribe
# the cores and CPU-heavy fixtures (random checkpoints, FP4 quantisation) slow down by orders of magnitude.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's name: fresh but reproducible inputs per test."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
