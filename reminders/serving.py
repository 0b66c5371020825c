"""Serving the HTTP API with uvicorn: imported only by the commands that serve it, so that
`reminders worker` and `reminders scheduler` start without uvicorn and the web stack."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from uvicorn.supervisors import Multiprocess


class Server(uvicorn.Server):
    """uvicorn with our own SIGTERM/SIGINT handlers, installed as soon as the server exists (a
    signal while the other parts start still stops cleanly), ending in exit 0 where uvicorn
    itself would re-raise the signal once stopped."""

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the handlers above stay in place


def make_server(host: str, port: int) -> Server:
    """One server process for the app, its signal handlers already in place."""
    from reminders.api import create_app

    server = Server(uvicorn.Config(create_app(), host=host, port=port, access_log=False))
    server.install_signal_handlers()
    return server


def serve_processes(factory: str, host: str, port: int, workers: int) -> None:
    """`workers` processes sharing the port, each building its app with `factory` (module:name).

    One Python process uses one core at most. uvicorn's supervisor starts them (spawned),
    restarts one that dies, and on SIGTERM/SIGINT stops them all, in-flight requests first.
    """
    config = uvicorn.Config(
        factory, factory=True, host=host, port=port, workers=workers, access_log=False
    )
    Multiprocess(config, sockets=[config.bind_socket()]).run()
