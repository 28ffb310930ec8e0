"""The CPU CSR path of high-sparsity tiers: used only where measured faster, and numerically the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sparsedial.compress.export import load_elastic_for_eval, tier_weights
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.linear import ElasticLinear, TierWeights
from sparsedial.engine.tiers import TierPlan

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny-elastic"


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_tier_weights_switch_to_csr_from_min_rows():
    w = torch.randn(24, 40) * (torch.rand(24, 40) > 0.9)
    tw = TierWeights(weight=w, csr=w.to_sparse_csr(), csr_min_rows=8)
    b = torch.randn(24)
    for rows in (1, 7, 8, 33):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(tw.apply(x, b), x @ w.T + b, atol=1e-5, rtol=0)
    x3 = torch.randn(2, 5, 40)  # leading dims are flattened into rows
    torch.testing.assert_close(tw.apply(x3, None), x3 @ w.T, atol=1e-5, rtol=0)


def test_shipped_model_high_tiers_use_csr_and_match_the_static_model():
    em = ElasticModel.load(SHIPPED, dtype="float32", resident=())
    lm, spec, tensors = load_elastic_for_eval(SHIPPED)
    tokens = torch.randint(0, 6144, (4, 16), generator=torch.Generator().manual_seed(0))  # 64 rows
    for name, has_csr in (("90%", True), ("80%", True), ("70%", False), ("2:4", False)):
        em.ensure([name])
        with torch.inference_mode():
            got = em.model(tokens, plan=TierPlan.single(em.tier_spec(name)))
        linears = [m for m in em.model.modules() if isinstance(m, ElasticLinear)]
        assert all((m.tiers[name].csr is not None) == has_csr for m in linears), name
        with torch.inference_mode(), tier_weights(lm.model, spec, tensors, spec.tier(name)) as ref:
            want = ref(tokens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
