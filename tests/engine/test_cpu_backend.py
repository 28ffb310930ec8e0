"""The engine's CPU path through the packed tier formats and kernels (issue 12) vs the fp32 path.

Sparse tiers store bf16 values (the fp32 path: fp32 values), so logits differ by bf16 rounding of the
weights; greedy tokens are compared for every tier of the embedded model and the difference is bounded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.linear import BITMASK_MIN_SPARSITY, ElasticLinear, sparse_formats
from sparsedial.engine.options import EngineConfig
from sparsedial.engine.tiers import TierPlan
from sparsedial.kernels import _cpu_ext
from sparsedial.kernels.cpu_formats import PackedBitmask, PackedDense
from sparsedial.kernels.formats import PackedCols

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny-elastic"
NEW = 12  # greedy tokens per prompt
# ids of a few prompts (the embedded model's tokenizer is not needed: token ids are prompts)
PROMPTS = [[5, 17, 301, 44, 9, 1200, 77], [400, 12, 12, 950, 3, 61, 2048, 15, 8], [1000, 2, 33, 4000]]


@pytest.fixture(scope="module")
def models():
    old = ElasticModel.load(SHIPPED, dtype="float32")
    new = ElasticModel.load(SHIPPED, dtype="float32", cpu_kernels=True)
    return old, new


@torch.inference_mode()
def _greedy(em: ElasticModel, tier: str, forced: list[list[int]] | None = None):
    """Greedy tokens of every prompt as one batch (prefill, then NEW decode steps of B rows), and the
    logits of each step; `forced`: feed these tokens instead of the argmax (same inputs for two models)."""
    model, plan_tier = em.model, em.tier_spec(tier)
    B = len(PROMPTS)
    lens = torch.tensor([len(p) for p in PROMPTS])
    T = int(lens.max())
    model.setup_cache(B, T + NEW + 1)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = torch.tensor(p)
    slots = torch.arange(B)
    logits = model(tokens, torch.arange(T).expand(B, T), slots, logit_index=lens - 1,
                   plan=TierPlan.single(plan_tier, B * T))
    out, all_logits, pos = [[] for _ in range(B)], [logits], lens.clone()
    for step in range(NEW):
        nxt = logits.argmax(-1) if forced is None else torch.tensor([f[step] for f in forced])
        for i in range(B):
            out[i].append(int(logits[i].argmax()))
        logits = model(nxt[:, None], pos[:, None], slots, logit_index=torch.zeros(B, dtype=torch.long),
                       plan=TierPlan.single(plan_tier, B))
        all_logits.append(logits)
        pos += 1
    return out, torch.stack(all_logits)


def test_every_tier_is_packed_and_small(models):
    old, new = models
    dense_fp32 = sum(m.weight.numel() * 4 for m in new.model.modules()
                     if isinstance(m, ElasticLinear) and m.maps is not None)
    for name in new.tiers:
        spec = new.tier_spec(name)
        for m in new.model.modules():
            if isinstance(m, ElasticLinear) and m.maps is not None:
                tw = m.tiers[name]
                tiled, rows = sparse_formats(spec.sparsity, _cpu_ext.isa())
                if spec.kind == "nm" or not tiled:
                    want = PackedDense if spec.kind != "nm" and spec.sparsity < BITMASK_MIN_SPARSITY else PackedBitmask
                    assert isinstance(tw.cpu, want) and tw.cpu_wide is None, name
                elif rows == 0:
                    assert isinstance(tw.cpu, PackedCols) and tw.cpu_wide is None, name
                else:  # the bitmask up to `rows` rows, the tiled format above
                    assert isinstance(tw.cpu, PackedBitmask) and isinstance(tw.cpu_wide, PackedCols), name
                    assert tw.cpu_max_rows == rows, name
                assert tw.weight is None or name == "dense"  # no fp32 copy of a sparse tier
    assert old.tier_bytes["70%"] == pytest.approx(dense_fp32, rel=0.01)  # the fp32 path: a dense copy
    assert new.tier_bytes["70%"] <= 0.45 * dense_fp32
    assert new.tier_bytes["90%"] <= 0.20 * dense_fp32  # two formats: ~0.33 + ~0.35 bytes per weight
    assert new.tier_bytes["2:4"] <= 0.30 * dense_fp32


def test_greedy_tokens_match_the_fp32_path_on_every_tier(models):
    """Tokens of the new path vs the fp32 path per tier; on the same inputs (teacher forcing) the logits
    differ by at most 2% of their range (bf16 weights: relative error 2**-9 per weight)."""
    old, new = models
    differing, worst = {}, {}
    for name in new.tiers:
        want, logits_old = _greedy(old, name)
        got, _ = _greedy(new, name)
        _, logits_new = _greedy(new, name, forced=want)
        scale = float(logits_old.abs().max())
        worst[name] = round(float((logits_new - logits_old).abs().max()) / scale, 5)
        assert worst[name] <= 0.02, name
        differing[name] = [sum(a != b for a, b in zip(w, g)) for w, g in zip(want, got)]
    print("differing tokens per tier and prompt:", differing, "max |logit diff| / max |logit|:", worst)
    # bf16 rounding may flip a near-tie argmax; a flip changes the rest of that prompt: allow one prompt
    assert all(sum(d > 0 for d in per) <= 1 for per in differing.values()), differing


def test_the_switch_keeps_the_fp32_path():
    off = EngineConfig(model=SHIPPED, cpu_kernels=False, resident_tiers=("dense", "70%")).load_model()
    on = EngineConfig(model=SHIPPED, resident_tiers=("dense", "70%")).load_model()
    lin = next(m for m in off.model.modules() if isinstance(m, ElasticLinear) and m.maps is not None)
    assert lin.tiers["70%"].cpu is None and lin.tiers["70%"].weight is not None
    lin = next(m for m in on.model.modules() if isinstance(m, ElasticLinear) and m.maps is not None)
    assert isinstance(lin.tiers["70%"].cpu, PackedBitmask)
    on.ensure(["90%"])  # an on-demand tier keeps the linear's choice: the tiled format for many rows
    assert PackedCols in (type(lin.tiers["90%"].cpu), type(lin.tiers["90%"].cpu_wide))
    assert on.tier_bytes["70%"] < 0.3 * off.tier_bytes["70%"]


def test_without_the_extension_the_engine_keeps_the_fp32_path(monkeypatch, caplog):
    saved = dict(_cpu_ext._state)

    def broken_build():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(_cpu_ext, "_build", broken_build)
    _cpu_ext.reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="sparsedial.kernels"):
            em = EngineConfig(model=SHIPPED, resident_tiers=("dense", "70%", "2:4")).load_model()
        lin = next(m for m in em.model.modules() if isinstance(m, ElasticLinear) and m.maps is not None)
        assert all(lin.tiers[t].cpu is None and lin.tiers[t].weight is not None for t in ("dense", "70%", "2:4"))
        assert len([r for r in caplog.records if r.name == "sparsedial.kernels"]) == 1
    finally:
        _cpu_ext.reset_for_tests()
        _cpu_ext._state.update(saved)


def test_the_lm_head_reads_a_bf16_copy_at_decode(models):
    """On the CPU kernel path the LM head is a PackedHead: the same (tied) fp32 weight for long inputs, and
    at decode the bf16 kernel, which equals x @ bf16(W).T computed here in fp64."""
    from sparsedial.engine.linear import DENSE_BF16_MAX_ROWS, PackedHead, dense_bf16_max_rows

    old, new = models
    head = new.model.lm_head
    assert isinstance(head, PackedHead) and not isinstance(old.model.lm_head, PackedHead)
    assert head.weight is new.model.model.embed_tokens.weight  # still tied: no second fp32 copy
    assert new.head_bytes == head.weight.numel() * 2 and old.head_bytes == 0
    x = torch.randn(3, head.in_features, generator=torch.Generator().manual_seed(0))
    want = x.double() @ head.weight.detach().to(torch.bfloat16).double().T
    with torch.inference_mode():
        torch.testing.assert_close(head(x).double(), want, rtol=1e-4, atol=1e-4)
        rows = dense_bf16_max_rows()  # measured on this machine: None = the bf16 kernel at every size
        assert head.tier.cpu_max_rows == rows and (rows is None or rows >= DENSE_BF16_MAX_ROWS)
        if rows is not None:
            long = torch.randn(rows + 1, head.in_features)
            torch.testing.assert_close(head(long), long @ head.weight.T, rtol=0, atol=0)  # fp32 MKL above
        else:
            long = torch.randn(DENSE_BF16_MAX_ROWS + 1, head.in_features)
            want = long.double() @ head.weight.detach().to(torch.bfloat16).double().T
            torch.testing.assert_close(head(long).double(), want, rtol=1e-4, atol=1e-4)
    assert set(dict(new.model.named_parameters())) == set(dict(old.model.named_parameters()))


def test_the_dense_kernel_limit_can_be_fixed_by_the_environment(monkeypatch):
    """dense_bf16_max_rows measures the bf16 kernel against MKL once per process; the environment replaces
    the measurement (runs that must not depend on the machine's load) and a bad value is refused."""
    from sparsedial.engine import linear

    linear._measured_dense_bf16_max_rows.cache_clear()
    try:
        monkeypatch.setenv("SPARSEDIAL_CPU_DENSE_BF16_ROWS", "all")
        assert linear.dense_bf16_max_rows() is None
        linear._measured_dense_bf16_max_rows.cache_clear()
        monkeypatch.setenv("SPARSEDIAL_CPU_DENSE_BF16_ROWS", "48")
        assert linear.dense_bf16_max_rows() == 48
        w = torch.randn(8, 16)
        assert linear._dense_cpu_tier(w).cpu_max_rows == 48
        linear._measured_dense_bf16_max_rows.cache_clear()
        monkeypatch.setenv("SPARSEDIAL_CPU_DENSE_BF16_ROWS", "many")
        with pytest.raises(ValueError, match="SPARSEDIAL_CPU_DENSE_BF16_ROWS"):
            linear.dense_bf16_max_rows()
    finally:
        linear._measured_dense_bf16_max_rows.cache_clear()
