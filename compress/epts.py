"""EPTS one-shot reconstruction: nested masks + hierarchical LoRA (MS-HiLoRA) trained block by block.

For every block (notes/epts.md, "EPTS in one paragraph"): freeze the dense weights; give each of the 7
linears one LoRA pair per sparsity group; each optimizer step visits every group once at a stratified
random sparsity inside the group's interval, runs the block with W_k = (W + sum_{g<=k} B_g A_g) * M_s on the
mixed (MSFM) input stream, and sums the losses
    L_0 = mse(Y_0, Y_dense),  L_k = (1 - t) mse(Y_k, Y_dense) + t mse(Y_k, Y_0.detach())   (t = 0.5)
toward the dense block's output on the dense stream. The next block's mixed input is a fixed weighted
mix of this block's outputs at one sparsity per group. After each block, LoRA_0 is disabled for the block
if it does not lower the error at s = 0.3.

Our extensions: the 2:4 tier has its own group (on top of the groups up to 50%), two groups beyond
70% (0.7-0.8, 0.8-0.9), and an `unmasked` mode where the delta is not masked (a low-rank path beside
the sparse base at run time). The run resumes from the last finished block.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sparsedial.engine.elastic_format import (
    LINEAR_NAMES,
    LoraGroup,
    groups_for_nm,
    groups_for_sparsity,
    keep_count,
    unpack_mask24,
)
from sparsedial.engine.model import Transformer
from torch.func import functional_call
from tqdm import tqdm

from .blockwise import BlockContext, embed, run_block
from .nested import NestedMasks

DEFAULT_GROUPS = ((0.0, 0.40), (0.40, 0.45), (0.45, 0.50), (0.50, 0.55), (0.55, 0.60), (0.60, 0.65),
                  (0.65, 0.70), (0.70, 0.80), (0.80, 0.90))


@dataclass(frozen=True)
class EPTSConfig:
    """Reconstruction recipe; serialised into elastic.json."""

    groups: tuple[tuple[float, float], ...] = DEFAULT_GROUPS
    """Sparsity intervals (low, high] of the unstructured LoRA groups (EPTS's 7 + our 0.7-0.8, 0.8-0.9)."""
    rank: int = 8
    """LoRA rank of every group (reference: 8)."""
    high_rank: int | None = None
    """If set, the rank of groups reaching beyond 70% sparsity (our extension; more capacity where the
    mask removes most of the weight)."""
    nm_group: bool = True
    """Train a LoRA group of the 2:4 tier in the same run."""
    msfm_weights: tuple[float, ...] | None = None
    """Mixing weights of the group outputs feeding the next block (unstructured groups, then 2:4);
    None: the reference's low/mid/high = 0.3/0.3/0.4 spread over our groups (see default_msfm_weights)."""
    epochs: int = 4
    batch_size: int = 4
    lr: float = 1e-3
    teacher_weight: float = 0.5
    lora_mode: Literal["masked", "unmasked"] = "masked"
    lora0_check_sparsity: float = 0.3
    lora0_off_below: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not 0.0 <= lo < hi <= 1.0 for lo, hi in self.groups):
            raise ValueError(f"groups must be intervals 0 <= low < high <= 1, got {self.groups}")
        n = len(self.groups) + int(self.nm_group)
        if self.msfm_weights is not None and (len(self.msfm_weights) != n or
                                              abs(sum(self.msfm_weights) - 1.0) > 1e-6):
            raise ValueError(f"msfm_weights needs {n} weights summing to 1, got {self.msfm_weights}")
        if self.lora_mode not in ("masked", "unmasked"):
            raise ValueError(f"lora_mode must be masked or unmasked, got {self.lora_mode!r}")

    def lora_groups(self) -> list[LoraGroup]:
        def rank(hi: float) -> int:
            return self.high_rank if self.high_rank and hi > 0.7 + 1e-9 else self.rank

        out = [LoraGroup(i, lo, hi, rank(hi)) for i, (lo, hi) in enumerate(self.groups)]
        if self.nm_group:
            out.append(LoraGroup(len(self.groups), 0.5, 0.5, self.rank, nm=True))
        return out

    def mixing_weights(self) -> list[float]:
        return list(self.msfm_weights) if self.msfm_weights is not None else default_msfm_weights(self)


