"""The CPU serving layout of the weights and the KV cache's two read paths (view for consecutive slots,
gather otherwise) change storage and speed only: these tests pin that down."""

from __future__ import annotations

import torch
from sparsedial.engine.linear import ElasticLinear, serving_layout


def test_serving_layout_is_column_major_for_cpu_fp32_only():
    w = torch.randn(6, 4)
    served = serving_layout(w)
    assert served.shape == (6, 4) and served.stride() == (1, 6) and served.t().is_contiguous()
    assert torch.equal(served, w)
    assert serving_layout(served) is served  # already served: left alone
    half = w.to(torch.bfloat16)
    assert serving_layout(half) is half
    assert serving_layout(torch.randn(5)).is_contiguous()  # not a matrix: unchanged


def test_served_model_weights_are_column_major_and_the_dense_tier_shares_them(em):
    linears = [m for m in em.model.modules() if isinstance(m, ElasticLinear)]
    for lin in linears:
        assert lin.weight.t().is_contiguous()
        dense = lin.tiers["dense"].weight
        assert dense.data_ptr() == lin.weight.data_ptr()  # no copy for the dense tier
        assert lin.tiers["50%"].weight.t().is_contiguous()
    assert em.model.lm_head.weight.t().is_contiguous()


@torch.inference_mode()
def test_consecutive_and_scattered_slots_give_identical_logits(em):
    model = em.model
    model.setup_cache(6, 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, em.config.vocab_size, (3, 5), generator=g)
    positions = torch.arange(5).expand(3, 5)
    last = torch.full((3,), 4)
    results = []
    for slots in ([1, 2, 3], [5, 0, 4]):  # a view of rows 1..3 vs a gather of rows 5, 0, 4
        s = torch.tensor(slots)
        prefill = model(prompt, positions, s, logit_index=last)
        step = prefill.argmax(-1, keepdim=True)  # [3, 1]
        decode = model(step, torch.full((3, 1), 5), s, logit_index=torch.zeros(3, dtype=torch.long))
        results.append((prefill, decode))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
