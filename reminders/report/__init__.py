"""Outcomes and the weekly no-show report: SQL aggregates in, the contract's JSON out.

Weeks are ISO weeks in the clinic's time zone. The report compares two arms drawn at random by
patient (the clinic's holdout, recorded on each appointment when its first reminder is planned):
appointments since go-live whose patient was held out, against those whose patient was reminded.
That comparison is what `effect` measures; the before/after series only shows the trend.
"""

from reminders.report.figures import build
from reminders.report.outcomes import OUTCOMES, record_outcome
from reminders.report.stats import Arm, effect, rate
from reminders.report.summary import summary
from reminders.report.weekly import build_stored, queue_due, report_for, stored
from reminders.report.weeks import ReportError, due_week, last_complete_week, parse_week, week_name

__all__ = [
    "OUTCOMES",
    "Arm",
    "ReportError",
    "build",
    "build_stored",
    "due_week",
    "effect",
    "last_complete_week",
    "parse_week",
    "queue_due",
    "rate",
    "record_outcome",
    "report_for",
    "stored",
    "summary",
    "week_name",
]
