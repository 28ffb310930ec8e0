"""The `sparsedial` command line: `serve`, `generate`, `compress`, `eval-ppl` and `import-gguf`.

Errors in user input (missing model, bad option values) print one line `sparsedial: error: ...` and exit
with status 2; no stack traces.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparsedial.engine.options import DType, choices, default_of, doc_of
from sparsedial.errors import SparsedialError
from sparsedial.paths import default_model


def __getattr__(name: str):
    """`DEFAULT_MODEL`, read when asked (it depends on SPARSEDIAL_MODEL): kept for old imports; use
    `sparsedial.paths.default_model()`."""
    if name == "DEFAULT_MODEL":
        return default_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --device default to SPARSEDIAL_MODEL / SPARSEDIAL_DEVICE when set, as `serve` reads them."""
    p.add_argument("--model", type=Path, default=default_model(), help=doc_of("model"))
    p.add_argument("--dtype", default=default_of("dtype"), choices=choices(DType), help=doc_of("dtype"))
    p.add_argument("--device", default=os.environ.get("SPARSEDIAL_DEVICE") or default_of("device"),
                   help=doc_of("device") + " (env SPARSEDIAL_DEVICE)")
    p.add_argument("--allow-external-base", action="store_true", help=doc_of("allow_external_base"))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparsedialError(f"--device {name}: CUDA is not available on this machine")
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    from sparsedial.engine.runner import EngineConfig, EngineCore
    from sparsedial.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
        # one request: one KV slot, and only the tier asked for is materialized (on first use)
        config = EngineConfig(model=args.model, dtype=args.dtype, device=_device(args.device), max_batch=1,
                              resident_tiers=(), allow_external_base=args.allow_external_base)
    except ValueError as e:
        raise SparsedialError(str(e)) from None
    core = EngineCore(config.load_model(), config)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    try:
        (g,) = core.generate([prompt], params, args.sparsity)
    except ValueError as e:  # unknown tier, prompt too long, empty prompt
        raise SparsedialError(str(e)) from None
    f = g.finish
    if f.finish_reason == "error":
        raise SparsedialError(f"generation failed: {f.error or 'unknown engine error'}")
    sys.stdout.write(prompt + f.text + "\n")
    print(f"[{f.prompt_tokens} prompt tokens, {f.completion_tokens} generated, finish: {f.finish_reason}, "
          f"tier: {f.tier}]", file=sys.stderr)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from sparsedial.engine.elastic_format import is_elastic
    from sparsedial.engine.loader import load_model
    from sparsedial.evaluate import load_texts, perplexity, token_stream

    if args.tier and not is_elastic(args.model):  # before loading anything: a plain model has no tiers
        raise SparsedialError(f"--tier: {args.model} is not an elastic checkpoint (no elastic.json)")
    if args.tier and args.backend != "sparsedial":
        raise SparsedialError("--tier needs --backend sparsedial")
    device = _device(args.device)
    lm = load_model(args.model, dtype=args.dtype, device=device, allow_external_base=args.allow_external_base)
    try:
        texts = load_texts(args.data)
    except FileNotFoundError as e:
        raise SparsedialError(str(e)) from None
    _warn_if_other_corpus(args.model, args.data)
    ids = token_stream(lm.tokenizer, texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    seq_len = min(args.seq_len, lm.config.max_position_embeddings - 1)
    if args.backend == "transformers":
        from transformers import AutoModelForCausalLM

        from sparsedial.engine.loader import base_weights_path

        ref_dir = base_weights_path(args.model).resolve().parent  # an elastic dir may refer to its base
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=lm.model.lm_head.weight.dtype).to(device).eval()
        fn = lambda x: ref(input_ids=x).logits
    else:
        fn = lm.model
    print(f"model {args.model}  data {args.data}  backend {args.backend}  window {seq_len}")
    if args.tier:
        return _eval_tiers(args, lm, ids, n_bytes, seq_len, device)
    with torch.inference_mode():
        r = perplexity(fn, ids, n_bytes, seq_len=seq_len, batch_size=args.batch_size, device=device)
    print(f"perplexity {r.perplexity:.3f}  nll {r.nll:.4f}  bits/byte {r.bits_per_byte:.4f}  tokens {r.tokens}")
    return 0


