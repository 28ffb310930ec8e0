"""OWL (Yin et al. 2024): non-uniform per-block sparsity from each block's share of outlier weights.

Outlier ratio of block l: D_l = share of the block's Wanda scores |W| * ||X|| (all 7 linears together,
dense trajectory) above M times their mean (M = 5). Blocks with more outliers are pruned less: the ratios
are min-max scaled to [0, 2 * lambda] and the block sparsity is s - (scaled - mean(scaled)), so the mean over
blocks stays s. EPTS serves any per-block schedule inside its groups without retraining (notes/epts.md);
the schedule is stored per tier in elastic.json in whole percents (the checkpoint's granularity).
"""

from __future__ import annotations

import torch
from sparsedial.engine.elastic_format import LINEAR_NAMES
from sparsedial.engine.model import Transformer


def outlier_ratios(model: Transformer, norms: dict[str, torch.Tensor], m: float = 5.0) -> list[float]:
    """D_l per decoder block from Wanda scores on the dense trajectory (`norms` from dense_input_norms)."""
    ratios = []
    for i, layer in enumerate(model.model.layers):
        scores = torch.cat([(layer.get_submodule(n).weight.detach().abs().float()
                             * norms[f"model.layers.{i}.{n}"][None, :]).flatten() for n in LINEAR_NAMES])
        ratios.append((scores > m * scores.mean()).float().mean().item())
    return ratios


def owl_schedule(ratios: list[float], sparsity: float, lam: float = 0.08) -> tuple[int, ...]:
    """Per-block integer sparsity percents with mean ~ `sparsity`, spread by up to 2 * lam."""
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"OWL lambda must be in [0, 0.5), got {lam}")
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    block = sparsity - (scaled - scaled.mean())  # more outliers -> lower sparsity
    return tuple(int(min(99, max(1, round(100 * float(x))))) for x in block)
