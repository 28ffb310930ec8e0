"""The engine's `triton` backend end to end on a CPU, with the Triton kernels in their interpreter.

A tiny Llama (hidden 64, 2 blocks, biases on) gets a synthetic elastic checkpoint (plus a 90% tier, where the
torch backend adds its CPU CSR copy); the same checkpoint is loaded with backend="triton" and
backend="torch", and every tier's logits, a batch mixing tiers, and greedy decoding through EngineCore must
agree. The triton tiers must hold packed weights (pack_24 for 2:4, pack_bitmap otherwise), count their
packed bytes, never carry a CSR copy, and run unmasked LoRA beside the packed base.

On a CPU, TierWeights.apply's `sparse_linear(..., backend="auto")` runs the torch reference of the packed
formats; the `kernels` fixture forces backend="triton" there so the interpreted Triton kernels really run
(and counts their calls). The interpreter must be on before the kernel modules are imported: set below, at
import, as tests/kernels/conftest.py does. With CUDA present the module is skipped (GPU: tests/kernels).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from safetensors.torch import save_file
from sparsedial.engine.config import ModelConfig
from sparsedial.engine.elastic import ElasticModel, choose_backend
from sparsedial.engine.linear import ElasticLinear
from sparsedial.engine.model import Transformer
from sparsedial.engine.runner import EngineConfig, EngineCore
from sparsedial.engine.sampling import SamplingParams
from sparsedial.engine.tiers import TierPlan
from sparsedial.kernels import Packed24, PackedBitmap, sparse_linear
from sparsedial.kernels._launch import interpreter_enabled

from sparsedial.testing import write_synthetic_elastic

from .conftest import EMBEDDED

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not interpreter_enabled(),
                                reason="CPU test of the Triton interpreter (TRITON_INTERPRET=1, no CUDA)")

VOCAB = 256
TIERS = ["dense", "30%", "50%", "70%", "90%", "2:4", "45%"]  # 45%: materialized on demand
SPARSE = [t for t in TIERS if t != "dense"]
TOKENS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))  # 16 rows: the dot kernels
# fp32: the kernels use ieee fp32 (no tf32); only the summation order differs from F.linear / CSR
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2**-8, "atol": 4e-3}}


def tiny_llama(path: Path) -> Path:
    """A random 2-block Llama (hidden 64, 4 heads / 2 KV heads, MLP 128, biases) with stdlib-tiny's tokenizer."""
    path.mkdir(parents=True)
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "attention_bias": True, "mlp_bias": True, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0}
    (path / "config.json").write_text(json.dumps(hf))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / f, path / f)
    with torch.device("meta"):
        names = {n: p.shape for n, p in Transformer(ModelConfig.from_hf(hf)).named_parameters()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for n, shape in names.items():
        r = torch.randn(shape, generator=g)
        state[n] = 1 + 0.1 * r if "norm" in n else 0.1 * r if n.endswith("bias") else r / shape[-1] ** 0.5
    save_file(state, path / "model.safetensors")
    return path


def elastic(base: Path, out: Path, lora_mode: str) -> Path:
    """write_synthetic_elastic plus a 90% tier (no LoRA group reaches it; the torch backend adds CSR there)."""
    return write_synthetic_elastic(base, out, seed=1, lora_mode=lora_mode, sparser=(0.9,))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton_backend")
    base = tiny_llama(root / "base")
    return {mode: elastic(base, root / mode, mode) for mode in ("masked", "unmasked")}


@pytest.fixture(scope="module")
def pair(dirs):
    """(lora mode, dtype) -> (triton-backend model, torch-backend model), loaded once per module."""
    made: dict[tuple[str, torch.dtype], tuple[ElasticModel, ElasticModel]] = {}

    def get(mode: str = "masked", dtype: torch.dtype = torch.float32) -> tuple[ElasticModel, ElasticModel]:
        if (mode, dtype) not in made:
            made[mode, dtype] = tuple(ElasticModel.load(dirs[mode], dtype=dtype, backend=b)
                                      for b in ("triton", "torch"))
            assert [m.backend for m in made[mode, dtype]] == ["triton", "torch"]
        return made[mode, dtype]

    return get


@pytest.fixture
def kernels_ran(monkeypatch) -> Counter:
    """Force the Triton kernels (interpreted) behind TierWeights.apply; counts calls per packed format."""
    calls: Counter = Counter()

    def forced(x, packed, bias=None, **kw):
        calls[type(packed).__name__] += 1
        return sparse_linear(x, packed, bias, backend="triton", **kw)

    monkeypatch.setattr("sparsedial.kernels.sparse_linear", forced)  # TierWeights.apply imports it per call
    return calls


def linears(em: ElasticModel) -> list[ElasticLinear]:
    return [m for m in em.model.modules() if isinstance(m, ElasticLinear)]


def logits(em: ElasticModel, tiers: list[str] | str, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    rows = [em.resolve(t) for t in ([tiers] * tokens.shape[0] if isinstance(tiers, str) else tiers)]
    em.ensure({r.name for r in rows})
    with torch.inference_mode():
        return em.model(tokens, plan=TierPlan.from_rows(rows))


# ------------------------------------------------------------------------------------------ backend choice
def test_choose_backend_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_backend("triton", cpu) == "triton"
    assert choose_backend("auto", cpu) == "torch"  # auto never picks triton off CUDA, interpreter or not
    monkeypatch.delenv("TRITON_INTERPRET")
    assert choose_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match=r"needs a CUDA device \(or TRITON_INTERPRET=1.*got device cpu"):
        choose_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend must be auto, torch or triton"):
        choose_backend("cuda", cpu)


# ------------------------------------------------------------------------------------------ materialization
def test_triton_tiers_hold_packed_weights_and_count_their_bytes(pair):
    tr, to = pair()
    for em in (tr, to):
        em.ensure([em.resolve("45%").name])  # on demand: from the drop levels, LoRA groups 0 and 1
    for name in TIERS:
        for lin in linears(tr):
            tw = lin.tiers[name]
            assert tw.csr is None and tw.lora_a is None, name
            if name == "dense":
                assert tw.packed is None and tw.weight is lin.weight and tw.nbytes == 0
            else:
                assert tw.weight is None and isinstance(tw.packed, Packed24 if name == "2:4" else PackedBitmap)
                assert tw.packed.dtype == torch.float32 and tw.nbytes == tw.packed.nbytes
        assert tr.tier_bytes[name] == sum(lin.tiers[name].nbytes for lin in linears(tr))
        if name != "dense":
            assert 0 < tr.tier_bytes[name] < to.tier_bytes[name], name  # packed fp32 < merged fp32 (+ CSR)
    bitmap = [tr.tier_bytes[t] for t in ("30%", "45%", "50%", "70%", "90%")]
    assert bitmap == sorted(bitmap, reverse=True)
    assert all(lin.tiers["90%"].csr is not None for lin in linears(to))  # the torch backend's CPU CSR copy


# ------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("tier", TIERS)
def test_tier_logits_equal_the_torch_backend(pair, kernels_ran, tier):
    tr, to = pair()
    torch.testing.assert_close(logits(tr, tier), logits(to, tier), **TOL[torch.float32])
    n = len(linears(tr))
    want = {} if tier == "dense" else {"Packed24" if tier == "2:4" else "PackedBitmap": n}
    assert dict(kernels_ran) == want  # one interpreted kernel call per linear (the dense tier: none)


def test_a_forward_mixing_tiers_equals_the_torch_backend(pair, kernels_ran):
    tr, to = pair()
    tiers = ["dense", "2:4", "2:4", "90%", "30%", "45%"]  # runs: dense | 2:4 x2 | 90% | 30% | 45%
    tokens = torch.randint(0, VOCAB, (6, 5), generator=torch.Generator().manual_seed(2))
    got = logits(tr, tiers, tokens)
    torch.testing.assert_close(got, logits(to, tiers, tokens), **TOL[torch.float32])
    assert kernels_ran == Counter(Packed24=len(linears(tr)), PackedBitmap=3 * len(linears(tr)))
    assert len({round(float(got[i, -1, 0]), 4) for i in (0, 1, 3, 4, 5)}) == 5  # the tiers really differ


def test_decode_rows_gemv_equal_the_torch_backend(pair, kernels_ran):
    tr, to = pair()
    tokens = TOKENS[:, :1]  # [2, 1]: two rows, the GEMV kernels
    for tier in ("50%", "2:4", ["70%", "2:4"]):
        torch.testing.assert_close(logits(tr, tier, tokens), logits(to, tier, tokens), **TOL[torch.float32])


def test_default_dispatch_on_cpu_runs_the_packed_reference(pair):
    """Without the forcing fixture, the triton-backend tiers run sparse_linear's torch reference on a CPU."""
    tr, to = pair()
    for tier in ("70%", "2:4"):
        torch.testing.assert_close(logits(tr, tier), logits(to, tier), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ unmasked LoRA
def test_unmasked_lora_runs_beside_the_packed_base(pair, kernels_ran):
    tr, to = pair("unmasked")
    masked = pair()[0]
    for name in ("30%", "50%", "2:4"):
        tws = [lin.tiers[name] for lin in linears(tr)]
        assert all(tw.weight is None and tw.packed is not None for tw in tws)
        assert any(tw.lora_a is not None for tw in tws)  # (some blocks opt out of group 0 at 30%)
        for tw in tws:
            lora = 0 if tw.lora_a is None else tw.lora_a.nbytes + tw.lora_b.nbytes
            assert tw.nbytes == tw.packed.nbytes + lora
        got = logits(tr, name)
        torch.testing.assert_close(got, logits(to, name), **TOL[torch.float32])
        assert not torch.allclose(got, logits(masked, name), atol=1e-3)  # the LoRA path changes the result
    assert all(lin.tiers["90%"].lora_a is None for lin in linears(tr))  # no group reaches 90%


# ------------------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("mode, tiers", [("masked", ["dense", "70%", ["90%", "30%"]]), ("unmasked", ["50%", "2:4"])])
def test_fp16_tiers_equal_the_torch_backend(pair, kernels_ran, mode, tiers):
    tr, to = pair(mode, torch.float16)
    for tier in tiers:
        torch.testing.assert_close(logits(tr, tier), logits(to, tier), **TOL[torch.float16])
    assert all(tw.packed.dtype == torch.float16 for lin in linears(tr) for tw in lin.tiers.values() if tw.packed)


# ------------------------------------------------------------------------------------------ EngineCore
def test_engine_core_greedy_tokens_equal_the_torch_backend(pair, dirs, kernels_ran):
    """Prefill, then decode steps whose rows mix tiers (one decode forward, several segments)."""
    prompts = [[5, 17, 30, 42, 9], [8, 8, 120], [77, 3, 200, 1], [64]]
    tiers = ["2:4", "50%", "dense", "90%"]
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    out = {}
    for em in pair():
        cfg = EngineConfig(model=dirs["masked"], backend=em.backend, max_batch=4, max_seq_len=32,
                           prefill_chunk=8)
        gens = EngineCore(em, cfg).generate(prompts, greedy, tiers)
        assert [g.finish.tier for g in gens] == tiers
        assert all(g.finish.finish_reason == "length" for g in gens)
        out[em.backend] = [g.token_ids for g in gens]
    assert out["triton"] == out["torch"]
    assert all(len(t) == 3 for t in out["triton"])
    assert kernels_ran["Packed24"] > 0 and kernels_ran["PackedBitmap"] > 0
