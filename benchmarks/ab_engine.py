"""A/B engine decode speed: this working tree against another commit, side by side in one run.

    python benchmarks/ab_engine.py --base 67a6a79 [--batches 1,8,32] [--rounds 5] [--tiers dense,50%]

The base commit is checked out into a temporary git worktree. Each round runs one subprocess per tree
(alternating which goes first), each of which loads the embedded elastic model with `EngineCore` (one
torch thread) and times greedy decoding of `--new` tokens for every batch size and tier; the table gives
the median tokens/s of each tree and the ratio new / base. Alternating in one run is what makes the ratio
meaningful on a noisy shared machine: both trees see the same load. Only APIs both trees have are used
(EngineConfig, EngineCore.generate, SamplingParams).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from sparsedial.engine.runner import EngineConfig, EngineCore
from sparsedial.engine.sampling import SamplingParams
model, batches, tiers, new = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], sys.argv[3].split(","), int(sys.argv[4])
extra = json.loads(sys.argv[5])
out = {}
for b in batches:
    cfg = EngineConfig(model=model, max_batch=b, max_seq_len=64 + new, **extra)
    core = EngineCore(cfg.load_model(), cfg)
    prompts = [[5 + i, 17, 300, 42, 9, 1000, 77, 3] for i in range(b)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for t in tiers:
        core.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), t)  # warm-up
        start = time.perf_counter()
        core.generate(prompts, params, t)
        out[f"{t}@{b}"] = b * new / (time.perf_counter() - start)
print(json.dumps(out))
"""


def prepare_base(ref: str, where: Path) -> Path:
    """A worktree of `ref` that imports as `sparsedial.*` from its source folders (older trees map the
    top-level folders only through an install, so link them under sparsedial/ here)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                   capture_output=True)
    for name in ("engine", "compress", "kernels", "server", "clients"):
        link = where / "sparsedial" / name
        if not link.exists():
            link.symlink_to(where / name, target_is_directory=True)
    models = where / "models"
    for m in ("stdlib-tiny", "stdlib-tiny-elastic"):  # tracked, so present; nothing to copy
        assert (models / m).is_dir(), models / m
    return where


def run_tree(tree: Path, model: Path, batches: str, tiers: str, new: int, extra: str = "{}") -> dict[str, float]:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(model), batches, tiers, str(new), extra],
                       cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"ab_engine: the run in {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git commit to compare against")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tiers", default="dense,50%,2:4")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-extra", default="{}", help='EngineConfig fields for the new tree only, as JSON, e.g. '
                                                      '\'{"cpu_kernels": false}\' to compare like with like')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base(args.base, Path(tmp) / "base")
        try:
            trees = {"base": base, "new": ROOT}
            runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
            for r in range(args.rounds):
                order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
                for name in order:
                    tree = trees[name]
                    runs[name].append(run_tree(tree, tree / "models" / "stdlib-tiny-elastic", args.batches,
                                               args.tiers, args.new, args.new_extra if name == "new" else "{}"))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"engine decode tok/s, median of {args.rounds} alternating rounds, {args.new} new tokens, "
          f"1 torch thread; base {args.base}, new = working tree at {head} with {args.new_extra}")
    print("| tier @ batch | base tok/s | new tok/s | new / base |")
    print("|---|---|---|---|")
    for key in runs["base"][0]:
        b = statistics.median(x[key] for x in runs["base"])
        n = statistics.median(x[key] for x in runs["new"])
        print(f"| {key} | {b:.0f} | {n:.0f} | {n / b:.3f} |")


if __name__ == "__main__":
    main()
