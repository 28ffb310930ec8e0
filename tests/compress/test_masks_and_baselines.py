"""Masks, Wanda and SparseGPT against straightforward independent implementations."""

from __future__ import annotations

import pytest
import torch
from sparsedial.compress.nested import build_nested
from sparsedial.compress.pruners import mask_nm, mask_unstructured, sparsegpt_prune, wanda_scores
from sparsedial.engine.elastic_format import (
    drop_levels_from_rank,
    keep_count,
    pack_mask24,
    rank_from_scores,
    unpack_mask24,
    unstructured_mask,
)
from sparsedial.engine.loader import load_model


def naive_wanda_mask(w: torch.Tensor, norms: torch.Tensor, s: float) -> torch.Tensor:
    """Row by row with Python sorting: keep the int(in*(1-s)) largest |w|*||x||."""
    out = torch.zeros_like(w, dtype=torch.bool)
    for i in range(w.shape[0]):
        scores = [(abs(float(w[i, j])) * float(norms[j]), -j) for j in range(w.shape[1])]
        for _, neg_j in sorted(scores, reverse=True)[: keep_count(w.shape[1], s)]:
            out[i, -neg_j] = True
    return out


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.9])
def test_wanda_mask_matches_naive(s):
    g = torch.Generator().manual_seed(0)
    w, norms = torch.randn(12, 40, generator=g), torch.rand(40, generator=g) + 0.1
    assert torch.equal(mask_unstructured(wanda_scores(w, norms), s), naive_wanda_mask(w, norms, s))


def test_nm_mask_keeps_exactly_two_of_four():
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    m = mask_nm(scores, 2, 4)
    assert (m.view(16, 16, 4).sum(-1) == 2).all()
    # the kept ones are the two largest of their group
    groups, kept = scores.view(16, 16, 4), m.view(16, 16, 4)
    assert (groups[kept].view(16, 16, 2).min(-1).values >= groups[~kept].view(16, 16, 2).max(-1).values).all()
    assert torch.equal(unpack_mask24(pack_mask24(m)), m)


def test_drop_levels_reproduce_every_integer_percent():
    scores = torch.randn(7, 384, generator=torch.Generator().manual_seed(2))
    rank = rank_from_scores(scores)
    levels = drop_levels_from_rank(rank)
    for p in range(0, 101):
        expected = rank < keep_count(384, p / 100)
        assert torch.equal(unstructured_mask(levels, p), expected), p


def test_nested_family_is_nested_exact_and_chain_sits_inside_24(tiny_model_dir):
    model = load_model(tiny_model_dir, with_tokenizer=False).model
    norms = {f"model.layers.{i}.{n}": torch.rand(lin.in_features) + 0.1
             for i, layer in enumerate(model.model.layers)
             for n, lin in [(n, layer.get_submodule(n)) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                 "self_attn.v_proj", "self_attn.o_proj",
                                                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]}
    for chain in (False, True):
        nm = build_nested(model, norms, chain=chain)
        for name, levels in nm.drop_level.items():
            in_features = levels.shape[1]
            prev = torch.ones_like(levels, dtype=torch.bool)
            for p in range(10, 100, 10):
                m = unstructured_mask(levels, p)
                assert (m.sum(1) == keep_count(in_features, p / 100)).all()  # exact per row
                assert not (m & ~prev).any()  # nested: sparser is a subset
                prev = m
            m24 = unpack_mask24(nm.mask24[name])
            assert (m24.view(m24.shape[0], -1, 4).sum(-1) == 2).all()
            if chain:
                assert torch.equal(unstructured_mask(levels, 50), m24)
                assert not (unstructured_mask(levels, 70) & ~m24).any()


def naive_obs(w: torch.Tensor, h: torch.Tensor, prune_mask: torch.Tensor) -> torch.Tensor:
    """Sequential OBS with an explicit inverse of the remaining columns' Hessian at every step."""
    w = w.double().clone()
    h = h.double()
    cols = w.shape[1]
    for i in range(cols):
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.where(prune_mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
        err = (w[:, i] - q) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w.float()


def _layer_problem(seed: int, rows=16, cols=48, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    w = torch.randn(rows, cols, generator=g)
    h = 2 * x.T @ x / tokens
    return w, x, h


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_naive_obs(nm):
    w, x, h = _layer_problem(3)
    damp = 0.01 * torch.diag(h).mean()
    new, keep = sparsegpt_prune(w, h, sparsity=0.5, nm=nm, blocksize=16)
    expected = naive_obs(w, h + damp * torch.eye(h.shape[0]), ~keep)
    torch.testing.assert_close(new, expected, atol=2e-4, rtol=1e-3)
    err = lambda v: ((x @ (w - v).T) ** 2).mean().item()  # noqa: E731
    assert err(new) <= err(expected) * 1.001
    assert err(new) < err(w * keep)  # the OBS update beats plain masking
    if nm:
        assert (keep.view(16, -1, 4).sum(-1) == 2).all()
    else:
        assert abs((~keep).float().mean().item() - 0.5) < 0.02


def test_sparsegpt_survives_dead_inputs_and_singular_hessian():
    w, x, _ = _layer_problem(4, cols=32)
    x[:, 5] = 0.0  # a dead input
    x = x[:, :8].repeat(1, 4)  # rank 8 Hessian of size 32: singular
    h = 2 * x.T @ x / x.shape[0]
    new, keep = sparsegpt_prune(w, h, sparsity=0.6, percdamp=0.0)
    assert torch.isfinite(new).all()
    assert (new[:, 5] == 0).all()
    assert torch.equal(new == 0, ~keep | (new == 0))
