"""Pure time maths: rules, quiet hours, deadlines, late bookings, DST. Property-tested."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reminders.schedule import (
    Rule,
    Timing,
    format_duration,
    in_quiet_hours,
    parse_duration,
    parse_quiet_hours,
    parse_rules,
    plan,
)

PARIS = ZoneInfo("Europe/Paris")
DEFAULT = Timing(
    rules=parse_rules("72h,24h:unconfirmed"),
    zone=PARIS,
    quiet=(dt.time(20), dt.time(8)),
    deadline=dt.timedelta(hours=2),
)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=PARIS).astimezone(dt.UTC)


def test_rules_parse_and_print_back() -> None:
    rules = parse_rules("24h:unconfirmed, 72h")
    assert rules == (Rule(dt.timedelta(hours=72)), Rule(dt.timedelta(hours=24), True))
    assert [str(r) for r in rules] == ["72h", "24h:unconfirmed"]
    assert parse_duration("3d") == dt.timedelta(days=3)
    assert format_duration(dt.timedelta(minutes=90)) == "90m"
    assert parse_quiet_hours("none") is None


def test_a_booking_well_ahead_gets_both_reminders_at_their_times() -> None:
    starts = paris(2026, 12, 10, 14, 0)
    sends = plan(starts, paris(2026, 12, 1, 9, 0), DEFAULT)
    assert [(p.rule, p.kind, p.due_at) for p in sends] == [
        ("72h", "reminder", paris(2026, 12, 7, 14, 0)),
        ("24h:unconfirmed", "reminder", paris(2026, 12, 9, 14, 0)),
    ]
    assert all(p.send_by == paris(2026, 12, 10, 12, 0) for p in sends)


def test_a_reminder_due_at_night_moves_to_the_morning() -> None:
    starts = paris(2026, 12, 10, 7, 30)  # 72h before is 07:30, inside 20:00-08:00
    sends = plan(starts, paris(2026, 12, 1, 9, 0), DEFAULT)
    assert sends[0].due_at == paris(2026, 12, 7, 8, 0)


def test_an_early_appointment_whose_morning_is_too_late_is_reminded_the_evening_before() -> None:
    timing = Timing(parse_rules("3h"), PARIS, (dt.time(20), dt.time(8)), dt.timedelta(hours=1))
    starts = paris(2026, 12, 10, 8, 30)  # 3h before is 05:30; 08:00 is past the 07:30 deadline
    [send] = plan(starts, paris(2026, 12, 1, 9, 0), timing)
    assert send.due_at == paris(2026, 12, 9, 19, 59)


def test_a_late_booking_gets_one_reminder_at_once() -> None:
    starts = paris(2026, 12, 10, 14, 0)
    now = paris(2026, 12, 9, 10, 0)  # 28 h before: both rule times have passed or are near
    sends = plan(starts, now, DEFAULT)
    assert [(p.rule, p.kind, p.due_at) for p in sends] == [("late", "late", now)]


def test_a_late_booking_keeps_a_later_rule_far_enough_away() -> None:
    starts = paris(2026, 12, 10, 14, 0)
    now = paris(2026, 12, 8, 9, 0)  # 53 h before: 72h missed, 24h is 29 h away
    sends = plan(starts, now, DEFAULT)
    assert [p.rule for p in sends] == ["late", "24h:unconfirmed"]


def test_a_late_booking_at_night_is_sent_after_quiet_hours() -> None:
    starts = paris(2026, 12, 10, 14, 0)
    [send] = plan(starts, paris(2026, 12, 9, 23, 0), DEFAULT)
    assert send.due_at == paris(2026, 12, 10, 8, 0)


def test_a_booking_inside_the_deadline_is_recorded_as_skipped() -> None:
    starts = paris(2026, 12, 10, 14, 0)
    [send] = plan(starts, paris(2026, 12, 10, 13, 0), DEFAULT)
    assert send.skip == "deadline"


def test_an_appointment_in_the_past_plans_nothing() -> None:
    assert plan(paris(2026, 1, 5, 9, 0), paris(2026, 12, 1, 9, 0), DEFAULT) == []


def test_a_move_after_a_reminder_sends_one_moved_sms_and_keeps_later_rules() -> None:
    starts = paris(2026, 12, 20, 14, 0)
    now = paris(2026, 12, 8, 10, 0)
    sends = plan(starts, now, DEFAULT, moved=True)
    assert [(p.rule, p.due_at) for p in sends] == [
        ("moved", now),
        ("72h", paris(2026, 12, 17, 14, 0)),
        ("24h:unconfirmed", paris(2026, 12, 19, 14, 0)),
    ]


@pytest.mark.parametrize(
    ("starts", "due"),
    [
        # Spring forward (29 March 2026, 02:00 -> 03:00): 72 h before 10:00 CEST is 09:00 CET.
        (paris(2026, 3, 30, 10, 0), paris(2026, 3, 27, 9, 0)),
        # Fall back (25 October 2026): 72 h before 09:00 CET is 10:00 CEST.
        (paris(2026, 10, 27, 9, 0), paris(2026, 10, 24, 10, 0)),
    ],
)
def test_rule_offsets_are_real_durations_across_dst(starts: dt.datetime, due: dt.datetime) -> None:
    sends = plan(starts, paris(2026, 1, 1, 9, 0), DEFAULT)
    assert sends[0].due_at == due
    assert sends[0].due_at == starts - dt.timedelta(hours=72)


def test_quiet_hours_follow_the_wall_clock_across_dst() -> None:
    quiet = (dt.time(20), dt.time(8))
    assert in_quiet_hours(paris(2026, 3, 29, 7, 59), PARIS, quiet)
    assert not in_quiet_hours(paris(2026, 3, 29, 8, 0), PARIS, quiet)
    assert in_quiet_hours(paris(2026, 10, 25, 20, 0), PARIS, quiet)


ZONES = [
    "Europe/Paris",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Shanghai",
    "UTC",
    "America/St_Johns",
    "Pacific/Chatham",
]
instants = st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31)).map(
    lambda d: d.replace(tzinfo=dt.UTC)
)
quiet_hours = st.one_of(
    st.none(),
    st.tuples(st.times(), st.times())
    .filter(lambda q: q[0] != q[1])
    .map(lambda q: (q[0].replace(second=0, microsecond=0), q[1].replace(second=0, microsecond=0)))
    .filter(lambda q: q[0] != q[1]),
)
rule_sets = st.lists(
    st.tuples(st.integers(min_value=1, max_value=24 * 14), st.booleans()),
    min_size=1,
    max_size=4,
    unique_by=lambda r: r[0],
).map(lambda rs: tuple(sorted((Rule(dt.timedelta(hours=h), u) for h, u in rs), reverse=True)))


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    quiet=quiet_hours,
    rules=rule_sets,
    deadline_hours=st.integers(min_value=0, max_value=48),
    now=instants,
    lead=st.timedeltas(min_value=dt.timedelta(minutes=-60), max_value=dt.timedelta(days=30)),
    moved=st.booleans(),
)
def test_no_send_is_in_quiet_hours_after_its_deadline_in_the_past_or_twice_for_a_rule(
    zone: str,
    quiet: tuple[dt.time, dt.time] | None,
    rules: tuple[Rule, ...],
    deadline_hours: int,
    now: dt.datetime,
    lead: dt.timedelta,
    moved: bool,
) -> None:
    timing = Timing(rules, ZoneInfo(zone), quiet, dt.timedelta(hours=deadline_hours))
    starts = now + lead
    sends = plan(starts, now, timing, moved=moved)
    keys = [p.rule for p in sends]
    assert len(keys) == len(set(keys)), "one rule, one send"
    assert sum(p.kind in ("late", "moved") for p in sends) <= 1, "never a burst of catch-ups"
    for p in sends:
        assert p.send_by == starts - timing.deadline
        if p.skip is None:
            assert not in_quiet_hours(p.due_at, timing.zone, quiet), p
            assert p.due_at <= p.send_by, p
            assert p.due_at >= now, p
    if starts <= now:
        assert sends == []
