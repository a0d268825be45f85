"""Kernel tests run the Triton kernels on CUDA when present, else on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it at decoration).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmforge.kernels._interp import interpreting, patch_bf16  # noqa: E402

if interpreting():
    patch_bf16()

HERE = os.path.dirname(__file__)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and str(item.path).startswith(HERE):
            item.add_marker(skip)
