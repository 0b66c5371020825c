"""The fault suite (issue 7): a burst of due reminders sent by real processes while something
breaks; after each scenario every reminder is sent, skipped with a reason or failed with a reason,
none after its deadline, none twice, and no phone number or name reached a log.

Selected with `-m faults` only. `REMINDERS_FAULTS=full` (`make faults`) sends 2,000 reminders per
scenario; the short form (CI) 500. Each scenario prints one `scenario=...` line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests import vonage_standin as standin
from tests.faults import harness
from tests.faults.harness import Fleet, Scenario, when

pytestmark = pytest.mark.faults

FULL = os.environ.get("REMINDERS_FAULTS") == "full"
COUNT = int(os.environ.get("REMINDERS_FAULTS_COUNT") or (2000 if FULL else 500))
LIMIT_SECONDS = 600 if FULL else 240  # for the burst to be settled; what is not counts as lost


@pytest.fixture(scope="module")
def world() -> Iterator[harness.World]:
    with harness.world() as built:
        yield built


def kill_worker_five_times(fleet: Fleet, taken: Callable[[], int]) -> None:
    for k in range(1, 6):
        when(taken, COUNT * k // 7)
        fleet.kill("worker0")
        fleet.start("worker0", "worker", "--threads", "8")


def restart_redis_empty(fleet: Fleet, taken: Callable[[], int]) -> None:
    when(taken, COUNT // 3)
    fleet.world.redis.kill()
    time.sleep(1)
    fleet.world.redis.start()


def restart_postgres(fleet: Fleet, taken: Callable[[], int]) -> None:
    when(taken, COUNT // 3)
    fleet.world.postgres.restart()


SCENARIOS = [
    Scenario("worker-killed", damage=kill_worker_five_times),
    Scenario("redis-restarted", damage=restart_redis_empty),
    Scenario("postgres-restarted", damage=restart_postgres),
    Scenario(
        "vonage-faults",
        behaviour=standin.random_faults(
            throttled=0.20, server_error=0.05, timeout=0.02, timeout_seconds=11
        ),
    ),
    Scenario("vonage-drops", behaviour=standin.random_faults(dropped=0.10)),
    Scenario("two-schedulers-three-workers", schedulers=2, workers=3, threads=4),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(
    world: harness.World, scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = harness.run(world, scenario, COUNT, LIMIT_SECONDS)
    with capsys.disabled():
        print(f"\n{outcome.line()}")
        if outcome.lost or outcome.late or outcome.duplicates or outcome.detail["brought_forward"]:
            print(f"  {outcome.detail}")
    assert outcome.reminders == COUNT
    assert outcome.detail["leaked_to_logs"] == [], "phone numbers or names in the logs"
    assert (outcome.lost, outcome.late, outcome.duplicates) == (0, 0, 0), outcome.detail
