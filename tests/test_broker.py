"""Queueing answers and replies from the API process: never an error for the patient's request."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from reminders import broker
from reminders.config import load_settings


def test_install_declares_the_queues_the_api_sends_to() -> None:
    installed = broker.install(load_settings())
    assert isinstance(installed, StubBroker)
    broker.enqueue_sends([1, 2, 3, 4, 5], 2)
    broker.enqueue_apply()
    sends = installed.queues[broker.QUEUE]
    assert [(m.actor_name, m.args) for m in map(dramatiq.Message.decode, sends.queue)] == [
        ("send_reminders", ([1, 2],)),
        ("send_reminders", ([3, 4],)),
        ("send_reminders", ([5],)),
    ]
    [apply] = map(dramatiq.Message.decode, installed.queues[broker.REPLIES_QUEUE].queue)
    assert (apply.actor_name, apply.args) == ("apply_replies", ())
    assert dramatiq.get_broker() is installed


def test_a_failed_enqueue_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    dramatiq.set_broker(StubBroker())  # no queue declared: enqueue raises QueueNotFound
    broker.enqueue_sends([7], 25)
    broker.enqueue_apply()
    assert "could not queue 1 answer SMS now; the sweep will" in caplog.text
    assert "could not queue a reply's application now; the sweep will" in caplog.text
