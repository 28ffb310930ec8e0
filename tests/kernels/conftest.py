"""Kernel tests run the Triton kernels on CUDA, or in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before the kernel modules are imported (triton reads it when a function is
decorated with @triton.jit), so it is set here, at conftest import, and only when CUDA is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the reference and format tests still run
    HAS_TRITON = False


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels run: the GPU, or CPU tensors under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
