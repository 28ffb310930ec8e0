"""Rebuild a Hugging Face `tokenizer.json` + `tokenizer_config.json` from a GGUF file's tokenizer metadata.

llama.cpp stores no tokenizer file, only metadata under `tokenizer.ggml.*`: the token list, BPE merges, one
type per token (1 normal, 3 control, 4 user-defined, ...), the special token ids, a pre-tokenizer *name*
(`tokenizer.ggml.pre`, e.g. "llama-bpe", "qwen2", "smollm") and the chat template. For the byte-level BPE kind
(`tokenizer.ggml.model == "gpt2"`) that is enough to rebuild a `tokenizers` ByteLevel BPE tokenizer:

- tokens are already in the GPT-2 byte-to-unicode spelling ("Ġthe"); one that is not (a token written as raw
  text) is respelled from its UTF-8 bytes, so the vocabulary has one entry per id;
- control tokens become special added tokens, user-defined ones plain added tokens (matched whole in text);
- the pre-tokenizer name selects the split regex the merges were learned with (unknown names: GPT-2's);
- BOS/EOS are added by a TemplateProcessing post-processor when the file asks for it (`add_bos_token`).

Encodings equal transformers' own GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(d, gguf_file=f)`),
with one deliberate exception: for the pre-tokenizers llama.cpp splits into single digits before the GPT-2
regex ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"; SmolLM/SmolLM2 files),
we do too, as the original tokenizer.json and llama.cpp do; transformers falls back to the plain GPT-2 regex
there, which differs on digits after a space. SentencePiece ("llama") and other tokenizer kinds are rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sparsedial.errors import UnsupportedModelError

CONTROL, USER_DEFINED = 3, 4

# Split regexes by llama.cpp pre-tokenizer name (the same patterns as the models' own tokenizer.json files).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEX = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
}
# GPT-2's regex after splitting off every digit on its own
DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
# names that mean plain GPT-2 pre-tokenization (anything else unknown falls back to it with a note)
GPT2_NAMES = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"})


@dataclass
class GGUFTokenizer:
    """What the importer writes: `tokenizer.json` text, `tokenizer_config.json` dict, and remarks for the user."""

    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, DEL, NBSP, soft hyphen...) are given the code points from U+0100 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def check_tokenizer_kind(meta: dict[str, Any]) -> None:
    """Fail early (before any tensor work) on a tokenizer kind this module cannot rebuild."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        if not meta.get("tokenizer.ggml.tokens") or "tokenizer.ggml.merges" not in meta:
            raise UnsupportedModelError("GGUF byte-level BPE tokenizer without tokenizer.ggml.tokens/merges")
        return
    if kind == "llama":
        raise UnsupportedModelError("GGUF tokenizer 'llama' (SentencePiece) is not supported; only 'gpt2' "
                                    "(byte-level BPE: Llama 3, SmolLM, Qwen-style vocabularies)")
    raise UnsupportedModelError(f"GGUF tokenizer {kind!r} is not supported; only 'gpt2' (byte-level BPE)")


def build_tokenizer(meta: dict[str, Any], model_max_length: int | None = None) -> GGUFTokenizer:
    """`meta`: the file's `tokenizer.*` metadata keys and values (see `check_tokenizer_kind`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    check_tokenizer_kind(meta)
    notes: list[str] = []
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = byte_alphabet()
    spelled_chars = set(alphabet.values())

    def spelled(tok: str) -> bool:
        return set(tok) <= spelled_chars

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        key = tok if spelled(tok) else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[key] = i  # a spelling listed twice keeps its last id (so does transformers' conversion)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre in SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        if pre not in GPT2_NAMES:
            notes.append(f"tokenizer.ggml.pre {pre!r} is not known here; using GPT-2's pre-tokenizer regex "
                         f"(check the tokenization of digits and punctuation against the original)")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    # Control tokens stay whole as special tokens; one not spelled in the byte alphabet would be a new id
    # past the vocabulary (a llama.cpp mislabel), so it is left out. User-defined tokens are matched whole too.
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == CONTROL and spelled(t)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)

    def token_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    first = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    second = ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = {t: vocab_id(vocab, t) for t, on in ((bos, add_bos), (eos, add_eos)) if on}
    tok.post_processor = processors.TemplateProcessing(single=" ".join(first), pair=" ".join(first + second),
                                                       special_tokens=list(special.items()))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos,
        "unk_token": token_at("unknown_token_id"), "pad_token": token_at("padding_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return GGUFTokenizer(tokenizer_json=tok.to_str(pretty=False), tokenizer_config=config, notes=notes)


def vocab_id(vocab: dict[str, int], token: str) -> int:
    return vocab[token] if token in vocab else vocab["".join(byte_alphabet()[b] for b in token.encode("utf-8"))]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
