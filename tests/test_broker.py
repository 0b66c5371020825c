"""Queueing answers from the API process: never an error for the patient's request."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from reminders import broker
from reminders.config import load_settings


def test_install_declares_the_queues_the_api_sends_to() -> None:
    installed = broker.install(load_settings())
    assert isinstance(installed, StubBroker)
    broker.enqueue_sends([1, 2])
    assert installed.queues[broker.QUEUE].qsize() == 2
    assert dramatiq.get_broker() is installed


def test_a_failed_enqueue_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    dramatiq.set_broker(StubBroker())  # no queue declared: enqueue raises QueueNotFound
    broker.enqueue_sends([7])
    assert "the sweep will" in caplog.text
