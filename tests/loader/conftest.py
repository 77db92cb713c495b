"""Loader tests keep tokenloom's disk cache (converted tokenizers, verified-file stamps) in a folder of
their own, never the user's ~/.cache/tokenloom."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="package", autouse=True)
def isolated_tokenloom_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TOKENLOOM_CACHE for this package's tests: package scope, so module fixtures see it too."""
    from tokenloom.models.ops.native import cache_dir as kernels_dir

    root = tmp_path_factory.mktemp("tokenloom-cache")
    kernels = kernels_dir()
    kernels.mkdir(parents=True, exist_ok=True)
    (root / "kernels").symlink_to(kernels, target_is_directory=True)  # compiled once, not per test session
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENLOOM_CACHE", str(root))
        yield root
