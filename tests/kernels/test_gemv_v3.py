"""Issue 14 gemv kernels against the float64 reference: split-K, the 2:4 kernels (gather-x at M = 1, expand
at explicit block_m 2..8, tensor cores at 2..16), the bitmap running-pointer kernel (1..8 rows a program)
and the nested kernels' split-K, under the interpreter on a CPU.

Small case table (the interpreter is slow): M = 1 and odd M, N and K not multiples of the tile, K not a
multiple of 32 (the bitmap's partial last word), bias and no bias, split-K forced to 1, 2 and 3 (3 leaves
an empty last split), and the split-K counters are back at zero after every launch.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_kernels import assert_matches, make_case  # same folder (rootdir-relative imports, no __init__.py)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# name: (M, N, K, bias, BLOCK_N, BLOCK_K, split_k)
CASES = {
    "m1_split1_bias": (1, 33, 100, True, 16, 64, 1),
    "m1_split2": (1, 24, 256, False, 8, 64, 2),
    "m1_split3_ragged_bias": (1, 19, 228, True, 16, 64, 3),
    "m3_split2_bias": (3, 21, 196, True, 8, 64, 2),
    "m8_split3": (8, 16, 256, False, 16, 64, 3),
}


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gemv_split_k(case: str, fmt: str, device: torch.device) -> None:
    from sparsedial.kernels import _launch
    from sparsedial.kernels._launch import KernelConfig

    m, n, k, bias, bn, bk, split = CASES[case]
    x, packed, b, ref = make_case(fmt, m, n, k, torch.float16, bias, 0.45, seed=list(CASES).index(case),
                                  device=device)
    if fmt == "24":
        from sparsedial.kernels.triton_24 import linear_24_triton as launch
    else:
        from sparsedial.kernels.triton_bitmap import linear_bitmap_triton as launch
    config = KernelConfig(min(8, 1 << (m - 1).bit_length()), bn, bk, split_k=split)
    y = launch(x, packed, b, path="gemv", config=config)
    assert_matches(y, ref, torch.float16)
    assert torch.equal(launch(x, packed, b, path="gemv", config=config), y)  # deterministic split-K sum
    for locks in _launch._LOCKS.values():
        assert int(locks.abs().sum()) == 0  # the last split resets its counter


@needs_triton
def test_split_k_grid() -> None:
    from sparsedial.kernels._launch import NUM_SMS, SPLIT_K_TARGET_PROGRAMS, choose_split_k
    from sparsedial.kernels._triton_util import split_k_grid

    assert choose_split_k(4096, 4096, 512) == 1  # enough tiles already
    split = choose_split_k(128, 4096, 512)  # 1024 x 4096 at BLOCK_N = 8
    assert 128 * split >= SPLIT_K_TARGET_PROGRAMS // 2 and 4096 // 512 // split >= 2
    assert split_k_grid(4096, 1, 4096, 1, 16, 512) == (256, 4, 1)  # choose_split_k's 4: 1024 programs already
    # 1024 x 4096 at 16 x 512 tiles: 64 tiles, 8 K steps; choose_split_k's 4 splits give 256 programs, under
    # two waves, so the grid splits to one step each
    assert choose_split_k(64, 4096, 512) == 4
    assert split_k_grid(1024, 1, 4096, 1, 16, 512) == (64, 8, 1) and 64 * 8 >= 2 * NUM_SMS
    assert split_k_grid(16 * 16, 1, 128, 1, 16, 64) == (16, 2, 1)  # 2 K steps, 16 tiles: one step a split
    assert split_k_grid(16 * 16, 1, 64, 1, 16, 64) == (16, 1, 1)  # one K step: nothing to split
    # 16 tiles, 32 K steps: choose_split_k stops at its maximum 16 (256 programs), one more doubling -> 512
    assert choose_split_k(16, 4096, 128) == 16 and split_k_grid(1024, 8, 4096, 8, 64, 128)[1] == 32
    assert split_k_grid(64, 1, 65536, 1, 64, 64)[1] == 32  # one tile: capped at SPLIT_K_WAVES_MAX


@needs_triton
def test_prune_under_two_waves() -> None:
    """The 2:4 gather autotuner drops configs under 2 programs per SM (264 on 132 SMs) when another reaches it."""
    import triton
    from sparsedial.kernels._triton_util import prune_under_two_waves

    small = triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4)  # 8192 weights a step
    big = triton.Config({"BLOCK_N": 32, "BLOCK_K": 512}, num_warps=8)  # 16384 weights a step
    # 1024 x 4096: small -> 64 tiles x 8 splits = 512 programs; big -> 32 tiles x 8 splits (one K step each) = 256
    assert prune_under_two_waves([small, big], {"N": 1024, "K": 4096, "M": 1}, BLOCK_M=1) == [small]
    # 4096 x 4096: big -> 128 tiles x 4 splits = 512 programs, kept
    assert prune_under_two_waves([small, big], {"N": 4096, "K": 4096, "M": 1}, BLOCK_M=1) == [small, big]
    # 64 x 512: one K step, 4 or 2 tiles, no split: neither reaches 264, so both are kept
    assert prune_under_two_waves([small, big], {"N": 64, "K": 512, "M": 1}, BLOCK_M=1) == [small, big]


# 2:4 tensor-core gemv (BLOCK_M = 16, W on the MMA's M side): name -> (M, N, K, bias, BLOCK_N, BLOCK_K, split_k)
TC_CASES = {
    "m2_split1_bias": (2, 33, 100, True, 16, 64, 1),
    "m5_split2": (5, 24, 256, False, 16, 64, 2),
    "m16_split3_ragged_bias": (16, 19, 228, True, 16, 64, 3),
    "m17_two_row_tiles": (17, 21, 132, False, 32, 64, 1),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", list(TC_CASES), ids=list(TC_CASES))
def test_gemv_24_tensor_core(case: str, dtype: torch.dtype, device: torch.device) -> None:
    from sparsedial.kernels import _launch
    from sparsedial.kernels._launch import KernelConfig
    from sparsedial.kernels.triton_24 import TC_BLOCK_M, linear_24_triton

    m, n, k, bias, bn, bk, split = TC_CASES[case]
    x, packed, b, ref = make_case("24", m, n, k, dtype, bias, 0.5, seed=len(case), device=device)
    config = KernelConfig(TC_BLOCK_M, bn, bk, split_k=split)
    y = linear_24_triton(x, packed, b, path="gemv", config=config)
    assert_matches(y, ref, dtype)
    assert torch.equal(linear_24_triton(x, packed, b, path="gemv", config=config), y)
    for locks in _launch._LOCKS.values():
        assert int(locks.abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("m", [2, 9, 15])
def test_auto_path_2_to_15_rows_runs_tensor_core_gemv(m: int, device: torch.device,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsedial.kernels import sparse_linear, triton_24

    calls = []
    real = triton_24.launch_gemv
    monkeypatch.setattr(triton_24, "launch_gemv", lambda kernel, *a, **kw: calls.append(kernel) or real(kernel, *a, **kw))
    x, packed, b, ref = make_case("24", m, 24, 128, torch.float16, True, 0.5, seed=m, device=device)
    assert_matches(sparse_linear(x, packed, b, backend="triton"), ref, torch.float16)
    assert calls == [triton_24._gemv_24_tc_kernel]


# Bitmap gemv: the value loads are unguarded when the values have a readable element after the last one
# (pack_bitmap's layout), guarded otherwise; trailing empty rows put the running pointer at the last+1 value.
@needs_triton
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize(("n", "k", "empty_tail_rows", "split"), [(33, 100, 0, 1), (40, 256, 9, 2), (21, 228, 21, 3)],
                         ids=str)
def test_bitmap_value_tail(n: int, k: int, empty_tail_rows: int, split: int, tail: bool, m: int,
                           device: torch.device) -> None:
    from sparsedial.kernels import PackedBitmap, pack_bitmap
    from sparsedial.kernels._launch import KernelConfig
    from sparsedial.kernels.formats import values_have_tail
    from sparsedial.kernels.triton_bitmap import linear_bitmap_triton

    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) / k**0.5).half()
    mask = torch.rand(n, k, generator=gen) < 0.5
    mask[n - empty_tail_rows:] = False
    x = torch.randn(m, k, generator=gen).half()
    ref = x.double() @ (w.double() * mask).T
    packed = pack_bitmap(w, mask).to(device)
    assert values_have_tail(packed.values)
    if not tail:  # hand-built pack: exactly nnz values
        packed = PackedBitmap(packed.bitmap, packed.values.clone(), packed.row_ptr, packed.shape, packed.word_offsets)
        assert not values_have_tail(packed.values)
    config = KernelConfig(1 if m == 1 else 8, 16, 64, split_k=split)
    y = linear_bitmap_triton(x.to(device), packed, path="gemv", config=config)
    assert_matches(y, ref, torch.float16)


def test_pack_bitmap_values_keep_their_tail() -> None:
    from sparsedial.kernels import pack_bitmap
    from sparsedial.kernels.formats import values_have_tail

    w = torch.randn(5, 40)
    packed = pack_bitmap(w, w > 0)
    assert packed.values.numel() == packed.nnz == int((w > 0).sum())
    assert torch.equal(packed.values, w[w > 0])
    assert values_have_tail(packed.values) and values_have_tail(packed.to("cpu").values)
    assert not values_have_tail(packed.values.clone())


# Nested kernels: split-K over the format tiles (K = 300 at tile 64 is 5 tiles: split 3 leaves 1 in the last).
@needs_triton
@pytest.mark.parametrize("index", ["cols", "levels"])
@pytest.mark.parametrize(("m", "split", "bias"), [(1, 1, True), (1, 3, False), (6, 2, True), (9, 4, False)])
def test_nested_split_k(m: int, split: int, bias: bool, index: str, device: torch.device) -> None:
    from sparsedial.kernels import _launch
    from sparsedial.kernels._launch import KernelConfig
    from sparsedial.kernels.triton_nested import linear_nested_triton
    from test_nested import make_case as make_nested_case

    x, packed, b, refs = make_nested_case(m, 21, 300, torch.float16, bias, 64, seed=m + split, device=device)
    config = KernelConfig(min(8, 1 << (m - 1).bit_length()), 8, 32, split_k=split)
    for tier in (0, 3, 6):
        y = linear_nested_triton(x, packed, tier, b, index=index, config=config)
        assert_matches(y, refs[tier], torch.float16)
        assert torch.equal(linear_nested_triton(x, packed, tier, b, index=index, config=config), y)
    for locks in _launch._LOCKS.values():
        assert int(locks.abs().sum()) == 0
