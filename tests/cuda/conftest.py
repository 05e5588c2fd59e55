"""Everything in tests/cuda needs an NVIDIA GPU (and cuda.core); skipped otherwise."""

import pytest
import torch


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from forge.kernels import compiler
    except Exception:  # noqa: BLE001
        return False
    return compiler.available()


_READY = _cuda_ready()


def pytest_collection_modifyitems(config, items):
    if _READY:
        return
    skip = pytest.mark.skip(reason="needs CUDA and cuda.core")
    for item in items:
        if "tests/cuda" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
