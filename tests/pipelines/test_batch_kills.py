"""`tokenloom run` killed with SIGKILL at many points, and resumed after each, ends with the bytes of an
uninterrupted run: kills at exact byte counts of the output (in the first row, mid-row, inside a multi-byte
character, just before a newline, on a row boundary, before the final rewrite) and at seeded random moments
of real runs."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KILL_AT = "TOKENLOOM_TEST_KILL_AT"
SLEEP = 0.15  # seconds per batch in the randomly killed runs, so that most kills land while rows are written
LONG = "The quick brown fox jumps over the lazy dog. " * 40
# One line per input row: multi-byte characters to cut, separators that json.dumps leaves raw (U+2028, U+0085)
# and two failed rows (not JSON; a prompt over max_model_len).
LINES = [json.dumps(r, ensure_ascii=False) for r in [
    "Hello world", "The quick brown fox", "café naïve", "emoji 🙂 and 🚀"]] + ["{not json"] + \
    [json.dumps(r, ensure_ascii=False) for r in [
        "Paged\u2028attention", LONG, "continuous\x85batching", {"text": "Numbers 0123456789"}, "中文字符",
        "lazy dog", "résumé", "Hello"]]


def child() -> None:
    """`tokenloom` in a subprocess, with the test's sleep step; with TOKENLOOM_TEST_KILL_AT=N it SIGKILLs
    itself as soon as its --output holds N bytes, cutting the write that crosses N there, as a kill landing
    in the middle of a write does."""
    from tests.pipelines.test_batch_run import Sleep
    from tokenloom.cli import main
    from tokenloom.pipelines import register_step

    register_step("postprocess", "sleep", Sleep)
    if KILL_AT in os.environ:
        _die_at(int(os.environ[KILL_AT]), Path(sys.argv[sys.argv.index("--output") + 1]))
    sys.exit(main(sys.argv[1:]))


def _die_at(size: int, output: Path) -> None:
    real_open = Path.open

    class Dying:
        """The output opened for appending: written through at each flush, up to `size` bytes."""

        def __init__(self, f) -> None:
            self.f, self.pending = f, []

        def write(self, text: str) -> int:
            self.pending.append(text)
            return len(text)

        def flush(self) -> None:
            data = "".join(self.pending).encode("utf-8")
            self.pending.clear()
            room = size - os.fstat(self.f.fileno()).st_size
            if len(data) >= room:
                self.f.write(data[:max(room, 0)])
                os.kill(os.getpid(), signal.SIGKILL)
            self.f.write(data)

        def fileno(self) -> int:
            return self.f.fileno()

        def __enter__(self) -> Dying:
            return self

        def __exit__(self, *exc) -> None:
            self.flush()
            self.f.close()

    def open_(self, mode="r", *args, **kwargs):
        if mode.startswith("a") and self == output:
            return Dying(real_open(self, "ab", buffering=0))
        return real_open(self, mode, *args, **kwargs)

    Path.open = open_


def cli(pipeline: Path, data: Path, out: Path, kill_at: int | None = None, extra: tuple[str, ...] = ()
        ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != KILL_AT}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **({KILL_AT: str(kill_at)} if kill_at is not None else {}))
    return subprocess.Popen([sys.executable, "-c", "from tests.pipelines.test_batch_kills import child; child()",
                             "run", str(pipeline), "--input", str(data), "--output", str(out), "--quiet", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for an uninterrupted run; its summary line."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err.strip().splitlines()[-1]


def kept_rows(output: bytes) -> int:
    """How many rows a resume keeps of an output that is a prefix of the reference: the whole lines, and a
    last line whose JSON is whole but whose newline was cut."""
    *whole, last = output.split(b"\n")
    try:
        json.loads(last)
    except ValueError:
        return len(whole)
    return len(whole) + 1


@dataclass
class Case:
    plain: Path
    slow: Path
    data: Path
    reference: bytes


@pytest.fixture(scope="module")
def case(tiny_models, tmp_path_factory) -> Case:
    """The pipeline (greedy, small batches), the input, and the output of one uninterrupted run."""
    root = tmp_path_factory.mktemp("kills")
    plain, slow, data = root / "pipeline.yaml", root / "slow.yaml", root / "data.jsonl"
    text = (f"task: text-generation\nmodel: {tiny_models['llama']}\n"
            "engine: {dtype: float32, kv_cache_gib: 0.02, max_model_len: 128, num_threads: 1}\n"
            "sampling: {temperature: 0, max_tokens: 5}\nbatch_size: 2\n")
    plain.write_text(text, encoding="utf-8")
    slow.write_text(text + f"postprocess: [{{sleep: {{seconds: {SLEEP}}}}}]\n", encoding="utf-8")
    data.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    reference = root / "reference.jsonl"
    finish(cli(plain, data, reference))
    rows = [json.loads(line) for line in reference.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["index"] for r in rows] == list(range(len(LINES)))
    assert [i for i, r in enumerate(rows) if "error" in r] == [4, 6]
    return Case(plain, slow, data, reference.read_bytes())


def test_kills_at_exact_bytes_of_the_output_resume_to_the_same_bytes(case, tmp_path):
    ref = case.reference
    starts = [0] + [i + 1 for i, b in enumerate(ref) if b == ord("\n")]
    inside = lambda char, row: ref.index(char.encode(), starts[row]) + 1  # after the character's first byte
    points = [
        1,                          # the first byte of the first row
        starts[1] + 9,              # mid-row 1: row 0 kept, row 1 run again in a batch with row 2
        starts[3] - 1,              # row 2 whole but for its newline
        inside("🙂", 3),             # inside a 4-byte character
        inside("\u2028", 5),        # inside a line separator that json.dumps leaves raw
        starts[6] + 1000,           # in the middle of a long failed row
        starts[8],                  # just after the newline of batch [6, 7] (row 7 has a raw U+0085), before its fsync
        inside("中", 9),
        len(ref) - 1,               # the last newline cut
        len(ref),                   # all rows kept, killed on closing the output, before the final rewrite
    ]
    assert points == sorted(set(points))
    out = tmp_path / "out.jsonl"
    for at in points:
        proc = cli(case.plain, case.data, out, kill_at=at)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err
        assert out.read_bytes() == ref[:at], f"killed at byte {at}"
    summary = finish(cli(case.plain, case.data, out))
    assert summary.startswith(f"{len(LINES)} rows ({len(LINES)} done before, 0 run now, 0 failed)")
    assert out.read_bytes() == ref
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_kills_at_seeded_random_moments_resume_to_the_same_bytes(case, tmp_path):
    ref, rng, out = case.reference, random.Random(17), tmp_path / "out.jsonl"
    kills = 0
    while kills < 3:
        before = out.stat().st_ino if out.exists() else None
        batches_left = math.ceil((len(LINES) - (kept_rows(out.read_bytes()) if out.exists() else 0)) / 2)
        proc = cli(case.slow, case.data, out)
        deadline = time.monotonic() + 120
        # the run has loaded its model once it has rewritten the output (what it keeps of it) into a new file
        while proc.poll() is None and not (out.exists() and out.stat().st_ino != before):
            assert time.monotonic() < deadline, "the run did not start in time"
            time.sleep(0.01)
        # up to one batch past the rows left, so that a kill may also land in the final rewrite, or too late
        time.sleep(rng.uniform(0, SLEEP * (batches_left + 1)))
        proc.kill()
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break  # it finished first
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        assert ref.startswith(out.read_bytes())
    assert kills  # the first delay (seeded) is shorter than the sleeps of the first run alone
    if kills == 3:
        finish(cli(case.slow, case.data, out))
    assert out.read_bytes() == ref
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
