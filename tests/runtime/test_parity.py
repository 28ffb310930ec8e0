"""Our decoder == transformers' own model, on random configs of every supported family (fp32)."""

from __future__ import annotations

import pytest
import torch
from sparsedial.engine.loader import load_model

from .conftest import FAMILIES

# fp32 logits of two implementations of the same math differ by summation order only (~1e-6 relative).
ATOL = 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_checkpoints, family):
    path, ref = hf_checkpoints[family]
    ours = load_model(path, dtype="float32", with_tokenizer=False).model
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (3, 24))  # 24 > mistral-window's 5: the window must bite
    with torch.no_grad():
        expected = ref(input_ids=tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window"])
def test_cached_decode_equals_full_forward(hf_checkpoints, family):
    path, _ = hf_checkpoints[family]
    model = load_model(path, dtype="float32", with_tokenizer=False).model
    torch.manual_seed(2)
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(tokens)  # [1, 20, V]
        model.setup_cache(num_slots=3, max_seq_len=32)
        slot = torch.tensor([2])
        steps = [model(tokens[:, :12], torch.arange(12)[None], slot)[:, -1]]  # prefill 12 tokens
        for t in range(12, 20):  # then one token at a time
            steps.append(model(tokens[:, t : t + 1], torch.tensor([[t]]), slot)[:, -1])
    torch.testing.assert_close(torch.stack(steps[1:], 1), full[:, 12:], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps[0], full[:, 11], atol=ATOL, rtol=0)


def test_rows_at_different_lengths_match_single_rows(hf_checkpoints):
    """Right-padded batched prefill + decode at per-row positions == each row alone."""
    path, _ = hf_checkpoints["llama"]
    model = load_model(path, dtype="float32", with_tokenizer=False).model
    torch.manual_seed(3)
    rows = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    with torch.no_grad():
        alone = [model(r[None])[0, -1] for r in rows]
        model.setup_cache(3, 16)
        batch = torch.zeros(3, 9, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        lens = torch.tensor([len(r) for r in rows])
        got = model(batch, torch.arange(9).expand(3, 9), torch.arange(3), logit_index=lens - 1)
    torch.testing.assert_close(got, torch.stack(alone), atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(hf_checkpoints, tmp_path):
    _, ref = hf_checkpoints["llama"]
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, dtype="float32", with_tokenizer=False).model
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(input_ids=tokens).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_loads_close(hf_checkpoints, dtype):
    path, ref = hf_checkpoints["llama"]
    ours = load_model(path, dtype=dtype, with_tokenizer=False).model
    assert ours.lm_head.weight.dtype == dtype
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        # half precision keeps ~3 significant digits; logits here are O(1)
        torch.testing.assert_close(ours(tokens).float(), ref(input_ids=tokens).logits, atol=0.1, rtol=0.05)
