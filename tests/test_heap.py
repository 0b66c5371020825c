"""Long-running processes freeze their start-up heap out of the garbage collector's way."""

from __future__ import annotations

import gc

import pytest

from reminders import cli, heap


def test_settle_moves_what_lives_into_the_permanent_generation() -> None:
    made_at_start: list[list[int]] = [[] for _ in range(1000)]  # lists: the collector tracks them
    before = gc.get_freeze_count()
    try:
        heap.settle()
        assert gc.get_freeze_count() >= before + len(made_at_start)
    finally:
        gc.unfreeze()  # the test process goes on as before


def test_an_api_process_settles_once_its_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    settled: list[int] = []
    monkeypatch.setattr(heap, "settle", lambda: settled.append(len(settled)))
    assert cli.api_app().title == "reminders"
    assert settled == [0]
