"""The C++ CPU kernels (kernels/cpu/) against their torch references, on both ISA paths the machine has.

The first test to call a kernel compiles the extension into the user cache (about a minute on a 2-core
machine, once per clean cache); later runs load the cached build.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.linear import ElasticLinear
from sparsedial.kernels import _cpu_ext
from sparsedial.kernels.cpu_dispatch import cpu_linear
from sparsedial.kernels.cpu_formats import (
    PackedBitmask,
    PackedDense,
    linear_bitmask_reference,
    linear_cols_bf16_reference,
    linear_dense_bf16_reference,
    pack_bitmask,
    pack_cols_bf16,
    pack_dense_bf16,
    unpack_bitmask,
    unpack_dense,
)
from sparsedial.kernels.formats import PackedCols, unpack_cols

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny-elastic"
ISAS = _cpu_ext.supported_isas()
# (M, N, K): one row, every register-pass size of the bitmask kernel (1-8 rows) and its scratch path (9+,
# K past one 512-input chunk), up to 32 and beyond (a second 32-row pass), K and N off every tile size
SHAPES = [(1, 37, 100), (2, 9, 33), (3, 64, 260), (4, 6, 17), (6, 13, 48), (7, 5, 31), (8, 50, 300),
          (17, 33, 516), (32, 96, 1024), (5, 7, 12), (1, 256, 384), (40, 24, 64), (12, 11, 1100)]


def _mask24(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(n, k)


def _close(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    # fp32 accumulation in another order: error ~ sqrt(K) ulps of the terms
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * k ** 0.5 * 4)


@pytest.fixture(params=ISAS or ["none"])
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEDIAL_CPU_ISA", request.param)
    return request.param


def test_the_extension_builds_where_a_compiler_is():
    from torch.utils.cpp_extension import is_ninja_available

    if platform.machine() not in ("x86_64", "AMD64") or not ISAS or shutil.which("c++") is None:
        pytest.skip("no x86-64 AVX2 CPU or no C++ compiler here")
    if not is_ninja_available():
        pytest.skip("no ninja (make setup installs it)")
    assert _cpu_ext.extension() is not None, _cpu_ext._state.get("why")


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernels_equal_their_references(isa, m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    dense = pack_dense_bf16(w)
    _close(cpu_linear(x, dense, bias), linear_dense_bf16_reference(x, dense, bias), k)
    for s in (0.5, 0.7, 0.95):
        tiled = pack_cols_bf16(w, torch.rand(n, k, generator=g) >= s)
        _close(cpu_linear(x, tiled, bias), linear_cols_bf16_reference(x, tiled, bias), k)
    for s in (0.0, 0.5, 0.9, 1.0):  # every weight kept, half, a tenth, none
        bm = pack_bitmask(w, torch.rand(n, k, generator=g) >= s)
        _close(cpu_linear(x, bm, bias), linear_bitmask_reference(x, bm, bias), k)
    if k % 4 == 0:
        bm = pack_bitmask(w, _mask24(n, k, g))
        _close(cpu_linear(x, bm, bias), linear_bitmask_reference(x, bm, bias), k)


def test_the_bitmask_kernel_against_a_hand_computed_product(isa):
    """Independent of the packer's reference: a 5 x 20 weight (two blocks, a partial 16-input group) with
    a hand-made mask, against the sum over the kept (row, input) pairs written out."""
    w = torch.arange(1, 101, dtype=torch.float32).reshape(5, 20) / 8  # exact in bf16
    keep = torch.zeros(5, 20, dtype=torch.bool)
    kept = {0: [0, 15, 16, 19], 1: [], 2: list(range(20)), 3: [1, 2, 3], 4: [17]}
    for r, cols in kept.items():
        keep[r, cols] = True
    x = torch.tensor([[(-1.0) ** j * (j + 1) / 4 for j in range(20)], [1.0] * 20])
    want = torch.tensor([[sum(float(w[r, c]) * float(x[b, c]) for c in cols) for r, cols in kept.items()]
                         for b in range(2)])
    packed = pack_bitmask(w, keep)
    assert packed.masks.shape == (2, 2, 4) and int(packed.block_ptr[-1]) == 4 + 20 + 3 + 1
    torch.testing.assert_close(cpu_linear(x, packed), want)


def test_leading_dims_and_bf16_activations(isa):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 200, generator=g), torch.randn(2, 3, 200, generator=g)
    tiled = pack_cols_bf16(w, torch.rand(48, 200, generator=g) >= 0.7)
    y = cpu_linear(x, tiled)
    assert y.shape == (2, 3, 48)
    _close(y, linear_cols_bf16_reference(x, tiled), 200)
    yb = cpu_linear(x.bfloat16(), tiled)
    assert yb.dtype == torch.bfloat16


def test_pack_unpack_identity():
    g = torch.Generator().manual_seed(2)
    for n, k in ((7, 12), (33, 516), (64, 256), (5, 1000)):
        w = torch.randn(n, k, generator=g)
        mask = torch.rand(n, k, generator=g) >= 0.6
        mask[0] = True  # a full row: every segment full
        mask[-1] = False  # an empty row
        tiled = pack_cols_bf16(w, mask)
        assert torch.equal(unpack_cols(tiled), (w * mask).bfloat16())
        assert tiled.values.numel() % 8 == 0 and (tiled.run_ptr.diff() % 8 == 0).all()
        assert torch.equal(unpack_dense(pack_dense_bf16(w)), w.bfloat16())
        bm = pack_bitmask(w, mask)
        assert torch.equal(unpack_bitmask(bm), (w * mask).bfloat16())
        assert bm.values.numel() == int(mask.sum()) + 16  # the kept values and the padding, nothing else
        if k % 4 == 0:
            m24 = _mask24(n, k, g)
            assert torch.equal(unpack_bitmask(pack_bitmask(w, m24)), (w * m24).bfloat16())
    # bytes at K = 2048: 70% bitmask 2 * 0.3 + 1/8 bytes per weight, 90% tiled under a tenth of fp32 dense
    w = torch.randn(256, 2048, generator=g)
    bm = pack_bitmask(w, torch.rand(256, 2048, generator=g) >= 0.7)
    assert bm.nbytes < (2 * 0.31 + 0.125) * w.numel()
    tiled = pack_cols_bf16(w, torch.rand(256, 2048, generator=g) >= 0.9)
    assert tiled.nbytes < 0.1 * w.numel() * 4


def test_the_cpp_bitmask_packer_equals_the_torch_packer():
    """pack_bitmask packs in C++ where the extension builds; its torch path is the independent spelling of
    the same format (blocked transposes + masked_select): identical masks, offsets and values (inf and NaN
    weights included; NaN compared as NaN)."""
    from sparsedial.kernels.cpu_formats import _pack_bitmask_torch

    if _cpu_ext.extension() is None:
        pytest.skip("the extension cannot build here")
    g = torch.Generator().manual_seed(5)
    for n, k in ((5, 20), (37, 100), (64, 256), (130, 1000), (3, 7)):
        w = torch.randn(n, k, generator=g)
        w[0, 0], w[-1, -1], w[0, 1] = float("inf"), -float("inf"), float("nan")
        for s in (0.0, 0.5, 0.9, 1.0):
            mask = torch.rand(n, k, generator=g) >= s
            fast, ref = pack_bitmask(w, mask), _pack_bitmask_torch(w, mask)
            assert torch.equal(fast.masks, ref.masks) and torch.equal(fast.block_ptr, ref.block_ptr)
            torch.testing.assert_close(fast.values, ref.values, rtol=0, atol=0, equal_nan=True)


def test_an_inconsistent_bitmask_is_refused_before_any_kernel_reads_it():
    """Masks that claim more values than the offsets hold would make the kernel read past the values."""
    import dataclasses

    if _cpu_ext.extension() is None:
        pytest.skip("the extension cannot build here")
    g = torch.Generator().manual_seed(6)
    good = pack_bitmask(torch.randn(64, 1024, generator=g), torch.rand(64, 1024, generator=g) >= 0.9)
    with pytest.raises(ValueError, match="inconsistent PackedBitmask"):
        dataclasses.replace(good, masks=torch.full_like(good.masks, -1))  # every bit set
    with pytest.raises(ValueError, match="inconsistent PackedBitmask"):
        dataclasses.replace(good, values=good.values[:-1])  # the padding cut short


def test_every_tier_of_the_embedded_model(isa):
    """Every tier's packed weights of a few linears of the embedded model, kernel vs reference."""
    em = ElasticModel.load(SHIPPED, dtype="float32", resident=(), cpu_kernels=True)
    linears = [m for m in em.model.modules() if isinstance(m, ElasticLinear) and m.maps is not None]
    picked = [linears[0], linears[len(linears) // 2], linears[-1]]
    g = torch.Generator().manual_seed(3)
    kinds = set()
    for name in em.tiers:
        for lin in picked:
            tw = lin.build(em.spec, em.tier_spec(name), em.backend)
            assert tw.cpu is not None, name
            for packed in (tw.cpu, tw.cpu_wide):
                if packed is None:
                    continue
                kinds.add(type(packed))
                ref = {PackedDense: linear_dense_bf16_reference, PackedCols: linear_cols_bf16_reference,
                       PackedBitmask: linear_bitmask_reference}[type(packed)]
                for m in (1, 5, 32):
                    x = torch.randn(m, lin.in_features, generator=g)
                    _close(cpu_linear(x, packed, lin.bias), ref(x, packed, lin.bias), lin.in_features)
            if tw.cpu_wide is not None:  # the tier itself: one format up to cpu_max_rows rows, the other above
                for m in (tw.cpu_max_rows, tw.cpu_max_rows + 1):
                    x = torch.randn(m, lin.in_features, generator=g)
                    want = linear_bitmask_reference(x, tw.cpu, lin.bias)
                    _close(tw.apply(x, lin.bias), want, lin.in_features)
    assert kinds == {PackedDense, PackedCols, PackedBitmask}


def test_forcing_an_isa_the_cpu_lacks_is_an_error(monkeypatch):
    if "avx512" in ISAS:
        pytest.skip("this CPU has every ISA path")
    monkeypatch.setenv("SPARSEDIAL_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks"):
        _cpu_ext.isa()


def test_a_failed_build_falls_back_to_the_reference_with_one_log_line(monkeypatch, caplog):
    saved = dict(_cpu_ext._state)

    def broken_build():
        raise RuntimeError("Error building extension 'sparsedial_cpu_kernels': c++ not found")

    monkeypatch.setattr(_cpu_ext, "_build", broken_build)
    _cpu_ext.reset_for_tests()
    try:
        g = torch.Generator().manual_seed(4)
        w, x = torch.randn(20, 64, generator=g), torch.randn(3, 64, generator=g)
        tiled, dense = pack_cols_bf16(w, torch.rand(20, 64, generator=g) >= 0.5), pack_dense_bf16(w)
        bm = pack_bitmask(w, _mask24(20, 64, g))
        with caplog.at_level(logging.WARNING, logger="sparsedial.kernels"):
            assert torch.equal(cpu_linear(x, tiled), linear_cols_bf16_reference(x, tiled))
            assert torch.equal(cpu_linear(x, dense), linear_dense_bf16_reference(x, dense))
            assert torch.equal(cpu_linear(x, bm), linear_bitmask_reference(x, bm))
        lines = [r for r in caplog.records if r.name == "sparsedial.kernels"]
        assert len(lines) == 1 and "build failed" in lines[0].getMessage()
        assert not _cpu_ext.available()
    finally:
        _cpu_ext.reset_for_tests()
        _cpu_ext._state.update(saved)


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's build lock file survives a killed build (the next load would wait on it forever); the
    extension's own flock makes a lock found while holding it stale, and it is removed."""
    import subprocess
    import sys

    from sparsedial.kernels import _cpu_ext

    if _cpu_ext.extension() is None:
        pytest.skip("the extension cannot build here")
    build_dir, _ = _cpu_ext._staged_sources()
    (build_dir / "lock").write_text("")  # as a build killed between taking and releasing torch's lock leaves it
    code = "from sparsedial.kernels import _cpu_ext; assert _cpu_ext.extension() is not None"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "removing a stale build lock" in p.stderr and not (build_dir / "lock").exists()
