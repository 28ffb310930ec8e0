"""Per-tier baselines: magnitude, Wanda and SparseGPT, unstructured or N:M, run block by block.

`prune(model, config, calib_tokens)` prunes a decoder in place, sequentially as the papers do: block i's
statistics come from calibration activations that went through the already-pruned blocks 0..i-1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from sparsedial.engine.elastic_format import keep_count
from sparsedial.engine.model import Transformer
from tqdm import tqdm

from .blockwise import BlockContext, block_linears, capture_inputs, embed, run_block

Method = Literal["magnitude", "wanda", "sparsegpt"]


@dataclass(frozen=True)
class PruneConfig:
    """One baseline run at one tier: `sparsity` (unstructured, per row) or `nm` = (N kept, M) e.g. (2, 4)."""

    method: Method = "wanda"
    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    blocksize: int = 128  # SparseGPT lazy-update block (columns)
    percdamp: float = 0.01  # SparseGPT damping, fraction of mean(diag H)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"method must be magnitude, wanda or sparsegpt, got {self.method!r}")
        if self.nm is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.nm is not None and not 0 < self.nm[0] < self.nm[1]:
            raise ValueError(f"nm must be (kept N, group M) with 0 < N < M, got {self.nm}")

    @property
    def tier_name(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{round(self.sparsity * 100)}%"

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ scores and masks
def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, eq. 1). weight [out, in], input_norm [in]."""
    return weight.abs().float() * input_norm[None, :].float()


def mask_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep each row's top keep(s) scores (ties by column index). bool [out, in]."""
    keep = keep_count(scores.shape[1], sparsity)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive inputs in each row. bool [out, in]."""
    out, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"N:M needs in_features divisible by {m}, got {in_features}")
    groups = scores.reshape(out, in_features // m, m)
    top = torch.topk(groups, n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(out, in_features)


# ------------------------------------------------------------------------------------------- SparseGPT
def _inverse_cholesky_upper(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; if H is not PD, retries with damping raised x10
    (starting from at least 0.1% of mean(diag H), so that percdamp = 0 also recovers)."""
    mean_diag = torch.mean(torch.diag(h)).clamp_min(1e-8)
    damp = percdamp * mean_diag
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U
        damp = max(damp * 10, 1e-3 * mean_diag)
    raise RuntimeError("SparseGPT: Hessian is not positive definite even with 1e4x damping")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.0,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune and update the remaining weights by OBS.

    Unstructured: within each block of `blocksize` columns one threshold on w^2 / diag(Hinv)^2 across all
    rows; N:M: per row, the M-N lowest of every M columns. Returns (new weight in weight's dtype, keep mask).
    """
    W = weight.float().clone()
    H = hessian.float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs that never fire: nothing to reconstruct
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky_upper(H, percdamp)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)
        if nm is None:
            score = W1.pow(2) / d[None, :].pow(2)
            k = int(score.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                thresh = torch.sort(score.flatten())[0][k - 1]
                mask1 = score <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i : i + nm[1]].pow(2) / d[None, i : i + nm[1]].pow(2)
                low = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    keep = ~pruned
    return (W * keep).to(weight.dtype), keep


# ------------------------------------------------------------------------------------------ sequential
@torch.no_grad()
def prune(model: Transformer, config: PruneConfig, calib_tokens: torch.Tensor | None = None,
          progress: bool = True) -> dict[str, float]:
    """Prune every linear of every decoder block in place; returns the measured sparsity per linear."""
    needs_data = config.method != "magnitude"
    if needs_data and calib_tokens is None:
        raise ValueError(f"{config.method} needs calibration tokens")
    layers = model.model.layers
    x = embed(model, calib_tokens) if needs_data else None
    ctx = BlockContext.build(model, calib_tokens.shape[1], x.dtype) if needs_data else None
    measured: dict[str, float] = {}
    for i, layer in enumerate(tqdm(layers, desc=f"{config.method} {config.tier_name}", disable=not progress)):
        stats = None
        if needs_data:
            with capture_inputs(layer, with_hessian=config.method == "sparsegpt") as stats:
                run_block(ctx, layer, x, config.batch_size)
        for name, lin in block_linears(layer).items():
            W = lin.weight.data
            if config.method == "sparsegpt":
                new, keep = sparsegpt_prune(W, stats[name].hessian, config.sparsity, config.nm,
                                            config.blocksize, config.percdamp)
                lin.weight.data = new
            else:
                scores = W.abs().float() if config.method == "magnitude" else wanda_scores(W, stats[name].norm)
                keep = mask_nm(scores, *config.nm) if config.nm else mask_unstructured(scores, config.sparsity)
                lin.weight.data = W * keep
            measured[f"model.layers.{i}.{name}"] = 1.0 - keep.float().mean().item()
        if needs_data:
            x = run_block(ctx, layer, x, config.batch_size)  # the pruned block feeds the next one
    return measured


def overall_sparsity(model: Transformer) -> float:
    """Fraction of exact zeros over all block linears."""
    zeros = total = 0
    for layer in model.model.layers:
        for lin in block_linears(layer).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total if total else math.nan
