"""Sampling parameters and next-token selection.

Greedy (temperature below `SAMPLING_EPS`, 0 included) is an exact argmax. Sampled decoding uses one `torch.Generator` per request, seeded
from `seed`, so a seeded request reproduces whatever else is in its batch. `TextStream` turns a request's
tokens into streamed text with stop strings; `top_logprobs` gives the logprobs of chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (as vLLM's `_SAMPLING_EPS`): dividing fp32 logits by 1e-38 overflows to
inf and softmax then gives NaN, so such a request could not be sampled at all."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise ValueError naming the field."""

    max_tokens: int = 64
    """Maximum number of tokens to generate (>= 0)."""
    temperature: float = 1.0
    """Below SAMPLING_EPS (0 included) means greedy; otherwise logits are divided by it before sampling (<= 100)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    seed: int | None = None
    """Seed of this request's own random generator; None draws one."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the returned text stops before the first one found."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (besides the model's end-of-sequence tokens)."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens."""
    logprobs: int | None = None
    """Return the log-probability of each chosen token and of this many top alternatives (0..20)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k / the top-p nucleus. logits: [V] fp32."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits [V]."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Log-probability (of the model's own distribution, before temperature/top-k/top-p) of each row's
    chosen token, and its `k` most likely alternatives. logits: [B, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logp[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist()
    if k == 0:
        return [(c, []) for c in chosen]
    vals, idx = torch.topk(logp, k, dim=-1)  # [B, k]
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, idx.tolist(), vals.tolist())]


class TextStream:
    """The text of one request, built token by token.

    Detokenizes incrementally (a window of the last tokens decoded with a few tokens of context, so
    multi-byte characters split across tokens and leading spaces come out right), finds stop strings
    even when they span several tokens, and holds back a tail of text that could be the start of a stop
    string, so streamed pieces never contain part of one. `text` is cut before the first stop string.
    """

    CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first output tokens

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        # the Rust tokenizer directly when there is one: transformers' decode() wrapper costs ~4x more per call
        fast = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else fast
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self._prefix = 0  # window start: tokens [prefix, read) are already in the text
        self._read = len(self._ids)
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._by_first: dict[str, list[str]] = {}
        for s in stop:
            self._by_first.setdefault(s[0], []).append(s)
        self.text = ""
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly emittable text (may be '')."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # \ufffd: an incomplete character
            old_len = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            if self.stop:
                self._find_stop(old_len)
        return self._emit(final=self.stopped)

    def _find_stop(self, old_len: int) -> None:
        start = max(0, old_len - self._max_stop + 1)  # a stop string may begin in earlier text
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string. Runs after every
        token, so only tails starting with some stop's first character are compared (16 stops of 256
        characters, benchmarks/bench_input_costs.py on a 2-core AMD EPYC: 261 us per token with every tail
        against every stop, 12-35 us on code text now, 188 us when text and stops are drawn from the same
        three letters; the server caps count and length)."""
        text, by_first = self.text, self._by_first
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            stops = by_first.get(text[-n])
            if stops and any(s.startswith(text[-n:]) for s in stops):
                return n
        return 0

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final or not self.stop else len(self.text) - self._held_back()
        piece = self.text[self.emitted:max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Everything not yet emitted (call when the request finishes)."""
        return self._emit(final=True)
