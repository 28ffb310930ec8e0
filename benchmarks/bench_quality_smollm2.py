"""Compression quality on a real model: SmolLM2-135M-Instruct, every method and tier, prose and code.

    python benchmarks/bench_quality_smollm2.py run --methods dense,sparsegpt,wanda,magnitude   # per-tier baselines
    python benchmarks/bench_quality_smollm2.py run --methods epts                              # one EPTS run, all tiers
    python benchmarks/bench_quality_smollm2.py hf-check --tier 70%    # an exported tier through transformers
    python benchmarks/bench_quality_smollm2.py lora0 --tiers 30%,35%,40% --off-below 0,0.3,0.4   # LoRA_0 on/off
    python benchmarks/bench_quality_smollm2.py report                 # docs/quality_smollm2.json, .md table, plot

Text (sparsedial.evaltext): CPython's documentation (Debian python3-doc) for prose, pip's `_internal` source
for code; calibration windows come only from the calibration splits (half prose, half code), perplexity only
from the held-out splits (`--eval-windows` windows of `--eval-seq-len` tokens at evenly spaced offsets of each
held-out token stream). Every result is written to RUNS/results/<method>.json as soon as it is measured, and a
rerun skips the method/tier entries already there (EPTS itself also resumes block by block), so a killed run
loses at most the entry in progress. Separate processes may run different methods at the same time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section
from sparsedial.compress.calibration import CalibrationConfig, sample_windows
from sparsedial.compress.epts import EPTSConfig
from sparsedial.compress.export import load_elastic_for_eval, tier_weights
from sparsedial.compress.pipeline import compress_epts
from sparsedial.compress.pruners import PruneConfig, overall_sparsity, prune
from sparsedial.engine.loader import load_model

from sparsedial import evaltext
from sparsedial.evaluate import token_stream

ROOT = Path(__file__).resolve().parent.parent
TIERS = ["30%", "40%", "50%", "60%", "70%", "80%", "90%", "2:4"]
BASELINES = ("magnitude", "wanda", "sparsegpt")


# ------------------------------------------------------------------------------------------------ data
def texts_and_tokens(tokenizer, args) -> dict:
    """Held-out evaluation windows per kind, the calibration tokens, and the provenance of both."""
    out = {"eval": {}, "manifests": {}}
    calib_parts = []
    for i, kind in enumerate(evaltext.KINDS):
        held, cal = evaltext.load(kind, "heldout"), evaltext.load(kind, "calibration")
        out["manifests"][f"{kind}/heldout"] = held.manifest()
        out["manifests"][f"{kind}/calibration"] = cal.manifest()
        ids = torch.tensor(token_stream(tokenizer, list(held.texts)), dtype=torch.long)
        out["eval"][kind] = eval_windows(ids, args.eval_windows, args.eval_seq_len)
        n = args.calib_samples // 2 + (args.calib_samples % 2 if i == 0 else 0)
        cal_ids = torch.tensor(token_stream(tokenizer, list(cal.texts)), dtype=torch.long)
        calib_parts.append(sample_windows(cal_ids, CalibrationConfig(f"{kind}/calibration", n,
                                                                      args.calib_seq_len, seed=0)))
        out["manifests"][f"{kind}/heldout"]["tokens"] = int(ids.numel())
        out["manifests"][f"{kind}/calibration"]["tokens"] = int(cal_ids.numel())
    out["calib"] = torch.cat(calib_parts)
    return out


def eval_windows(ids: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] windows at evenly spaced, non-overlapping offsets of a token stream."""
    span = seq_len + 1
    if ids.numel() < n * span:
        raise ValueError(f"held-out stream has {ids.numel()} tokens, fewer than {n} windows of {span}")
    step = (ids.numel() - span) // max(1, n - 1) if n > 1 else 0
    return torch.stack([ids[i * step : i * step + span] for i in range(n)])


