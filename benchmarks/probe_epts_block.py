"""Why does EPTS lose to SparseGPT where it does? One decoder block of SmolLM2-135M, measured in isolation.

    python benchmarks/probe_epts_block.py --block 3 --variants '{"lr1e-2": {"lr": 0.01}}' [--obs-rank]

Block `--block` gets its dense input from the dense model; 32 calibration windows of 256 tokens (16 prose +
16 code, evaltext calibration splits) train / calibrate, 8 more windows (seed 1, not trained on) measure the
error: mean squared difference of the block's output to the dense block's output, at sparsities 30/50/70/90%
and 2:4, for
- SparseGPT on the block (its own masks + OBS update, Hessian of the dense input);
- the nested masks without any update: Wanda score |W| ||X|| (EPTS's) and the OBS score w^2 / [H^-1]_jj;
- EPTS's block reconstruction (train_block) with the EPTSConfig fields of each variant (2 epochs, batch 4
  unless the variant says otherwise; "score": "obs" trains on the OBS-score masks);
- with --obs-rank: the Wanda masks plus SparseGPT's mask-given OBS update truncated to rank r (r = 0, 8, 32,
  128, full): how much of the OBS update a rank-r LoRA could hold at best.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sparsedial.compress.blockwise import BlockContext, block_linears, capture_inputs, embed, run_block
from sparsedial.compress.calibration import CalibrationConfig, sample_windows
from sparsedial.compress.epts import EPTSConfig, _BlockWeights, _forward, _init_lora, _paths, train_block
from sparsedial.compress.nested import NestedMasks
from sparsedial.compress.pruners import _inverse_cholesky_upper, mask_nm, sparsegpt_prune
from sparsedial.engine.elastic_format import drop_levels_from_rank, keep_count, pack_mask24, rank_from_scores
from sparsedial.engine.loader import load_model

from sparsedial import evaltext

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = [0.3, 0.5, 0.7, 0.9, "2:4"]


def obs_given_mask(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, blocksize: int = 128) -> torch.Tensor:
    """SparseGPT's OBS update with the mask given (no mask selection): the kept weights after pruning."""
    W, H = W.float().clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky_upper(H, 0.01)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1, d = torch.zeros_like(W1), torch.diag(U1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(keep[:, i1 + i], w, torch.zeros_like(w))
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i], E1[:, i] = q, err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W * keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--variants", default='{"lr1e-3": {}}')
    ap.add_argument("--obs-rank", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="float32")
    parts = []
    for kind in evaltext.KINDS:
        text = "".join(evaltext.load(kind, "calibration").texts)[:150_000]
        ids = torch.tensor(lm.tokenizer.encode(text, add_special_tokens=False))
        parts.append(sample_windows(ids, CalibrationConfig(kind, 20, 256, seed=1)))
    tok = torch.cat([parts[0][:16], parts[1][:16], parts[0][16:], parts[1][16:]])  # 32 train, 8 test
    model, blk = lm.model, args.block
    ctx = BlockContext.build(model, tok.shape[1], torch.float32)
    x = embed(model, tok)
    for i in range(blk):
        x = run_block(ctx, model.model.layers[i], x)
    layer = model.model.layers[blk]
    with capture_inputs(layer, with_hessian=True) as st:
        y = run_block(ctx, layer, x[:32])
    x_test, y_test = x[32:], run_block(ctx, layer, x[32:])

    def masks_for(score: str) -> NestedMasks:
        out = NestedMasks({}, {}, {})
        for n, lin in block_linears(layer).items():
            w = lin.weight.detach().float()
            if score == "wanda":
                sc = w.abs() * st[n].norm[None, :]
            else:
                H = st[n].hessian.clone()
                dead = torch.diag(H) == 0
                H[dead, dead] = 1.0
                U = _inverse_cholesky_upper(H, 0.01)
                sc = w.abs() / (U * U).sum(0).sqrt()[None, :]  # diag(H^-1) = column norms of U^2
            name = f"model.layers.{blk}.{n}"
            r = rank_from_scores(sc)
            out.rank[name], out.drop_level[name] = r, drop_levels_from_rank(r)
            out.mask24[name] = pack_mask24(mask_nm(sc, 2, 4))
        return out

    masks = {"wanda": masks_for("wanda"), "obs": masks_for("obs")}

    @torch.no_grad()
    def nested_err(cfg: EPTSConfig, lora, mk: NestedMasks, use_lora: bool = True) -> dict:
        bw, paths, res = _BlockWeights(layer, blk, mk, lora, "masked"), _paths(cfg), {}
        for s in SPARSITIES:
            p = paths[-1] if s == "2:4" else next(p for p in paths if not p.nm and p.low < s <= p.high + 1e-9)
            params = bw.params(p, 0.5 if s == "2:4" else s, None if use_lora else ())
            res[str(s)] = F.mse_loss(torch.cat([_forward(layer, ctx, params, x_test[i : i + 4])
                                                for i in range(0, x_test.shape[0], 4)]), y_test).item()
        return res

    def emit(name: str, row: dict) -> None:
        print(json.dumps({"block": blk, "what": name, **row}), flush=True)

    sg = {}
    for s in SPARSITIES:
        L = copy.deepcopy(layer)
        for n, lin in block_linears(L).items():
            lin.weight.data, _ = sparsegpt_prune(lin.weight.data, st[n].hessian, 0.0 if s == "2:4" else s,
                                                 (2, 4) if s == "2:4" else None)
        sg[str(s)] = F.mse_loss(run_block(ctx, L, x_test), y_test).item()
    emit("sparsegpt", sg)
    cfg0 = EPTSConfig()
    for score, mk in masks.items():
        emit(f"nested-{score}, no update", nested_err(cfg0, _init_lora(layer, cfg0, torch.Generator()), mk, False))
    if args.obs_rank:
        for s in (0.5, 0.7):
            deltas = {}
            for n, lin in block_linears(layer).items():
                W = lin.weight.detach().float()
                keep = masks["wanda"].rank[f"model.layers.{blk}.{n}"] < keep_count(W.shape[1], s)
                deltas[n] = (obs_given_mask(W, st[n].hessian, keep) - W * keep, keep)
            row = {}
            for r in (0, 8, 32, 128, None):
                L = copy.deepcopy(layer)
                for n, lin in block_linears(L).items():
                    D, keep = deltas[n]
                    if r is not None:
                        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
                        D = (U[:, :r] * S[:r]) @ Vh[:r]
                    lin.weight.data = (lin.weight.data.float() + D) * keep
                row[str(r if r is not None else "full")] = F.mse_loss(run_block(ctx, L, x_test), y_test).item()
            emit(f"wanda mask + OBS update truncated to rank r, s={s}", row)
    for name, kw in json.loads(args.variants).items():
        kw = dict(kw)
        mk = masks[kw.pop("score", "wanda")]
        cfg = EPTSConfig(**{"epochs": 2, "batch_size": 4, **kw})
        t0 = time.perf_counter()
        lora = train_block(layer, blk, ctx, x[:32], y, mk, cfg, torch.Generator().manual_seed(0), False)
        emit(f"EPTS {name}", {**nested_err(cfg, lora, mk), "train_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
