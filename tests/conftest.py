"""Shared fixtures. GPU tests run where CUDA is present and are skipped elsewhere."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of small-tensor work (10³–10⁴ points, small matrices).

    A thread pool gains nothing at these sizes and, on a shared two-core machine, its fork-join
    stalls every operation (files measured 5–25× slower with two threads under load). The numbers
    do not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_reductions(single_thread):
    """single_thread, and the reductions kept on their eager path: a module making a few dozen
    small calls would pay the fused path's one-off compile (seconds) for nothing. The fused path
    computes the same numbers and is tested in test_reductions."""
    from measureflow import reductions

    mode = reductions.config.compile
    reductions.config.compile = "off"
    yield
    reductions.config.compile = mode


@pytest.fixture
def devices():
    """CPU always, plus CUDA when present: device-generic code paths run on both."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out
