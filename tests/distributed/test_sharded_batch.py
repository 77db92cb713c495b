"""`tokenloom run --ray --replicas 2`: the batches shared out over two pipeline replicas on a local Ray give the
single-machine run's output byte for byte, and a sharded run killed (SIGKILL) mid-write resumes to it."""

from __future__ import annotations

import signal

import pytest

from tests.pipelines.test_batch_kills import LINES, case, cli, finish  # noqa: F401 - case is a fixture

pytest.importorskip("ray")
RAY = ("--ray", "--replicas", "2")


def test_a_sharded_run_equals_the_single_machine_run_and_resumes_after_kills(case, tmp_path):  # noqa: F811
    out = tmp_path / "out.jsonl"
    summary = finish(cli(case.plain, case.data, out, extra=RAY))
    assert summary.startswith(f"{len(LINES)} rows (0 done before, {len(LINES)} run now, 2 failed)")
    assert out.read_bytes() == case.reference
    out.unlink()
    ref = case.reference
    starts = [0] + [i + 1 for i, b in enumerate(ref) if b == ord("\n")]
    for at in (starts[2] + 5, starts[9]):  # mid-row, and on a row boundary (rows land in the order they finish)
        proc = cli(case.plain, case.data, out, kill_at=at, extra=RAY)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, err
        assert len(out.read_bytes()) == at
    summary = finish(cli(case.plain, case.data, out, extra=RAY))
    assert summary.startswith(f"{len(LINES)} rows (")
    assert out.read_bytes() == ref
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
