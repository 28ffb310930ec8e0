"""Hostile or corrupt elastic checkpoints fail at load with one ModelLoadError line naming the file and the
field or tensor, and the CLI turns that into `sparsedial: error: ...` with exit code 2.

Each case copies the shipped checkpoint (models/stdlib-tiny-elastic) and the base model it refers to
(../stdlib-tiny/model.safetensors) side by side under tmp_path, damages one thing and loads it. Schema cases
re-seal elastic.json (write_elastic_json recomputes spec_sha256) as a writer with a bug would, so the
schema check itself is what fires, not the edit detection.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.elastic_format import read_elastic, write_elastic, write_elastic_json
from sparsedial.engine.loader import base_weights_path, load_model

from sparsedial.errors import ModelLoadError

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = MODELS / "stdlib-tiny-elastic"
LORA_A = "model.layers.0.mlp.up_proj.lora.0.A"
BASE_W = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the CI machine has 2 cores (see tests/engine/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A fresh copy of the shipped checkpoint, one level down so that tmp_path/ext is outside its parent."""
    root = tmp_path / "models"
    shutil.copytree(MODELS / "stdlib-tiny", root / "stdlib-tiny")
    shutil.copytree(SHIPPED, root / "stdlib-tiny-elastic")
    return root / "stdlib-tiny-elastic"


def edit(d: Path, change: Callable[[dict], None], reseal: bool = True) -> None:
    doc = json.loads((d / "elastic.json").read_text())
    change(doc)
    if reseal:
        write_elastic_json(d, doc)
    else:
        (d / "elastic.json").write_text(json.dumps(doc, indent=2))


def load_error(d: Path, **kw) -> str:
    with pytest.raises(ModelLoadError) as e:
        ElasticModel.load(d, resident=(), **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def run_cli(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsedial.cli", "generate", "--model", str(d), "--prompt", "x",
                           "--max-tokens", "2"], check=False, capture_output=True, text=True, timeout=300)


def assert_cli_fails(d: Path, *needles: str) -> None:
    r = run_cli(d)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsedial: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def tier(i: int, **kv) -> Callable[[dict], None]:
    return lambda doc: doc["tiers"][i].update(kv)


def group(i: int, **kv) -> Callable[[dict], None]:
    return lambda doc: doc["groups"][i].update(kv)


def top(**kv) -> Callable[[dict], None]:
    return lambda doc: doc.update(kv)


# ------------------------------------------------------------------------------------------ the positive
def test_untouched_copy_loads(ckpt):
    em = ElasticModel.load(ckpt, resident=())
    assert em.tiers == ["dense", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "2:4"]
    spec, _ = read_elastic(SHIPPED)  # the committed checkpoint itself, in place
    assert spec.base_weights == "../stdlib-tiny/model.safetensors"


def test_shipped_elastic_json_is_sealed():
    doc = json.loads((SHIPPED / "elastic.json").read_text())
    assert len(doc["spec_sha256"]) == 64 and doc["files"]


