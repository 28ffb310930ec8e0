"""Prefill fallback (issue 14): from DENSE_PREFILL_MIN_M rows, ``sparse_linear(path="auto")`` on a 2:4 or
bitmap weight runs ``F.linear`` on the weight unpacked by a Triton kernel, instead of the sparse dot kernel.

Under the interpreter on a CPU: the Triton unpack kernels against ``formats.unpack_*`` (bit for bit, odd
shapes, K not a multiple of 32, empty and full bitmaps), and which path ``sparse_linear`` takes on each side
of the threshold (the other path's launcher is replaced by one that raises).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from sparsedial.kernels import sparse_linear, unpack_24, unpack_bitmap
from test_kernels import assert_matches, make_case  # same folder (rootdir-relative imports, no __init__.py)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("n", "k", "density"), [(1, 4, 0.5), (19, 100, 0.3), (40, 132, 0.7), (33, 64, 0.0),
                                                 (17, 96, 1.0)], ids=str)
def test_unpack_triton_is_bit_exact(n: int, k: int, density: float, dtype: torch.dtype, fmt: str,
                                    device: torch.device) -> None:
    from sparsedial.kernels.triton_24 import unpack_24_triton
    from sparsedial.kernels.triton_bitmap import unpack_bitmap_triton

    _, packed, _, _ = make_case(fmt, 1, n, k, dtype, False, density, seed=n + k, device=device)
    got = unpack_24_triton(packed) if fmt == "24" else unpack_bitmap_triton(packed)
    want = unpack_24(packed) if fmt == "24" else unpack_bitmap(packed)
    assert got.shape == (n, k) and got.dtype == dtype
    assert torch.equal(bits(got), bits(want))


def _forbid(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"{module}.{name} must not run here")

    monkeypatch.setattr(f"sparsedial.kernels.{module}.{name}", boom)


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("m", "bias"), [(16, True), (17, False), (40, True)])
def test_auto_prefill_runs_dense(m: int, bias: bool, dtype: torch.dtype, fmt: str, device: torch.device,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsedial.kernels.dispatch import DENSE_PREFILL_MIN_M

    assert m >= DENSE_PREFILL_MIN_M
    x, packed, b, ref = make_case(fmt, m, 21, 100, dtype, bias, 0.4, seed=m, device=device)
    _forbid(monkeypatch, "triton_24", "linear_24_triton")  # neither sparse kernel may run
    _forbid(monkeypatch, "triton_bitmap", "linear_bitmap_triton")
    y = sparse_linear(x, packed, b, backend="triton")
    dense = unpack_24(packed) if fmt == "24" else unpack_bitmap(packed)
    assert torch.equal(y, F.linear(x, dense, b))
    assert_matches(y, ref, dtype)
    y3 = sparse_linear(x.reshape(1, m, 100), packed, b, backend="triton")  # leading dims count as rows
    assert torch.equal(y3.reshape(m, 21), y)


@needs_triton
@pytest.mark.parametrize("fmt", ["24", "bitmap"])
@pytest.mark.parametrize(("m", "path"), [(15, "auto"), (9, "auto"), (16, "dot"), (16, "gemv")])
def test_kernels_below_threshold_or_forced(m: int, path: str, fmt: str, device: torch.device,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    x, packed, b, ref = make_case(fmt, m, 24, 64, torch.float16, True, 0.5, seed=m, device=device)
    _forbid(monkeypatch, "triton_24", "unpack_24_triton")
    _forbid(monkeypatch, "triton_bitmap", "unpack_bitmap_triton")
    assert_matches(sparse_linear(x, packed, b, backend="triton", path=path), ref, torch.float16)


def test_prefill_fallback_checks_inputs() -> None:
    x, packed, _b, _ = make_case("24", 16, 16, 32, torch.float32, False, 0.5, seed=6, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse_linear(x, packed, torch.zeros(3), backend="triton" if _interpreting() else "torch")


def _interpreting() -> bool:
    from sparsedial.kernels._launch import interpreter_enabled

    return interpreter_enabled() and importlib.util.find_spec("triton") is not None
