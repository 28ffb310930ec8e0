"""OWL per-block schedules on the shipped elastic checkpoint: uniform vs OWL, with and without EPTS's LoRA.

    python benchmarks/bench_owl.py [--model models/stdlib-tiny-elastic] [--lam 0.08] [--tiers 60%,70%,80%,90%]

The outlier ratios come from the dense trajectory on the checkpoint's own calibration recipe (from
elastic.json); the same masks and LoRA serve both schedules (no retraining). Writes the `owl` section of
docs/quality.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section  # noqa: E402
from sparsedial.compress.calibration import CalibrationConfig, calibration_tokens  # noqa: E402
from sparsedial.compress.export import load_elastic_for_eval, tier_weights  # noqa: E402
from sparsedial.compress.nested import dense_input_norms  # noqa: E402
from sparsedial.compress.owl import outlier_ratios, owl_schedule  # noqa: E402
from sparsedial.evaluate import perplexity, token_stream  # noqa: E402

from sparsedial import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "stdlib-tiny-elastic")
    ap.add_argument("--lam", type=float, default=0.08)
    ap.add_argument("--tiers", default="60%,70%,80%,90%")
    args = ap.parse_args(argv)
    lm, spec, tensors = load_elastic_for_eval(args.model)
    calib = CalibrationConfig(**spec.calibration)
    with torch.inference_mode():
        norms = dense_input_norms(lm.model, calibration_tokens(lm.tokenizer, calib))
    ratios = outlier_ratios(lm.model, norms)
    texts = [f.text for f in corpus.load_split("heldout")]
    ids, n_bytes = token_stream(lm.tokenizer, texts), sum(len(t.encode()) for t in texts)
    no_lora = dataclasses.replace(spec, groups=[])
    rows = []
    for name in args.tiers.split(","):
        tier = spec.tier(name)
        owl = dataclasses.replace(tier, schedule=owl_schedule(ratios, tier.sparsity, args.lam))
        result = {}
        for label, sp, t in (("EPTS", spec, tier), ("EPTS + OWL", spec, owl),
                             ("nested Wanda", no_lora, dataclasses.replace(tier, lora_groups=())),
                             ("nested Wanda + OWL", no_lora, dataclasses.replace(owl, lora_groups=()))):
            with tier_weights(lm.model, sp, tensors, t) as m, torch.inference_mode():
                result[label] = perplexity(m, ids, n_bytes, seq_len=512, progress=False).perplexity
            print(name, label, f"{result[label]:.3f}", flush=True)
        rows.append((name, owl.schedule, result))
    labels = list(rows[0][2])
    table = "| tier | OWL schedule (per block %) | " + " | ".join(labels) + " |\n|---|---|" + "---|" * len(labels)
    table += "".join(f"\n| {n} | {', '.join(map(str, sch))} | " + " | ".join(f"{r[k]:.2f}" for k in labels) + " |"
                     for n, sch, r in rows)
    body = f"""## OWL per-block schedules (optional)

Measured by `python benchmarks/bench_owl.py` on {machine()}: the shipped `{args.model.name}` with its
masks and LoRA unchanged, each tier at its uniform sparsity vs an OWL schedule (lambda {args.lam}, M = 5;
outlier ratios per block from the dense trajectory on the checkpoint's calibration recipe:
{', '.join(f'{r:.4f}' for r in ratios)}). Held-out perplexity, all held-out tokens, windows of 512.

{table}
"""
    write_section(DOCS / "quality.md", "owl", body, "Quality")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
