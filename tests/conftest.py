"""Fixtures shared across the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model bundle of ``tasks_rods.build_tiny_bundle``, built once; tests only read it.

    Its backbone and head bundles lie next to it, in ``bundle_dir.parent``.
    """
    from tasks_rods import build_tiny_bundle  # imported here: only the bundle tests pay for it

    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))