@torch.inference_mode()
def window_ppl(logits_fn, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> float:
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        logits = logits_fn(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


# --------------------------------------------------------------------------------------------- results
def results_dir(args) -> Path:
    return Path(args.work) / "results"


def load_results(args, method: str) -> dict:
    p = results_dir(args) / f"{method}.json"
    return json.loads(p.read_text()) if p.is_file() else {"tiers": {}}


def save_results(args, method: str, res: dict) -> None:
    d = results_dir(args)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{method}.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(d / f"{method}.json")


def epts_config(args) -> EPTSConfig:
    extra = json.loads(args.epts_extra) if args.epts_extra else {}
    return EPTSConfig(epochs=args.epochs, batch_size=args.batch_size, rank=args.rank, lr=args.lr, **extra)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_model(args.model, dtype="float32", device=args.device)
    data = texts_and_tokens(base.tokenizer, args)
    calib_cfg = CalibrationConfig("evaltext calibration splits (prose + code)", args.calib_samples,
                                  args.calib_seq_len, seed=0)
    common = {"machine": machine(), "threads": args.threads, "calibration": asdict(calib_cfg),
              "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len}, "texts": data["manifests"],
              "versions": evaltext.versions()}

    def ppl(model) -> dict:
        return {k: window_ppl(model, w, device=args.device) for k, w in data["eval"].items()}

    for method in args.methods.split(","):
        res = load_results(args, method)
        res.update(common)
        if method == "dense":
            if "dense" not in res["tiers"]:
                res["tiers"]["dense"] = ppl(base.model)
                res["model_bytes"] = (args.model / "model.safetensors").stat().st_size
            save_results(args, method, res)
            print("dense", res["tiers"]["dense"], flush=True)
        elif method in BASELINES:
            for tier in tqdm(args.tiers.split(","), desc=method):
                if tier in res["tiers"]:
                    continue
                model = copy.deepcopy(base.model)
                cfg = PruneConfig(method=method, nm=(2, 4)) if tier == "2:4" else \
                    PruneConfig(method=method, sparsity=int(tier[:-1]) / 100)
                t0 = time.perf_counter()
                prune(model, cfg, data["calib"].to(args.device) if method != "magnitude" else None, progress=False)
                wall = time.perf_counter() - t0
                res["tiers"][tier] = {**ppl(model), "wall_s": wall, "sparsity": overall_sparsity(model)}
                save_results(args, method, res)
                print(method, tier, res["tiers"][tier], flush=True)
                del model
        elif method == "nested-wanda":  # the EPTS run's masks without its LoRA: what the training adds
            lm, spec, tensors = load_elastic_for_eval(Path(args.work) / "epts", loaded=base, device=args.device,
                                                      allow_external_base=True)
            res["source"] = "the masks of the epts run, LoRA groups off"
            for tier in spec.tiers[1:]:
                if tier.name in res["tiers"] or tier.name not in args.tiers.split(","):
                    continue
                with tier_weights(lm.model, spec, tensors, dataclasses.replace(tier, lora_groups=())) as m:
                    res["tiers"][tier.name] = {**ppl(m), "sparsity": overall_sparsity(m)}
                save_results(args, method, res)
                print(method, tier.name, res["tiers"][tier.name], flush=True)
        else:  # an EPTS variant: one run, all tiers
            name = method
            out = Path(args.work) / name
            cfg = epts_config(args)
            if "wall_s" not in res:
                t0 = time.perf_counter()
                r = compress_epts(args.model, out, ["dense", *TIERS], calib_cfg, cfg, link_base=True,
                                  progress=True, calib_tokens=data["calib"], chain=args.chain,
                                  device=args.device)
                res.update({"wall_s": r.wall_s, "wall_s_this_process": time.perf_counter() - t0,
                            "elastic_bytes": (out / "elastic.safetensors").stat().st_size,
                            "config": {**json.loads(json.dumps(asdict(cfg))), "chain": args.chain}})
                save_results(args, method, res)
            lm, spec, tensors = load_elastic_for_eval(out, loaded=base, allow_external_base=True,
                                                      device=args.device)
            order = args.tiers.split(",")  # evaluation order (the most telling tiers first on a short budget)
            for tier in sorted(spec.tiers[1:], key=lambda t: order.index(t.name) if t.name in order else 99):
                if tier.name in res["tiers"]:
                    continue
                with tier_weights(lm.model, spec, tensors, tier) as m:
                    res["tiers"][tier.name] = {**ppl(m), "sparsity": overall_sparsity(m)}
                save_results(args, method, res)
                print(name, tier.name, res["tiers"][tier.name], flush=True)


def hf_check(args) -> None:
    """Export one tier of an EPTS checkpoint as a plain HF model; perplexity from transformers and from
    sparsedial's loader of the same export, next to the figure of the elastic checkpoint."""
    from sparsedial.compress.export import copy_base_files, save_hf_weights, weights_dtype
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    src = Path(args.work) / args.epts_name
    dest = Path(args.work) / f"export-{args.epts_name}-{args.tier.replace('%', 'pct').replace(':', '-')}"
    # = export_tier_hf, but the run's base weights are referenced from models/, outside the run folder's parent
    lm, spec, tensors = load_elastic_for_eval(src, allow_external_base=True)
    copy_base_files(args.model, dest, link_base=True)  # config + tokenizer; the weights are written below
    with tier_weights(lm.model, spec, tensors, spec.tier(args.tier)) as m:
        save_hf_weights(m, dest, weights_dtype(args.model / "model.safetensors"))
        sparsity = overall_sparsity(m)
    del lm
    ours = load_model(dest, dtype="float32")
    data = texts_and_tokens(ours.tokenizer, args)
    hf = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    res = {"tier": args.tier, "epts_run": args.epts_name, "sparsity": sparsity,
           "transformers": {k: window_ppl(lambda x: hf(input_ids=x).logits, w) for k, w in data["eval"].items()},
           "sparsedial_export": {k: window_ppl(ours.model, w) for k, w in data["eval"].items()},
           "export_bytes": (dest / "model.safetensors").stat().st_size}
    save_results(args, "hf-check", res)
    print(json.dumps(res, indent=2))


def lora0_check(args) -> None:
    """Tiers of one EPTS checkpoint with LoRA_0's off-threshold (elastic.json `lora0_off_below`, read when a
    tier is built; training never reads it) set to each of --off-below: the same trained tensors, served
    with LoRA_0 on or off at the low tiers. Results in RUNS/results/lora0-<run>.json."""
    from sparsedial.engine.tiers import parse_tier_name

    torch.set_num_threads(args.threads)
    base = load_model(args.model, dtype="float32", device=args.device)
    data = texts_and_tokens(base.tokenizer, args)
    lm, spec, tensors = load_elastic_for_eval(Path(args.work) / args.epts_name, loaded=base,
                                              allow_external_base=True, device=args.device)
    name = f"lora0-{args.epts_name}"
    res = load_results(args, name)
    res.update({"machine": machine(), "epts_run": args.epts_name, "recorded_off_below": spec.lora0_off_below})
    for below in (float(b) for b in args.off_below.split(",")):
        sp = dataclasses.replace(spec, lora0_off_below=below)
        for t in args.tiers.split(","):
            key = f"{t}@{below:g}"
            if key in res["tiers"]:
                continue
            with tier_weights(lm.model, sp, tensors, parse_tier_name(t, sp.groups)) as m:
                res["tiers"][key] = {k: window_ppl(m, w, device=args.device) for k, w in data["eval"].items()}
            save_results(args, name, res)
            print(name, key, res["tiers"][key], flush=True)


# ------------------------------------------------------------------------------------------- reporting
LABELS = {"nested-wanda": "nested Wanda (no LoRA)", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
          "epts": "EPTS (1 epoch)", "epts-ep2": "EPTS (2 epochs)", "epts-ep8": "EPTS (8 epochs)", "epts-msfm70": "EPTS (1 epoch, mix <= 70%)",
          "epts-own8": "EPTS (8 epochs, own streams)", "epts-band8": "EPTS (8 epochs, band streams)"}


def collect(args) -> dict:
    d = results_dir(args)
    res = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
    (DOCS / "quality_smollm2.json").write_text(json.dumps(res, indent=2))
    return res


def _cell(res, m, t, k) -> str:
    v = res.get(m, {}).get("tiers", {}).get(t)
    if not v:
        return "n/a"
    return f"{v[k]:,.0f}" if v[k] >= 1000 else f"{v[k]:.2f}"


def markdown(res: dict, epts_names: list[str]) -> str:
    methods = [m for m in ("magnitude", "wanda", "sparsegpt") if m in res] + [e for e in epts_names if e in res]
    label = {m: LABELS.get(m, m) for m in methods}
    d = res["dense"]
    meta = d
    tables = ""
    for kind in ("prose", "code"):
        tables += f"**{kind}** (held-out perplexity; lower is better)\n\n"
        tables += "| tier | " + " | ".join(label[m] for m in methods) + " |\n|---|" + "---|" * len(methods) + "\n"
        tables += "| dense | " + " | ".join(f"{d['tiers']['dense'][kind]:.2f}" for _ in methods) + " |\n"
        tables += "".join(f"| {t} | " + " | ".join(_cell(res, m, t, kind) for m in methods) + " |\n" for t in TIERS)
        tables += "\n"
    main = epts_names[0] if epts_names and epts_names[0] in res else None
    target = ""
    if main and "sparsegpt" in res:
        for t in TIERS:
            sg, ep = res["sparsegpt"]["tiers"].get(t), res[main]["tiers"].get(t)
            if not (sg and ep):
                continue
            cells = []
            for k in ("prose", "code"):
                dn = d["tiers"]["dense"][k]
                cells.append(f"{sg[k]:.2f} | {ep[k]:.2f} | {100 * (ep[k] / sg[k] - 1):+.1f}% | "
                             f"{100 * (sg[k] - ep[k]) / (sg[k] - dn):.0f}%")
            target += f"| {t} | " + " | ".join(cells) + " |\n"
    walls = ""
    for m in methods:
        r = res[m]
        if m in BASELINES:
            w = sum(v["wall_s"] for v in r["tiers"].values())
            walls += f"| {label[m]} | sum of {len(r['tiers'])} per-tier runs | {w / 60:.1f} min |\n"
        elif "wall_s" in r:
            walls += f"| {label[m]} | one run, all tiers | {r['wall_s'] / 60:.1f} min |\n"
    dense_mb = d.get("model_bytes", 0) / 1e6
    sizes = f"| dense model (model.safetensors, bf16) | {dense_mb:.1f} |\n"
    for e in epts_names:
        if e in res and "elastic_bytes" in res[e]:
            el = res[e]["elastic_bytes"] / 1e6
            sizes += (f"| {e}: elastic state (drop levels, 2:4 masks, LoRA bf16) | {el:.1f} |\n"
                      f"| {e}: base + elastic state, 9 tiers | {dense_mb + el:.1f} |\n")
    sizes += f"| a per-tier baseline: one dense-layout checkpoint per tier (x 8 tiers) | {dense_mb:.1f} (x 8 = {8 * dense_mb:.1f}) |\n"
    hf = ""
    if "hf-check" in res:
        h = res["hf-check"]
        el = res.get(h["epts_run"], {}).get("tiers", {}).get(h["tier"], {})
        hf = (f"\n### The same tier through transformers\n\n`{h['epts_run']}` tier {h['tier']} exported with "
              "the steps of `export_tier_hf` (bf16 merged weights, exact zeros; measured sparsity "
              f"{h['sparsity']:.4f}) and loaded with transformers' `AutoModelForCausalLM` (fp32):\n\n"
              "| | prose | code |\n|---|---|---|\n"
              f"| transformers, exported tier | {h['transformers']['prose']:.3f} | {h['transformers']['code']:.3f} |\n"
              f"| sparsedial, exported tier | {h['sparsedial_export']['prose']:.3f} | {h['sparsedial_export']['code']:.3f} |\n")
        if el:
            hf += f"| sparsedial, elastic checkpoint (fp32 merge) | {el['prose']:.3f} | {el['code']:.3f} |\n"
        hf += ("\nThe exported tier's two figures come from the same bf16 weights; the elastic checkpoint's from "
               "the fp32 merge before that rounding.\n")
    cal, ev = meta["calibration"], meta["eval"]
    tx = meta["texts"]
    texts = "".join(f"| {k} | {len(v['files'])} | {v['chars']:,} | {v['tokens']:,} | `{v['sha256'][:16]}…` |\n"
                    for k, v in tx.items())
    cfgs = "".join(f"- `{e}`: {json.dumps({k: v for k, v in res[e]['config'].items() if k != 'groups'})}\n"
                   for e in epts_names if e in res and "config" in res[e])
    return f"""## SmolLM2-135M-Instruct: every method and tier

Measured by `make smollm2-quality` (benchmarks/bench_quality_smollm2.py) on {meta['machine']}; the wall
times are from a machine shared with other jobs (see the notes below the table). Held-out perplexity on {ev['windows']} windows of {ev['seq_len']} tokens per text,
evenly spaced over the held-out split. Calibration: {cal['n_samples']} x {cal['seq_len']} tokens (half prose,
half code, from the calibration splits only, seed {cal['seed']}). Baselines prune each tier separately from the
dense model, sequentially block by block; EPTS is ONE elastic checkpoint serving every tier.

Texts (sparsedial/evaltext.py; full file lists and sha256 in docs/quality_smollm2.json):

| split | files | characters | tokens | sha256 |
|---|---|---|---|---|
{texts}
![perplexity vs sparsity](figures/quality_smollm2_ppl.png)

{tables}EPTS recipes:
{cfgs}
### EPTS ({main}) vs per-tier SparseGPT

| tier | SparseGPT prose | EPTS prose | EPTS vs SparseGPT | gap closed | SparseGPT code | EPTS code | EPTS vs SparseGPT | gap closed |
|---|---|---|---|---|---|---|---|---|
{target}
"gap closed": (SparseGPT - EPTS) / (SparseGPT - dense); negative means EPTS is worse than SparseGPT.

### Wall time

| method | what | wall time |
|---|---|---|
{walls}
### Size on disk

| what | MB |
|---|---|
{sizes}{hf}"""


def plot(res: dict, epts_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = [m for m in ("magnitude", "wanda", "sparsegpt") if m in res] + [e for e in epts_names if e in res]
    for ax, kind in zip(axes, ("prose", "code")):
        for m in methods:
            tiers = res[m]["tiers"]
            pts = [(int(t[:-1]), tiers[t][kind]) for t in TIERS if t.endswith("%") and t in tiers]
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), marker="o", label=LABELS.get(m, m))
            if "2:4" in tiers:
                ax.scatter([50], [tiers["2:4"][kind]], marker="x", s=60, color=line.get_color())
        ax.axhline(res["dense"]["tiers"]["dense"][kind], color="black", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the block linears (%)   (x: 2:4)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"SmolLM2-135M, {kind}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(args) -> None:
    res = collect(args)
    names = args.epts_names.split(",")
    plot(res, names, DOCS / "figures" / "quality_smollm2_ppl.png")
    md = markdown(res, names)
    write_section(DOCS / "quality.md", "smollm2-tiers", md, "Quality")
    print(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("run", "hf-check", "lora0", "report"))
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--work", default=str(ROOT / "runs" / "smollm2-quality"))
    ap.add_argument("--methods", default="dense,sparsegpt,wanda,magnitude,epts")
    ap.add_argument("--tiers", default=",".join(TIERS), help="tiers of the per-tier baselines")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--chain", action="store_true")
    ap.add_argument("--epts-extra", default="", help="more EPTSConfig fields as JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="run: where the models run (cpu, cuda)")
    ap.add_argument("--tier", default="70%", help="hf-check: the tier to export")
    ap.add_argument("--off-below", default="0.3,0.4", help="lora0: LoRA_0 off-thresholds to serve the tiers with")
    ap.add_argument("--epts-name", default="epts-band8", help="hf-check: the EPTS run to export from")
    ap.add_argument("--epts-names", default="epts-band8,epts-own8,epts-ep8,epts-ep2,epts,epts-msfm70,nested-wanda",
                    help="report: EPTS runs (and nested-wanda) to show; the first is compared with SparseGPT")
    args = ap.parse_args(argv)
    try:
        {"run": run, "hf-check": hf_check, "lora0": lora0_check, "report": report}[args.cmd](args)
    except evaltext.EvalTextMissing as e:
        raise SystemExit(f"bench_quality_smollm2: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
