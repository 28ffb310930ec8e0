"""The one linear class every projection of the decoder goes through.

`ElasticLinear` starts as a plain `y = x @ W.T + b`; the elastic model extends it with tiers (masks,
LoRA stacks, packed weights) without the decoder changing. Parameter names match `nn.Linear`
(`weight`, `bias`), so HF state dicts load into it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ElasticLinear(nn.Module):
    """A linear projection `[..., in_features] -> [..., out_features]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
