"""Real processes: `reminders run` on embedded defaults, SIGTERM, readiness with Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import REDIS_ENV, TEST_SECRET, need

REMINDERS = [sys.executable, "-m", "reminders"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMINDERS_")}
    env.update(extra)
    return env


def wait_until_up(url: str, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited early with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a real process coming up, not waiting on our own clock
    raise AssertionError(f"{url} did not answer in {seconds}s")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`reminders run` in an empty folder: nothing configured, nothing installed but us."""
    port = free_port()
    process = subprocess.Popen(
        [*REMINDERS, "run", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", process)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_run_serves_on_embedded_defaults_and_stops_cleanly_on_sigterm(
    running: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    process, port = running
    assert (tmp_path / "reminders.db").exists()  # migrated by itself
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"http://127.0.0.1:{port}/v1/appointments/A1").status_code == 401
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"Traceback" not in stderr


def test_api_refuses_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    result = subprocess.run(
        [*REMINDERS, "api", "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        env=clean_env(REMINDERS_DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.db'}"),
        timeout=60,
    )
    assert result.returncode == 2
    assert b"reminders migrate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_setting_stops_the_process_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [*REMINDERS, "run"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        env=clean_env(REMINDERS_SEND_RATE="-3"),
    )
    assert result.returncode == 2
    assert (
        result.stderr.decode()
        .strip()
        .startswith("reminders: configuration error: REMINDERS_SEND_RATE")
    )


@pytest.mark.redis
def test_readiness_checks_redis(
    request: pytest.FixtureRequest, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reminders import db
    from reminders.api import create_app

    monkeypatch.setenv("REMINDERS_REDIS_URL", need(request.config, REDIS_ENV))
    monkeypatch.setenv("REMINDERS_SECRET_KEY", TEST_SECRET)
    db.reset()
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["redis"] == "ok"
        monkeypatch.setenv("REMINDERS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
        db.reset()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["errors"][0]["field"] == "redis"


def test_mllp_listens_acknowledges_and_stops_cleanly(database: str, tmp_path: Path) -> None:
    from reminders import db as database_module
    from reminders.clinics import ClinicOptions, create_clinic
    from reminders.siu import frame

    with database_module.session_scope() as session:
        clinic, _ = create_clinic(
            session,
            ClinicOptions(name="Hôpital", timezone="Europe/Paris", country="FR", language="fr"),
        )
        clinic_id = clinic.id
    port = free_port()
    process = subprocess.Popen(
        [*REMINDERS, "mllp", "--clinic", str(clinic_id), "--port", str(port)],
        env=clean_env(REMINDERS_DATABASE_URL=database, REMINDERS_SECRET_KEY=TEST_SECRET),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        message = (Path(__file__).parent / "data" / "hl7" / "s12_v251_tq1.hl7").read_text()
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the listener did not come up"
                time.sleep(0.1)  # waiting for a real process to listen
        with connection:
            connection.sendall(frame(message))
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = connection.recv(4096)
                assert chunk, "connection closed before the ACK"
                answer += chunk
        assert b"MSA|AA|" in answer
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr


def test_mllp_refuses_an_unknown_clinic(database: str) -> None:
    result = subprocess.run(
        [*REMINDERS, "mllp", "--clinic", "99", "--port", str(free_port())],
        env=clean_env(REMINDERS_DATABASE_URL=database, REMINDERS_SECRET_KEY=TEST_SECRET),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert b"no clinic with id 99" in result.stderr


def test_api_with_several_workers_serves_and_stops_cleanly_on_sigterm(
    database: str, tmp_path: Path
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*REMINDERS, "api", "--port", str(port), "--workers", "2"],
        cwd=tmp_path,
        env=clean_env(REMINDERS_DATABASE_URL=database, REMINDERS_SECRET_KEY=TEST_SECRET),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", process, seconds=60)
        for _ in range(10):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/appointments/A1").status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert b"Traceback" not in stderr
    assert stderr.count(b"Started server process") == 2
