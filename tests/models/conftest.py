"""The native kernels at every instruction-set level this machine runs (an AVX-512 machine also runs the
AVX2 and portable levels), each tested against the torch reference."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tokenloom.models import ops
from tokenloom.models.ops.native import kernels_enabled

LEVELS = list(ops.isa.supported_levels()) if kernels_enabled() else []


@pytest.fixture(params=LEVELS or [pytest.param(None, marks=pytest.mark.skip(reason="native kernels are off"))])
def kernels(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The kernel module of one level, with the ops running at that level for the test's duration."""
    with ops.use_level(request.param) as module:
        if module is None:
            pytest.skip(f"the {request.param} kernels could not be built")
        yield module
