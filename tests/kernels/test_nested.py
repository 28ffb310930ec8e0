"""Nested-tier shared-values format: pack/unpack, byte counts, validation, reference and Triton kernels.

Tiers are sparsest first. Without CUDA the kernels run in Triton's CPU interpreter (conftest.py): shapes
stay small (K, N <= 200) and dtypes are fp16/fp32 (bf16 is silently wrong in the interpreter: GPU tests
only). Tolerances are those of test_kernels.py (fp32 accumulation, one rounding of the output).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsedial.kernels import (
    PackedNested,
    linear_nested_reference,
    pack_bitmap,
    pack_nested,
    sparse_linear,
    unpack_nested,
)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

TIER_SPARSITIES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the model's unstructured tiers, sparsest first
TOL = {
    torch.float16: {"rtol": 2**-10, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
}


def rank_masks(n: int, k: int, sparsities: tuple[float, ...], gen: torch.Generator) -> list[torch.Tensor]:
    """Nested masks as the engine builds them: a random per-row rank, keep the int(K (1 - s)) best."""
    rank = torch.rand(n, k, generator=gen).argsort(dim=1).argsort(dim=1)
    return [rank < max(1, int(k * (1 - s))) for s in sparsities]


def level_masks(n: int, k: int, tiers: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Nested masks from uniform random levels 0..T (T = never): any pattern, rows of any count."""
    level = torch.randint(0, tiers + 1, (n, k), generator=gen)
    return [level <= t for t in range(tiers)]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    int_dtype = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(int_dtype), b.view(int_dtype))


def masked(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, w, torch.zeros_like(w))


# ---- pack / unpack ---------------------------------------------------------------------------------


