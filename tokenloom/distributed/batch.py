"""`tokenloom run pipeline.yaml ... --ray --replicas N`: a batch run's batches shared out over N pipeline
replicas (Ray actors, each loading the pipeline's model once), results written as they finish.

The driver keeps what makes a run resumable: the same batches as a run on one machine (the rows not yet in the
output, `batch_size` at a time), each appended to the output when it returns, the output rewritten in input
order at the end (`pipelines/batch.run_file`). So the output equals the single-machine run's byte for byte, and
a killed run resumes from the batches that made it to disk. A replica that dies is restarted by Ray and its
batches run again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenloom.distributed.replica_set import connect_ray, cpu_share, import_ray

IN_FLIGHT_PER_REPLICA = 2  # batches queued on a replica: the next one is there when the last finishes


class PipelineReplica:
    """The actor's body: the pipeline of a YAML file with its model loaded, running batches."""

    def __init__(self, pipeline_yaml: str, num_threads: int) -> None:
        import torch

        from tokenloom.pipelines.yaml_spec import load_pipeline

        torch.set_num_threads(num_threads)
        self.pipe = load_pipeline(pipeline_yaml)

    def run_batch(self, rows: list[Any]) -> list[dict[str, Any]]:
        """One batch's results (`Pipeline.run_batch`)."""
        return self.pipe.run_batch(rows)


@dataclass
class ShardedPipeline:
    """A pipeline's batches run on replicas (a `BatchRunner` for `run_file`)."""

    task: str
    batch_size: int
    actors: list[Any]
    started_ray: bool

    @classmethod
    def start(cls, pipeline_yaml: str | Path, task: str, batch_size: int, num_replicas: int,
              ray_address: str | None = None, num_cpus: float | None = None) -> ShardedPipeline:
        """`num_replicas` replicas of the pipeline (on a local Ray instance unless `ray_address`), each with
        `num_cpus` CPUs (default: this machine's cores shared out) and as many torch threads. The YAML must be
        readable at the same path where the replicas run."""
        cpus = cpu_share(num_replicas, num_cpus)
        ray = import_ray()
        started = connect_ray(ray_address)
        actor_class = ray.remote(PipelineReplica).options(num_cpus=cpus, max_restarts=-1, max_task_retries=-1)
        path = str(Path(pipeline_yaml).resolve())
        return cls(task, batch_size, [actor_class.remote(path, max(1, int(cpus))) for _ in range(num_replicas)],
                   started)

    def run_batches(self, batches: list[list[Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(k, results) per batch as each finishes; every replica holds up to IN_FLIGHT_PER_REPLICA batches."""
        ray = import_ray()
        queue = iter([k for k, rows in enumerate(batches) if rows])
        for k, rows in enumerate(batches):
            if not rows:  # every row of it unreadable: nothing to run
                yield k, []
        pending: dict[Any, tuple[int, int]] = {}  # object ref → (batch, replica)

        def submit(replica: int) -> None:
            k = next(queue, None)
            if k is not None:
                pending[self.actors[replica].run_batch.remote(batches[k])] = (k, replica)

        for replica in range(len(self.actors)):
            for _ in range(IN_FLIGHT_PER_REPLICA):
                submit(replica)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k, replica = pending.pop(ready[0])
            results = ray.get(ready[0])
            submit(replica)
            yield k, results

    def shutdown(self) -> None:
        """Stop the replicas (and the local Ray instance, if this run started it)."""
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.started_ray:
            ray.shutdown()
