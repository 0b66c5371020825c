"""The dramatiq broker: Redis in production, in-process in embedded mode; and the send rate
limit shared by every worker (Redis-backed when Redis is set)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

from reminders.config import Settings

log = logging.getLogger(__name__)
QUEUE = "sms"
WEBHOOK_QUEUE = "webhooks"  # apart, so a slow clinic endpoint never holds up SMS
REPLIES_QUEUE = "replies"  # apart, so a patient's STOP never waits behind a batch of reminders
QUEUES = (QUEUE, WEBHOOK_QUEUE, REPLIES_QUEUE)


def make_broker(settings: Settings) -> dramatiq.Broker:
    if settings.redis_url is None:
        # Embedded mode: messages never leave the process (and are lost with it; the sweep
        # queues again whatever was claimed and never finished).
        return StubBroker()
    return RedisBroker(url=settings.redis_url)  # type: ignore[no-untyped-call]


class RateLimiter:
    """At most `rate` sends per second (per window, for rates below one a second) across all
    workers: a counter per window, in Redis when Redis is set, else in this process.

    A worker takes its turns in blocks (a twentieth of the rate), so that sending at 10,000/s
    costs Redis one round trip per block, not one per SMS; a block left unused when its window
    ends is lost, which errs on the side of sending less.
    """

    def __init__(self, settings: Settings, clock: Callable[[], dt.datetime]) -> None:
        rate = settings.send_rate
        self._limit, self._window = (round(rate), 1) if rate >= 1 else (1, max(1, round(1 / rate)))
        self._block = max(1, self._limit // 20)
        self._redis = (
            redis.Redis.from_url(settings.redis_url) if settings.redis_url is not None else None
        )
        self._counts: dict[int, int] = {}  # window -> turns taken, without Redis
        self._lock = threading.Lock()
        self._held_window = -1
        self._held = 0  # turns of `_held_window` taken from the counter, not yet used
        self._clock = clock

    def _take(self, window: int, wanted: int) -> int:
        """Takes up to `wanted` turns of `window` from the shared counter; returns how many."""
        if self._redis is not None:
            key = f"reminders-sms:{self._window}:{window}"
            pipe = self._redis.pipeline()
            pipe.incrby(key, wanted)
            pipe.expire(key, self._window * 2 + 1)
            total = int(pipe.execute()[0])
        else:
            self._counts = {w: n for w, n in self._counts.items() if w >= window}
            total = self._counts[window] = self._counts.get(window, 0) + wanted
        return max(0, min(wanted, self._limit - (total - wanted)))

    def wait(self, until: dt.datetime) -> bool:
        """Blocks until a send is allowed; False if that would be after `until`."""
        while True:
            now = time.time()
            window = int(now // self._window)
            with self._lock:
                if self._held_window != window:
                    self._held_window, self._held = window, 0
                if self._held == 0:
                    self._held = self._take(window, self._block)
                if self._held > 0:
                    self._held -= 1
                    return True
            if self._clock() >= until:
                return False
            # Throttled: wait for the next window (a worker thread waits its turn).
            time.sleep(min(0.05, (window + 1) * self._window - now + 0.001))


def install(settings: Settings) -> dramatiq.Broker:
    """Makes the settings' broker the process's own (for processes that only enqueue)."""
    broker = make_broker(settings)
    for queue in QUEUES:
        broker.declare_queue(queue)
    dramatiq.set_broker(broker)
    return broker


def enqueue_sends(ids: list[int], size: int) -> None:
    """Queues `send_reminders` for rows already `queued` (answers to patients, sent at once), in
    messages of at most `size` ids (`dispatch.batch_size`).

    Feature modules call this instead of importing the actors; losing a message is safe, since
    the scheduler's sweep queues again whatever stays `queued`.
    """
    batches = [ids[start : start + size] for start in range(0, len(ids), size)]
    try:
        for batch in batches:
            _enqueue(QUEUE, "send_reminders", batch)
    except Exception:  # the rows are committed `queued`: the scheduler's sweep sends them
        log.warning("could not queue %d answer SMS now; the sweep will", len(ids), exc_info=True)


# Set while an `apply_replies` message waits in Redis that no worker has started yet: a
# reply stored meanwhile needs no message of its own, as that one will apply it too. The key
# expires, so a message lost with its key set delays replies by at most this long (and the
# scheduler's sweep stands behind that).
APPLY_PENDING = "reminders:apply-pending"
APPLY_PENDING_SECONDS = 10


def enqueue_apply() -> None:
    """Queues `apply_replies` for an inbound SMS just stored (it applies whatever is waiting),
    unless a queued one has not started yet: at 300 replies a second, one message per reply
    cost the API a Redis write each and the worker a message each, most finding nothing left
    to apply. The reply is committed before this runs, and a worker clears the flag before it
    looks (`apply_starting`), so the message a skipped reply counts on finds it. If queueing
    fails, the scheduler's sweep queues it once the reply has waited a little."""
    try:
        client = _redis_of(dramatiq.get_broker())
        if client is not None and not client.set(
            APPLY_PENDING, 1, nx=True, ex=APPLY_PENDING_SECONDS
        ):
            return
        _enqueue(REPLIES_QUEUE, "apply_replies")
    except Exception:
        log.warning("could not queue a reply's application now; the sweep will", exc_info=True)


def apply_starting() -> None:
    """Called by `apply_replies` before it looks for stored replies: the next reply stored
    queues a message again."""
    try:
        client = _redis_of(dramatiq.get_broker())
        if client is not None:
            client.delete(APPLY_PENDING)
    except Exception:  # the flag expires by itself
        log.warning("could not clear %s", APPLY_PENDING, exc_info=True)


def _redis_of(broker: dramatiq.Broker) -> redis.Redis | None:
    """The Redis client of a Redis broker (None in embedded mode: each reply queues its own
    message, in the process's memory)."""
    return broker.client if isinstance(broker, RedisBroker) else None


def _enqueue(queue: str, actor: str, *args: object) -> None:
    dramatiq.get_broker().enqueue(
        dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={})
    )
