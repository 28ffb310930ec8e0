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
70% (0.7-0.8, 0.8-0.9), an `unmasked` mode where the delta is not masked (a low-rank path beside
the sparse base at run time), and input streams per sparsity band or per group instead of the one MSFM
stream (`EPTSConfig.streams`; docs/quality.md, "Input streams"). The run resumes from the last finished block whose files verify, so a
kill at any point or a damaged file costs at most the blocks after it (see "resume folder" below).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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
    streams: Literal["mixed", "band", "own"] = "mixed"
    """Input streams of the sparse paths. "mixed": EPTS's MSFM, one stream for every group (the next
    block's input = the msfm_weights mix of the group outputs). "band" (ours): one MSFM stream per band
    (<= 50%; 50-70% and 2:4; > 70%), mixed from that band's groups only (msfm_weights renormalised inside
    the band). "own" (ours): every group reads and feeds its own trajectory, the stream its tiers see at
    run time."""

    def __post_init__(self) -> None:
        if any(not 0.0 <= lo < hi <= 1.0 for lo, hi in self.groups):
            raise ValueError(f"groups must be intervals 0 <= low < high <= 1, got {self.groups}")
        n = len(self.groups) + int(self.nm_group)
        if self.msfm_weights is not None and (len(self.msfm_weights) != n or
                                              abs(sum(self.msfm_weights) - 1.0) > 1e-6):
            raise ValueError(f"msfm_weights needs {n} weights summing to 1, got {self.msfm_weights}")
        if self.lora_mode not in ("masked", "unmasked"):
            raise ValueError(f"lora_mode must be masked or unmasked, got {self.lora_mode!r}")
        if self.streams not in ("mixed", "band", "own"):
            raise ValueError(f"streams must be mixed, band or own, got {self.streams!r}")

    def lora_groups(self) -> list[LoraGroup]:
        def rank(hi: float) -> int:
            return self.high_rank if self.high_rank and hi > 0.7 + 1e-9 else self.rank

        out = [LoraGroup(i, lo, hi, rank(hi)) for i, (lo, hi) in enumerate(self.groups)]
        if self.nm_group:
            out.append(LoraGroup(len(self.groups), 0.5, 0.5, self.rank, nm=True))
        return out

    def mixing_weights(self) -> list[float]:
        return list(self.msfm_weights) if self.msfm_weights is not None else default_msfm_weights(self)

    def stream_plan(self) -> tuple[list[int], list[float]]:
        """(stream index of each path, the path's weight in its stream's mix); paths are the unstructured
        groups, then 2:4. Each stream's weights sum to 1."""
        w = self.mixing_weights()
        if self.streams == "own":
            return list(range(len(w))), [1.0] * len(w)
        keys = _bands(self) if self.streams == "band" else ["all"] * len(w)
        order = list(dict.fromkeys(keys))
        stream = [order.index(k) for k in keys]
        total = [sum(x for x, s in zip(w, stream) if s == i) for i in range(len(order))]
        if any(t <= 0 for t in total):
            raise ValueError(f"msfm_weights {w} give a stream no weight (streams={self.streams})")
        return stream, [x / total[s] for x, s in zip(w, stream)]


def _bands(cfg: EPTSConfig) -> list[str]:
    """Band of each path: low (<= 50%), mid (50-70%, and 2:4), high (> 70%)."""
    bands = ["low" if hi <= 0.5 + 1e-9 else "mid" if hi <= 0.7 + 1e-9 else "high" for _, hi in cfg.groups]
    return bands + ["mid"] * int(cfg.nm_group)


def default_msfm_weights(cfg: EPTSConfig) -> list[float]:
    """Low (<= 50%), mid (50-70%, and 2:4) and high (> 70%) bands get 0.3 / 0.3 / 0.4, equal inside a band."""
    bands = _bands(cfg)
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


def _stream_plan(cfg: EPTSConfig, n_streams: int) -> tuple[list[int], list[float]]:
    """cfg.stream_plan(), or every path on one MSFM stream when the caller gives one stream ([n, T, H], as
    the block probe does whatever cfg.streams says)."""
    return cfg.stream_plan() if n_streams > 1 else ([0] * len(_paths(cfg)), cfg.mixing_weights())


