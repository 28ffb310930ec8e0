"""The model side of a step (`ModelRunner.run`) and the synchronous engine loop (`EngineCore`).

`EngineCore.step()` is the serving loop, three calls: `schedule()` (scheduler.py, under the lock) ->
`run()` (the model forwards, outside the lock) -> `postprocess()` (sampling results become tokens, text,
events, finished requests; under the lock). AsyncEngine runs `step()` in a background thread; the CLI,
tests and benchmarks call it directly.

A step runs at most two forwards: the decode rows ([B, 1]) and the prefill rows (right-padded to
[B, T]). A request's tier is resolved once, when it is added (a `TierSpec`; auto requests get the policy's
tier at admission). Each step makes its tiers resident once (`ElasticModel.ensure`), sorts the rows of
each forward by tier and passes the per-row tiers to the model as a `TierPlan` argument, so a batch
mixes tiers while the decoder only hands the plan on to its projections.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .api import (
    EngineStats,
    FinishEvent,
    FinishReason,
    PolicySpec,
    PromptTooLongError,
    StreamEvent,
    Timings,
    TokenEvent,
    TokenLogprob,
)
from .elastic import ElasticModel
from .options import EngineConfig, LoadSignal
from .policy import TierPolicy
from .sampling import SamplingParams, TextStream, select_token, top_logprobs
from .scheduler import ScheduledRow, Scheduler, SchedulerConfig, SchedulerOutput, SeqStatus, Sequence
from .tier_builder import TierBuilder
from .tiers import TierPlan, TierSpec

Sink = Callable[[StreamEvent], None]


class ModelRunner:
    """Turns a SchedulerOutput into model forwards over the static per-slot KV cache."""

    def __init__(self, em: ElasticModel, num_slots: int, max_seq_len: int, prefill_chunk: int) -> None:
        self.em = em
        self.evict = True  # False when a TierBuilder owns the on-demand tier cache (AsyncEngine)
        self.device = em.model.model.embed_tokens.weight.device
        # headroom: right-padded prefill rows write up to prefill_chunk - 1 positions past their end
        em.model.setup_cache(num_slots, max_seq_len + prefill_chunk)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[ScheduledRow], torch.Tensor]:
        """Compute every row; return the rows that sample and their last-position logits [N, V] (fp32)."""
        rows: list[ScheduledRow] = []
        logits: list[torch.Tensor] = []
        self.em.ensure({r.seq.tier.name for r in out.rows}, evict=self.evict)  # once per step, all its tiers
        for group in (out.decode_rows, out.prefill_rows):
            if group:
                done, lg = self._forward(group)
                keep = [i for i, r in enumerate(done) if r.sample]
                rows += [done[i] for i in keep]
                logits.append(lg[keep].float())
        if not logits:
            return [], torch.empty(0)
        return rows, torch.cat(logits)

    def _forward(self, rows: list[ScheduledRow]) -> tuple[list[ScheduledRow], torch.Tensor]:
        # rows of a tier contiguous; within a tier by slot, so cache rows are often one range (read as a view)
        rows = sorted(rows, key=lambda r: (r.seq.tier.name, r.seq.slot))
        T = max(r.length for r in rows)
        tokens = torch.tensor([r.token_ids + [0] * (T - r.length) for r in rows], device=self.device)  # [B, T]
        start = torch.tensor([r.start for r in rows], device=self.device)
        positions = start[:, None] + torch.arange(T, device=self.device)  # [B, T]; padding continues on
        slots = torch.tensor([r.seq.slot for r in rows], device=self.device)  # [B]
        last = torch.tensor([r.length - 1 for r in rows], device=self.device)  # [B]
        plan = TierPlan.from_rows([r.seq.tier for r in rows])
        return rows, self.em.model(tokens, positions, slots, logit_index=last, plan=plan)  # [B, V]


@dataclass(eq=False)
class RequestState:
    """The engine's per-request state (Sequence.data)."""

    params: SamplingParams
    sink: Sink
    text: TextStream
    generator: torch.Generator | None
    submitted: float
    admitted: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)


