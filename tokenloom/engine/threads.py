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
import threading

from tokenloom.config import EngineConfig, parse_cpu_bind
from tokenloom.models import ops

logger = logging.getLogger(__name__)


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
