"""The scheduler alone: no model, no tensors."""

from __future__ import annotations

import pytest
from sparsedial.engine.api import EngineOverloadedError
from sparsedial.engine.scheduler import Scheduler, SchedulerConfig, SeqStatus, Sequence, SlotAllocator


def seq(rid: str, n: int = 3, tier: str | None = None) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), tier=tier)


def step(s: Scheduler, auto: str = "dense", sampled: int = 7):
    """schedule -> (pretend) run -> postprocess: advance, and append a token to every sampling row."""
    out = s.schedule(auto)
    s.advance(out)
    for r in out.rows:
        if r.sample:
            r.seq.output_ids.append(sampled)
    return out


def test_admits_fifo_into_free_slots_and_the_rest_waits():
    s = Scheduler(SchedulerConfig(num_slots=2, max_step_tokens=64))
    for i in range(3):
        s.add(seq(f"r{i}"))
    out = step(s)
    assert [q.request_id for q in out.admitted] == ["r0", "r1"]
    assert [(r.seq.request_id, r.start, r.length, r.sample) for r in out.rows] == [("r0", 0, 3, True),
                                                                                 ("r1", 0, 3, True)]
    assert [q.slot for q in out.admitted] == [0, 1] and [q.request_id for q in s.waiting] == ["r2"]
    out = step(s)  # decode rows: one token each, at the position after the prompt
    assert [(r.start, r.length, r.token_ids) for r in out.rows] == [(3, 1, [7]), (3, 1, [7])]
    assert out.decode_rows == out.rows and not out.prefill_rows


def test_long_prompt_is_prefilled_in_chunks_and_samples_once():
    s = Scheduler(SchedulerConfig(num_slots=1, prefill_chunk=4, max_step_tokens=16))
    s.add(seq("long", n=10))
    chunks = [step(s).rows[0] for _ in range(3)]
    assert [(c.start, c.length, c.sample) for c in chunks] == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert chunks[1].token_ids == [5, 6, 7, 8]
    assert step(s).rows[0].start == 10  # then decodes


def test_step_token_budget_puts_decodes_first():
    s = Scheduler(SchedulerConfig(num_slots=3, prefill_chunk=8, max_step_tokens=5))
    s.add(seq("a", n=2))
    step(s)  # a prefilled
    s.add(seq("b", n=8))
    out = step(s)
    assert [(r.seq.request_id, r.length) for r in out.rows] == [("a", 1), ("b", 4)]  # 1 decode + 4 of budget
    out = step(s)
    assert [(r.seq.request_id, r.start, r.length) for r in out.rows] == [("a", 3, 1), ("b", 4, 4)]


def test_abort_frees_the_slot_at_once_and_the_next_request_takes_it():
    s = Scheduler(SchedulerConfig(num_slots=1, max_step_tokens=8))
    s.add(seq("a"))
    s.add(seq("b"))
    out = step(s)
    assert s.slots.used == 1 and out.admitted[0].request_id == "a"
    a = s.abort("a")
    assert a.status is SeqStatus.FINISHED and s.slots.used == 0 and s.abort("a") is None
    out = step(s)
    assert out.admitted[0].request_id == "b" and out.admitted[0].slot == 0
    s.abort("b")
    assert not s.has_work


def test_rows_of_a_sequence_aborted_during_the_step_are_not_advanced():
    s = Scheduler(SchedulerConfig(num_slots=1, max_step_tokens=8))
    s.add(seq("a"))
    out = s.schedule("dense")
    s.abort("a")
    s.advance(out)
    assert out.rows[0].seq.num_cached == 0


def test_tier_is_fixed_at_admission():
    s = Scheduler(SchedulerConfig(num_slots=1, max_step_tokens=8))
    s.add(seq("auto"))
    s.add(seq("explicit", tier="2:4"))
    s.add(seq("auto2"))
    assert step(s, auto="50%").admitted[0].tier == "50%"
    step(s, auto="dense")
    assert s.get("auto").tier == "50%"  # the policy moved; the running request keeps its tier
    s.abort("auto")
    assert step(s, auto="70%").admitted[0].tier == "2:4"  # explicit tier wins over the policy
    s.abort("explicit")
    assert step(s, auto="70%").admitted[0].tier == "70%"


def test_overload_and_bad_requests():
    s = Scheduler(SchedulerConfig(num_slots=1, max_waiting=2, max_step_tokens=8))
    s.add(seq("a"))
    s.add(seq("b"))
    with pytest.raises(EngineOverloadedError, match="2 requests waiting"):
        s.add(seq("c"))
    with pytest.raises(ValueError, match="'a' is already"):
        step(s)
        s.add(seq("a"))
    with pytest.raises(ValueError, match="empty prompt"):
        s.add(Sequence("e", []))


def test_slot_allocator_lowest_first():
    a = SlotAllocator(3)
    assert [a.allocate() for _ in range(3)] == [0, 1, 2] and a.allocate() is None
    a.free(1)
    a.free(0)
    assert a.allocate() == 0 and a.used == 2
    with pytest.raises(ValueError, match="slot 2 is not"):
        a.free(2) or a.free(2)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_slots=0), "num_slots"), (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(max_waiting=-1), "max_waiting"), (dict(num_slots=8, max_step_tokens=4), "max_step_tokens"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)
