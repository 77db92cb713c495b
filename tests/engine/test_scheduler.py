"""Scheduler: the token budget, chunked prefill, max_num_seqs, preemption and token-level stops."""

from tokenloom.config import SchedulerConfig
from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.request import Request, RequestStatus
from tokenloom.engine.scheduler import Scheduler
from tokenloom.sampling_params import SamplingParams


def make(budget=32, seqs=8, blocks=64, block_size=4, chunked=True, max_len=1000) -> Scheduler:
    kv = KVCacheManager(blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(budget, seqs, chunked), kv, max_len)


def req(rid: str, n: int, max_tokens: int = 8, **params) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=frozenset({0}), max_tokens=max_tokens)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {r.request_id: token for i, r in enumerate(out.requests) if out.samples(i)}
    s.update(out, {k: [v] for k, v in sampled.items()})
    return out


def test_prefill_is_chunked_by_the_token_budget():
    s = make(budget=10)
    s.add(req("a", 25))
    assert [run_step(s).num_tokens for _ in range(3)] == [[10], [10], [5]]
    a = s.running[0]
    assert a.num_computed_tokens == 25 and a.output_token_ids == [7]
    assert run_step(s).num_tokens == [1]


def test_running_requests_are_served_before_waiting_ones():
    s = make(budget=12)
    s.add(req("a", 10))
    run_step(s)
    s.add(req("b", 30))
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["a", "b"] and out.num_tokens == [1, 11]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    s = make(budget=12, chunked=False)
    s.add(req("a", 10))
    s.add(req("b", 10))
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["a"]


def test_max_num_seqs_limits_the_running_set():
    s = make(seqs=2)
    for i in range(4):
        s.add(req(str(i), 3))
    out = s.schedule()
    assert len(out.requests) == 2 and len(s.waiting) == 2


def test_preemption_frees_the_newest_request_and_requeues_it_first():
    s = make(budget=64, blocks=6, block_size=4)
    s.add(req("a", 8, max_tokens=20))
    s.add(req("b", 8, max_tokens=20))
    s.add(req("c", 7, max_tokens=20))
    run_step(s)  # a, b, c use 2 blocks each: pool full
    out = s.schedule()  # a needs a third block: c (newest) is preempted
    assert [r.request_id for r in out.preempted] == ["c"]
    c = s.waiting[0]
    assert c.request_id == "c" and c.status is RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0 and c.block_ids == [] and c.output_token_ids == [7]


def test_token_level_stops():
    s = make()
    s.add(req("len", 3, max_tokens=2))
    s.add(req("eos", 3, max_tokens=5))
    s.add(req("stoptok", 3, max_tokens=5, stop_token_ids=[9]))
    s.add(req("min", 3, max_tokens=5, min_tokens=2))
    out = s.schedule()
    finished = s.update(out, {"len": [7], "eos": [0], "stoptok": [9], "min": [0]})
    assert {r.request_id for r in finished} == {"eos", "stoptok"}
    by_id = {r.request_id: r for r in out.requests}
    assert by_id["stoptok"].stop_reason == 9
    out = s.schedule()
    finished = s.update(out, {r.request_id: [7] for r in out.requests})
    assert [r.request_id for r in finished] == ["len"]
    assert finished[0].status is RequestStatus.FINISHED_LENGTH
    assert by_id["min"].is_finished is False


def test_finish_frees_blocks_and_dequeues():
    s = make()
    s.add(req("a", 5))
    run_step(s)
    a = s.running[0]
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and s.kv.pool.num_free == 64 and a.finish_reason == "abort"
