"""engine/tiers.py: the one parser of tier requests and tier lists, the typed plan, and the engine making a
step's tiers resident once (the eviction bug of two per-group `ensure` calls)."""

from __future__ import annotations

import pytest
import torch
from sparsedial.engine.api import UnknownTierError
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.elastic_format import LoraGroup
from sparsedial.engine.runner import EngineConfig, EngineCore
from sparsedial.engine.sampling import SamplingParams
from sparsedial.engine.tiers import TierKind, TierPlan, Tiers, parse_tier_name, slug, tiers_from_names

GROUPS = [LoraGroup(0, 0.0, 0.4, 4), LoraGroup(1, 0.4, 0.7, 4), LoraGroup(2, 0.5, 0.5, 4, nm=True)]


def test_writer_tier_lists_are_strict_and_always_hold_dense():
    tiers = tiers_from_names(["70%", " 90% ", "2:4"], GROUPS)
    assert [t.name for t in tiers] == ["dense", "70%", "90%", "2:4"]  # dense first, although not asked for
    assert [t.kind for t in tiers] == [TierKind.DENSE, TierKind.UNSTRUCTURED, TierKind.UNSTRUCTURED, TierKind.NM]
    assert tiers[1].lora_groups == (0, 1) and tiers[2].lora_groups == ()  # 90% is above the last group
    assert tiers[3].lora_groups == (0, 1, 2) and (tiers[3].n, tiers[3].m, tiers[3].sparsity) == (2, 4, 0.5)
    for bad, why in [("55.5%", "whole percent"), ("0%", "1..99"), ("100%", "1..99"), ("3:4", "is not"),
                     ("fast", "is not"), ("50", "is not")]:
        with pytest.raises(ValueError, match=why):
            parse_tier_name(bad)
    with pytest.raises(ValueError, match="duplicate"):
        tiers_from_names(["50%", "50%"])
    assert [slug(n) for n in ("50%", "2:4", "dense")] == ["50pct", "2-4", "dense"]


def test_requests_snap_to_whole_percents_where_the_writer_is_strict():
    cat = Tiers(tiers_from_names(["30%", "70%"], GROUPS), GROUPS)
    assert [cat.resolve(r).name for r in ("55.5%", 0.554, "0.5", 0.001, "dense")] == ["56%", "55%", "50%",
                                                                                    "dense", "dense"]
    assert cat.resolve("auto") is None and cat.resolve(None) is None
    assert cat.resolve("45%") is cat.resolve(0.45)  # made once, then the same value
    for bad in ("71%", "2:4", True, float("inf"), "-1%"):
        with pytest.raises(UnknownTierError, match="any whole percent from 1% to 70%"):
            cat.resolve(bad)
    forged = parse_tier_name("30%")  # a TierSpec that this catalogue did not make (no LoRA groups)
    with pytest.raises(UnknownTierError):
        cat.resolve(forged)


def test_a_plan_groups_runs_of_rows():
    a, b = parse_tier_name("30%"), parse_tier_name("2:4")
    plan = TierPlan.from_rows([a, a, b, a])
    assert [(t.name, s, e) for t, s, e in plan.segments] == [("30%", 0, 2), ("2:4", 2, 3), ("30%", 3, 4)]
    assert plan.names == {"30%", "2:4"}


def test_a_step_makes_its_tiers_resident_once(elastic_dir, monkeypatch):
    """cache_tiers=1 and one step holding a decode row at 45% and a prefill row at 46%: the step builds 46%
    once. Before the fix each forward's own `ensure` evicted the other's tier: 45%, 46%, 46%, 45% over two
    steps, four builds for two tiers."""
    em = ElasticModel.load(elastic_dir, resident=["dense"], cache_tiers=1)
    built: list[str] = []
    real = em.build_tier
    monkeypatch.setattr(em, "build_tier", lambda name: built.append(name) or real(name))
    core = EngineCore(em, EngineConfig(model=elastic_dir, max_batch=4, max_seq_len=64, prefill_chunk=16,
                                       tier_builder=False))
    greedy = SamplingParams(max_tokens=6, temperature=0)
    sink: list = []
    core.add("def fibonacci(n):", greedy, "45%", sink.append)
    core.step()  # prefill at 45%: its first token
    assert built == ["45%"]
    core.add("import os", greedy, "46%", sink.append)
    out = core.schedule()
    assert sorted((r.seq.tier.name, r.length > 1) for r in out.rows) == [("45%", False), ("46%", True)]
    rows, logits = core.runner.run(out)  # one step: the 45% decode row and the 46% prefill row
    core.postprocess(out, rows, logits)
    assert built == ["45%", "46%"] and len(rows) == 2
    while core.has_work:
        core.step()
    assert built == ["45%", "46%"]  # both requests ran to the end on those two builds
    assert torch.isfinite(logits).all()