def padded_entries(mask: torch.Tensor, tile: int, align: int) -> torch.Tensor:
    """[N, tiles] entries a run of `mask`'s kept weights takes when padded to a multiple of `align`."""
    n, k = mask.shape
    tiles = -(-k // tile)
    per_tile = torch.nn.functional.pad(mask, (0, tiles * tile - k)).reshape(n, tiles, tile).sum(dim=-1)
    return -(-per_tile // align) * align


@pytest.mark.parametrize("align", [1, 4, 8])
@pytest.mark.parametrize("index", ["both", "cols", "levels"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(("shape", "tile"), [((1, 1), 32), ((3, 31), 32), ((5, 200), 64), ((17, 300), 128)],
                         ids=str)
def test_round_trip_every_tier_is_bit_exact(
    shape: tuple[int, int], tile: int, dtype: torch.dtype, index: str, align: int
) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=gen).to(dtype)
    masks = rank_masks(*shape, TIER_SPARSITIES, gen)
    packed = pack_nested(w, masks, tile=tile, index=index, align=align)
    assert packed.num_tiers == 7 and packed.num_planes == 3 and packed.align == align
    assert packed.tier_nnz == tuple(int(m.sum()) for m in masks)
    # every (row, tile) run of the densest tier padded to a multiple of align (align 1: no padding)
    assert packed.values.numel() == int(padded_entries(masks[-1], tile, align).sum())
    if align == 1:
        assert packed.values.numel() == packed.tier_nnz[-1]
    for tier, mask in enumerate(masks):
        assert bit_equal(unpack_nested(packed, tier), masked(w, mask)), tier


@pytest.mark.parametrize("align", [1, 2, 4, 8])
@pytest.mark.parametrize("tiers", [1, 2, 3, 8])
def test_round_trip_tier_counts(tiers: int, align: int) -> None:
    gen = torch.Generator().manual_seed(tiers)
    w = torch.randn(6, 70, generator=gen, dtype=torch.float16)
    masks = level_masks(6, 70, tiers, gen)
    for index in ("cols", "levels"):
        packed = pack_nested(w, masks, tile=32, index=index, align=align)
        assert packed.num_planes == tiers.bit_length()
        for tier, mask in enumerate(masks):
            assert bit_equal(unpack_nested(packed, tier), masked(w, mask))


def test_keeps_kept_zeros_and_negative_zero() -> None:
    w = torch.tensor([[-0.0, 0.0, 5.0, -7.0]], dtype=torch.float16)
    masks = [torch.tensor([[True, False, False, False]]), torch.tensor([[True, True, False, True]])]
    packed = pack_nested(w, masks, tile=32)
    assert packed.tier_nnz == (1, 3)
    assert bit_equal(unpack_nested(packed, 0), torch.tensor([[-0.0, 0.0, 0.0, 0.0]], dtype=torch.float16))
    assert bit_equal(unpack_nested(packed, 1), torch.tensor([[-0.0, 0.0, 0.0, -7.0]], dtype=torch.float16))


def test_layout_tier_values_are_a_prefix_of_every_tile() -> None:
    """Values run level-major, then by column; level_ends and cols agree with the masks."""
    w = torch.arange(1, 9, dtype=torch.float32).reshape(1, 8)
    masks = [torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool),
             torch.tensor([[0, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)]
    packed = pack_nested(w, masks, tile=32, align=1)
    assert packed.values.tolist() == [4.0, 2.0, 7.0]  # level 0 (input 3), then level 1 (inputs 1, 6)
    assert packed.cols.tolist() == [3, 1, 6] and packed.cols.dtype == torch.uint8
    assert packed.level_ends[:, 0, 0].tolist() == [1, 3]
    assert packed.planes.shape == (1, 1, 2) and packed.planes.dtype == torch.int32
    # level codes: input 3 -> 0, inputs 1, 6 -> 1, the rest (and the padding) -> 2 (never)
    codes = [(packed.planes[0, 0, 0] >> c) & 1 | ((packed.planes[0, 0, 1] >> c) & 1) << 1 for c in range(8)]
    assert [int(c) for c in codes] == [2, 1, 2, 0, 2, 2, 1, 2]


def test_layout_aligned_runs_are_padded_with_zeros() -> None:
    """align=4, by hand: each (row, tile) run is followed by +0.0 / column-0 entries up to a multiple of 4,
    the tile offsets and row pointers count the padding, and tier prefixes (level_ends) do not."""
    w = torch.arange(1, 41, dtype=torch.float32).reshape(1, 40)  # weight of input c is c + 1
    keep0 = torch.zeros(1, 40, dtype=torch.bool)
    keep0[0, [3, 35]] = True
    keep1 = keep0.clone()
    keep1[0, [1, 6, 33, 34, 38, 39]] = True
    packed = pack_nested(w, [keep0, keep1], tile=32, align=4, index="both")
    # tile 0 (inputs 0..31): level 0 = input 3, level 1 = inputs 1, 6 -> 3 values + 1 pad
    # tile 1 (inputs 32..39): level 0 = input 35, level 1 = 33, 34, 38, 39 -> 5 values + 3 pad
    assert packed.values.tolist() == [4.0, 2.0, 7.0, 0.0, 36.0, 34.0, 35.0, 39.0, 40.0, 0.0, 0.0, 0.0]
    assert packed.cols.tolist() == [3, 1, 6, 0, 3, 1, 2, 6, 7, 0, 0, 0]
    assert packed.row_ptr.tolist() == [0, 12]
    assert packed.tile_offsets.tolist() == [[0, 4]]
    assert packed.level_ends[:, 0].tolist() == [[1, 1], [3, 5]]
    assert packed.tier_nnz == (2, 8)
    assert packed.read_bytes(0, "cols") == (4 + 4) * 5 + 16 + 4 + 2  # two 4-entry prefixes + tables
    assert packed.read_bytes(1, "cols") == (4 + 8) * 5 + 16 + 4 + 2
    assert packed.read_bytes(1, "levels") == 8 * 4 + 16 + 4 + packed.planes.nbytes  # kept values only
    for tier, mask in enumerate([keep0, keep1]):
        assert bit_equal(unpack_nested(packed, tier), masked(w, mask))


@pytest.mark.parametrize("index", ["cols", "levels"])
def test_unpack_ignores_padding_entries(index: str) -> None:
    """Garbage in the padding entries never reaches a tier: unpack reads only each run's kept prefix."""
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(5, 100, generator=gen).to(torch.float16)
    masks = level_masks(5, 100, 3, gen)
    packed = pack_nested(w, masks, tile=32, index=index, align=8)
    real = torch.zeros(packed.values.numel(), dtype=torch.bool)
    starts = packed.row_ptr[:-1, None] + (packed.tile_offsets.to(torch.int64) & 0xFFFF)
    counts = padded_entries(masks[-1], 32, 1)
    for s0, c in zip(starts.flatten().tolist(), counts.flatten().tolist(), strict=True):
        assert s0 % 8 == 0
        real[s0:s0 + c] = True
    assert (packed.values[~real] == 0).all()
    garbage = replace(packed, values=torch.where(real, packed.values, torch.full_like(packed.values, 1000.0)))
    for tier, mask in enumerate(masks):
        assert bit_equal(unpack_nested(garbage, tier), masked(w, mask))


def test_aligned_bytes_per_weight() -> None:
    """align=4: the cols read is each tile's tier prefix rounded up to 4 entries (3 bytes each), counted from
    the masks; the levels read and the tables do not change; stored values include the padding."""
    n, k = 16, 1024
    masks = rank_masks(n, k, TIER_SPARSITIES, torch.Generator().manual_seed(5))
    w = torch.randn(n, k, dtype=torch.float16)
    p1, p4 = pack_nested(w, masks, align=1), pack_nested(w, masks, align=4)
    tables = 2 * (n * k // 128) + 8 * (n + 1)
    for tier, mask in enumerate(masks):
        entries = int(padded_entries(mask, 128, 4).sum())
        assert p4.read_bytes(tier, "cols") == 3 * entries + tables + n * k // 128
        assert p4.read_bytes(tier, "levels") == p1.read_bytes(tier, "levels")
        assert 0 <= p4.read_bytes(tier, "cols") - p1.read_bytes(tier, "cols") <= 3 * 3 * n * k // 128
    pad = int(padded_entries(masks[-1], 128, 4).sum()) - p1.tier_nnz[-1]
    assert p4.nbytes - p1.nbytes == 3 * pad and pad > 0


def test_two_index_packs_share_the_same_values() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 150, generator=gen)
    masks = rank_masks(9, 150, TIER_SPARSITIES, gen)
    both, cols, levels = (pack_nested(w, masks, tile=64, index=i) for i in ("both", "cols", "levels"))
    assert torch.equal(both.values, cols.values) and torch.equal(both.values, levels.values)
    assert torch.equal(both.cols, cols.cols) and torch.equal(both.planes, levels.planes)
    assert cols.planes is None and levels.cols is None and levels.level_ends is None
    assert both.nbytes == cols.nbytes + levels.nbytes - (
        both.values.nbytes + both.row_ptr.nbytes + both.tile_offsets.nbytes
    )


def test_bytes_per_weight() -> None:
    n, k = 64, 4096
    masks = rank_masks(n, k, TIER_SPARSITIES, torch.Generator().manual_seed(0))  # exact per-row counts
    packed = pack_nested(torch.randn(n, k, dtype=torch.float16), masks, align=1)  # tile 128, 3 planes
    tables = 2 / 128 + 8 * (n + 1) / (n * k)  # tile offsets + row pointers
    for tier, s in enumerate(TIER_SPARSITIES):
        d = int(k * (1 - s)) / k
        assert packed.density(tier) == pytest.approx(d)
        assert packed.bytes_per_weight(tier, "cols") == pytest.approx(3 * d + 1 / 128 + tables)
        assert packed.bytes_per_weight(tier, "levels") == pytest.approx(2 * d + 3 / 8 + tables)
        assert packed.index_for(tier) == ("cols" if s >= 0.7 else "levels")
        assert packed.bytes_per_weight(tier) == min(packed.bytes_per_weight(tier, i) for i in ("cols", "levels"))
    # stored: values + cols of the densest tier, planes, tile offsets, level_ends of 7 tiers, row pointers
    d = int(k * 0.7) / k
    assert packed.stored_bytes_per_weight == pytest.approx(3 * d + 3 / 8 + 7 / 128 + tables)
    per_tier_bitmaps = sum(pack_bitmap(torch.zeros(n, k, dtype=torch.float16), m).nbytes for m in masks)
    assert packed.nbytes < per_tier_bitmaps / 2.5


@pytest.mark.parametrize(
    ("masks", "kwargs", "message"),
    [
        ([torch.ones(2, 40, dtype=torch.bool), torch.zeros(2, 40, dtype=torch.bool)], {}, "densest first"),
        ([torch.eye(2, 40, dtype=torch.bool), torch.eye(2, 40, dtype=torch.bool).roll(1, 1)], {}, "not nested"),
        ([], {}, "1 to 8 tier masks"),
        ([torch.ones(2, 40, dtype=torch.bool)] * 9, {}, "1 to 8 tier masks"),
        ([torch.ones(2, 41, dtype=torch.bool)], {}, "mask shape"),
        ([None], {}, "explicit bool mask"),
        (torch.ones(2, 40, dtype=torch.bool), {}, r"\[T, N, K\]"),
        ([torch.ones(2, 40, dtype=torch.bool)], {"tile": 256}, "tile must be one of"),
        ([torch.ones(2, 40, dtype=torch.bool)], {"index": "bitmap"}, "index must be"),
        ([torch.ones(2, 40, dtype=torch.bool)], {"align": 3}, "align must be one of"),
        ([torch.ones(2, 40, dtype=torch.bool)], {"align": 16}, "align must be one of"),
        ([torch.ones(2, 40, dtype=torch.bool)], {"align": True}, "align must be one of"),
    ],
    ids=["densest_first", "not_nested", "no_masks", "nine_tiers", "mask_shape", "none_mask", "2d_tensor",
         "tile_256", "bad_index", "align_3", "align_16", "align_bool"],
)
def test_pack_rejects_bad_input(masks: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_nested(torch.randn(2, 40), masks, **kwargs)


def test_pack_rejects_bad_weight_and_wide_rows() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_nested(torch.randn(2, 3, 4), [torch.ones(2, 3, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="65536"):
        pack_nested(torch.randn(1, 65537), [torch.ones(1, 65537, dtype=torch.bool)])


def test_tier_and_index_validation() -> None:
    packed = pack_nested(torch.randn(2, 40), level_masks(2, 40, 3, torch.Generator()), index="levels")
    for bad in (-1, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"tier must be an int in \[0, 3\)"):
            unpack_nested(packed, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not stored"):
        packed.bytes_per_weight(0, "cols")
    moved = packed.to("cpu")
    assert isinstance(moved, PackedNested) and moved.tier_nnz == packed.tier_nnz and moved.cols is None


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 300),
    tiers=st.integers(1, 8),
    tile=st.sampled_from([32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(n: int, k: int, tiers: int, tile: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(torch.float16)
    masks = level_masks(n, k, tiers, gen)
    packed = pack_nested(w, masks, tile=tile, index=("cols", "levels", "both")[seed % 3])
    for tier, mask in enumerate(masks):
        assert bit_equal(unpack_nested(packed, tier), masked(w, mask))


# ---- reference and dispatch (no triton needed) ------------------------------------------------------


def make_case(
    m: int, n: int, k: int, dtype: torch.dtype, bias: bool, tile: int, seed: int, device: torch.device,
    masks_fn: str = "rank",
) -> tuple[torch.Tensor, PackedNested, torch.Tensor | None, list[torch.Tensor]]:
    """Random x [M, K], nested packed W [N, K] (7 tiers), bias [N] and the float64 reference y per tier."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    masks = rank_masks(n, k, TIER_SPARSITIES, gen) if masks_fn == "rank" else level_masks(n, k, 7, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    refs = [x.double() @ (w.double() * mask).T + (b.double() if b is not None else 0.0) for mask in masks]
    packed = pack_nested(w, masks, tile=tile)
    return x.to(device), packed.to(device), None if b is None else b.to(device), refs


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double().cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_reference_equals_dense_masked_matmul(dtype: torch.dtype) -> None:
    x, packed, b, refs = make_case(5, 24, 100, dtype, True, 32, seed=1, device=torch.device("cpu"))
    for tier, ref in enumerate(refs):
        y = linear_nested_reference(x.reshape(5, 1, 100), packed, tier, b)
        assert y.shape == (5, 1, 24)
        assert_matches(y.reshape(5, 24), ref, dtype)
        assert torch.equal(sparse_linear(x, packed, b, tier=tier), linear_nested_reference(x, packed, tier, b))


def test_dispatch_tier_argument() -> None:
    x, packed, _b, _ = make_case(2, 8, 40, torch.float32, False, 32, seed=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="needs tier="):
        sparse_linear(x, packed)
    with pytest.raises(ValueError, match=r"tier must be an int in \[0, 7\)"):
        sparse_linear(x, packed, tier=7)
    with pytest.raises(ValueError, match="PackedNested only"):
        sparse_linear(x, pack_bitmap(torch.randn(8, 40)), tier=0)
    with pytest.raises(ValueError, match="dtype"):
        sparse_linear(x.half(), packed, tier=0)


# ---- Triton (CUDA, or the CPU interpreter) -----------------------------------------------------------

# name: (M, N, K, bias, tile) -- interpreter tiles: BLOCK_N 16, BLOCK_J 32; M > 8 spans two row blocks.
CASES = {
    "decode_m1": (1, 64, 128, False, 64),
    "decode_m1_bias_ragged": (1, 33, 100, True, 32),
    "odd_m3": (3, 40, 96, True, 32),
    "m8": (8, 24, 64, False, 64),
    "odd_m11_ragged": (11, 20, 132, True, 128),
    "k_below_tile": (2, 16, 12, False, 32),
}
TIERS_CHECKED = (0, 3, 6)  # 90%, 60%, 30%: sparsest, middle, densest


@needs_triton
@pytest.mark.parametrize("index", ["cols", "levels"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(case: str, dtype: torch.dtype, index: str, device: torch.device) -> None:
    from sparsedial.kernels.triton_nested import linear_nested_triton

    m, n, k, bias, tile = CASES[case]
    x, packed, b, refs = make_case(m, n, k, dtype, bias, tile, seed=list(CASES).index(case), device=device)
    for tier in TIERS_CHECKED:
        assert_matches(linear_nested_triton(x, packed, tier, b, index=index), refs[tier], dtype)


@needs_triton
def test_auto_index_every_tier_and_batch_dims(device: torch.device) -> None:
    x, packed, b, refs = make_case(4, 24, 96, torch.float16, True, 32, seed=7, device=device)
    for tier, ref in enumerate(refs):
        y = sparse_linear(x.reshape(2, 2, 96), packed, b, backend="triton", tier=tier)
        assert y.shape == (2, 2, 24)
        assert_matches(y.reshape(4, 24), ref, torch.float16)


@needs_triton
def test_kernel_empty_and_full_tiers(device: torch.device) -> None:
    from sparsedial.kernels.triton_nested import linear_nested_triton

    gen = torch.Generator().manual_seed(8)
    w, x, b = torch.randn(20, 40, generator=gen), torch.randn(3, 40, generator=gen), torch.randn(20, generator=gen)
    masks = [torch.zeros(20, 40, dtype=torch.bool), torch.rand(20, 40, generator=gen) < 0.5,
             torch.ones(20, 40, dtype=torch.bool)]
    masks[1] |= masks[0]
    packed = pack_nested(w, masks, tile=32).to(device)
    for tier, mask in enumerate(masks):
        ref = x.double() @ (w.double() * mask).T + b.double()
        for index in ("cols", "levels"):
            y = linear_nested_triton(x.to(device), packed, tier, b.to(device), index=index)
            assert_matches(y, ref, torch.float32)


@needs_triton
def test_kernel_eight_tiers_top_level_counts(device: torch.device) -> None:
    """8 tiers (the most): the levels kernel's per-level counts fill all eight 8-bit fields of its int64,
    the top one up to the sign bit when every weight of a 128-wide tile sits at level 7."""
    from sparsedial.kernels.triton_nested import linear_nested_triton

    gen = torch.Generator().manual_seed(9)
    w, x = torch.randn(16, 256, generator=gen), torch.randn(2, 256, generator=gen)
    only_last = [torch.zeros(16, 256, dtype=torch.bool)] * 7 + [torch.ones(16, 256, dtype=torch.bool)]
    rank = torch.rand(16, 256, generator=gen)
    spread = [rank < (t + 1) / 8 for t in range(8)]  # random levels 0..7
    for masks in (only_last, spread):
        packed = pack_nested(w, masks, tile=128).to(device)
        for tier in (0, 3, 7):
            ref = x.double() @ (w.double() * masks[tier]).T
            for index in ("cols", "levels"):
                assert_matches(linear_nested_triton(x.to(device), packed, tier, None, index=index), ref,
                               torch.float32)


@needs_triton
@pytest.mark.parametrize(("index", "tile"), [("cols", (8, 4, 16)), ("cols", (2, 8, 64)), ("levels", (4, 8, 64))],
                         ids=["cols_bm8_bj16", "cols_bm2_bj64", "levels_bm4"])
def test_explicit_tiles(index: str, tile: tuple[int, int, int], device: torch.device) -> None:
    from sparsedial.kernels._launch import KernelConfig
    from sparsedial.kernels.triton_nested import linear_nested_triton

    x, packed, b, refs = make_case(5, 24, 160, torch.float16, True, 64, seed=11, device=device)
    for tier in (1, 5):
        y = linear_nested_triton(x, packed, tier, b, index=index, config=KernelConfig(*tile))
        assert_matches(y, refs[tier], torch.float16)


@needs_triton
@pytest.mark.parametrize("align", [1, 2, 8])
@pytest.mark.parametrize("index", ["cols", "levels"])
def test_kernel_other_alignments(align: int, index: str, device: torch.device) -> None:
    """Packs of every run alignment (the default, 4, runs in the tests above) against the float64 reference."""
    from sparsedial.kernels.triton_nested import linear_nested_triton

    gen = torch.Generator().manual_seed(30 + align)
    w, x, b = torch.randn(24, 100, generator=gen), torch.randn(3, 100, generator=gen), torch.randn(24, generator=gen)
    masks = level_masks(24, 100, 4, gen)
    packed = pack_nested(w, masks, tile=32, align=align).to(device)
    for tier in range(4):
        ref = x.double() @ (w.double() * masks[tier]).T + b.double()
        y = linear_nested_triton(x.to(device), packed, tier, b.to(device), index=index)
        assert_matches(y, ref, torch.float32)


@needs_triton
def test_kernel_rounded_prefix_skips_next_levels_and_padding(device: torch.device) -> None:
    """By hand, align 4: tier 0 keeps one weight a tile, so the kernel's 4-entry read of each prefix also
    covers level-1 values and padding, which must not count; the padding is filled with garbage."""
    from sparsedial.kernels.triton_nested import linear_nested_triton

    w = torch.zeros(2, 64)
    w[0, 5], w[0, 9], w[0, 40], w[0, 41] = 2.0, 100.0, 300.0, 3.0  # row 0: level 0 at 5 and 41
    w[1, 0], w[1, 63] = 1000.0, -4.0  # row 1: level 1 at 0, level 0 at 63
    keep0 = torch.zeros(2, 64, dtype=torch.bool)
    keep0[0, [5, 41]] = True
    keep0[1, 63] = True
    keep1 = keep0 | (w != 0)
    packed = pack_nested(w, [keep0, keep1], tile=32, align=4, index="cols")
    # runs (row, tile), each padded to 4 entries: (0, 0) = [2, 100], (0, 1) = [3, 300], (1, 0) = [1000], (1, 1) = [-4]
    assert packed.row_ptr.tolist() == [0, 8, 16] and packed.tile_offsets.tolist() == [[0, 4], [0, 4]]
    pad = torch.ones(packed.values.numel(), dtype=torch.bool)
    pad[[0, 1, 4, 5, 8, 12]] = False
    assert packed.values[~pad].tolist() == [2.0, 100.0, 3.0, 300.0, 1000.0, -4.0]
    assert packed.level_ends[0].tolist() == [[1, 1], [0, 1]]
    garbage = replace(packed, values=torch.where(pad, torch.full_like(packed.values, 1e4), packed.values)).to(device)
    x = torch.arange(1, 65, dtype=torch.float32)[None, :]  # x[c] = c + 1
    y0 = linear_nested_triton(x.to(device), garbage, 0, index="cols").cpu()
    y1 = linear_nested_triton(x.to(device), garbage, 1, index="cols").cpu()
    assert y0.tolist() == [[2.0 * 6 + 3.0 * 42, -4.0 * 64]]
    assert y1.tolist() == [[2.0 * 6 + 100.0 * 10 + 300.0 * 41 + 3.0 * 42, 1000.0 * 1 - 4.0 * 64]]


@needs_triton
def test_kernel_rejects_dot_path_and_missing_index(device: torch.device) -> None:
    from sparsedial.kernels.triton_nested import linear_nested_triton

    gen = torch.Generator().manual_seed(12)
    packed = pack_nested(torch.randn(8, 40, generator=gen), level_masks(8, 40, 2, gen), index="cols").to(device)
    x = torch.randn(2, 40, generator=gen).to(device)
    with pytest.raises(ValueError, match="only a gemv kernel"):
        linear_nested_triton(x, packed, 0, path="dot")
    with pytest.raises(ValueError, match="stored in the pack"):
        linear_nested_triton(x, packed, 0, index="levels")


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    k=st.integers(1, 150),
    tile=st.sampled_from([32, 64, 128]),
    tier=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_kernel_property_random_nested_masks(m: int, n: int, k: int, tile: int, tier: int, seed: int) -> None:
    from sparsedial.kernels.triton_nested import linear_nested_triton

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    x, packed, b, refs = make_case(m, n, k, torch.float16, seed % 2 == 0, tile, seed, device, masks_fn="level")
    for index in ("cols", "levels"):
        assert_matches(linear_nested_triton(x, packed, tier, b, index=index), refs[tier], torch.float16)


# ---- GPU only: bf16 and real model shapes ------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("index", ["cols", "levels"])
@pytest.mark.parametrize("m", [1, 5, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (1000, 4100)], ids=str)
def test_gpu_large_shapes(n: int, k: int, dtype: torch.dtype, m: int, index: str) -> None:
    from sparsedial.kernels.triton_nested import linear_nested_triton

    x, packed, b, refs = make_case(m, n, k, dtype, True, 128, seed=7, device=torch.device("cuda"))
    for tier, ref in enumerate(refs):
        # Two runs must agree bit for bit: a moving result would mean a race.
        y1 = linear_nested_triton(x, packed, tier, b, index=index)
        y2 = linear_nested_triton(x, packed, tier, b, index=index)
        assert torch.equal(y1, y2)
        assert_matches(y1, ref, dtype)
