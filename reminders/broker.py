"""The dramatiq broker: Redis in production, in-process in embedded mode; and the send rate
limit shared by every worker (Redis-backed when Redis is set)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.rate_limits import RateLimiterBackend, WindowRateLimiter
from dramatiq.rate_limits.backends import RedisBackend, StubBackend

from reminders.config import Settings

log = logging.getLogger(__name__)
QUEUE = "sms"
WEBHOOK_QUEUE = "webhooks"  # apart, so a slow clinic endpoint never holds up SMS


def make_broker(settings: Settings) -> dramatiq.Broker:
    if settings.redis_url is None:
        # Embedded mode: messages never leave the process (and are lost with it; the sweep
        # queues again whatever was claimed and never finished).
        return StubBroker()
    return RedisBroker(url=settings.redis_url)  # type: ignore[no-untyped-call]


class RateLimiter:
    """At most `rate` sends per second across all workers (a sliding one-second window)."""

    def __init__(self, settings: Settings, clock: Callable[[], dt.datetime]) -> None:
        backend: RateLimiterBackend
        if settings.redis_url is not None:
            backend = RedisBackend(url=settings.redis_url)
        else:
            backend = StubBackend()  # type: ignore[no-untyped-call]
        rate = settings.send_rate
        limit, window = (round(rate), 1) if rate >= 1 else (1, max(1, round(1 / rate)))
        self._limiter = WindowRateLimiter(  # type: ignore[no-untyped-call]
            backend, "reminders-sms", limit=limit, window=window
        )
        self._clock = clock

    def wait(self, until: dt.datetime) -> bool:
        """Blocks until a send is allowed; False if that would be after `until`."""
        while True:
            with self._limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    return True
            if self._clock() >= until:
                return False
            time.sleep(0.02)  # throttling: a worker thread waits its turn


def install(settings: Settings) -> dramatiq.Broker:
    """Makes the settings' broker the process's own (for processes that only enqueue)."""
    broker = make_broker(settings)
    for queue in (QUEUE, WEBHOOK_QUEUE):
        broker.declare_queue(queue)
    dramatiq.set_broker(broker)
    return broker


def enqueue_sends(ids: list[int]) -> None:
    """Queues `send_reminder` for rows already `queued` (answers to patients, sent at once).

    Feature modules call this instead of importing the actors; losing a message is safe, since
    the scheduler's sweep queues again whatever stays `queued`.
    """
    broker = dramatiq.get_broker()
    try:
        for reminder_id in ids:
            broker.enqueue(
                dramatiq.Message(
                    queue_name=QUEUE,
                    actor_name="send_reminder",
                    args=(reminder_id,),
                    kwargs={},
                    options={},
                )
            )
    except Exception:  # the rows are committed `queued`: the scheduler's sweep sends them
        log.warning("could not queue %d answer SMS now; the sweep will", len(ids), exc_info=True)