def _eval_tiers(args: argparse.Namespace, lm, ids: list[int], n_bytes: int, seq_len: int, device: str) -> int:
    """Perplexity of each requested tier of an elastic checkpoint: tier, measured sparsity, perplexity."""
    from sparsedial.compress.export import load_elastic_for_eval, tier_weights
    from sparsedial.compress.pruners import overall_sparsity
    from sparsedial.evaluate import perplexity

    lm, spec, tensors = load_elastic_for_eval(args.model, dtype="float32", device=device, loaded=lm,
                                              allow_external_base=args.allow_external_base)
    names = [t.name for t in spec.tiers] if args.tier == "all" else [t.strip() for t in args.tier.split(",")]
    try:
        tiers = [spec.tier(n) for n in names]
    except KeyError as e:
        raise SparsedialError(str(e.args[0])) from None
    print(f"{'tier':>6}  {'sparsity':>8}  {'perplexity':>10}")
    for tier in tiers:
        with tier_weights(lm.model, spec, tensors, tier) as model:  # a progress bar per tier (minutes on a CPU)
            r = perplexity(model, ids, n_bytes, seq_len=seq_len, batch_size=args.batch_size, device=device,
                           progress=True)
            print(f"{tier.name:>6}  {overall_sparsity(model):8.4f}  {r.perplexity:10.3f}", flush=True)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from sparsedial.compress.calibration import CalibrationConfig
    from sparsedial.compress.epts import EPTSConfig
    from sparsedial.compress.export import parse_tiers
    from sparsedial.compress.pipeline import compress_baseline, compress_epts

    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    try:
        parse_tiers(tiers, [])
        calib = CalibrationConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed)
        cfg = EPTSConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                         high_rank=args.high_rank, lora_mode=args.lora_mode, seed=args.seed)
    except ValueError as e:
        raise SparsedialError(str(e)) from None
    if not (args.model / "config.json").is_file():
        raise SparsedialError(f"--model {args.model}: not a model directory (no config.json)")
    out = args.out
    if out.exists() and any(out.iterdir()) and not (out / ".epts-resume").is_dir() and not args.force:
        raise SparsedialError(f"--out {out} exists and is not empty; pass --force to write into it")
    device = _device(args.device)
    try:
        if args.method == "epts":
            r = compress_epts(args.model, out, tiers, calib, cfg, device=device, chain=args.chain,
                              link_base=args.link_base, owl_lambda=args.owl_lambda)
        else:
            r = compress_baseline(args.model, out, args.method, tiers, calib, device=device)
    except ValueError as e:  # calibration source, shapes
        raise SparsedialError(str(e)) from None
    print(f"{args.method}: wrote {out} ({', '.join(r.tiers)}) in {r.wall_s:.1f} s")
    return 0


def _add_compress_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compress", help="make an elastic checkpoint (EPTS) or per-tier baseline checkpoints",
                       formatter_class=_Help, epilog="example: sparsedial compress --model models/stdlib-tiny "
                                                     "--out my-elastic --tiers dense,50%,70%,2:4")
    c.add_argument("--model", type=Path, required=True, help="dense HF model directory")
    c.add_argument("--out", type=Path, required=True, help="output directory (an interrupted EPTS run resumes)")
    c.add_argument("--method", choices=["epts", "wanda", "sparsegpt", "magnitude"], default="epts")
    c.add_argument("--tiers", default="dense,30%,40%,50%,60%,70%,80%,90%,2:4")
    c.add_argument("--calib", default="stdlib", help="stdlib | c4 | wikitext2 | text file | folder")
    c.add_argument("--calib-samples", type=int, default=64)
    c.add_argument("--calib-seq-len", type=int, default=256)
    c.add_argument("--epochs", type=int, default=4, help="EPTS epochs per block (0: nested masks, no LoRA)")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--rank", type=int, default=8, help="LoRA rank per group")
    c.add_argument("--high-rank", type=int, default=None, help="LoRA rank of the groups above 70%%")
    c.add_argument("--lora-mode", choices=["masked", "unmasked"], default="masked")
    c.add_argument("--chain", action="store_true", help="build the >= 50%% masks inside the 2:4 support")
    c.add_argument("--link-base", action="store_true", help="refer to the base weights instead of copying")
    c.add_argument("--owl-lambda", type=float, default=0.0,
                   help="store OWL per-block sparsity schedules spread by up to 2x this (0: uniform)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=os.environ.get("SPARSEDIAL_DEVICE") or "auto",
                   help="cpu, cuda, cuda:N or auto (env SPARSEDIAL_DEVICE)")
    c.add_argument("--force", action="store_true", help="write into a non-empty --out")
    c.set_defaults(func=cmd_compress)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from sparsedial.gguf_import import import_gguf

    r = import_gguf(args.gguf, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress)
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    c = r.config
    print(f"import-gguf: wrote {r.out} ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
          f"vocab {c['vocab_size']}, {r.tensors} tensors in {args.dtype}, {r.shards} file(s))")
    return 0


