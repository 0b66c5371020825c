"""Thin dramatiq actors: they take ids and call `dispatch`.

`configure()` binds them to the broker of the settings (Redis, or in-process in embedded mode)
and sets the clock, the provider and the rate limiter they use.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.stub import StubBroker

from reminders import broker as queues
from reminders import dispatch, events, replies
from reminders.broker import QUEUE, REPLIES_QUEUE, WEBHOOK_QUEUE, RateLimiter, make_broker
from reminders.config import Settings
from reminders.db import session_scope
from reminders.sms import Provider, provider_from_settings


def real_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Runtime:
    settings: Settings
    provider: Provider
    limiter: dispatch.Limiter | None
    clock: dispatch.Clock


_runtime: Runtime | None = None


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("reminders.actors.configure() was not called")
    return _runtime


def _retry_when(retries: int, exception: Exception) -> bool:
    # Only transient send errors are retried here, briefly; longer waits go back to the row.
    return isinstance(exception, dispatch.TransientSendError) and retries < MAX_RETRIES


MAX_RETRIES = 5


@dramatiq.actor(
    broker=StubBroker(),  # a placeholder until configure() binds the real one
    queue_name=QUEUE,
    max_retries=MAX_RETRIES,
    min_backoff=1_000,
    max_backoff=30_000,
    max_age=3_600_000,  # an hour: anything older is the sweep's business
    time_limit=120_000,
    retry_when=_retry_when,
)
def send_reminder(reminder_id: int) -> None:
    """One SMS. Answers to patients now go in batches (`send_reminders`); this stays for the
    messages an older version queued."""
    state = runtime()
    dispatch.send_one(reminder_id, state.clock, state.provider, state.settings, state.limiter)


@dramatiq.actor(
    broker=StubBroker(),
    queue_name=QUEUE,
    max_retries=MAX_RETRIES,
    min_backoff=1_000,
    max_backoff=30_000,
    max_age=3_600_000,
    time_limit=300_000,  # a batch at a low send rate waits for its turns (dispatch.batch_size)
    retry_when=_retry_when,
)
def send_reminders(reminder_ids: list[int]) -> None:
    """A batch of due reminders claimed by the scheduler, or of answers to patients
    (dispatch.batch_size at most): one message, one claim and a few statements for all of them.
    A retry takes only the rows still `queued` (those that asked for a brief retry)."""
    state = runtime()
    dispatch.send_batch(reminder_ids, state.clock, state.provider, state.settings, state.limiter)


@dramatiq.actor(
    broker=StubBroker(),
    queue_name=REPLIES_QUEUE,
    max_retries=3,  # then the scheduler's sweep queues the waiting replies again
    min_backoff=1_000,
    max_backoff=10_000,
    max_age=3_600_000,
    time_limit=300_000,  # a run stops taking batches after a minute (replies.apply_waiting)
)
def apply_replies() -> None:
    """Applies the inbound SMS the webhook stored, in batches, until none waits; each batch's
    answers go out at once in `send_reminders` messages. Any message applies whatever waits,
    so a lost one costs nothing but time, and several at once share the work."""
    state = runtime()
    size = dispatch.batch_size(state.settings)
    queues.apply_starting()
    drained = replies.apply_waiting(state.clock, lambda ids: queues.enqueue_sends(ids, size))
    if not drained:
        apply_replies.send()  # more waits: go on in another message, this one took long enough


@dramatiq.actor(
    broker=StubBroker(),
    queue_name=WEBHOOK_QUEUE,
    max_retries=0,  # retried through the event row, with backoff, for 24 h
    max_age=3_600_000,
    time_limit=60_000,
)
def deliver_event(event_id: int) -> None:
    events.deliver(event_id, runtime().clock)


@dramatiq.actor(
    broker=StubBroker(),
    queue_name=WEBHOOK_QUEUE,  # not behind SMS; a build takes well under a second
    max_retries=3,
    max_age=3_600_000,  # older: the scheduler queues the build again
    time_limit=300_000,
)
def build_weekly_report(report_id: int) -> None:
    # Imported here: the report's figures cost a worker's start 45 ms, for a job run weekly.
    from reminders import report

    with session_scope() as session:
        report.build_stored(session, report_id, runtime().clock())


ACTORS = (send_reminder, send_reminders, apply_replies, deliver_event, build_weekly_report)


def configure(
    settings: Settings,
    *,
    clock: dispatch.Clock = real_clock,
    provider: Provider | None = None,
    broker: dramatiq.Broker | None = None,
    rate_limit: bool = True,
) -> dramatiq.Broker:
    """Binds the actors to a broker and sets what they send with; returns the broker."""
    global _runtime
    broker = broker or make_broker(settings)
    dramatiq.set_broker(broker)
    for actor in ACTORS:
        actor.broker = broker
        broker.declare_actor(actor)
    _runtime = Runtime(
        settings=settings,
        provider=provider or provider_from_settings(settings),
        limiter=RateLimiter(settings, clock) if rate_limit else None,
        clock=clock,
    )
    return broker