def train_block(layer, block: int, ctx: BlockContext, x_mix: torch.Tensor, y_dense: torch.Tensor,
                masks: NestedMasks, cfg: EPTSConfig, gen: torch.Generator, progress: bool) -> BlockLoRA:
    """Reconstruct one block; returns its trained LoRA stack. `x_mix`: the sparse paths' input, [n, T, H]
    (one stream) or [streams, n, T, H] (cfg.stream_plan() says which path reads which)."""
    lora = _init_lora(layer, cfg, gen)
    bw = _BlockWeights(layer, block, masks, lora, cfg.lora_mode)
    paths = _paths(cfg)
    x_streams = x_mix if x_mix.dim() == 4 else x_mix.unsqueeze(0)
    stream_of, _ = _stream_plan(cfg, x_streams.shape[0])
    n = x_streams.shape[1]
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
            yd = y_dense[idx]
            y0, total = None, 0.0
            for p, d, s in zip(paths, draws, stream_of):
                y = _forward(layer, ctx, bw.params(p, d[step]), x_streams[s][idx])
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
    """MSFM: the next block's sparse-path input = sum_k w_k * block(x_mix) at one sparsity per group; with
    several streams ([streams, n, T, H]), each stream mixes the outputs of its own paths on itself."""
    bw = _BlockWeights(layer, block, masks, lora, cfg.lora_mode)
    streams = x_mix if x_mix.dim() == 4 else x_mix.unsqueeze(0)
    stream_of, weights = _stream_plan(cfg, streams.shape[0])
    out = torch.zeros_like(streams)
    for p, w, k in zip(_paths(cfg), weights, stream_of):
        s = p.stratified(1, gen)[0]
        params = bw.params(p, s)
        xs = streams[k]
        out[k] += w * torch.cat([_forward(layer, ctx, params, xs[i : i + 8]) for i in range(0, xs.shape[0], 8)])
    return out if x_mix.dim() == 4 else out[0]


