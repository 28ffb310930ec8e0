"""A synthetic elastic checkpoint of the embedded model (random-jittered magnitude masks, random LoRA), and
the same model with each tier's weights computed by the test itself from the checkpoint's files and the
documented math (`reference_tier_weight`, independent of the engine's code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.linear import ElasticLinear, serving_layout
from sparsedial.engine.loader import LoadedModel, load_model
from sparsedial.engine.runner import EngineConfig, EngineCore

from sparsedial.testing import write_synthetic_elastic

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"
PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass ", "    for i in range(", "#"]


@pytest.fixture(scope="session")
def elastic_dir(tmp_path_factory) -> Path:
    return write_synthetic_elastic(EMBEDDED, tmp_path_factory.mktemp("elastic"), seed=0)


@pytest.fixture(scope="session")
def em(elastic_dir) -> ElasticModel:
    return ElasticModel.load(elastic_dir)


@pytest.fixture
def make_core(em):
    """A fresh EngineCore over the shared model (each call re-allocates the KV cache)."""
    def make(**kw) -> EngineCore:
        cfg = EngineConfig(model=em.lm.path, **{"max_batch": 8, "max_seq_len": 256, "prefill_chunk": 64, **kw})
        return EngineCore(em, cfg)
    return make


@pytest.fixture
def engine(em):
    """Factory of AsyncEngines over the shared model (4 slots unless overridden); all shut down afterwards."""
    from sparsedial.engine.async_engine import AsyncEngine

    made = []

    def make(**kw) -> AsyncEngine:
        cfg = EngineConfig(model=em.lm.path, **{"max_batch": 4, "max_seq_len": 256, "prefill_chunk": 64, **kw})
        made.append(AsyncEngine(cfg, model=em))
        return made[-1]

    yield make
    for e in made:
        e.shutdown()


def reference_tier_weight(doc: dict, tensors: dict[str, torch.Tensor], name: str, tier: str,
                          base: torch.Tensor, lora_mode: str | None = None) -> torch.Tensor:
    """A tier's weight of linear `name`, computed here from elastic.json (`doc`) and the raw tensors of
    elastic.safetensors with the format's documented math (docs/architecture.md, "Elastic checkpoint"),
    independently of the engine's code:
    - kept at p% <=> drop_level > p (255: never dropped); 2:4: bit j of mask24[o, g] keeps input 4g + j;
    - LoRA groups: a listed tier's own list; an unlisted p% uses every unstructured group up to the first
      whose `high` >= p/100 (none above the last); group 0 is off where `lora0_off` is set and p/100 <=
      `lora0_off_below`;
    - masked mode: W_t = (W + scale * sum_g B_g A_g) * M; unmasked: W * M + scale * sum_g B_g A_g (the delta
      runs beside the sparse base, so it is added unmasked)."""
    listed = {t["name"]: t for t in doc["tiers"]}
    if tier in listed:
        t = listed[tier]
        assert t.get("schedule") is None, "the reference handles uniform tiers only"
        kind, sparsity, groups = t["kind"], t["sparsity"], list(t["lora_groups"])
    else:
        assert tier.endswith("%"), tier
        kind, sparsity, groups = "unstructured", int(tier[:-1]) / 100, []
        for g in sorted((g for g in doc["groups"] if not g["nm"]), key=lambda g: g["high"]):
            groups.append(g["index"])
            if sparsity <= g["high"] + 1e-9:
                break
        else:
            groups = []
    off = tensors.get(f"{name}.lora0_off")
    if 0 in groups and off is not None and int(off) == 1 and sparsity <= doc["lora0_off_below"]:
        groups.remove(0)
    delta = None
    for g in groups:
        ba = tensors[f"{name}.lora.{g}.B"].double() @ tensors[f"{name}.lora.{g}.A"].double()
        delta = ba if delta is None else delta + ba
    w = base.double()
    mode = lora_mode or doc["lora_mode"]
    if delta is not None and mode == "masked":
        w = w + doc["lora_scale"] * delta
    if kind == "unstructured":
        w = w * (tensors[f"{name}.drop_level"].int() > round(sparsity * 100))
    elif kind == "nm":
        packed = tensors[f"{name}.mask24"].int()  # [out, in/4]
        bits = torch.stack([(packed >> j) & 1 for j in range(4)], dim=-1)  # [out, in/4, 4]
        w = w * bits.reshape(w.shape)
    if delta is not None and mode == "unmasked":
        w = w + doc["lora_scale"] * delta
    return w.to(base.dtype)


class StaticModels:
    """The base model with its linears overwritten by a tier's weights from `reference_tier_weight`."""

    def __init__(self, path: Path) -> None:
        import json

        from safetensors.torch import load_file

        self.lm: LoadedModel = load_model(path)
        self.doc = json.loads((path / "elastic.json").read_text())
        self.tensors = load_file(path / "elastic.safetensors")
        self.base = {n: m.weight.detach().clone() for n, m in self.lm.model.named_modules()
                     if isinstance(m, ElasticLinear)}
        # stored as the engine stores them (linear.serving_layout): same values, and the same BLAS kernel,
        # so logits compare closely (another layout sums in another order)
        for m in [*(m for m in self.lm.model.modules() if isinstance(m, ElasticLinear)), self.lm.model.lm_head]:
            m.weight.data = serving_layout(m.weight.data)

    @torch.no_grad()
    def at(self, tier: str, lora_mode: str | None = None) -> LoadedModel:
        for name, mod in self.lm.model.named_modules():
            if isinstance(mod, ElasticLinear):
                mod.weight.copy_(reference_tier_weight(self.doc, self.tensors, name, tier, self.base[name],
                                                       lora_mode))
        return self.lm


@pytest.fixture(scope="session")
def static(elastic_dir) -> StaticModels:
    return StaticModels(elastic_dir)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: the CI machine has 2 cores shared with other jobs, and oversubscribed OpenMP
    threads spin (measured: model load 3.2 s with one thread, 8.5 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
