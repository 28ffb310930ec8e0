"""The nested mask family: one fixed importance score per weight gives every unstructured tier at once.

Scores come from the DENSE trajectory (EPTS): one pass of the dense model over the calibration data gives
each linear's input norms, so score = |W| * ||X|| (Wanda) or |W| (magnitude). Each row is ranked once;
the mask at s keeps the row's top keep(s). The 2:4 mask takes the 2 best of every 4 by the same scores.

`chain=True` builds the unstructured family inside the 2:4 support: every weight the 2:4 mask keeps
ranks above every weight it drops, so 50% == 2:4 and 60/70/80/90% are subsets of the 2:4 tier
(dense > 30% > 40% > 50% = 2:4 > 60% > ...). `chain=False` ranks purely by score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from sparsedial.engine.elastic_format import drop_levels_from_rank, pack_mask24, rank_from_scores
from sparsedial.engine.model import Transformer
from tqdm import tqdm

from .blockwise import BlockContext, block_linears, capture_inputs, embed, run_block
from .pruners import mask_nm

Importance = Literal["wanda", "magnitude"]


@dataclass
class NestedMasks:
    """Per linear (full name): rank [out, in] int64 (0 = most important), drop levels, packed 2:4 mask."""

    rank: dict[str, torch.Tensor]
    drop_level: dict[str, torch.Tensor]
    mask24: dict[str, torch.Tensor]


@torch.no_grad()
def dense_input_norms(model: Transformer, calib_tokens: torch.Tensor, batch_size: int = 8,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every linear's inputs along the dense trajectory (one pass, no pruning)."""
    x = embed(model, calib_tokens)
    ctx = BlockContext.build(model, calib_tokens.shape[1], x.dtype)
    norms: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="dense statistics", disable=not progress)):
        with capture_inputs(layer) as stats:
            x = run_block(ctx, layer, x, batch_size)
        norms.update({f"model.layers.{i}.{n}": s.norm for n, s in stats.items()})
    return norms


def build_nested(model: Transformer, norms: dict[str, torch.Tensor] | None, importance: Importance = "wanda",
                 chain: bool = False, with_24: bool = True) -> NestedMasks:
    """Rank every block linear's weights once; `norms` from dense_input_norms (unused for magnitude)."""
    out = NestedMasks({}, {}, {})
    for i, layer in enumerate(model.model.layers):
        for short, lin in block_linears(layer).items():
            name = f"model.layers.{i}.{short}"
            w = lin.weight.detach().float()
            scores = w.abs() if importance == "magnitude" else w.abs() * norms[name][None, :]
            keep24 = mask_nm(scores, 2, 4) if with_24 and w.shape[1] % 4 == 0 else None
            if chain:
                if keep24 is None:
                    raise ValueError(f"chain mode needs a 2:4 mask, but {name} has {w.shape[1]} inputs")
                # 2:4-kept weights first (shift their scores above every dropped one), then by score
                scores = scores + keep24 * (scores.max() + 1.0)
            rank = rank_from_scores(scores)
            out.rank[name] = rank
            out.drop_level[name] = drop_levels_from_rank(rank)
            if keep24 is not None:
                out.mask24[name] = pack_mask24(keep24)
    return out
