"""Task-runner set-up of the flows: torch threads shared among parallel tasks."""

from __future__ import annotations

import os

import pytest
import torch

from pipelines.runtime import share_cores


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_parallel_tasks_share_the_cores(threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert share_cores(2) == 4 and torch.get_num_threads() == 4
    assert share_cores(16) == 1 and torch.get_num_threads() == 1  # never below one thread


def test_user_thread_setting_wins(threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert share_cores(2) == 3 and torch.get_num_threads() == 3