def test_compressor_output_loads(tmp_path):
    """compress_epts (LoRA groups, the 2:4 group, OWL schedules, a by-reference base) writes what loads."""
    from sparsedial.compress.calibration import CalibrationConfig
    from sparsedial.compress.epts import EPTSConfig
    from sparsedial.compress.pipeline import compress_epts
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "tiny"
    cfg = LlamaConfig(vocab_size=6144, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(MODELS / "stdlib-tiny" / f, base / f)
    tokens = torch.randint(0, 6144, (4, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "elastic"
    compress_epts(base, out, ["dense", "30%", "50%", "2:4"], CalibrationConfig("stdlib", 4, 16),
                  EPTSConfig(epochs=1, batch_size=2), link_base=True, progress=False, calib_tokens=tokens,
                  owl_lambda=0.05)
    em = ElasticModel.load(out, resident=())
    assert em.tiers == ["dense", "30%", "50%", "2:4"] and em.spec.tiers[1].schedule is not None
    assert em.spec.base_weights == "../tiny/model.safetensors"


# ------------------------------------------------------------------------------------------ the schema
SCHEMA_CASES = {
    "lora_group_99": (tier(2, lora_groups=[0, 99]), r"tiers\[2\]\.lora_groups\[1\]: expected one of .*found 99"),
    "kind_quantum": (tier(1, kind="quantum"), r"tiers\[1\]\.kind: expected 'dense', 'unstructured' or 'nm', "
                                              + r"found 'quantum'"),
    "sparsity_2": (tier(1, sparsity=2.0), r"tiers\[1\]\.sparsity: expected .*found 2\.0"),
    "sparsity_negative": (tier(1, sparsity=-0.5), r"tiers\[1\]\.sparsity: expected .*found -0\.5"),
    "sparsity_nan": (tier(1, sparsity=math.nan), r"tiers\[1\]\.sparsity: expected a finite number, found nan"),
    "sparsity_dense_nonzero": (tier(0, sparsity=0.3), r"tiers\[0\]\.sparsity: expected 0\.0 .*found 0\.3"),
    "nm_n": (tier(8, n=3), r"tiers\[8\]\.n: expected 2 .*found 3"),
    "nm_m": (tier(8, m=8), r"tiers\[8\]\.m: expected 4 .*found 8"),
    "nm_on_unstructured": (tier(1, n=2, m=4), r"tiers\[1\]\.n: expected 0 .*found 2"),
    "schedule_100": (tier(1, schedule=[30] * 5 + [100]), r"tiers\[1\]\.schedule\[5\]: expected .*found 100"),
    "schedule_negative": (tier(1, schedule=[-1] + [30] * 5), r"tiers\[1\]\.schedule\[0\]: expected .*found -1"),
    "schedule_length": (tier(1, schedule=[30] * 5), r"tiers\[1\]\.schedule: expected 6 entries .*found 5"),
    "schedule_on_dense": (tier(0, schedule=[0] * 6), r"tiers\[0\]\.schedule: expected null .*found"),
    "duplicate_tier": (tier(2, name="30%"), r"tiers\[2\]\.name: duplicate tier name '30%' \(also tiers\[1\]\)"),
    "int_tier_name": (tier(1, name=30), r"tiers\[1\]\.name: expected a valid string, found 30"),
    "empty_tier_name": (tier(1, name=""), r"tiers\[1\]\.name: expected .*found ''"),
    "no_tiers": (top(tiers=[]), r"tiers: expected .*at least 1"),
    "tier_unknown_key": (tier(0, bogus=1), r"tiers\[0\]\.bogus: unexpected field"),
    "group_rank_0": (group(0, rank=0), r"groups\[0\]\.rank: expected greater than or equal to 1, found 0"),
    "group_low_ge_high": (group(1, low=0.45, high=0.45), r"groups\[1\]\.high: expected more than low 0\.45, "
                                                        + r"found 0\.45"),
    "group_high_1.5": (group(7, high=1.5), r"groups\[7\]\.high: expected less than or equal to 1, found 1\.5"),
    "group_low_negative": (group(0, low=-0.1), r"groups\[0\]\.low: expected greater than or equal to 0"),
    "group_duplicate_index": (group(1, index=0), r"groups\[1\]\.index: duplicate group index 0 \(also groups\[0\]\)"),
    "lora_mode": (top(lora_mode="sideways"), r"lora_mode: expected 'masked' or 'unmasked', found 'sideways'"),
    "lora_scale_inf": (top(lora_scale=math.inf), r"lora_scale: expected a finite number, found inf"),
    "lora_scale_nan": (top(lora_scale=math.nan), r"lora_scale: expected a finite number, found nan"),
    "linears_not_strings": (top(linears=[1]), r"linears\[0\]: expected a valid string, found 1"),
    "top_unknown_key": (top(surprise=True), r"surprise: unexpected field"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_schema_violation_fails_at_load(ckpt, case):
    change, pattern = SCHEMA_CASES[case]
    edit(ckpt, change)
    msg = load_error(ckpt)
    assert str(ckpt / "elastic.json") in msg
    assert re.search(pattern, msg), msg


def test_cli_lora_group_99(ckpt):
    edit(ckpt, tier(2, lora_groups=[0, 99]))
    assert_cli_fails(ckpt, "elastic.json", "tiers[2].lora_groups[1]", "99")


# ------------------------------------------------------------------------------------------ integrity data
def test_edited_json_is_detected(ckpt):
    edit(ckpt, top(lora_scale=4.0), reseal=False)
    msg = load_error(ckpt)
    assert "elastic.json" in msg and "edited after it was written" in msg
    assert_cli_fails(ckpt, "elastic.json", "edited after it was written")


def test_edit_detected_without_hash_verification(ckpt):
    """verify_hashes=False skips hashing the (large) listed files, not the (cheap) seal of elastic.json."""
    edit(ckpt, top(lora_scale=4.0), reseal=False)
    with pytest.raises(ModelLoadError, match="edited after it was written"):
        read_elastic(ckpt, verify_hashes=False)


def test_missing_seal(ckpt):
    edit(ckpt, lambda doc: doc.pop("spec_sha256"), reseal=False)
    assert "spec_sha256" in load_error(ckpt)


@pytest.mark.parametrize("files", [None, {}])
def test_missing_files_list(ckpt, files):
    edit(ckpt, (lambda doc: doc.pop("files")) if files is None else top(files=files))
    msg = load_error(ckpt)
    assert str(ckpt / "elastic.json") in msg and "files" in msg and "no integrity data" in msg
    with pytest.raises(ModelLoadError, match="no integrity data"):
        read_elastic(ckpt, verify_hashes=False)
    if files is None:
        assert_cli_fails(ckpt, "elastic.json", "no integrity data")


@pytest.mark.parametrize("name", ["elastic.safetensors", "config.json", "../stdlib-tiny/model.safetensors"])
def test_files_must_cover_what_is_loaded(ckpt, name):
    edit(ckpt, lambda doc: doc["files"].pop(name))
    msg = load_error(ckpt)
    assert f"files: no sha256 for {name!r}" in msg, msg


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "../stdlib-tiny/config.json"])
def test_listed_files_stay_inside_the_checkpoint(ckpt, name):
    edit(ckpt, lambda doc: doc["files"].update({name: "0" * 64}))
    msg = load_error(ckpt)
    assert f"files[{name!r}]" in msg and "outside the checkpoint folder" in msg, msg


@pytest.mark.parametrize("where", ["files", "base_weights"])
def test_unresolvable_names(ckpt, where):
    """A NUL byte or a symlink loop makes Path.resolve raise: still one ModelLoadError, no traceback."""
    (ckpt / "loop").symlink_to(ckpt / "loop")
    if where == "files":
        edit(ckpt, lambda doc: doc["files"].update({"a\0b": "0" * 64}))
        assert "files['a\\x00b']: expected a file name" in load_error(ckpt)
        edit(ckpt, lambda doc: doc["files"].pop("a\0b") and doc["files"].update({"loop": "0" * 64}))
        assert "files['loop']: expected a file name" in load_error(ckpt)
    else:
        edit(ckpt, top(base_weights="a\0b"))
        assert "base_weights: expected a file name" in load_error(ckpt)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "[" * 100_000, b"\xff\xfe"])
def test_unreadable_json(ckpt, text):
    path = ckpt / "elastic.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert str(path) in load_error(ckpt)


def test_bad_digest_type(ckpt):
    edit(ckpt, lambda doc: doc["files"].update({"config.json": 5}))
    assert "files['config.json']: expected a sha256 hex digest (64 characters 0-9a-f), found 5" in load_error(ckpt)


def test_changed_file_hash_mismatch(ckpt):
    (ckpt / "generation_config.json").write_text("{}")
    assert "generation_config.json: sha256 does not match" in load_error(ckpt)


# ------------------------------------------------------------------------------------------ base weights
@pytest.fixture
def external_base(ckpt) -> Path:
    """The base weights moved outside the checkpoint's parent folder, referred to by absolute path."""
    ext = ckpt.parents[1] / "ext" / "model.safetensors"
    ext.parent.mkdir()
    shutil.move(ckpt.parent / "stdlib-tiny" / "model.safetensors", ext)

    def point(doc):
        doc["files"][str(ext)] = doc["files"].pop(doc["base_weights"])
        doc["base_weights"] = str(ext)
    edit(ckpt, point)
    return ext


def test_absolute_base_outside_is_refused(ckpt, external_base):
    msg = load_error(ckpt)
    assert "elastic.json" in msg and "base_weights" in msg and str(external_base) in msg
    assert "allow_external_base" in msg
    with pytest.raises(ModelLoadError, match="base_weights"):
        read_elastic(ckpt)
    with pytest.raises(ModelLoadError, match="base_weights"):
        base_weights_path(ckpt)
    assert_cli_fails(ckpt, "elastic.json", "base_weights", str(external_base))


def test_external_base_opt_in(ckpt, external_base):
    assert base_weights_path(ckpt, allow_external_base=True) == external_base
    lm = load_model(ckpt, with_tokenizer=False, allow_external_base=True)
    spec, _ = read_elastic(ckpt, allow_external_base=True)
    assert spec.base_weights == str(external_base) and lm.config.num_hidden_layers == 6


def test_relative_base_escaping_the_parent_is_refused(ckpt, external_base):
    rel = "../../ext/model.safetensors"

    def point(doc):
        doc["files"][rel] = doc["files"].pop(doc["base_weights"])
        doc["base_weights"] = rel
    edit(ckpt, point)
    msg = load_error(ckpt)
    assert "base_weights" in msg and rel in msg


def test_symlinked_base_escaping_is_refused(ckpt, external_base):
    """The rule applies after resolving symlinks: a link inside the parent to a file outside is refused."""
    link = ckpt.parent / "stdlib-tiny" / "model.safetensors"
    link.symlink_to(external_base)
    rel = "../stdlib-tiny/model.safetensors"

    def point(doc):
        doc["files"][rel] = doc["files"].pop(doc["base_weights"])
        doc["base_weights"] = rel
    edit(ckpt, point)
    assert "base_weights" in load_error(ckpt)


# ------------------------------------------------------------------------------------------ tensor values
def test_nan_lora_tensor(ckpt):
    """A writer that stored a NaN: re-written through write_elastic, so every hash is consistent."""
    spec, tensors = read_elastic(ckpt)
    tensors[LORA_A] = tensors[LORA_A].clone()
    tensors[LORA_A][0, 0] = float("nan")
    write_elastic(ckpt, spec, tensors)
    msg = load_error(ckpt)
    assert "elastic.safetensors" in msg and repr(LORA_A) in msg and "NaN" in msg, msg
    assert_cli_fails(ckpt, "elastic.safetensors", LORA_A)


def test_inf_base_weight(ckpt):
    path = ckpt.parent / "stdlib-tiny" / "model.safetensors"
    sd = load_file(path)
    sd[BASE_W][3, 2] = float("inf")
    save_file(sd, path)
    msg = load_error(ckpt)
    assert "stdlib-tiny/model.safetensors" in msg and repr(BASE_W) in msg and "inf" in msg, msg
    assert_cli_fails(ckpt, "model.safetensors", BASE_W)
