"""Run a decoder block by block on calibration data, and capture what each linear sees.

Every compression method here is sequential: block i is compressed from the activations that come out of
the already-compressed blocks before it (or from the dense trajectory, when a method asks for it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from sparsedial.engine.elastic_format import LINEAR_NAMES
from sparsedial.engine.model import DecoderLayer, Transformer
from torch import nn


@dataclass
class BlockContext:
    """RoPE tables, causal mask and positions for calibration batches [B, T] (no KV cache)."""

    cos: torch.Tensor  # [1, T, Dh]
    sin: torch.Tensor
    mask: torch.Tensor  # [1, 1, T, T] bool
    positions: torch.Tensor  # [1, T]

    @classmethod
    def build(cls, model: Transformer, seq_len: int, dtype: torch.dtype) -> BlockContext:
        if model._rope is None:
            model.init_rope()
        device = model.model.embed_tokens.weight.device
        positions = torch.arange(seq_len, device=device)[None]
        cos, sin = model._rope[0][positions].to(dtype), model._rope[1][positions].to(dtype)
        return cls(cos, sin, model._mask_rows(positions), positions)

    def run(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> the block's output [B, T, D]."""
        B = x.shape[0]
        return layer(x, self.cos.expand(B, -1, -1), self.sin.expand(B, -1, -1), self.mask,
                     self.positions.expand(B, -1), None, x.shape[1])


# projections that read the same input as an earlier one in LINEAR_NAMES order
_SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                 "mlp.up_proj": "mlp.gate_proj"}


def block_linears(layer: DecoderLayer) -> dict[str, nn.Module]:
    """The 7 projections of a block by short name (self_attn.q_proj ...)."""
    return {name: layer.get_submodule(name) for name in LINEAR_NAMES}


@torch.no_grad()
def embed(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Inputs of block 0: [N, T] -> [N, T, D]."""
    return model.model.embed_tokens(tokens)


@torch.no_grad()
def run_block(ctx: BlockContext, layer: DecoderLayer, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    return torch.cat([ctx.run(layer, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


class InputStats:
    """Per-linear statistics of its inputs, accumulated over calibration tokens (fp32):
    `sq_norm[j]` = sum_t x_tj^2 (Wanda's ||X_j||^2) and, if asked, `hessian` = (2/N) sum_t x_t x_t^T."""

    def __init__(self, in_features: int, device: torch.device, with_hessian: bool) -> None:
        self.sq_norm = torch.zeros(in_features, device=device)
        self.hessian = torch.zeros(in_features, in_features, device=device) if with_hessian else None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.sq_norm += x.pow(2).sum(0)
        if self.hessian is not None:
            # running mean of 2 x x^T, as in the SparseGPT reference
            n_new = x.shape[0]
            self.hessian *= self.n / (self.n + n_new)
            x = x * (2.0 / (self.n + n_new)) ** 0.5
            self.hessian += x.T @ x
        self.n += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt()


@contextmanager
def capture_inputs(layer: DecoderLayer, with_hessian: bool = False) -> Iterator[dict[str, InputStats]]:
    """Within the block, accumulate InputStats for each of its 7 linears while forwards run."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name, lin in block_linears(layer).items():
        shared = _SHARED_INPUT.get(name)
        if shared is not None:  # q/k/v and gate/up read the same tensor: accumulate it once
            stats[name] = stats[shared]
            continue
        stats[name] = InputStats(lin.in_features, lin.weight.device, with_hessian)
        handles.append(lin.register_forward_pre_hook(lambda m, args, s=stats[name]: s.add(args[0])))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