def _add_import_gguf_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-gguf", help="convert a llama.cpp GGUF file (Llama family) into a model directory",
        description="Convert a llama.cpp GGUF file (general.architecture llama with a byte-level BPE "
                    "tokenizer: Llama 3.x, SmolLM/SmolLM2...; SentencePiece vocabularies such as Llama 2's are "
                    "not supported yet) into a Hugging Face model directory (config.json, "
                    "tokenizer.json, model.safetensors) that sparsedial serves and compresses. Tensors in F32, "
                    "F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or Q2_K..Q6_K are dequantized to --dtype. The "
                    "files are written into a temporary folder next to --out and renamed into place at the "
                    "end: an interrupted import leaves nothing behind, and resuming means rerunning it.")
    p.add_argument("gguf", type=Path, metavar="FILE.gguf", help="the GGUF file")
    p.add_argument("--out", type=Path, required=True, help="model directory to create")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the written weights (default: bfloat16)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import_gguf)


def _warn_if_other_corpus(model_dir: Path, data: str) -> None:
    """The stdlib splits depend on the Python version; say so when it differs from the model's training."""
    import json

    from sparsedial import corpus

    info = model_dir / "training.json"
    if data in ("heldout", "val") and info.is_file():
        trained = json.loads(info.read_text()).get("corpus", {}).get("python_version")
        if trained and trained != corpus.python_version():
            print(f"note: {model_dir.name} was trained on the Python {trained} stdlib; the {data} split here comes "
                  f"from Python {corpus.python_version()}, so figures differ from its model card", file=sys.stderr)


SERVE_OPTIONS = ("host", "port", "model", "served_model_name", "device", "dtype", "backend", "default_tier",
                 "max_running", "max_waiting", "log_level", "allow_external_base", "api_key", "allowed_origins")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the HTTP API; options left out come from SPARSEDIAL_* env vars, then ServerSettings' defaults."""
    import uvicorn
    from pydantic import ValidationError

    from sparsedial.server import ServerSettings, create_app

    overrides = {k: getattr(args, k) for k in SERVE_OPTIONS if getattr(args, k) is not None}
    if args.replicas is not None or args.autoscale:  # scale-out on Ray Serve (sparsedial/deploy, docs/deploy.md)
        return _serve_fleet(args, overrides)
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        raise SparsedialError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    if not settings.model.is_dir():
        raise SparsedialError(f"model directory not found: {settings.model}")
    print(f"sparsedial: serving {settings.model} on http://{settings.host}:{settings.port} "
          f"(admin routes {'on' if settings.admin_token else 'off: set SPARSEDIAL_ADMIN_TOKEN'})", file=sys.stderr)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level))
    app.state.on_load_failed = lambda reason: setattr(server, "should_exit", True)
    server.run()
    reason = app.state.sparsedial.load_error
    if reason:  # vLLM and TGI exit too: a server that can never serve should not look alive to a supervisor
        raise SparsedialError(f"the server could not start: {reason}")
    return 0


def _serve_fleet(args: argparse.Namespace, overrides: dict) -> int:
    """`serve --replicas N` / `--autoscale`: a local Ray cluster on loopback and the Ray Serve app."""
    from pydantic import ValidationError

    from sparsedial.deploy import FleetOptions, RayMissingError, require_ray
    from sparsedial.deploy.options import parse_ladder
    from sparsedial.server import ServerSettings

    try:
        require_ray()
    except RayMissingError as e:
        raise SparsedialError(str(e)) from None
    from sparsedial.deploy.app import run_local, server_overrides

    try:
        settings = ServerSettings(**overrides)
        opts = FleetOptions(replicas=args.replicas or 2, autoscale=args.autoscale, min_replicas=args.min_replicas,
                            max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                            max_ongoing_requests=args.max_ongoing_requests, replica_cpus=args.replica_cpus,
                            ladder=parse_ladder(args.ladder), hysteresis=args.hysteresis,
                            server=server_overrides(overrides))
    except ValidationError as e:
        raise SparsedialError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    except ValueError as e:
        raise SparsedialError(str(e)) from None
    if not settings.model.is_dir():
        raise SparsedialError(f"model directory not found: {settings.model}")
    return run_local(opts, settings.host, settings.port)


