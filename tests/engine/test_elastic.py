"""ElasticModel: tier resolution, tier k == the statically merged model, mixed tiers in one forward,
resident tiers / LRU cache / memory budget, unmasked LoRA, packed (triton-format) tiers, plain models."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from sparsedial.engine.api import UnknownTierError
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.elastic_format import drop_levels_from_rank, rank_from_scores, read_elastic
from sparsedial.engine.linear import ElasticLinear
from sparsedial.engine.loader import load_model
from sparsedial.engine.tiers import TierPlan

from sparsedial.testing import fast_drop_levels

from .conftest import EMBEDDED

TOKENS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3], [8, 8, 120, 6, 250, 31, 2, 64]])  # [2, 8]


@pytest.mark.parametrize("requested, tier", [
    ("dense", "dense"), ("2:4", "2:4"), ("30%", "30%"), (" 50% ", "50%"), (0.5, "50%"), ("0.5", "50%"),
    (0.304, "30%"), (0.45, "45%"), ("45.4%", "45%"), (0, "dense"), (0.001, "dense"), (0.7, "70%"),
    ("auto", None), (None, None),
])
def test_resolve(em, requested, tier):
    got = em.resolve(requested)
    assert (None if got is None else got.name) == tier
    assert got is None or em.resolve(got) is got  # a resolved tier is accepted as it is


@pytest.mark.parametrize("bad", ["80%", 0.71, -0.1, "3:4", "fast", True, float("nan"), [0.5]])
def test_unknown_tier_lists_the_tiers(em, bad):
    with pytest.raises(UnknownTierError, match=r"available: dense, 30%, 40%, 50%, 60%, 70%, 2:4, auto") as e:
        em.resolve(bad)
    assert e.value.tiers == em.tiers


def test_on_demand_tier_groups_follow_the_intervals(em):
    assert em.resolve(0.35).lora_groups == (0,)
    assert em.resolve(0.45).lora_groups == (0, 1)
    assert em.resolve(0.05).lora_groups == (0,)
    assert em.tier_spec("45%") is em.resolve("45%")


@pytest.mark.parametrize("tier", ["dense", "30%", "40%", "50%", "60%", "70%", "2:4", "45%", "5%", "38%"])
def test_tier_logits_equal_the_independent_reference(em, static, tier):
    """Each tier against weights the test computes itself from elastic.safetensors (conftest)."""
    spec = em.resolve(tier)
    em.ensure([spec.name])
    with torch.inference_mode():
        got = em.model(TOKENS, plan=TierPlan.single(spec, 2))
        want = static.at(tier).model(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_tiers_in_one_forward_equal_each_row_alone(em):
    tiers = [em.resolve(t) for t in ["dense", "2:4", "2:4", "60%", "45%", "dense"]]
    tokens = torch.randint(0, 6000, (6, 5), generator=torch.Generator().manual_seed(1))
    em.ensure({t.name for t in tiers})
    with torch.inference_mode():
        mixed = em.model(tokens, plan=TierPlan.from_rows(tiers))
        for i, t in enumerate(tiers):
            alone = em.model(tokens[i:i + 1], plan=TierPlan.single(t))[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
    assert len({round(float(mixed[i, -1, 0]), 4) for i in (0, 1, 3, 4)}) == 4  # the tiers really differ


def test_unmasked_lora_runs_beside_the_sparse_base(elastic_dir, static):
    spec, tensors = read_elastic(elastic_dir)
    spec = dataclasses.replace(spec, lora_mode="unmasked")
    m = ElasticModel(load_model(elastic_dir), spec, tensors, "torch", resident=["dense", "50%"])
    lin = m.model.model.layers[1].mlp.up_proj
    assert lin.tiers["50%"].lora_a.shape == (8, lin.in_features)  # groups 0 and 1, rank 4 each
    with torch.inference_mode():
        got = m.model(TOKENS, plan=TierPlan.single(m.tier_spec("50%"), 2))
        want = static.at("50%", lora_mode="unmasked").model(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_tiers_match_the_torch_tiers(em):
    """The triton backend's materialization (pack_24 / pack_bitmap), run through sparse_linear's reference."""
    lin: ElasticLinear = em.model.model.layers[2].self_attn.o_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))
    for name in ("2:4", "60%"):
        want = lin.apply_tier(x, name)
        packed = dataclasses.replace(lin.materialize(em.spec, em.tier_spec(name), "triton"))
        lin.materialize(em.spec, em.tier_spec(name), "torch")  # restore the torch tier
        assert packed.packed is not None and packed.nbytes > 0
        torch.testing.assert_close(packed.apply(x, lin.bias), want, rtol=1e-5, atol=1e-5)


def test_resident_tiers_budget_and_lru(elastic_dir):
    one_tier = 34209792  # bytes of one merged fp32 tier of stdlib-tiny's 42 linears
    m = ElasticModel.load(elastic_dir, resident=["dense", "50%"], memory_budget=3 * one_tier, cache_tiers=1)
    assert m.resident == ["dense", "50%"] and m.tier_bytes == {"dense": 0, "50%": one_tier}
    m.ensure(["30%"])
    m.ensure(["2:4"])  # cache of one: 30% is evicted
    assert sorted(m.materialized) == ["2:4", "50%", "dense"]
    m.ensure(["30%", "2:4"])  # both needed by one step: kept over the count, within the budget
    assert sorted(m.materialized) == ["2:4", "30%", "50%", "dense"]
    with pytest.raises(ValueError, match="resident tier '70%' does not fit the memory budget"):
        m.add_resident("70%")
    assert "70%" not in m.materialized
    before = {id(lin): lin.tiers["50%"] for lin in m._linears}
    m.ensure(["50%"])  # resident: nothing rebuilt; the cache is trimmed back to its count of one
    assert all(lin.tiers["50%"] is before[id(lin)] for lin in m._linears)
    assert m.resident == ["dense", "50%"] and len(m.materialized) == 3
    with pytest.raises(UnknownTierError):
        m.add_resident("99%")


def test_plain_model_serves_dense_only():
    m = ElasticModel.load(EMBEDDED)
    assert m.tiers == ["dense"] and m.resolve(0).name == "dense" and m.tier_bytes == {"dense": 0}
    with pytest.raises(UnknownTierError, match="'30%'.*available: dense, auto"):
        m.resolve("30%")


def test_fast_drop_levels_equal_the_reference():
    for shape in [(7, 13), (5, 384), (3, 100), (4, 1)]:
        r = rank_from_scores(torch.rand(*shape))
        assert torch.equal(fast_drop_levels(r), drop_levels_from_rank(r))


def test_triton_backend_without_the_triton_package(monkeypatch):
    from sparsedial.engine.elastic import choose_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(ValueError, match="needs the triton package"):
        choose_backend("triton", torch.device("cuda"))
    assert choose_backend("auto", torch.device("cuda")) == "torch"
    assert choose_backend("torch", torch.device("cuda")) == "torch"


def test_a_checkpoint_without_dense_still_serves_dense(elastic_dir, tmp_path):
    """The base weights are always there, so dense is always a tier (a compressor run with --tiers 70%,90%
    lists none): it is served, and it is the default tier of auto requests."""
    import json
    import shutil

    from sparsedial.engine.elastic_format import write_elastic_json
    from sparsedial.engine.runner import EngineConfig, EngineCore
    from sparsedial.engine.sampling import SamplingParams

    d = tmp_path / "no-dense"
    shutil.copytree(elastic_dir, d)
    doc = json.loads((d / "elastic.json").read_text())
    doc["tiers"] = [t for t in doc["tiers"] if t["name"] != "dense"]
    write_elastic_json(d, doc)
    m = ElasticModel.load(d)
    assert m.tiers[0] == "dense" and "dense" not in [t.name for t in m.spec.tiers]
    core = EngineCore(m, EngineConfig(model=d, max_batch=2, max_seq_len=64))
    got = core.generate(["def "], SamplingParams(max_tokens=2, temperature=0))[0]
    assert got.finish.tier == "dense" and len(got.token_ids) == 2