def reconstruct(model: Transformer, masks: NestedMasks, calib_tokens: torch.Tensor, cfg: EPTSConfig,
                work_dir: Path | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run EPTS over all blocks; returns the LoRA tensors (elastic.safetensors names). With `work_dir`,
    each finished block is saved there and a rerun with the same config resumes after the last block
    whose files verify (layout and recovery: see _checkpoint and _resume)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = model.model.layers
    with torch.no_grad():
        x_dense = embed(model, calib_tokens).float()
    n_streams = max(cfg.stream_plan()[0]) + 1
    x_mix = x_dense.clone() if n_streams == 1 else x_dense.unsqueeze(0).repeat(n_streams, 1, 1, 1)
    ctx = BlockContext.build(model, calib_tokens.shape[1], x_dense.dtype)
    tensors: dict[str, torch.Tensor] = {}
    start, state, files = 0, None, {}
    if work_dir:
        start, tensors, state, files = _resume(work_dir, cfg, calib_tokens)
    if state is not None:
        x_dense, x_mix = state["x_dense"].to(x_dense.device), state["x_mix"].to(x_dense.device)
        gen.set_state(state["rng"])
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
            state = {"x_dense": x_dense.contiguous().cpu(), "x_mix": x_mix.contiguous().cpu(),
                     "rng": gen.get_state()}
            files = _checkpoint(work_dir, b, block_tensors, state, files, _fingerprint(cfg, calib_tokens))
    return tensors


def _fingerprint(cfg: EPTSConfig, calib_tokens: torch.Tensor) -> dict:
    config = json.loads(json.dumps(asdict(cfg)))
    if config["streams"] == "mixed":  # the default: runs from before the field existed still resume
        del config["streams"]
    return {"config": config, "calib_sum": int(calib_tokens.sum()),
            "calib_shape": list(calib_tokens.shape)}


# ---- resume folder -------------------------------------------------------------------------------------
# After block b the folder holds block0..b.safetensors (LoRA tensors), state{b-1} and state{b}.safetensors
# (x_dense, x_mix and the RNG state as a uint8 tensor) and progress.json, the manifest: next_block = b + 1,
# the fingerprint, and size + sha256 of each of those files. Every file is written to a temp file, fsynced
# and renamed, so a name never holds half a file; the manifest is renamed only after the files it names are
# durable, so it never points at data that is not there. Each safetensors file also carries its run id, its
# block and a digest of its tensors in the header, so the files verify on their own when the manifest is
# lost. A kill between the files and the manifest leaves the old manifest, which still names only
# verified older files (state{b-1} is deleted only once the manifest naming state{b} is durable).

MANIFEST = "progress.json"
_FORMAT = 2
_OWN_FILE = re.compile(r"^(?:(?:block|state)(\d+)\.safetensors|streams\.safetensors|rng\.pt|progress\.json)"
                       r"(?:\.tmp)?$")  # also the pre-manifest layout (streams, rng.pt), to clean it up


def _block_name(b: int) -> str:
    return f"block{b}.safetensors"


def _state_name(b: int) -> str:
    return f"state{b}.safetensors"


def _run_id(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor], run_id: str, block: str) -> str:
    """sha256 over the header's run id and block, and the tensors' names, dtypes, shapes and bytes: lets
    a file verify itself without the manifest (a damaged run id reads as damage, not as another run)."""
    h = hashlib.sha256(f"{run_id}|{block}|".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # a view, not a copy: states can be GBs
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Makes the renames inside `path` durable (the rename lives in the directory, not the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, path: Path) -> dict:
    """fsync `tmp`, rename it onto `path`; returns the manifest entry (size, sha256) of its bytes."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    entry = {"size": tmp.stat().st_size, "sha256": _file_sha256(tmp)}
    os.replace(tmp, path)
    return entry


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], run_id: str, block: int) -> dict:
    tmp = path.with_name(path.name + ".tmp")
    meta = {"run": run_id, "block": str(block), "digest": _tensor_digest(tensors, run_id, str(block))}
    save_file(tensors, tmp, metadata=meta)
    return _durable_replace(tmp, path)


def _write_manifest(work_dir: Path, manifest: dict) -> None:
    tmp = work_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    _durable_replace(tmp, work_dir / MANIFEST)
    _fsync_dir(work_dir)


def _prune(work_dir: Path, keep: set[str]) -> None:
    """Delete our files the durable manifest does not name: older states, temp files, the old layout."""
    for p in work_dir.iterdir():
        if _OWN_FILE.match(p.name) and p.name not in keep | {MANIFEST}:
            p.unlink(missing_ok=True)


def _checkpoint(work_dir: Path, b: int, block_tensors: dict, state: dict, files: dict,
                fingerprint: dict) -> dict:
    """Writes block b's files, then the manifest naming them; returns the manifest's file entries.
    `files`: the entries of the previous manifest (or of the files resume verified)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run_id = _run_id(fingerprint)
    # state{b-1} stays named (and on disk) as the fallback in case state{b} is found damaged later
    files = {n: e for n, e in files.items() if n.startswith("block") or n == _state_name(b - 1)}
    files[_block_name(b)] = _write_tensors(work_dir / _block_name(b), block_tensors, run_id, b)
    files[_state_name(b)] = _write_tensors(work_dir / _state_name(b), state, run_id, b)
    _fsync_dir(work_dir)  # the new files' names are durable before a manifest names them
    _write_manifest(work_dir, {"format": _FORMAT, "next_block": b + 1, "fingerprint": fingerprint,
                               "files": files})
    _prune(work_dir, set(files))
    return files


def _manifest_ok(m) -> bool:
    """The manifest's shape: next_block >= 1 and a size + sha256 for each of our file names."""
    if not (isinstance(m, dict) and m.get("format") == _FORMAT and isinstance(m.get("next_block"), int)
            and m["next_block"] >= 1 and isinstance(m.get("files"), dict)):
        return False
    return all(_OWN_FILE.match(n) and n.endswith(".safetensors") and isinstance(e, dict)
               and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
               for n, e in m["files"].items())


def _read_manifest(work_dir: Path, fingerprint: dict) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, what is wrong with it). Another run's manifest raises ValueError."""
    path = work_dir / MANIFEST
    if not path.is_file():
        return None, f"{MANIFEST} is missing"
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{MANIFEST} is corrupt (invalid JSON)"
    if isinstance(m, dict) and "fingerprint" in m and m["fingerprint"] != fingerprint:
        raise _other_run(work_dir)
    if not _manifest_ok(m):
        return None, f"{MANIFEST} is corrupt (not an EPTS manifest of format {_FORMAT})"
    return m, None


