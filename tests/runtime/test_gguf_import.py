"""`sparsedial import-gguf`: GGUF files written here with gguf-py (the way llama.cpp's converter lays them out)
-> model directory -> sparsedial's loader; logits against transformers' own GGUF loader of the same file (and
against the original model for float files), tokenizer ids against transformers' GGUF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from sparsedial import gguf_import
from sparsedial.engine.loader import load_model

from sparsedial.cli import main

from .conftest import EMBEDDED

Q = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# gguf-py cannot quantize these: random blocks, with (byte offset of each fp16 scale, its magnitude)
RAW_BLOCKS = {"Q2_K": ((80, 2e-3), (82, 2e-3)), "Q3_K": ((108, 1e-3),), "Q4_K": ((0, 1e-4), (2, 1e-4)),
              "Q5_K": ((0, 5e-5), (2, 5e-5)), "Q6_K": ((208, 4e-5),)}
SHAPE = {"vocab_size": 6144, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0}
TEXT = ("def parse(path: str) -> dict[str, int]:\n    return {k: int(v) for k, v in pairs}  # 123 + 4567\n"
        "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?\t\n"
        "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀 and a <|endoftext|> in the middle.  ")


def hf_model(tie: bool = False, rope_scaling: dict | None = None, seed: int = 0):
    """A random Llama with peaked attention (large Q/K), so a wrong Q/K row order shows in the logits."""
    import transformers

    cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                                   rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.05)
    return model


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order -> llama.cpp's (the converter's reordering, which the importer must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(w, pre: str = "default", add_bos: bool | None = None, template: str | None = None) -> None:
    doc = json.loads((EMBEDDED / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in doc["added_tokens"]:
        types[added["id"]] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)


def raw_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator, gain: float) -> np.ndarray:
    qt = Q[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    blocks = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for offset, scale in RAW_BLOCKS[kind]:
        d = (rng.uniform(0.5, 1.0, size=len(blocks)) * scale * gain).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * nbytes)


def write_gguf(path: Path, model, kind: str, arch: str = "llama", rope_freqs: np.ndarray | None = None,
               **tok) -> Path:
    """The model's tensors under llama.cpp names and layout; 2-D weights in `kind`, norms in F32 (as llama.cpp
    keeps them). K-quant files get random blocks instead of the model's weights."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    tokenizer_metadata(w, **tok)
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem = name.removesuffix(".weight")
        if stem in names:
            gname = names[stem]
        else:
            i, rest = stem.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{layer[rest]}"
        x = p.detach().float().numpy()
        if gname.endswith("attn_q"):
            x = permute_like_llama_cpp(x, cfg.num_attention_heads)
        elif gname.endswith("attn_k"):
            x = permute_like_llama_cpp(x, cfg.num_key_value_heads)
        gname += ".weight"
        if x.ndim == 1 or kind == "F32":
            w.add_tensor(gname, np.ascontiguousarray(x, dtype=np.float32))
        elif kind == "F16":
            w.add_tensor(gname, x.astype(np.float16))
        elif kind in RAW_BLOCKS:
            gain = 5.0 if gname.endswith(("attn_q.weight", "attn_k.weight")) else 1.0
            w.add_tensor(gname, raw_blocks(*x.shape, kind, rng, gain), raw_dtype=Q[kind])
        else:
            w.add_tensor(gname, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path: Path):
    import transformers

    # dequantize=True: a plain float model (newer transformers may otherwise look for hub matmul kernels)
    extra = {}
    if hasattr(transformers, "GgufConfig"):
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                             **extra).eval()


def run_import(path: Path, out: Path, *extra: str) -> Path:
    assert main(["import-gguf", str(path), "--out", str(out), *extra]) == 0
    return out


TOKENS = torch.randint(0, 6144, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    return hf_model()


@pytest.mark.parametrize("kind", TYPES)
def test_logits_match_transformers_gguf_loader(tmp_path, reference, kind):
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", reference, kind)
    out = run_import(path, tmp_path / "out", "--dtype", "float32")
    ours = load_model(out, dtype="float32").model
    theirs = transformers_gguf(path)
    with torch.no_grad():
        got, expected = ours(TOKENS), theirs(input_ids=TOKENS).logits
    assert expected.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if kind == "F32":  # and the original model itself: every layout step was undone exactly
        with torch.no_grad():
            torch.testing.assert_close(got, reference(input_ids=TOKENS).logits, atol=1e-4, rtol=0)


def test_qk_unpermutation_is_what_makes_logits_match(tmp_path, reference, monkeypatch):
    """Control: importing without undoing llama.cpp's Q/K order gives visibly different logits."""
    path = write_gguf(tmp_path / "tiny.gguf", reference, "F32")
    monkeypatch.setattr(gguf_import, "unpermute_rows", lambda w, n: w)
    out = run_import(path, tmp_path / "out", "--dtype", "float32")
    with torch.no_grad():
        got = load_model(out, dtype="float32", with_tokenizer=False).model(TOKENS)
        diff = (got - reference(input_ids=TOKENS).logits).abs().max()
    assert diff > 0.05


def test_tied_embeddings_default_bfloat16_and_written_files(tmp_path):
    model = hf_model(tie=True)
    path = write_gguf(tmp_path / "tied.gguf", model, "Q8_0", add_bos=True, template="{{ messages[0]['content'] }}")
    out = run_import(path, tmp_path / "m")  # default dtype
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".m.*"))  # no temp folder left next to it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert {k: cfg[k] for k in SHAPE} == SHAPE and cfg["head_dim"] == 64
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 0}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open has keys(), not __contains__)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    lm = load_model(out, dtype="float32")
    assert lm.tokenizer.chat_template == "{{ messages[0]['content'] }}"
    assert lm.tokenizer("hi")["input_ids"][0] == 0  # add_bos_token from the file
    theirs = transformers_gguf(path)
    with torch.no_grad():
        for p in theirs.parameters():  # the same rounding of the same weights (buffers such as RoPE's stay fp32)
            p.copy_(p.to(torch.bfloat16))
        torch.testing.assert_close(lm.model(TOKENS), theirs(input_ids=TOKENS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("add_bos", [None, True])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, reference, add_bos):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "tok.gguf", reference, "F16", add_bos=add_bos)
    out = run_import(path, tmp_path / "out")
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    original = AutoTokenizer.from_pretrained(EMBEDDED)  # the tokenizer the GGUF's vocabulary came from
    ids = ours(TEXT)["input_ids"]
    assert ids == theirs(TEXT)["input_ids"]
    assert ids[int(bool(add_bos)):] == original(TEXT)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False).endswith(TEXT)
    for line in TEXT.splitlines():
        assert ours(line)["input_ids"] == theirs(line)["input_ids"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "tekken", "gpt-4o", "some-new-name"])
