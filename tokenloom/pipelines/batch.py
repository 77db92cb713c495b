"""Batch runs over files: `tokenloom run pipeline.yaml --input data.jsonl --output out.jsonl`.

Rows go through the pipeline `batch_size` at a time. Each output row is `{"index": i, ...result,
"input": row}` (or `"error"` naming the step that failed, for that row alone). Every finished batch is
appended and flushed, so an interrupted run resumes where it stopped: the rows already in the output
are kept and not run again (failed rows too, unless `retry_errors`). At the end the output is rewritten
in input order, atomically.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from tokenloom.pipelines.base import ERROR


class BatchInputError(ValueError):
    """An input or output file that cannot be used (unreadable, unknown format, from another input)."""


@dataclass(slots=True)
class InputRow:
    """One input row: its data, or why it could not be read."""

    data: Any = None
    error: str | None = None


@dataclass(slots=True)
class RunSummary:
    """What a batch run did."""

    total: int
    resumed: int
    processed: int
    failed: int
    output: Path


def read_rows(path: Path) -> list[InputRow]:
    """The rows of a .jsonl (one JSON value a line), .csv (header row, one dict a row) or .txt (one text a
    line) file; blank lines are skipped, and a line that is not valid JSON is a failed row."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".txt"):
        raise BatchInputError(f"--input {path}: expected a .jsonl, .csv or .txt file")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                return [InputRow(dict(row)) for row in csv.DictReader(f)]
            lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BatchInputError(f"--input {path}: cannot read it ({exc})") from exc
    if suffix == ".txt":
        return [InputRow({"text": line}) for _, line in lines]
    return [_json_row(n, line) for n, line in lines]


def _json_row(number: int, line: str) -> InputRow:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return InputRow(error=f"input: line {number} is not valid JSON ({exc.msg} at column {exc.colno})")
    if isinstance(value, str):
        return InputRow({"text": value})
    if not isinstance(value, dict):
        return InputRow(error=f"input: line {number} is a JSON {type(value).__name__}, not an object or a string")
    return InputRow(value)


def finished_rows(output: Path, rows: list[InputRow], retry_errors: bool = False) -> dict[int, str]:
    """index → JSON line of the rows an earlier run finished (a line cut short by a kill is dropped);
    an output written for different input rows is an error rather than silently mixed."""
    done: dict[int, str] = {}
    if not output.exists():
        return done
    # Split the bytes on b"\n" alone: a kill can cut a line inside a character, and str.splitlines would also
    # split at the U+2028, U+0085... that json.dumps(ensure_ascii=False) leaves raw in a row.
    for raw in output.read_bytes().split(b"\n"):
        try:
            line = raw.decode("utf-8").rstrip("\r")
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        index = row.get("index") if isinstance(row, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(rows) or (retry_errors and ERROR in row):
            continue
        if row.get("input") != rows[index].data:
            raise BatchInputError(f"--output {output}: row {index} was written for another input; "
                                  "remove the file or choose another --output")
        done[index] = line
    return done


def _write_atomic(path: Path, lines: Iterator[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _row_line(index: int, row: InputRow, result: dict[str, Any]) -> str:
    out = {"index": index, **result, "input": row.data} if row.error is None else \
        {"index": index, ERROR: row.error, "input": None}
    return json.dumps(out, ensure_ascii=False, default=str)  # a plugin's odd value must not stop the run


class BatchRunner(Protocol):
    """What a batch run needs of a pipeline: its task (the progress bar's name), its batch size, and its batches'
    results as they finish (a `Pipeline`, or a pipeline sharded over Ray replicas)."""

    task: str
    batch_size: int

    def run_batches(self, batches: list[list[Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(k, results of batches[k]) for each batch, in the order they finish."""


def run_yaml(pipeline_yaml: str | Path, input_path: str | Path, output_path: str | Path, *,
             batch_size: int | None = None, retry_errors: bool = False, progress: bool = True,
             ray_replicas: int | None = None, ray_address: str | None = None) -> RunSummary:
    """`tokenloom run`: the input is read and the YAML checked before the model loads; with `ray_replicas`,
    the batches are shared out over that many replicas on Ray (the same output, byte for byte)."""
    from tokenloom.pipelines.yaml_spec import load_pipeline, load_spec

    rows = read_rows(Path(input_path))
    if batch_size is not None and batch_size < 1:
        raise BatchInputError(f"--batch-size must be >= 1; got {batch_size}")
    if ray_replicas is not None:
        from tokenloom.distributed.batch import ShardedPipeline

        spec, _ = load_spec(pipeline_yaml)
        pipe = ShardedPipeline.start(pipeline_yaml, spec.task, batch_size or spec.batch_size, ray_replicas,
                                     ray_address)
        try:
            return run_file(pipe, rows, output_path, retry_errors=retry_errors, progress=progress)
        finally:
            pipe.shutdown()
    pipe = load_pipeline(pipeline_yaml)
    if batch_size is not None:
        pipe.batch_size = batch_size
    return run_file(pipe, rows, output_path, retry_errors=retry_errors, progress=progress)


def run_file(pipe: BatchRunner, inputs: str | Path | list[InputRow], output_path: str | Path, *,
             retry_errors: bool = False, progress: bool = True) -> RunSummary:
    """Run the pipeline over every row of `inputs` (a file, or rows read with `read_rows`) into
    `output_path` (JSON lines, input order), resuming from what an earlier run of the same input already
    wrote there. Each batch's rows are appended as it finishes (in any order); the end rewrites the file in
    input order."""
    rows = inputs if isinstance(inputs, list) else read_rows(Path(inputs))
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = finished_rows(output, rows, retry_errors)
    _write_atomic(output, (done[i] for i in sorted(done)))  # drops a torn last line before appending
    todo = [i for i in range(len(rows)) if i not in done]
    batches = [todo[start:start + pipe.batch_size] for start in range(0, len(todo), pipe.batch_size)]
    readable = [[i for i in batch if rows[i].error is None] for batch in batches]
    resumed, failed = len(done), 0
    bar = tqdm(total=len(rows), initial=resumed, desc=f"{pipe.task}", unit="row", disable=not progress)
    try:
        with output.open("a", encoding="utf-8") as f:
            for k, out in pipe.run_batches([[rows[i].data for i in batch] for batch in readable]):
                results = dict(zip(readable[k], out))
                for i in batches[k]:
                    done[i] = _row_line(i, rows[i], results.get(i, {}))
                    failed += int(rows[i].error is not None or ERROR in results[i])
                    f.write(done[i] + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batches[k]))
    finally:
        bar.close()
    _write_atomic(output, (done[i] for i in sorted(done)))
    return RunSummary(len(rows), resumed, len(todo), failed, output)
