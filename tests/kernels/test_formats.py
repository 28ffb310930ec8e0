"""Pack/unpack round trips, byte counts and input validation of the sparse formats (CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsedial.kernels import Packed24, PackedBitmap, pack_24, pack_bitmap, unpack_24, unpack_bitmap


def random_24_mask(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[N, K] bool keeping 2 random inputs of every 4."""
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(n, k)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0 and NaN == NaN count as they should for a copy)."""
    int_dtype = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(int_dtype), b.view(int_dtype))


def masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W * mask with +0.0 at dropped entries (W * mask itself gives -0.0 where W < 0): what unpack returns."""
    return torch.where(mask, w, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (17, 36), (64, 256)], ids=str)
def test_24_round_trip_is_bit_exact(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen).to(dtype)
    mask = random_24_mask(*shape, gen)
    packed = pack_24(w, mask)
    assert packed.values.shape == (shape[0], shape[1] // 2)
    assert packed.meta.dtype == torch.int32 and packed.meta.shape == (shape[0], -(-shape[1] // 32))
    assert bit_equal(unpack_24(packed), masked(w, mask))
    assert torch.equal(unpack_24(pack_24(w * mask, mask)), w * mask)


def test_24_keeps_kept_zeros_and_negative_zero() -> None:
    w = torch.tensor([[-0.0, 0.0, 5.0, 7.0]], dtype=torch.float16)
    mask = torch.tensor([[True, False, False, True]])
    assert bit_equal(unpack_24(pack_24(w, mask)), torch.tensor([[-0.0, 0.0, 0.0, 7.0]], dtype=torch.float16))


def test_24_without_mask_uses_nonzeros_and_pads_short_groups() -> None:
    w = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    assert torch.equal(unpack_24(pack_24(w)), w)


def test_24_bytes_per_weight() -> None:
    packed = pack_24(torch.randn(128, 4096, dtype=torch.float16), random_24_mask(128, 4096, torch.Generator()))
    assert packed.nbytes / (128 * 4096) == pytest.approx(1.125)


@pytest.mark.parametrize(
    ("weight", "mask", "message"),
    [
        (torch.randn(4, 6), None, "divisible by 4"),
        (torch.randn(8), None, "2-D"),
        (torch.randn(2, 8).to(torch.int32), None, "dtype"),
        (torch.ones(2, 8), None, "more than 2"),
        (torch.randn(2, 8), torch.ones(2, 4, dtype=torch.bool), "mask shape"),
        (torch.randn(1, 4), torch.tensor([[True, False, False, False]]), "exactly 2"),
    ],
    ids=["k_not_div_4", "not_2d", "int_dtype", "dense_group", "mask_shape", "one_of_four"],
)
def test_24_rejects_bad_input(weight: torch.Tensor, mask: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_24(weight, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 33), (17, 100), (64, 256)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bitmap_round_trip_is_bit_exact(shape: tuple[int, int], dtype: torch.dtype, density: float) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=gen).to(dtype)
    mask = torch.rand(*shape, generator=gen) < density
    packed = pack_bitmap(w, mask)
    assert packed.nnz == int(mask.sum())
    assert packed.row_ptr[-1].item() == packed.nnz
    assert bit_equal(unpack_bitmap(packed), masked(w, mask))
    assert torch.equal(unpack_bitmap(pack_bitmap(w * mask, mask)), w * mask)


def test_bitmap_bytes_per_weight() -> None:
    n, k = 256, 4096
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[:, : k // 2] = True  # exactly 50%
    packed = pack_bitmap(torch.randn(n, k, dtype=torch.float16), mask)
    # values 1.0 + bitmap 0.125 + word offsets 2 / 32 + row pointers 8 * (n + 1) / (n * k)
    assert packed.nbytes / (n * k) == pytest.approx(1.125 + 0.0625 + 8 * (n + 1) / (n * k))
    assert packed.density == 0.5


@pytest.mark.parametrize("k", [1, 31, 33, 100, 4096])
def test_bitmap_word_offsets_count_kept_values_before_each_word(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    mask = torch.rand(5, k, generator=gen) < 0.6
    packed = pack_bitmap(torch.randn(5, k, generator=gen), mask)
    padded = torch.nn.functional.pad(mask, (0, (-k) % 32)).reshape(5, -1, 32).sum(dim=-1)
    expected = padded.cumsum(dim=1) - padded
    assert packed.word_offsets is not None and packed.word_offsets.dtype == torch.int16
    assert torch.equal(packed.word_offsets.to(torch.int64) & 0xFFFF, expected)


def test_bitmap_word_offsets_wrap_to_unsigned_16_bit() -> None:
    packed = pack_bitmap(torch.ones(1, 65536))  # offsets up to 65504 > int16 max
    offsets = packed.word_offsets.to(torch.int64) & 0xFFFF
    assert offsets[0, -1].item() == 65536 - 32
    with pytest.raises(ValueError, match="65536"):
        pack_bitmap(torch.ones(1, 65537))


def test_bitmap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_bitmap(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        pack_bitmap(torch.randn(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_to_keeps_shape_and_dtype() -> None:
    p24 = pack_24(torch.randn(4, 8, dtype=torch.float16), random_24_mask(4, 8, torch.Generator()))
    pbm = pack_bitmap(torch.randn(4, 8, dtype=torch.bfloat16))
    assert isinstance(p24.to("cpu"), Packed24) and p24.to("cpu").shape == (4, 8)
    assert isinstance(pbm.to("cpu"), PackedBitmap) and pbm.to("cpu").dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    groups=st.integers(1, 20),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_round_trips_property(n: int, groups: int, density: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = 4 * groups
    w = torch.randn(n, k, generator=gen, dtype=torch.float32).to(torch.float16)
    mask24 = random_24_mask(n, k, gen)
    assert bit_equal(unpack_24(pack_24(w, mask24)), masked(w, mask24))
    mask = torch.rand(n, k - (seed % 4), generator=gen) < density  # K not a multiple of 4 for bitmap
    wb = w[:, : mask.shape[1]]
    assert bit_equal(unpack_bitmap(pack_bitmap(wb, mask)), masked(wb, mask))


def test_import_does_not_import_triton() -> None:
    code = "import sys, sparsedial.kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
