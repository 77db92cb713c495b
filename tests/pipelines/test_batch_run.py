"""`tokenloom run`: input order kept, a failing row recorded in that row, and an interrupted run (an
exception after N batches, or a process killed after its first flushed batch) resumed without redoing
finished rows, ending with the same file as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenloom.cli import main
from tokenloom.pipelines import load_pipeline, read_rows, register_step, run_file, unregister_step
from tokenloom.pipelines.batch import BatchInputError
from tokenloom.sampling_params import SamplingParams

ROWS = ["Hello world", "The quick brown fox", {"text": "Numbers 0123456789"}, "café naïve", "Paged attention",
        {"text": "continuous batching"}, "Hello", "emoji 🙂", "lazy dog"]
LONG = "The quick brown fox jumps over the lazy dog. " * 40


class Sleep:
    """A postprocessor that only waits (so a subprocess can be killed mid-run)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def run(self, items, ctx) -> None:
        time.sleep(self.seconds)


@pytest.fixture
def sleep_step():
    register_step("postprocess", "sleep", Sleep, replace=True)
    yield
    unregister_step("postprocess", "sleep")


def pipeline_yaml(write_yaml, tiny_models, extra: str = "") -> Path:
    return write_yaml(f"""
        task: text-generation
        model: {tiny_models['llama']}
        engine: {{dtype: float32, kv_cache_gib: 0.02, max_model_len: 128, num_threads: 1}}
        sampling: {{temperature: 0, max_tokens: 5}}
        batch_size: 2
        {extra}
        """)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_keeps_order_and_records_failed_rows(tiny_models, tiny_llm, write_yaml, tmp_path):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, ROWS[:3] + [LONG] + ROWS[3:5])
    with data.open("a", encoding="utf-8") as f:
        f.write("{not json\n\n" + json.dumps(ROWS[5]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", str(pipeline_yaml(write_yaml, tiny_models)), "--input", str(data), "--output", str(out),
                 "--quiet"]) == 0
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(8))
    assert rows[3]["error"].startswith("generate: InvalidRequestError: prompt has")
    assert rows[6]["error"].startswith("input: line 7 is not valid JSON")
    good = [i for i in range(8) if i not in (3, 6)]
    texts = [rows[i]["input"]["text"] for i in good]
    assert texts == [r if isinstance(r, str) else r["text"] for r in ROWS[:5] + [ROWS[5]]]
    want = tiny_llm.generate(texts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [rows[i]["text"] for i in good] == [o.outputs[0].text for o in want]


def test_run_interrupted_by_an_exception_resumes_without_redoing_rows(tiny_models, tiny_llm, write_yaml,
                                                                      tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    pipe = load_pipeline(pipeline_yaml(write_yaml, tiny_models), llm=tiny_llm)
    reference = tmp_path / "reference.jsonl"
    run_file(pipe, data, reference, progress=False)
    seen: list[str] = []
    real = pipe.run_batch

    def counting(rows, fail_at=None):
        if fail_at is not None and len(seen) >= fail_at:
            raise RuntimeError("injected")
        seen.extend(r if isinstance(r, str) else r["text"] for r in rows)
        return real(rows)

    out = tmp_path / "out.jsonl"
    pipe.run_batch = lambda rows: counting(rows, fail_at=4)  # two batches of two, then the third raises
    with pytest.raises(RuntimeError, match="injected"):
        run_file(pipe, data, out, progress=False)
    assert [r["index"] for r in read_jsonl(out)] == [0, 1, 2, 3]
    with out.open("a", encoding="utf-8") as f:
        f.write('{"index": 4, "te')  # a line cut short by a kill
    seen.clear()
    pipe.run_batch = counting
    summary = run_file(pipe, data, out, progress=False)
    assert (summary.resumed, summary.processed, summary.failed) == (4, 5, 0)
    assert len(seen) == 5
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_killed_run_resumes_to_the_uninterrupted_output(tiny_models, tiny_llm, write_yaml, tmp_path, sleep_step):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    yaml_path = pipeline_yaml(write_yaml, tiny_models, "postprocess: [{sleep: {seconds: 0.4}}]")
    out = tmp_path / "out.jsonl"
    script = ("import sys; from tests.pipelines.test_batch_run import Sleep; from tokenloom.pipelines import "
              "register_step; register_step('postprocess', 'sleep', Sleep); from tokenloom.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script, "run", str(yaml_path), "--input", str(data),
                             "--output", str(out), "--quiet"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no batch flushed in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = read_jsonl(out)
    assert 2 <= len(finished) < len(ROWS)

    pipe = load_pipeline(yaml_path, llm=tiny_llm)
    summary = run_file(pipe, data, out, progress=False)
    assert summary.resumed == len(finished) and summary.processed == len(ROWS) - len(finished)
    reference = tmp_path / "reference.jsonl"
    run_file(pipe, data, reference, progress=False)
    assert out.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")


def test_resume_refuses_an_output_written_for_other_input(tiny_llm, tmp_path):
    from tokenloom.pipelines import pipeline

    data = write_jsonl(tmp_path / "data.jsonl", ["a", "b"])
    out = write_jsonl(tmp_path / "out.jsonl", [{"index": 0, "text": "x", "input": {"text": "not a"}}])
    with pytest.raises(BatchInputError, match="row 0 was written for another input"):
        run_file(pipeline("text-generation", tiny_llm), data, out, progress=False)


def test_csv_and_txt_inputs(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('question,context\n"Who, then?",Ada wrote it.\nWhere?,Here.\n', encoding="utf-8")
    assert [r.data for r in read_rows(csv_path)] == [{"question": "Who, then?", "context": "Ada wrote it."},
                                                       {"question": "Where?", "context": "Here."}]
    txt_path = tmp_path / "data.txt"
    txt_path.write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert [r.data for r in read_rows(txt_path)] == [{"text": "first line"}, {"text": "second line"}]
    with pytest.raises(BatchInputError, match="expected a .jsonl, .csv or .txt"):
        read_rows(tmp_path / "data.parquet")
