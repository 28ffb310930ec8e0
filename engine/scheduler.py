"""The continuous-batching scheduler: pure Python, no model, no torch (unit-testable on its own).

Each engine step is `schedule() -> run() -> postprocess()`. `schedule()` decides which tokens of which
sequences the model computes this step, within a token budget:

1. every running sequence that has a token not yet in its KV slot gets it (a decode row: one token);
2. running sequences still prefilling get their next chunk (at most `prefill_chunk` tokens);
3. waiting sequences are admitted in arrival order while a KV slot and budget remain: each gets a slot,
   its tier (an explicit one, or the policy's auto tier of that moment: fixed from then on) and its
   first prefill chunk. A sequence whose tier is not `ready` (an on-demand tier still being built beside
   the model thread) stays waiting without holding up the sequences behind it.

A row whose chunk reaches the last known token of its sequence is marked `sample`: the runner returns the
logits there and the engine appends the chosen token in postprocess (`Sequence.output_ids`), which makes
that token the next step's decode input. `advance()` records what was computed; `finish()` / `abort()`
free the slot at once.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .api import EngineOverloadedError
from .options import EngineConfig, default_of

if TYPE_CHECKING:  # pragma: no cover
    from .tiers import TierSpec


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. `data` is the engine's own per-request state."""

    request_id: str
    prompt_ids: list[int]
    tier: TierSpec | None = None  # resolved when added; None = auto until admission
    data: Any = None
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens whose keys/values are in the slot
    status: SeqStatus = SeqStatus.WAITING

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)


@dataclass(frozen=True)
class ScheduledRow:
    """Compute `length` tokens of `seq` from position `start` (= seq.num_cached) in its slot."""

    seq: Sequence
    start: int
    length: int
    sample: bool  # the chunk ends at the last known token: sample the next one from its logits

    @property
    def token_ids(self) -> list[int]:
        return self.seq.tokens[self.start:self.start + self.length]


@dataclass
class SchedulerOutput:
    """What one step computes. Decode rows have one token; prefill rows have more (padded together)."""

    rows: list[ScheduledRow] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def decode_rows(self) -> list[ScheduledRow]:
        return [r for r in self.rows if r.length == 1]

    @property
    def prefill_rows(self) -> list[ScheduledRow]:
        return [r for r in self.rows if r.length > 1]

    @property
    def empty(self) -> bool:
        return not self.rows


class SlotAllocator:
    """KV cache slots 0..n-1; the lowest free slot first (deterministic)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.total = num_slots
        self._free = list(range(num_slots))

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.total:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)

    @property
    def used(self) -> int:
        return self.total - len(self._free)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler: EngineConfig's `max_batch` (here `num_slots`), `max_waiting`, `prefill_chunk`
    and `max_step_tokens`, with EngineConfig's defaults and meaning (engine/options.py documents them)."""

    num_slots: int = default_of("max_batch")
    max_waiting: int = default_of("max_waiting")
    prefill_chunk: int = default_of("prefill_chunk")
    max_step_tokens: int = default_of("max_step_tokens")

    @classmethod
    def of(cls, config: EngineConfig) -> SchedulerConfig:
        return cls(config.max_batch, config.max_waiting, config.prefill_chunk, config.max_step_tokens)

    def __post_init__(self) -> None:
        for name in ("num_slots", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_step_tokens < self.num_slots:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= num_slots ({self.num_slots}) "
                             "so every running sequence can decode each step")


class Scheduler:
    """Waiting queue, running set and KV slots; see the module docstring."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.slots = SlotAllocator(config.num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._by_id: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(len(self.waiting), self.config.max_waiting)
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        if not seq.prompt_ids:
            raise ValueError(f"request {seq.request_id!r}: empty prompt (at least one token is needed)")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, auto_tier: TierSpec, ready: Callable[[TierSpec], bool] | None = None) -> SchedulerOutput:
        """Pick this step's rows (module docstring); `auto_tier` is given to auto sequences admitted now;
        waiting sequences whose tier fails `ready` are passed over (None: every tier is ready)."""
        out = SchedulerOutput()
        budget = self.config.max_step_tokens
        for seq in self.running:  # decodes first: one token each, always fits (max_step_tokens >= slots)
            if not seq.prefilling and seq.num_cached < seq.total_len:
                out.rows.append(ScheduledRow(seq, seq.num_cached, 1, sample=True))
                budget -= 1
        for seq in self.running:
            if seq.prefilling and budget > 0:
                budget -= self._chunk(out, seq, budget)
        passed: list[Sequence] = []
        while self.waiting and budget > 0 and self.slots.used < self.slots.total:
            seq = self.waiting.popleft()
            if ready is not None and not ready(seq.tier or auto_tier):
                passed.append(seq)
                continue
            seq.slot = self.slots.allocate()
            seq.status = SeqStatus.RUNNING
            if seq.tier is None:
                seq.tier = auto_tier
            self.running.append(seq)
            out.admitted.append(seq)
            budget -= self._chunk(out, seq, budget)
        self.waiting.extendleft(reversed(passed))  # back at the front, in arrival order
        return out

    def _chunk(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        n = min(len(seq.prompt_ids) - seq.num_cached, self.config.prefill_chunk, budget)
        end = seq.num_cached + n
        out.rows.append(ScheduledRow(seq, seq.num_cached, n, sample=end == seq.total_len))
        return n

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the rows' tokens are now cached (rows of sequences finished meanwhile are skipped)."""
        for row in out.rows:
            if row.seq.status is SeqStatus.RUNNING:
                row.seq.num_cached = row.start + row.length

    def finish(self, request_id: str) -> Sequence | None:
        """Remove a sequence (finished or aborted), freeing its slot now; None when it is not here."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.slots.free(seq.slot)
        seq.status = SeqStatus.FINISHED
        return seq

    abort = finish
