"""Encoding many distinct prompts does not grow memory: a BPE tokenizer's cache of encoded "words" holds whole
prompts where the pre-tokenizer does not split at spaces (gemma's), and by default it took 10,000 of them, a few
KB each, for the life of a server (docs/reliability.md)."""

from __future__ import annotations

import ctypes
import gc
import random

import pytest

from tokenloom.config import ModelConfig
from tokenloom.loader import load_tokenizer


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _in_use() -> int:
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().uordblks


def test_distinct_prompts_do_not_fill_a_cache():
    try:
        _in_use()
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2 here")
    tokenizer = load_tokenizer(ModelConfig(model="gemma-3-270m"))
    rng, words = random.Random(0), ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]

    def encode(n: int) -> None:
        for _ in range(n):
            tokenizer.encode(" ".join(rng.choices(words, k=rng.randint(20, 60))))

    encode(2000)
    before = _in_use()
    encode(4000)
    grown = _in_use() - before
    assert grown < 2**20, f"{grown / 2**20:.1f} MiB more after 4,000 distinct prompts"  # uncapped: ~12 MiB
