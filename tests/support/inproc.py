"""The real pure-Python server in this process, on its own event loop in a daemon thread.

For the tests that must look inside a device (controller state, internal counters, a DMA
request in flight) or hold the server still while the host acts (:meth:`paused`). Anything
that touches the device runs on the loop thread through :meth:`call`. A callback that raises
on the loop is remembered in :attr:`error`; the fixtures fail the test on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any, Callable, Iterator

from vfio_user.backends import make_server
from vfio_user.device import Device
from vfio_user.server import new_event_loop
from vfio_user.server_api import ServerBackend

from .server import DEADLINE


class InProcessServer:
    """``make_server(backend, device, path, **options)`` (the Python ``Server`` by default) on
    ``new_event_loop()`` in a daemon thread; the device is closed with the server."""

    def __init__(self, device: Device, path: str, *, backend: ServerBackend = ServerBackend.PYTHON, **options: Any) -> None:
        self.device = device
        self.path = path
        self.loop = new_event_loop()
        self.server = make_server(backend, device, path, **options)
        self.error: BaseException | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as e:  # reported by the constructor
                self.error = e
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.loop.set_exception_handler(self._loop_exception)
        self.thread = threading.Thread(target=run, name="inproc-server", daemon=True)
        self.thread.start()
        if not started.wait(DEADLINE) or self.error is not None:
            error, self.error = self.error, None
            self._close_loop()
            raise RuntimeError(f"in-process server did not start: {error!r}")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # a callback that raised: remember it, the test's teardown fails on it
        self.error = context.get("exception") or RuntimeError(context.get("message"))
        loop.default_exception_handler(context)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop thread and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(DEADLINE)

    def settle(self) -> None:
        """Return once the loop has run every callback that was ready when this was called,
        eventfd readers included: an fd readable now is polled in the loop iteration that runs
        the first round trip, its reader runs at the latest in that iteration, before the
        second round trip; the third covers what those readers scheduled with call_soon."""
        for _ in range(3):
            self.call(lambda: None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Block the server's loop (it is inside a callback) until the block ends."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait(DEADLINE)

        self.loop.call_soon_threadsafe(hold)
        assert entered.wait(DEADLINE), "server loop did not pause"
        try:
            yield
        finally:
            release.set()

    def close(self) -> None:
        """Close the server (its client, the socket), stop the loop, close the device."""
        try:
            if self.thread.is_alive():
                try:
                    self.call(self.server.close)
                finally:
                    self.loop.call_soon_threadsafe(self.loop.stop)
                    self.thread.join(DEADLINE)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        self.device.close()
