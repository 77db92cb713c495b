"""Runs `tokenloom` with a thread that records where the process's memory goes, for the soak (issue 17):

    .venv/bin/python benchmarks/memwatch.py OUT.jsonl serve MODEL ...   # the arguments of `tokenloom`

Every `TOKENLOOM_MEMWATCH_SECONDS` (default 60) it appends one JSON line to OUT.jsonl: RssAnon; glibc's
`mallinfo2` (bytes malloc has handed out and not had back, bytes free inside its heaps, bytes in mmapped
blocks); Python's allocated blocks; and the count of live objects of each type that grew since the first
line. Memory in use by malloc that grows with requests is a leak (Python objects if the counts grow with it,
native otherwise); free bytes inside the heap that grow are fragmentation; neither growing while RssAnon does
points at pages outside malloc (torch's own allocator, thread stacks).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap": info.arena, "in_use": info.uordblks, "free_in_heap": info.fordblks, "mmapped": info.hblkhd}


def _rss_anon() -> int:
    match = re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def _watch(out: Path, every: float) -> None:
    baseline: Counter | None = None
    start = time.monotonic()
    while True:
        time.sleep(every)
        counts = Counter(type(o).__name__ for o in gc.get_objects())
        baseline = baseline or counts
        grown = {k: v - baseline.get(k, 0) for k, v in counts.most_common(400) if v - baseline.get(k, 0) > 50}
        line = {"t": round(time.monotonic() - start), "rss_anon": _rss_anon(), **_mallinfo(),
                "py_blocks": sys.getallocatedblocks(), "gc_objects": sum(counts.values()),
                "threads": threading.active_count(),
                "grown_types": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:15])}
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    every = float(os.environ.get("TOKENLOOM_MEMWATCH_SECONDS", "60"))
    threading.Thread(target=_watch, args=(out, every), daemon=True, name="memwatch").start()
    from tokenloom.cli import main as tokenloom_main

    return tokenloom_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
