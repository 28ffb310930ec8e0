"""sparsedial's Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM).

Module names mirror Hugging Face's (`model.layers.N.self_attn.q_proj` ...), so HF safetensors load by
name. Every projection is an `ElasticLinear`; blocks know nothing of sparsity or requests: they pass the
forward's `TierPlan` (engine/tiers.py, the tier of each row) on to their projections.

KV cache: a static cache of `num_slots` rows x `max_seq_len` positions per layer. A forward pass takes
per-token positions `[B, T]` and the cache slot of each row `[B]`; it writes its keys/values at those
positions, then attends to every cached key whose position is <= the query's. Rows may therefore be at
different lengths, and right padding is harmless (padding writes land beyond the row's real length and
are overwritten before anything attends to them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_inv_freq
from .linear import ElasticLinear
from .tiers import TierPlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; same math as below when there is nothing to cast
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32, scale in the input dtype (as the reference implementation does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D], sin with its first half negated (`Transformer.init_rope`), so
    HF's `rotate_half(x) * sin` is `roll(x, D/2) * sin` (bit-identical, one op instead of three)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static per-slot key/value cache for one layer: [num_slots, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, num_slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (num_slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, T, D] at (slots [B], positions [B, T]); return the first `length` cached positions
        of those slots. `first`: set when the slots are `first, first + 1, ...`, read as a view (no copy)."""
        idx = (slots[:, None], slice(None), positions)  # advanced indices -> [B, T, Hkv, D]
        self.k[idx] = k.transpose(1, 2)
        self.v[idx] = v.transpose(1, 2)
        if first is not None:
            rows = slice(first, first + k.shape[0])
            return self.k[rows, :, :length], self.v[rows, :, :length]
        return self.k[slots, :, :length], self.v[slots, :, :length]


def _first_of_range(slots: torch.Tensor) -> int | None:
    """The first slot when `slots` [B] are consecutive ascending cache rows, else None (checked on CPU only:
    on a GPU the check would cost a device sync)."""
    if slots.device.type != "cpu" or slots.numel() == 0:
        return None
    ids = slots.tolist()
    return ids[0] if ids == list(range(ids[0], ids[0] + len(ids))) else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = ElasticLinear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = ElasticLinear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = ElasticLinear(d, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = ElasticLinear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor, slots: torch.Tensor | None, kv_len: int,
                first: int | None = None, plan: TierPlan | None = None) -> torch.Tensor:
        B, T, _ = x.shape  # x: [B, T, D]
        q = self.q_proj(x, plan).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x, plan).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x, plan).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slots is not None:
            if self.kv_cache is None:
                raise RuntimeError("a KV cache slot was given but setup_cache() was not called")
            k, v = self.kv_cache.update(slots, positions, k, v, kv_len, first)  # [B, Hkv, S, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), plan)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ElasticLinear(d, f, bias=cfg.mlp_bias)
        self.up_proj = ElasticLinear(d, f, bias=cfg.mlp_bias)
        self.down_proj = ElasticLinear(f, d, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, plan: TierPlan | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, plan)) * self.up_proj(x, plan), plan)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos, sin, mask, positions, slots, kv_len, first=None,
                plan: TierPlan | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, slots, kv_len, first, plan)
        return x + self.mlp(self.post_attention_layernorm(x), plan)


class DecoderBody(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """The causal LM. `forward(tokens, positions, slots)` returns logits [B, T, V] (or [B, V] with `logit_index`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = 0
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self, max_positions: int | None = None) -> None:
        """(Re)build the cos/sin tables on the parameters' device; call after the weights are materialised."""
        cfg = self.config
        n = max_positions or cfg.max_position_embeddings
        device = self.model.embed_tokens.weight.device
        inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)  # [Dh/2]
        freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)  # [n, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, Dh]
        sin = emb.sin()
        sin[:, : cfg.head_dim // 2].neg_()  # signed sine, see apply_rope
        self._rope = (emb.cos(), sin)

    def setup_cache(self, num_slots: int, max_seq_len: int) -> None:
        """Allocate a static KV cache of `num_slots` sequences x `max_seq_len` positions."""
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(num_slots, self.config.num_key_value_heads, max_seq_len,
                                               self.config.head_dim, w.dtype, w.device)
        self.max_seq_len = max_seq_len
        if self._rope is None or self._rope[0].shape[0] < max_seq_len:
            self.init_rope(max(max_seq_len, self.config.max_position_embeddings))

    def _mask(self, positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        # positions: [B, T], key_positions: [S] -> bool [B, 1, T, S], True = attend
        diff = positions[:, :, None] - key_positions[None, None, :]
        allowed = diff >= 0
        if self.config.sliding_window is not None:
            allowed &= diff < self.config.sliding_window
        return allowed[:, None]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, logit_index: torch.Tensor | None = None,
                plan: TierPlan | None = None) -> torch.Tensor:
        """tokens/positions: [B, T]; slots: [B] cache rows or None (no cache, keys = this call's tokens);
        logit_index: [B] position (0..T-1) whose logits to return per row, else all positions;
        plan: the tier of each run of rows (its tiers materialized: ElasticModel.ensure), None = base weights."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if self._rope is None:
            self.init_rope()
        max_pos = int(positions.max())
        if max_pos >= self._rope[0].shape[0]:
            raise ValueError(f"position {max_pos} exceeds the RoPE table ({self._rope[0].shape[0]} positions)")
        cos, sin = self._rope[0][positions], self._rope[1][positions]  # [B, T, Dh] fp32
        first = None
        if slots is None:
            kv_len = T
            mask = self._mask_rows(positions)
        else:
            first = _first_of_range(slots)
            if max_pos >= self.max_seq_len:
                raise ValueError(f"position {max_pos} exceeds the KV cache length {self.max_seq_len}")
            kv_len = max_pos + 1
            mask = self._mask(positions, torch.arange(kv_len, device=tokens.device))
        x = self.model.embed_tokens(tokens)  # [B, T, D]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, positions, slots, kv_len, first, plan)
        x = self.model.norm(x)
        if logit_index is not None:
            x = x[torch.arange(B, device=x.device), logit_index]  # [B, D]
        return self.lm_head(x)

    def _mask_rows(self, positions: torch.Tensor) -> torch.Tensor:
        # no cache, several rows: keys are each row's own tokens at its own positions -> [B, 1, T, T]
        diff = positions[:, :, None] - positions[:, None, :]
        allowed = diff >= 0
        if self.config.sliding_window is not None:
            allowed &= diff < self.config.sliding_window
        return allowed[:, None]
