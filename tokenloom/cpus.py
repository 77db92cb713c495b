"""The CPUs this process may run on, by physical core (for `cpu_bind` and thread counts)."""

from __future__ import annotations

import os
from pathlib import Path


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
