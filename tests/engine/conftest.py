"""A synthetic elastic checkpoint of the embedded model (random-jittered magnitude masks, random LoRA), and
the same model statically pruned and merged per tier with elastic_format.merged_weight (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sparsedial.engine.elastic import ElasticModel, write_synthetic_elastic
from sparsedial.engine.elastic_format import merged_weight, read_elastic
from sparsedial.engine.linear import ElasticLinear, serving_layout
from sparsedial.engine.loader import LoadedModel, load_model
from sparsedial.engine.runner import EngineConfig, EngineCore

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


class StaticModels:
    """The base model with its linears overwritten by a tier's merged weights, on request."""

    def __init__(self, path: Path) -> None:
        self.lm: LoadedModel = load_model(path)
        self.spec, self.tensors = read_elastic(path)
        self.base = {n: m.weight.detach().clone() for n, m in self.lm.model.named_modules()
                     if isinstance(m, ElasticLinear)}
        # stored as the engine stores them (linear.serving_layout): same values, and the same BLAS kernel,
        # so logits can be compared bit for bit (another layout sums in another order)
        for m in [*(m for m in self.lm.model.modules() if isinstance(m, ElasticLinear)), self.lm.model.lm_head]:
            m.weight.data = serving_layout(m.weight.data)

    @torch.no_grad()
    def at(self, tier, lora_mode: str = "masked") -> LoadedModel:
        spec = self.spec if lora_mode == "masked" else type(self.spec)(**{**vars(self.spec), "lora_mode": lora_mode})
        for name, mod in self.lm.model.named_modules():
            if isinstance(mod, ElasticLinear):
                layer = int(name.split(".")[2])
                w = merged_weight(spec, tier, self.tensors, name, layer, self.base[name])
                if lora_mode == "unmasked":  # the delta runs beside the sparse base, unmasked
                    from sparsedial.engine.elastic_format import tier_delta

                    d = tier_delta(spec, tier, self.tensors, name, layer)
                    w = w if d is None else w + d.to(w.dtype)
                mod.weight.copy_(w)
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