class EngineCore:
    """Synchronous engine: add requests, call `step()` until `has_work` is False. Thread-safe add/abort."""

    def __init__(self, em: ElasticModel, config: EngineConfig) -> None:
        self.em, self.config, self.tokenizer = em, config, em.tokenizer
        self.max_context = min(config.max_seq_len or em.config.max_position_embeddings,
                               em.config.max_position_embeddings)
        self.scheduler = Scheduler(SchedulerConfig.of(config))
        self.runner = ModelRunner(em, config.max_batch, self.max_context, config.prefill_chunk)
        self.policy = TierPolicy(config.policy, em.resolve)
        self.eos = set(em.config.eos_token_ids)
        self.vocab_size = em.config.vocab_size
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self.builder: TierBuilder | None = None  # set by AsyncEngine: on-demand tiers built off this thread

    # ----------------------------------------------------------------------------------------- requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; ValueError for ids outside the vocabulary (they would index past the
        embedding table and fail every request batched with this one)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        return list(prompt)

    def add(self, prompt: str | list[int], params: SamplingParams, tier: object, sink: Sink,
            request_id: str | None = None) -> str:
        """Queue a request; its events go to `sink` (from the stepping thread). Raises PromptTooLongError,
        UnknownTierError, EngineOverloadedError, ValueError (empty prompt, duplicate id)."""
        ids = self.encode(prompt)
        resolved = self.em.resolve(tier)  # a TierSpec from the server's admission is checked, not re-parsed
        if len(ids) + params.max_tokens > self.max_context:
            raise PromptTooLongError(len(ids), params.max_tokens, self.max_context)
        now = time.monotonic()
        rid = request_id or f"req-{next(self._ids)}"
        state = RequestState(params, sink, TextStream(self.tokenizer, ids, params.stop),
                             params.make_generator(self.runner.device), now)
        seq = Sequence(rid, ids, tier=resolved, data=state)
        with self.lock:
            self.scheduler.add(seq)
            if params.max_tokens == 0:
                self._finish(seq, "length")
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request now (its slot is free on return); it gets a 'cancelled' FinishEvent."""
        with self.lock:
            seq = self.scheduler.get(request_id)
            if seq is None:
                return False
            self._finish(seq, "cancelled")
            return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ----------------------------------------------------------------------------------------- the loop
    def step(self) -> int:
        """One schedule -> run -> postprocess iteration; returns the number of rows computed."""
        with self.lock:
            out = self.schedule()
        if out.empty:
            return 0
        try:
            rows, logits = self.runner.run(out)
        except Exception as e:  # noqa: BLE001 - find the rows that fail, fail those alone
            rows, logits = self._run_isolated(out, e)
        with self.lock:
            self.postprocess(out, rows, logits)
        return len(out.rows)

    def _run_isolated(self, out: SchedulerOutput, error: Exception) -> tuple[list[ScheduledRow], torch.Tensor]:
        """The batched forward raised: run each row alone, so only the rows that fail alone fail (with their
        own error). A row's forward writes only its own KV slot at its own positions, so recomputing it is
        exact and the survivors get the tokens they would get without the failing row."""
        if len(out.rows) == 1:
            self._fail_rows(out.rows, error)
            return [], torch.empty(0)
        rows: list[ScheduledRow] = []
        logits: list[torch.Tensor] = []
        for row in out.rows:
            try:
                got, lg = self.runner.run(SchedulerOutput(rows=[row]))
            except Exception as e:  # noqa: BLE001 - this row's own failure
                self._fail_rows([row], e)
                continue
            rows += got
            logits.append(lg)
        return rows, (torch.cat(logits) if rows else torch.empty(0))

    def _fail_rows(self, rows: list[ScheduledRow], error: Exception) -> None:
        with self.lock:
            for row in rows:
                if row.seq.status is SeqStatus.RUNNING:
                    self._finish(row.seq, "error", error=f"{type(error).__name__}: {error}")

    def schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule(self.policy.update(self.load()), self._tier_ready if self.builder else None)
        now = time.monotonic()
        for seq in out.admitted:
            seq.data.admitted = now
        return out

    def _tier_ready(self, tier: TierSpec) -> bool:
        """Scheduler admission test with a TierBuilder: a tier not yet built is queued for building."""
        if self.em.is_ready(tier.name):
            return True
        self.builder.request(tier.name)  # type: ignore[union-attr]
        return False

    def tiers_in_use(self) -> set[str]:
        """Tiers that live requests or the policy's current auto tier need (never evicted from the on-demand
        cache). The ladder's other tiers are not held: a ladder naming more on-demand tiers than the cache
        holds must not wedge it."""
        s = self.scheduler
        return {seq.tier.name for seq in [*s.running, *s.waiting] if seq.tier} | {self.policy.tier.name}

    def fail_all(self, message: str) -> None:
        """Fail every request in flight with `message` (the engine cannot go on); under the lock."""
        with self.lock:
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self._finish(seq, "error", error=message)

    def fail_waiting(self, tier: str, message: str) -> None:
        """Fail the waiting requests of `tier` (its build failed); under the lock."""
        for seq in [q for q in self.scheduler.waiting if (q.tier or self.policy.tier).name == tier]:
            self._finish(seq, "error", error=message)

    def load(self) -> float:
        s = self.scheduler
        if self.policy.spec.signal is LoadSignal.KV:
            return s.slots.used / s.slots.total
        return len(s.waiting) + len(s.running)

    def postprocess(self, out: SchedulerOutput, rows: list[ScheduledRow], logits: torch.Tensor) -> None:
        """Sample, detokenize and stream each row. Everything here is per request: a row whose logits are not
        finite, or whose sampling or text handling raises, fails alone; the others go on."""
        self.scheduler.advance(out)
        finite = torch.isfinite(logits).all(-1).tolist() if rows else []
        live = []
        for i, r in enumerate(rows):
            if r.seq.status is not SeqStatus.RUNNING:  # aborted meanwhile
                continue
            if not finite[i]:
                self._finish(r.seq, "error", error="the model produced non-finite logits (NaN or inf) for this "
                                                   "request")
                continue
            live.append(i)
        if not live:
            return
        rows, logits = [rows[i] for i in live], logits[live]
        states: list[RequestState] = [r.seq.data for r in rows]
        tokens = self._sample(rows, logits, states)
        want = [i for i, s in enumerate(states) if s.params.logprobs is not None and tokens[i] is not None]
        lps = {}
        if want:
            k = max(states[i].params.logprobs for i in want)
            found = top_logprobs(logits[want], [tokens[i] for i in want], k)
            lps = {i: self._logprob(tokens[i], found[j], states[i].params.logprobs) for j, i in enumerate(want)}
        now = time.monotonic()
        for i, (row, tok, st) in enumerate(zip(rows, tokens, states)):
            if tok is None:
                continue
            try:
                self._accept(row.seq, st, tok, lps.get(i), now)
            except Exception as e:  # noqa: BLE001 - e.g. a detokenizer error: this request's own
                self._fail_rows([row], e)

    def _sample(self, rows: list[ScheduledRow], logits: torch.Tensor, states: list[RequestState]) -> list[int | None]:
        """The next token of each row: one argmax for all greedy rows, a seeded draw of its own for each sampled
        row (so a row's token never depends on its batch); a row whose draw raises is failed and gets None."""
        argmax = torch.argmax(logits, dim=-1).tolist()  # [B]
        tokens: list[int | None] = []
        for i, (row, st) in enumerate(zip(rows, states)):
            if st.params.greedy:
                tokens.append(argmax[i])
                continue
            try:
                tokens.append(select_token(logits[i], st.params, st.generator))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._finish(row.seq, "error", error=f"sampling failed: {type(e).__name__}: {e}")
                tokens.append(None)
        return tokens

    def _logprob(self, tok: int, found: tuple[float, list[tuple[int, float]]], k: int) -> TokenLogprob:
        dec = self.tokenizer.decode
        top = tuple((t, dec([t]), lp) for t, lp in found[1][:k])
        return TokenLogprob(tok, dec([tok]), found[0], top)

    def _accept(self, seq: Sequence, st: RequestState, tok: int, logprob: TokenLogprob | None, now: float) -> None:
        p = st.params
        if st.first_token is None:
            st.first_token = now
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(seq, "stop")  # the end token is not part of the completion
            return
        seq.output_ids.append(tok)
        st.token_times.append(now)
        piece = st.text.push(tok)
        reason: FinishReason | None = None
        if st.text.stopped:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason:
            piece += st.text.flush()
        st.sink(TokenEvent(len(seq.output_ids) - 1, tok, piece, logprob))
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End a request with its FinishEvent; one still waiting (auto) is reported at the policy's tier."""
        seq.tier = seq.tier or self.policy.tier
        self.scheduler.finish(seq.request_id)
        st: RequestState = seq.data
        now = time.monotonic()
        t = st.token_times
        timings = Timings(queue=(st.admitted or now) - st.submitted,
                          ttft=None if st.first_token is None else st.first_token - st.submitted,
                          e2e=now - st.submitted, inter_token=tuple(b - a for a, b in zip(t, t[1:])))
        st.sink(FinishEvent(reason, st.text.text, seq.tier.name, len(seq.prompt_ids), len(seq.output_ids),
                            timings, error))

    # ----------------------------------------------------------------------------------------- control
    def set_policy(self, policy: PolicySpec) -> None:
        new = TierPolicy(policy, self.em.resolve)  # validates before anything changes
        with self.lock:
            self.policy = new

    def stats(self) -> EngineStats:
        """Counts now, and the tier an auto request admitted now would get: the policy is evaluated at the
        current load (as a step would), so an idle engine does not report the tier of its last busy step."""
        with self.lock:
            s = self.scheduler
            tier = self.policy.update(self.load())
            return EngineStats(running=len(s.running), waiting=len(s.waiting), kv_slots_used=s.slots.used,
                               kv_slots_total=s.slots.total, current_auto_tier=tier.name)

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams],
                 tiers: object | list[object] = None) -> list[Generation]:
        """Run prompts to completion in this thread (CLI, tests, benchmarks): one Generation per prompt."""
        n = len(prompts)
        per_params = params if isinstance(params, list) else [params] * n
        per_tier = tiers if isinstance(tiers, list) else [tiers] * n
        if len(per_params) != n or len(per_tier) != n:
            raise ValueError(f"{len(per_params)} SamplingParams and {len(per_tier)} tiers for {n} prompts")
        results = [Generation() for _ in range(n)]
        for prompt, p, t, g in zip(prompts, per_params, per_tier, results):
            self.add(prompt, p, t, g.events.append)
        while self.has_work:
            self.step()
        return results


@dataclass
class Generation:
    """Everything one request streamed, collected (EngineCore.generate)."""

    events: list[StreamEvent] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def finish(self) -> FinishEvent:
        last = self.events[-1]
        assert isinstance(last, FinishEvent), "the request has not finished"
        return last
