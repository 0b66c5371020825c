"""APScheduler jobs: claim what is due and queue it. Nothing slow runs here."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from reminders import actors, dispatch, events, replies, report
from reminders.config import get_settings
from reminders.db import session_scope

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

log = logging.getLogger(__name__)
TICK_SECONDS = 60
BATCH = 1000
# Each clinic's report is due at Monday 07:00 in its own time zone: checked this often.
REPORT_CHECK_SECONDS = 600


def tick(clock: dispatch.Clock = actors.real_clock) -> list[int]:
    """One pass: expire, sweep and claim in batches, queueing each batch once committed; and
    queue the application of stored replies left waiting (their message was lost). Returns the
    ids of the SMS queued. An idle pass is one transaction."""
    now = clock()
    size = dispatch.batch_size(get_settings())
    with session_scope() as session:
        dispatch.expire(session, now)
        swept = dispatch.sweep(session, now)
        deliveries = events.claim_webhooks(session, now)
        waiting = replies.stale(session, now)
        claimed = dispatch.claim_due(session, now, BATCH)
    dispatch.queue_batches(swept + claimed, size, actors.send_reminders.send)
    dispatch.queue_all(deliveries, actors.deliver_event.send)
    if waiting:
        log.warning(
            "%d stored replies waited over %s: applying them", waiting, replies.PENDING_STALE
        )
        actors.apply_replies.send()
    queued = swept + claimed
    while len(claimed) == BATCH:
        with session_scope() as session:
            claimed = dispatch.claim_due(session, now, BATCH)
        dispatch.queue_batches(claimed, size, actors.send_reminders.send)
        queued += claimed
    return queued


def queue_reports(clock: dispatch.Clock = actors.real_clock) -> list[int]:
    """Queues the weekly report builds that are due (each clinic's Monday 07:00); returns them."""
    with session_scope() as session:
        ids = report.queue_due(session, clock())
    for report_id in ids:
        actors.build_weekly_report.send(report_id)
    return ids


def _every(
    scheduler: BaseScheduler, work: Callable[[], list[int]], seconds: int, name: str, what: str
) -> None:
    """Runs `work` every `seconds`, logging what it queued; a failure waits for the next run."""

    def job() -> None:
        try:
            queued = work()
        except Exception:
            log.exception("scheduler job %s failed; the next run will try again", name)
            return
        if queued:
            log.info("queued %d %s", len(queued), what)

    scheduler.add_job(
        job,
        "interval",
        seconds=seconds,
        id=name,
        next_run_time=dt.datetime.now(dt.UTC),
        coalesce=True,
        misfire_grace_time=seconds * 5,
        max_instances=1,
    )


def add_jobs(scheduler: BaseScheduler) -> BaseScheduler:
    """The jobs every scheduler process runs; any number of processes may run them at once."""
    _every(scheduler, tick, TICK_SECONDS, "tick", "SMS")
    _every(scheduler, queue_reports, REPORT_CHECK_SECONDS, "weekly-reports", "weekly report(s)")
    return scheduler
