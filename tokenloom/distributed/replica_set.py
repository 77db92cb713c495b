"""N replicas as Ray actors: started with their CPU (or GPU) share, restarted by Ray when their process dies,
and found again at their new address.

Ray actors, not a Ray Serve deployment: each replica is the single-machine server unchanged (every route, the
model manager, streaming, metrics), and the routing that matters here (by the prefix cache's block hashes) is
the front's own. Serve would add its HTTP proxy and its router in front of ours and replace neither.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The `ray` module, or an error that says how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("replicas run on Ray, which is not installed: pip install 'tokenloom[ray]'") from exc
    return ray


def connect_ray(ray_address: str | None) -> bool:
    """Join the Ray cluster at `ray_address`, or start a local instance without one; True when this call
    started Ray (the caller then shuts it down), False when the process was already connected."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    return True


def cpu_share(num_replicas: int, num_cpus: float | None) -> float:
    """The CPUs each of `num_replicas` replicas reserves: `num_cpus` when given, else this machine's cores
    shared out, at least one."""
    if num_replicas < 1:
        raise ValueError(f"--replicas must be >= 1; got {num_replicas}")
    return num_cpus if num_cpus is not None else max(1, (os.cpu_count() or 1) // num_replicas)


@dataclass
class ReplicaSet:
    """The replica actors, their current addresses and the key the front sends them."""

    actors: list[Any]
    urls: list[str]
    internal_key: str
    started_ray: bool = False
    _reviving: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, num_replicas: int, server_options: dict[str, Any], model: str | None,
              engine_options: dict[str, Any], ray_address: str | None = None, num_cpus: float | None = None,
              num_gpus: float = 0.0) -> ReplicaSet:
        """Start `num_replicas` replicas (on a local Ray instance unless `ray_address` names a cluster), each
        with `num_cpus` CPUs (default: this machine's cores shared out, at least one) and torch threads to
        match; returns once every replica has loaded its model and listens."""
        ray = import_ray()
        from tokenloom.distributed.replica import ReplicaServer

        cpus = cpu_share(num_replicas, num_cpus)
        started = connect_ray(ray_address)
        options = dict(engine_options)
        options.setdefault("num_threads", max(1, int(cpus)))
        key = secrets.token_urlsafe(24)
        actor_class = ray.remote(ReplicaServer).options(num_cpus=cpus, num_gpus=num_gpus, max_restarts=-1,
                                                        max_task_retries=-1)
        actors = [actor_class.remote(server_options, model, options, key) for _ in range(num_replicas)]
        try:
            urls = ray.get([a.url.remote() for a in actors])
        except Exception:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()
            raise
        logger.info("%d replicas up (%s CPUs each): %s", num_replicas, cpus, ", ".join(urls))
        return cls(actors, urls, key, started)

    async def revive(self, replica: int) -> str:
        """The address of `replica` once Ray has restarted it (waits for the restart and the model's load)."""
        return await self.actors[replica].url.remote()

    async def pid(self, replica: int) -> int:
        """The process id of a replica."""
        return await self.actors[replica].pid.remote()

    def shutdown(self) -> None:
        """Stop every replica (and the local Ray instance, if this process started it)."""
        ray = import_ray()
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                logger.debug("replica already gone", exc_info=True)
        if self.started_ray:
            ray.shutdown()
