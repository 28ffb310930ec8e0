"""Values + one-byte column format (``PackedCols``, issue 14): pack / unpack round trips, byte counts, the
Triton gemv kernel and unpack kernel against the references, and the dispatch.

Without CUDA the kernels run in Triton's CPU interpreter (conftest.py): small shapes, fp16 / fp32. The
kernel's GPU x gather (inline ``ld.global.nc``) does not run in the interpreter: there the same gather is a
tl.load (HW_LOAD=False); the GPU test at the end runs the inline one.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from sparsedial.kernels import sparse_linear
from sparsedial.kernels.formats import COLS_TILE, PackedCols, pack_cols, unpack_cols
from test_kernels import TOL, assert_matches  # same folder (rootdir-relative imports, no __init__.py)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def make(m: int, n: int, k: int, density: float, dtype: torch.dtype, bias: bool, seed: int,
         device: torch.device) -> tuple[torch.Tensor, PackedCols, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    mask = torch.rand(n, k, generator=gen) < density
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = x.double() @ (w.double() * mask).T + (b.double() if b is not None else 0.0)
    return x.to(device), pack_cols(w, mask).to(device), None if b is None else b.to(device), ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(("n", "k", "density"), [(1, 1, 1.0), (3, 31, 0.5), (5, 300, 0.3), (4, 513, 0.9),
                                                 (6, 256, 0.0), (2, 700, 1.0)], ids=str)
def test_round_trip_is_bit_exact(n: int, k: int, density: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen).to(dtype)
    w[:, ::7] = -0.0  # kept negative zeros must come back as -0.0 (padding is +0.0 at column 0)
    mask = torch.rand(n, k, generator=gen) < density
    mask[:, 0] = density > 0  # a kept weight at column 0 of the first tile next to padding entries
    packed = pack_cols(w, mask)
    assert packed.nnz == int(mask.sum())
    tiles = -(-k // COLS_TILE)
    assert packed.run_ptr.shape == (n * tiles + 1,) and packed.run_ptr.dtype == torch.int32
    assert int(packed.run_ptr[-1]) == packed.values.numel() == packed.cols.numel()
    assert bool((packed.run_ptr % 8 == 0).all())  # 8-entry aligned runs
    assert bits(unpack_cols(packed)).equal(bits(torch.where(mask, w, torch.zeros_like(w))))


def test_bytes_scale_with_stored_values() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 4096, generator=gen).half()
    for density, low, high in [(0.3, 0.90, 1.00), (0.1, 0.30, 0.40)]:
        mask = torch.rand(64, 4096, generator=gen) < density
        per_weight = pack_cols(w, mask).nbytes / w.numel()
        assert low < per_weight < high, (density, per_weight)  # 3 bytes a stored value + padding + run starts


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("m", "n", "k", "density", "bias"), [(1, 33, 300, 0.3, True), (1, 19, 600, 0.1, False),
                                                               (3, 21, 256, 0.5, True), (8, 40, 100, 0.2, False),
                                                               (9, 17, 520, 0.3, True), (2, 16, 64, 0.0, True)],
                         ids=str)
def test_kernel_matches_reference(m: int, n: int, k: int, density: float, bias: bool, dtype: torch.dtype,
                                  device: torch.device) -> None:
    x, packed, b, ref = make(m, n, k, density, dtype, bias, seed=n * k, device=device)
    assert_matches(sparse_linear(x, packed, b, backend="triton"), ref, dtype)


@needs_triton
@pytest.mark.parametrize(("m", "split"), [(1, 1), (1, 2), (1, 3), (5, 2)])
def test_kernel_split_k_and_tiles(m: int, split: int, device: torch.device) -> None:
    from sparsedial.kernels import _launch
    from sparsedial.kernels._launch import KernelConfig
    from sparsedial.kernels.triton_cols import linear_cols_triton

    x, packed, b, ref = make(m, 23, 700, 0.25, torch.float16, True, seed=m + split, device=device)  # 3 tiles
    config = KernelConfig(min(8, 1 << (m - 1).bit_length()), 8, 16, split_k=split)
    y = linear_cols_triton(x, packed, b, config=config)
    assert_matches(y, ref, torch.float16)
    assert torch.equal(linear_cols_triton(x, packed, b, config=config), y)
    for locks in _launch._LOCKS.values():
        assert int(locks.abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("n", "k", "density"), [(1, 4, 1.0), (19, 300, 0.3), (5, 513, 0.0)], ids=str)
def test_unpack_triton_is_bit_exact(n: int, k: int, density: float, dtype: torch.dtype,
                                    device: torch.device) -> None:
    from sparsedial.kernels.triton_cols import unpack_cols_triton

    _, packed, _, _ = make(1, n, k, density, dtype, False, seed=k, device=device)
    assert torch.equal(bits(unpack_cols_triton(packed)), bits(unpack_cols(packed)))


@needs_triton
def test_prefill_runs_dense(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsedial.kernels import triton_cols

    x, packed, b, ref = make(16, 24, 300, 0.3, torch.float16, True, seed=1, device=device)
    monkeypatch.setattr(triton_cols, "linear_cols_triton", lambda *a, **k: pytest.fail("kernel ran"))
    y = sparse_linear(x, packed, b, backend="triton")
    assert torch.equal(y, F.linear(x, unpack_cols(packed), b))
    assert_matches(y, ref, torch.float16)


def test_torch_backend_and_validation() -> None:
    x, packed, b, ref = make(3, 16, 64, 0.4, torch.float32, True, seed=2, device=torch.device("cpu"))
    torch.testing.assert_close(sparse_linear(x, packed, b, backend="torch").double(), ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_linear(x, packed, torch.zeros(3), backend="torch")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m", [1, 5])
def test_gpu_kernel(m: int, dtype: torch.dtype) -> None:
    x, packed, b, ref = make(m, 1000, 4100, 0.3, dtype, True, seed=3, device=torch.device("cuda"))
    y = sparse_linear(x, packed, b)
    assert torch.equal(y, sparse_linear(x, packed, b))
    assert_matches(y, ref, dtype)
