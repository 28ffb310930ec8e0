"""Triton sparse linear kernels vs a float64 reference, and the dispatch entry point.

Without CUDA the kernels run in Triton's CPU interpreter (see conftest.py), so shapes stay small
(K, N <= 256) and dtypes are fp16/fp32 (bf16 is silently wrong in the interpreter: GPU tests only).

Tolerances, against ``x.double() @ W.double().T + b`` of the same (rounded) inputs:
* fp16 / bf16: the kernels accumulate in fp32 (error ~ K * 2^-24 relative, negligible here) and round the
  output once, so |err| <= half an ulp of the output: rtol 2^-10 (fp16) / 2^-7 (bf16), plus a small atol
  for outputs near zero where the fp32 sum order matters.
* fp32: ieee fp32 dot and FMAs (no tf32): rtol 1e-5, atol 1e-5 * sqrt(K) scale.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsedial.kernels import (
    Packed24,
    PackedBitmap,
    linear_24_reference,
    linear_bitmap_reference,
    pack_24,
    pack_bitmap,
    sparse_linear,
)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

TOL = {
    torch.float16: {"rtol": 2**-10, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
}


def random_24_mask(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(n, k)


def make_case(
    fmt: str, m: int, n: int, k: int, dtype: torch.dtype, bias: bool, density: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, Packed24 | PackedBitmap, torch.Tensor | None, torch.Tensor]:
    """Random x [M, K], packed W [N, K], bias [N] and the float64 reference y [M, N]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    mask = random_24_mask(n, k, gen) if fmt == "24" else torch.rand(n, k, generator=gen) < density
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    w, x = w.to(dtype), x.to(dtype)
    b = b.to(dtype) if b is not None else None
    packed = pack_24(w, mask) if fmt == "24" else pack_bitmap(w, mask)
    ref = x.double() @ (w.double() * mask).T + (b.double() if b is not None else 0.0)
    return x.to(device), packed.to(device), None if b is None else b.to(device), ref


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), ref, **TOL[dtype])


# name: (M, N, K, bias) -- BLOCK sizes in the interpreter are N 16/32, K 32..64.
CASES = {
    "decode_m1": (1, 64, 128, False),
    "decode_m1_bias": (1, 48, 96, True),
    "odd_m3_ragged": (3, 33, 100, True),
    "m8": (8, 40, 64, False),
    "odd_m17_ragged": (17, 50, 132, True),
    "k_below_block": (2, 16, 12, False),
}


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "dot"])
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(case: str, dtype: torch.dtype, fmt: str, path: str, device: torch.device) -> None:
    m, n, k, bias = CASES[case]
    x, packed, b, ref = make_case(fmt, m, n, k, dtype, bias, density=0.4, seed=list(CASES).index(case), device=device)
    y = sparse_linear(x, packed, b, backend="triton", path=path)
    assert_matches(y, ref, dtype)


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_leading_batch_dims_and_auto_path(fmt: str, device: torch.device) -> None:
    x, packed, b, ref = make_case(fmt, 6, 24, 64, torch.float16, True, 0.5, seed=3, device=device)
    y = sparse_linear(x.reshape(2, 3, 64), packed, b, backend="triton")
    assert y.shape == (2, 3, 24)
    assert_matches(y.reshape(6, 24), ref, torch.float16)


@needs_triton
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_bitmap_empty_and_full(density: float, device: torch.device) -> None:
    x, packed, b, ref = make_case("bitmap", 2, 20, 40, torch.float16, True, density, seed=4, device=device)
    assert_matches(sparse_linear(x, packed, b, backend="triton"), ref, torch.float16)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    groups=st.integers(1, 24),
    density=st.floats(0.0, 1.0),
    fmt=st.sampled_from(["24", "bitmap"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_property_random_masks(m: int, n: int, groups: int, density: float, fmt: str, seed: int) -> None:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    x, packed, b, ref = make_case(fmt, m, n, 4 * groups, torch.float16, seed % 2 == 0, density, seed, device)
    assert_matches(sparse_linear(x, packed, b, backend="triton"), ref, torch.float16)


# ---- dispatch (no triton needed) -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["24", "bitmap"])
def test_dispatch_on_cpu_uses_reference(fmt: str) -> None:
    x, packed, b, _ = make_case(fmt, 3, 16, 32, torch.float32, True, 0.5, seed=5, device=torch.device("cpu"))
    reference = linear_24_reference if fmt == "24" else linear_bitmap_reference
    assert torch.equal(sparse_linear(x, packed, b), reference(x, packed, b))


def test_dispatch_rejects_bad_input() -> None:
    x, packed, _b, _ = make_case("24", 2, 16, 32, torch.float32, True, 0.5, seed=6, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 32\]"):
        sparse_linear(x[:, :16], packed)
    with pytest.raises(ValueError, match="dtype"):
        sparse_linear(x.half(), packed)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_linear(x, packed, torch.zeros(3))
    with pytest.raises(ValueError, match="Packed24, PackedBitmap, PackedCols or PackedNested"):
        sparse_linear(x, torch.zeros(16, 32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        sparse_linear(x, packed, backend="cuda")  # type: ignore[arg-type]


# ---- GPU only: bf16 and real model shapes ------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("m", [1, 5, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1000, 4100)], ids=str)
def test_gpu_large_shapes(n: int, k: int, dtype: torch.dtype, m: int, fmt: str) -> None:
    x, packed, b, ref = make_case(fmt, m, n, k, dtype, True, 0.3, seed=7, device=torch.device("cuda"))
    # Two runs must agree bit for bit: a moving result would mean a race.
    y1 = sparse_linear(x, packed, b)
    y2 = sparse_linear(x, packed, b)
    assert torch.equal(y1, y2)
    assert_matches(y1, ref, dtype)


# ---- explicit tiles (the autotune candidates run on the GPU; the interpreter checks the tiling logic) ----

TILES = {  # name: (path, KernelConfig args), M = 5 rows, N = 24, K = 160 (ragged against every BLOCK_K)
    "gemv_bm8_bk128": ("gemv", (8, 8, 128)),
    "gemv_bm2_bk256": ("gemv", (2, 4, 256)),
    "dot_bm16_bn32": ("dot", (16, 32, 128)),
}


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("tile", list(TILES), ids=list(TILES))
def test_explicit_tiles(tile: str, fmt: str, device: torch.device) -> None:
    from sparsedial.kernels._launch import KernelConfig

    path, (bm, bn, bk) = TILES[tile]
    x, packed, b, ref = make_case(fmt, 5, 24, 160, torch.float16, True, 0.3, seed=11, device=device)
    if fmt == "24":
        from sparsedial.kernels.triton_24 import linear_24_triton as launch
    else:
        from sparsedial.kernels.triton_bitmap import linear_bitmap_triton as launch
    y = launch(x, packed, b, path=path, config=KernelConfig(bm, bn, bk))
    assert_matches(y, ref, torch.float16)


@needs_triton
def test_bitmap_without_word_offsets(device: torch.device) -> None:
    x, packed, b, ref = make_case("bitmap", 2, 20, 70, torch.float16, False, 0.5, seed=12, device=device)
    bare = PackedBitmap(packed.bitmap, packed.values, packed.row_ptr, packed.shape)  # hand-built: no offsets
    assert_matches(sparse_linear(x, bare, b, backend="triton"), ref, torch.float16)