def test_pretokenizer_names_match_transformers(tmp_path, pre):
    """The split regex each llama.cpp pre-tokenizer name selects (tokenizer metadata only, no model)."""
    from sparsedial.gguf_tokenizer import build_tokenizer
    from transformers import AutoTokenizer

    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(4)
    w.add_head_count(1)
    tokenizer_metadata(w, pre=pre)
    w.add_tensor("token_embd.weight", np.zeros((6144, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = gguf_import.metadata(gguf_import.read_gguf(path))
    built = build_tokenizer({k: v for k, v in meta.items() if k.startswith("tokenizer.")})
    assert bool(built.notes) == (pre == "some-new-name")
    (tmp_path / "tokenizer.json").write_text(built.tokenizer_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(built.tokenizer_config))
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = TEXT + " in 2024 and 1999, x=12345 CamelCaseWord HTTPServer DON'T we'll\r\n\n\n  end"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    # this small vocabulary hides some split differences in the ids; the pieces show them
    pieces = [t.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) for t in (ours, theirs)]
    assert pieces[0] == pieces[1]


def test_smollm_pretokenizer_splits_digits_like_the_original(tmp_path, reference):
    """`smollm` files: digits split one by one before the GPT-2 regex, as SmolLM's own tokenizer.json does."""
    from tokenizers import Tokenizer, pre_tokenizers

    path = write_gguf(tmp_path / "smol.gguf", reference, "F16", pre="smollm")
    out = run_import(path, tmp_path / "out")
    original = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = TEXT + " in 2024 and 1999, x=12345"
    assert ours.encode(text).ids == original.encode(text).ids


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from sparsedial.engine.config import RopeConfig, rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = hf_model(rope_scaling=dict(scaling))
    rope = RopeConfig(theta=10000.0, type="llama3", factor=32.0, original_max_position_embeddings=8192)
    divisors = (rope_inv_freq(RopeConfig(theta=10000.0), 64) / rope_inv_freq(rope, 64)).numpy()
    path = write_gguf(tmp_path / "l3.gguf", model, "F32", rope_freqs=divisors)
    out = run_import(path, tmp_path / "out", "--dtype", "float32")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling
    with torch.no_grad():
        got = load_model(out, dtype="float32", with_tokenizer=False).model(TOKENS)
        torch.testing.assert_close(got, model(input_ids=TOKENS).logits, atol=1e-4, rtol=0)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unsupported_architecture_is_one_line_exit_2(tmp_path, reference, capsys):
    path = write_gguf(tmp_path / "q.gguf", reference, "F32", arch="qwen3")
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("sparsedial: error:") and "'qwen3'" in line and "not supported" in line
    assert not (tmp_path / "out").exists()


def test_unsupported_quant_type_is_one_line_exit_2(tmp_path, reference, capsys):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(256)
    tokenizer_metadata(w)
    w.add_tensor("token_embd.weight", np.zeros((6144, 66), np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    line = _error_line(capsys)
    assert "'token_embd.weight'" in line and "IQ2_XXS" in line and "not supported" in line


def test_sentencepiece_tokenizer_is_refused(tmp_path, capsys):
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "SentencePiece" in _error_line(capsys)


def test_not_a_gguf_and_existing_out(tmp_path, reference, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "not a readable GGUF" in _error_line(capsys)
    path = write_gguf(tmp_path / "f.gguf", reference, "F16")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(path), "--out", str(out)])
    assert e.value.code == 2 and "--force" in _error_line(capsys)
    run_import(path, out, "--force", "--no-progress")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_import_leaves_nothing(tmp_path, reference, monkeypatch):
    path = write_gguf(tmp_path / "f.gguf", reference, "F16")
    calls = []

    def boom(t):
        calls.append(t.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(t)

    real = gguf_import._dequantize
    monkeypatch.setattr(gguf_import, "_dequantize", boom)
    with pytest.raises(SystemExit) as e:
        main(["import-gguf", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.gguf"]
    monkeypatch.setattr(gguf_import, "_dequantize", real)  # rerun = redo
    run_import(path, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_sharded_output_loads(tmp_path, reference):
    path = write_gguf(tmp_path / "f.gguf", reference, "F32")
    r = gguf_import.import_gguf(path, tmp_path / "out", dtype="float32", progress=False, shard_bytes=4 << 20)
    assert r.shards > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        got = load_model(tmp_path / "out", dtype="float32", with_tokenizer=False).model(TOKENS)
        torch.testing.assert_close(got, reference(input_ids=TOKENS).logits, atol=1e-4, rtol=0)
