"""Test-wide set-up.

TRITON_INTERPRET must be set before any module that defines Triton kernels is imported (Triton
reads it at @triton.jit time), so it is set here, at the top, when no GPU is present.
"""

import os

try:  # decide without importing torch.cuda machinery twice
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from a clean Dynamo cache: without it, the compiles of earlier tests
    in the same worker count towards Dynamo's recompile limit (8 per code object), and a test
    that lands after enough of them runs its model eagerly, with no fgcompile state attached
    (which tests share a worker depends on pytest-xdist's distribution)."""
    torch._dynamo.reset()
    yield