def default_msfm_weights(cfg: EPTSConfig) -> list[float]:
    """Low (<= 50%), mid (50-70%, and 2:4) and high (> 70%) bands get 0.3 / 0.3 / 0.4, equal inside a band."""
    bands = ["low" if hi <= 0.5 + 1e-9 else "mid" if hi <= 0.7 + 1e-9 else "high" for _, hi in cfg.groups]
    bands += ["mid"] * int(cfg.nm_group)
    share = {"low": 0.3, "mid": 0.3, "high": 0.4}
    present = {b: bands.count(b) for b in set(bands)}
    total = sum(share[b] for b in present)
    return [share[b] / total / present[b] for b in bands]


@dataclass
class BlockLoRA:
    """LoRA factors of one block: A[name][g] [r, in], B[name][g] [out, r]; lora0_off flag."""

    A: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    B: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    lora0_off: bool = False

    def tensors(self, block: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.A:
            full = f"model.layers.{block}.{name}"
            for g, (a, b) in enumerate(zip(self.A[name], self.B[name])):
                out[f"{full}.lora.{g}.A"] = a.detach().contiguous()
                out[f"{full}.lora.{g}.B"] = b.detach().contiguous()
            out[f"{full}.lora0_off"] = torch.tensor(int(self.lora0_off), dtype=torch.uint8)
        return out


class _Group:
    """One training/mixing path: which LoRA groups apply and how to draw its sparsities."""

    def __init__(self, index: int, low: float, high: float, lora: tuple[int, ...], nm: bool) -> None:
        self.index, self.low, self.high, self.lora, self.nm = index, low, high, lora, nm

    def stratified(self, steps: int, gen: torch.Generator) -> list[float]:
        """One sparsity per step: the interval cut into `steps` slices, shuffled, one point per slice."""
        perm = torch.randperm(steps, generator=gen).tolist()
        u = torch.rand(steps, generator=gen).tolist()
        width = self.high - self.low
        return [min(self.high, max(self.low + 1e-3, round(self.low + width * (p + x) / steps, 3)))
                for p, x in zip(perm, u)]


def _paths(cfg: EPTSConfig) -> list[_Group]:
    groups = cfg.lora_groups()
    paths = [_Group(g.index, g.low, g.high, groups_for_sparsity(groups, g.high), False)
             for g in groups if not g.nm]
    if cfg.nm_group:
        nm = groups[-1]
        paths.append(_Group(nm.index, 0.5, 0.5, groups_for_nm(groups), True))
    return paths


class _BlockWeights:
    """Builds a block's per-path weights from frozen W, fixed ranks/2:4 masks and the trainable LoRA."""

    def __init__(self, layer, block: int, masks: NestedMasks, lora: BlockLoRA, mode: str) -> None:
        self.W = {n: layer.get_submodule(n).weight.detach().float() for n in LINEAR_NAMES}
        self.rank = {n: masks.rank[f"model.layers.{block}.{n}"] for n in LINEAR_NAMES}
        self.m24 = {n: unpack_mask24(masks.mask24[f"model.layers.{block}.{n}"])
                    for n in LINEAR_NAMES if f"model.layers.{block}.{n}" in masks.mask24}
        self.lora, self.mode = lora, mode

    def mask(self, name: str, sparsity: float, nm: bool) -> torch.Tensor | None:
        if nm:
            return self.m24[name]
        if sparsity <= 0:
            return None
        return self.rank[name] < keep_count(self.W[name].shape[1], sparsity)

    def params(self, path: _Group, sparsity: float, groups: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        groups = path.lora if groups is None else groups
        out = {}
        for n, W in self.W.items():
            delta = sum((self.lora.B[n][g] @ self.lora.A[n][g] for g in groups), torch.zeros_like(W))
            mask = self.mask(n, sparsity, path.nm)
            if mask is None:
                w = W + delta
            elif self.mode == "masked":
                w = (W + delta) * mask  # EPTS: the delta lives under the mask, sparsity stays exact
            else:
                w = W * mask + delta  # unmasked: sparse base + low-rank path
            out[f"{n}.weight"] = w
        return out


def _init_lora(layer, cfg: EPTSConfig, gen: torch.Generator) -> BlockLoRA:
    lora = BlockLoRA()
    groups = cfg.lora_groups()
    for n in LINEAR_NAMES:
        lin = layer.get_submodule(n)
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt(5)) bound, as peft's LoRA A
        dev = lin.weight.device
        lora.A[n] = [((torch.rand(g.rank, lin.in_features, generator=gen) * 2 - 1) * bound).to(dev)
                     .requires_grad_() for g in groups]
        lora.B[n] = [torch.zeros(lin.out_features, g.rank, device=dev, requires_grad=True) for g in groups]
    return lora


def _forward(layer, ctx: BlockContext, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    return functional_call(layer, params, (x, ctx.cos.expand(B, -1, -1), ctx.sin.expand(B, -1, -1), ctx.mask,
                                           ctx.positions.expand(B, -1), None, x.shape[1]), strict=False)


def train_block(layer, block: int, ctx: BlockContext, x_mix: torch.Tensor, y_dense: torch.Tensor,
                masks: NestedMasks, cfg: EPTSConfig, gen: torch.Generator, progress: bool) -> BlockLoRA:
    """Reconstruct one block; returns its trained LoRA stack."""
    lora = _init_lora(layer, cfg, gen)
    bw = _BlockWeights(layer, block, masks, lora, cfg.lora_mode)
    paths = _paths(cfg)
    n = x_mix.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    draws = [p.stratified(steps, gen) for p in paths]
    params = [t for n_ in LINEAR_NAMES for t in lora.A[n_] + lora.B[n_]]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = tqdm(total=steps, desc=f"EPTS block {block}", disable=not progress, leave=False)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yd = x_mix[idx], y_dense[idx]
            y0, total = None, 0.0
            for p, d in zip(paths, draws):
                y = _forward(layer, ctx, bw.params(p, d[step]), xb)
                if y0 is None:  # group 0: toward the dense output only
                    loss = F.mse_loss(y, yd)
                    y0 = y.detach()
                else:
                    loss = (1 - cfg.teacher_weight) * F.mse_loss(y, yd) + cfg.teacher_weight * F.mse_loss(y, y0)
                total = total + loss
            opt.zero_grad(set_to_none=True)
            total.backward()  # one step over the summed losses of all groups (EPTS)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total.item():.3e}")
    bar.close()
    for t in params:
        t.requires_grad_(False)
    return lora


@torch.no_grad()
def _check_lora0(layer, block, ctx, x_dense, y_dense, masks, lora, cfg) -> bool:
    """True if LoRA_0 should be disabled: at s = lora0_check_sparsity it does not lower the error."""
    bw = _BlockWeights(layer, block, masks, lora, cfg.lora_mode)
    path = _paths(cfg)[0]
    s = cfg.lora0_check_sparsity
    err = {}
    for key, groups in (("with", (0,)), ("without", ())):
        y = torch.cat([_forward(layer, ctx, bw.params(path, s, groups), x_dense[i : i + 8])
                       for i in range(0, x_dense.shape[0], 8)])
        err[key] = F.mse_loss(y, y_dense).item()
    return err["with"] >= err["without"]


@torch.no_grad()
def _mix(layer, block, ctx, x_mix, masks, lora, cfg, gen) -> torch.Tensor:
    """MSFM: the next block's sparse-path input = sum_k w_k * block(x_mix) at one sparsity per group."""
    bw = _BlockWeights(layer, block, masks, lora, cfg.lora_mode)
    out = torch.zeros_like(x_mix)
    for p, w in zip(_paths(cfg), cfg.mixing_weights()):
        s = p.stratified(1, gen)[0]
        params = bw.params(p, s)
        out += w * torch.cat([_forward(layer, ctx, params, x_mix[i : i + 8]) for i in range(0, x_mix.shape[0], 8)])
    return out


def reconstruct(model: Transformer, masks: NestedMasks, calib_tokens: torch.Tensor, cfg: EPTSConfig,
                work_dir: Path | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run EPTS over all blocks; returns the LoRA tensors (elastic.safetensors names). With `work_dir`,
    each finished block is saved there and a rerun with the same config resumes after it."""
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = model.model.layers
    with torch.no_grad():
        x_dense = embed(model, calib_tokens).float()
    x_mix = x_dense.clone()
    ctx = BlockContext.build(model, calib_tokens.shape[1], x_dense.dtype)
    tensors: dict[str, torch.Tensor] = {}
    start = _resume(work_dir, cfg, calib_tokens, tensors) if work_dir else 0
    if start:
        streams = load_file(work_dir / "streams.safetensors")
        x_dense, x_mix = streams["x_dense"].to(x_dense.device), streams["x_mix"].to(x_dense.device)
        gen.set_state(torch.load(work_dir / "rng.pt", weights_only=True))
    for b in tqdm(range(start, len(layers)), desc="EPTS", initial=start, total=len(layers), disable=not progress):
        layer = layers[b]
        y_dense = run_block(ctx, layer, x_dense)
        lora = train_block(layer, b, ctx, x_mix, y_dense, masks, cfg, gen, progress)
        lora.lora0_off = _check_lora0(layer, b, ctx, x_dense, y_dense, masks, lora, cfg)
        x_mix = _mix(layer, b, ctx, x_mix, masks, lora, cfg, gen)
        x_dense = y_dense
        block_tensors = {k: v.cpu() for k, v in lora.tensors(b).items()}
        tensors.update(block_tensors)
        if work_dir:
            _checkpoint(work_dir, b, block_tensors, x_dense, x_mix, gen, cfg, calib_tokens)
    return tensors


def _fingerprint(cfg: EPTSConfig, calib_tokens: torch.Tensor) -> dict:
    return {"config": json.loads(json.dumps(asdict(cfg))), "calib_sum": int(calib_tokens.sum()),
            "calib_shape": list(calib_tokens.shape)}


def _resume(work_dir: Path, cfg: EPTSConfig, calib_tokens: torch.Tensor, tensors: dict) -> int:
    progress_file = work_dir / "progress.json"
    if not progress_file.is_file():
        return 0
    state = json.loads(progress_file.read_text())
    if state["fingerprint"] != _fingerprint(cfg, calib_tokens):
        raise ValueError(f"{work_dir} holds an EPTS run with another config or calibration set; "
                         "delete it or choose another --out")
    for b in range(state["next_block"]):
        tensors.update(load_file(work_dir / f"block{b}.safetensors"))
    print(f"resuming EPTS at block {state['next_block']} from {work_dir}")
    return state["next_block"]


def _checkpoint(work_dir, b, block_tensors, x_dense, x_mix, gen, cfg, calib_tokens) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    save_file(block_tensors, work_dir / f"block{b}.safetensors")
    save_file({"x_dense": x_dense.contiguous().cpu(), "x_mix": x_mix.contiguous().cpu()},
              work_dir / "streams.safetensors")
    torch.save(gen.get_state(), work_dir / "rng.pt")
    tmp = work_dir / "progress.json.tmp"
    tmp.write_text(json.dumps({"next_block": b + 1, "fingerprint": _fingerprint(cfg, calib_tokens)}))
    tmp.replace(work_dir / "progress.json")  # atomic: progress never points at a half-written block