def _other_run(work_dir: Path) -> ValueError:
    return ValueError(f"{work_dir} holds an EPTS run with another config or calibration set; "
                      "delete it or choose another --out")


def _load_verified(path: Path, run_id: str, block: int,
                   entry: dict | None) -> tuple[dict | None, dict, str]:
    """(tensors, its manifest entry, "") if `path` is intact, else (None, {}, why). `entry`: the
    manifest's size + sha256, which cover every byte; without one (manifest lost) the header's tensor
    digest is checked instead."""
    if not path.is_file():
        return None, {}, "missing"
    found = {"size": path.stat().st_size, "sha256": _file_sha256(path)}
    if entry is not None and found != {"size": entry["size"], "sha256": entry["sha256"]}:
        return None, {}, "corrupt (sha256 mismatch)"
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError):  # truncated or garbage: unusable, not fatal
        return None, {}, "corrupt (unreadable)"
    run, held = meta.get("run", ""), meta.get("block", "")
    if entry is None and meta.get("digest") != _tensor_digest(tensors, run, held):
        return None, {}, "corrupt (digest mismatch)"
    if run != run_id:  # intact, but written by a run with another fingerprint
        raise _other_run(path.parent)
    if held != str(block):
        return None, {}, f"corrupt (holds block {held})"
    return tensors, found, ""


def _newest_state_on_disk(work_dir: Path) -> int:
    """Highest b with a state{b} file, -1 if none: where a lost manifest's successor could point."""
    found = [int(m.group(1)) for p in work_dir.iterdir()
             if (m := _OWN_FILE.match(p.name)) and p.name.startswith("state") and not p.name.endswith(".tmp")]
    return max(found, default=-1)


def _last_good(work_dir: Path, run_id: str, claimed: int,
               expect: dict) -> tuple[int, dict, dict | None, dict, list]:
    """Largest k <= claimed with block0..k-1 and state{k-1} all verifying: (k, their LoRA tensors, the
    state, the files' entries, the problems found on the way)."""
    blocks, files, problems = [], {}, []
    for b in range(claimed):
        name = _block_name(b)
        t, files[name], why = _load_verified(work_dir / name, run_id, b, expect.get(name))
        if t is None:
            problems.append(f"{name} is {why}")
            break
        blocks.append(t)
    for k in range(len(blocks), 0, -1):
        name = _state_name(k - 1)
        state, entry, why = _load_verified(work_dir / name, run_id, k - 1, expect.get(name))
        if state is not None:
            files = {_block_name(b): files[_block_name(b)] for b in range(k)} | {name: entry}
            return k, {n: v for t in blocks[:k] for n, v in t.items()}, state, files, problems
        problems.append(f"{name} is {why}")
    return 0, {}, None, {}, problems


def _resume(work_dir: Path, cfg: EPTSConfig,
            calib_tokens: torch.Tensor) -> tuple[int, dict, dict | None, dict]:
    """(first block to train, LoRA tensors of the blocks before it, their state or None, the verified
    files' entries). Trusts only files that verify; prints one line when it resumes or falls back."""
    if not work_dir.is_dir():
        return 0, {}, None, {}
    fingerprint = _fingerprint(cfg, calib_tokens)
    manifest, problem = _read_manifest(work_dir, fingerprint)
    if manifest is None and not any(_OWN_FILE.match(p.name) for p in work_dir.iterdir()):
        return 0, {}, None, {}  # a fresh folder: nothing to resume, nothing to report
    # without a manifest the newest state on disk is the best candidate; its files verify on their own
    claimed = manifest["next_block"] if manifest else _newest_state_on_disk(work_dir) + 1
    k, tensors, state, files, problems = _last_good(work_dir, _run_id(fingerprint), claimed,
                                                    manifest["files"] if manifest else {})
    problems = ([problem] if problem else []) + problems
    if not problems:
        print(f"resuming EPTS at block {k} from {work_dir}")
    elif k:
        print(f"resume: {'; '.join(problems[:2])}; restarting at block {k} from the verified state after "
              f"block {k - 1} in {work_dir}")
    else:
        print(f"resume: {'; '.join(problems[:2])}; nothing verifies, restarting from scratch in {work_dir}")
    return k, tensors, state, files