def _add_fleet_args(s: argparse.ArgumentParser) -> None:
    from sparsedial.deploy.options import FleetOptions

    d = FleetOptions()
    f = s.add_argument_group("scale-out on Ray Serve (needs: pip install 'sparsedial[ray]'; docs/deploy.md)")
    f.add_argument("--replicas", type=int, default=None,
                   help="serve N engine replicas on a local Ray Serve cluster (loopback) instead of one process")
    f.add_argument("--autoscale", action="store_true", help="Ray Serve autoscaling between --min-replicas and "
                                                           "--max-replicas instead of a fixed --replicas")
    f.add_argument("--min-replicas", type=int, default=d.min_replicas, help=f"default {d.min_replicas}")
    f.add_argument("--max-replicas", type=int, default=d.max_replicas, help=f"default {d.max_replicas}")
    f.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests,
                   help=f"autoscaling target per replica (default {d.target_ongoing_requests})")
    f.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                   help=f"most requests Serve hands one replica (default {d.max_ongoing_requests})")
    f.add_argument("--replica-cpus", type=float, default=d.replica_cpus,
                   help=f"Ray CPUs reserved per replica (default {d.replica_cpus})")
    f.add_argument("--ladder", default=None, help="fleet tier policy: THRESHOLD=TIER steps over the fleet's "
                                                  "load, e.g. 8=50%%,16=2:4 (default: fixed at the default tier)")
    f.add_argument("--hysteresis", type=float, default=d.hysteresis, help="how far the fleet load must fall "
                                                                         "below a step to step back")


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve the HTTP API (OpenAI-compatible + /generate); defaults: "
                                     "the embedded model on 127.0.0.1:8000",
                       epilog="examples: sparsedial serve --default-tier 50%  |  sparsedial serve --model "
                              "models/smollm2-135m-instruct --port 9000  |  SPARSEDIAL_ADMIN_TOKEN=secret "
                              "sparsedial serve --host 0.0.0.0. Options left out come from SPARSEDIAL_<OPTION> "
                              "env vars, then the defaults in docs/api.md.")
    from sparsedial.server.settings import ServerSettings

    def setting(name: str, **kw) -> None:
        """An option of ServerSettings field `name`: its one description, its env var, its default."""
        f = ServerSettings.model_fields[name]
        default = "" if f.default_factory is not None or f.default is None else f"; default {f.default}"
        s.add_argument("--" + name.replace("_", "-"), help=f"{f.description} (env SPARSEDIAL_{name.upper()}"
                                                           f"{default})", **kw)

    for name in ("host", "port", "model", "served_model_name", "device", "dtype", "backend", "default_tier",
                 "max_running", "max_waiting", "log_level", "api_key", "allowed_origins"):
        kind = {"port": int, "max_running": int, "max_waiting": int, "model": Path}.get(name)
        setting(name, **({"type": kind} if kind else {}))
    setting("allow_external_base", action="store_true", default=None)
    _add_fleet_args(s)
    s.set_defaults(func=cmd_serve)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each option's default."""


def build_parser() -> argparse.ArgumentParser:
    from sparsedial import __version__

    parser = argparse.ArgumentParser(prog="sparsedial", description="Serve one elastic sparse LLM at many tiers.",
                                     epilog="start with: sparsedial serve, then open http://127.0.0.1:8000/ "
                                            "(the playground); each command has --help with examples")
    parser.add_argument("--version", action="version", version=f"sparsedial {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from sparsedial.engine.sampling import SamplingParams  # torch-only import; the CLI needs torch anyway

    g = sub.add_parser("generate", help="complete a prompt with a model", formatter_class=_Help,
                       epilog='example: sparsedial generate --prompt "def fibonacci(n):" --sparsity 70% '
                              '--temperature 0')
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="text to complete")
    g.add_argument("--escapes", action="store_true", help=r"interpret \n, \t ... in --prompt")
    d = SamplingParams()  # the engine's defaults, the same as the server's
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=d.temperature, help="below 1e-5 (0 included) = greedy")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 disables")
    g.add_argument("--seed", type=int, default=None, help="seed of the request's random generator")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--sparsity", default="auto",
                   help="tier: dense, 2:4, <n>%%, a fraction in [0, max], or auto (default; plain models: dense)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval-ppl", help="held-out perplexity of a model", formatter_class=_Help,
                       epilog="example: sparsedial eval-ppl --model models/stdlib-tiny-elastic --tier all")
    _add_model_args(e)
    e.add_argument("--data", default="heldout",
                   help="'heldout' (default) or 'val' stdlib modules, or a text file / folder")
    e.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--backend", choices=["sparsedial", "transformers"], default="sparsedial",
                   help="whose implementation computes the logits (transformers = reference check)")
    e.add_argument("--tier", default=None, help="elastic checkpoints: 'all' or a comma list of tiers")
    e.set_defaults(func=cmd_eval_ppl)
    _add_compress_parser(sub)
    _add_serve_parser(sub)
    _add_import_gguf_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SparsedialError as e:
        parser.exit(2, f"sparsedial: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "sparsedial: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
