"""CPU threads of the thread that steps the model: pinned one per physical core (`--cpu-bind cores`) or
to given CPUs (`--cpu-bind 0,2,4`).

torch's intra-op pool (OpenMP) belongs to the thread that opens a parallel region, so binding happens on
the stepping thread, on its first step (and again if another thread takes over, as when a server
starts its engine loop). Pinning keeps each worker on one core's caches and stops the scheduler from
stacking two workers on one core while another idles; SMT siblings are left out, since two threads on
one core share its vector units, which these GEMM and dot-product kernels saturate.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from tokenloom.config import ConfigError, EngineConfig
from tokenloom.models import ops

logger = logging.getLogger(__name__)


def physical_cores() -> list[int]:
    """One CPU per physical core this process may run on (the lowest-numbered sibling), in order."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    seen, cores = set(), []
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
        except OSError:
            key = ("?", str(cpu))  # no topology: count every CPU as a core
        if key not in seen:
            seen.add(key)
            cores.append(cpu)
    return cores


def parse_cpu_bind(spec: str) -> list[int] | None:
    """`none` → None; `cores` → one CPU per physical core; `0,2,4` or `0-3` → those CPUs."""
    spec = spec.strip().lower()
    if spec == "none":
        return None
    if spec == "cores":
        return physical_cores()
    cpus: list[int] = []
    try:
        for part in spec.split(","):
            low, dash, high = part.partition("-")
            cpus.extend(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        cpus = []
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"cpu_bind must be none, cores, or CPU ids such as 0,2 or 0-3; got {spec!r}")
    return cpus


class ThreadBinder:
    """Pins the stepping thread's pool to `cpus` the first time each thread steps (no-op without CPUs or
    without the native kernels)."""

    def __init__(self, cpus: list[int] | None) -> None:
        self.cpus = cpus
        self._thread: int | None = None

    @classmethod
    def for_config(cls, config: EngineConfig) -> ThreadBinder:
        """The binder an engine's `cpu_bind` asks for (none off the CPU)."""
        device = config.device_config
        return cls(parse_cpu_bind(device.cpu_bind) if device.torch_device().type == "cpu" else None)

    def ensure(self) -> None:
        """Bind the current thread's pool unless it is the one already bound."""
        if not self.cpus or self._thread == threading.get_ident():
            return
        self._thread = threading.get_ident()
        bound = ops.bind_threads(self.cpus)
        if bound is None:
            logger.warning("cpu_bind needs the native kernels (disabled or not built): threads are not pinned")
            return
        if -1 in bound:
            logger.warning("could not pin every thread (pinned: %s; asked for CPUs %s)", bound, self.cpus)
        else:
            logger.info("torch threads pinned to CPUs %s", bound)
