"""Queueing answers and replies from the API process: never an error for the patient's request."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from reminders import broker
from reminders.config import load_settings
from tests.conftest import REDIS_ENV, need


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


@pytest.fixture
def redis_broker(request: pytest.FixtureRequest) -> Iterator[RedisBroker]:
    """A Redis broker of its own namespace, made the process's broker, its keys removed after."""
    url = need(request.config, REDIS_ENV)
    namespace = f"reminders-test-{os.getpid()}"
    installed = RedisBroker(url=url, namespace=namespace)  # type: ignore[no-untyped-call]
    installed.declare_queue(broker.REPLIES_QUEUE)
    installed.client.delete(broker.APPLY_PENDING)
    dramatiq.set_broker(installed)
    yield installed
    keys = list(installed.client.scan_iter(f"{namespace}:*"))
    installed.client.delete(broker.APPLY_PENDING, *keys)
    installed.close()


def taken(consumed: RedisBroker) -> int:
    """Takes (and acknowledges) every `apply_replies` message waiting in Redis; how many."""
    consumer = consumed.consume(broker.REPLIES_QUEUE, prefetch=50, timeout=200)
    count = 0
    for message in consumer:
        if message is None:
            break
        assert message.actor_name == "apply_replies"
        consumer.ack(message)
        count += 1
    consumer.close()
    return count


def test_with_redis_replies_share_an_apply_message_until_a_worker_starts_it(
    redis_broker: RedisBroker,
) -> None:
    for _ in range(5):
        broker.enqueue_apply()  # five replies stored while no worker has started the first
    assert taken(redis_broker) == 1
    broker.enqueue_apply()  # not started yet: the flag still says one waits
    assert taken(redis_broker) == 0
    broker.apply_starting()  # a worker begins: a reply stored from now needs a message
    broker.enqueue_apply()
    broker.enqueue_apply()
    assert taken(redis_broker) == 1
    ttl = redis_broker.client.ttl(broker.APPLY_PENDING)
    assert 0 < ttl <= broker.APPLY_PENDING_SECONDS  # a lost message delays replies, briefly


def test_with_redis_a_lost_apply_message_holds_replies_only_until_the_flag_expires(
    redis_broker: RedisBroker,
) -> None:
    broker.enqueue_apply()
    assert taken(redis_broker) == 1  # taken by a worker that dies before it starts applying
    redis_broker.client.pexpire(broker.APPLY_PENDING, 1)
    time.sleep(0.01)
    broker.enqueue_apply()
    assert taken(redis_broker) == 1
