"""Pinning the stepping thread's torch threads to CPUs (`cpu_bind`)."""

from __future__ import annotations

import os
import threading

import pytest

from tokenloom import SamplingParams
from tokenloom.config import ConfigError, parse_cpu_bind
from tokenloom.cpus import physical_cores
from tokenloom.llm import LLM
from tokenloom.models import ops


def test_cpu_bind_specs():
    assert parse_cpu_bind("none") is None
    assert parse_cpu_bind("0,2") == [0, 2] and parse_cpu_bind("1-3,6") == [1, 2, 3, 6]
    cores = parse_cpu_bind("cores")
    assert cores == physical_cores() and cores and set(cores) <= os.sched_getaffinity(0)


def test_a_bad_cpu_bind_is_a_config_error(tiny_models):
    with pytest.raises(ConfigError, match="cpu_bind must be none, cores, or CPU ids"):
        LLM(str(tiny_models["llama"]), kv_cache_gib=0.01, cpu_bind="all of them")


@pytest.mark.skipif(ops.kernels() is None, reason="pinning runs through the native kernels")
def test_the_stepping_thread_is_pinned_and_outputs_do_not_change(tiny_models):
    """Run in a thread of its own, so the test process's main thread stays unpinned."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(str(tiny_models["llama"]), kv_cache_gib=0.01).generate([[5, 6, 7]], params, use_tqdm=False)
    seen = {}

    def run() -> None:
        llm = LLM(str(tiny_models["llama"]), kv_cache_gib=0.01, cpu_bind=str(cpu))
        seen["out"] = llm.generate([[5, 6, 7]], params, use_tqdm=False)
        seen["affinity"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["affinity"] == {cpu}
    assert seen["out"][0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert os.sched_getaffinity(0) == before  # this thread untouched
