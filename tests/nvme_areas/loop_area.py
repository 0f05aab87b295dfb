"""The NVM command set on a real asyncio loop and I/O pool, as the controller runs it: what a
backend whose commands complete later (rbd:, nbd:) is tested under."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable

from nvme_emu.aio import IoPool
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import DEFERRED

from .area_helpers import Area, sqe


class Loop:
    """A real asyncio loop and I/O pool under the NVM command set, as the controller has them."""

    def __init__(self, area: Area) -> None:
        self.area = area
        self.loop = asyncio.new_event_loop()
        self.pool = IoPool(self.loop)
        self.nvm = NvmCommands(area.state, dataclasses.replace(area.hooks, io_pool=lambda: self.pool))

    def finished(self) -> list[tuple]:
        return self.area.record.named("finish_request")

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> float:
        """Serve the loop until ``done()``; seconds it took."""
        t0 = time.monotonic()

        async def wait() -> None:
            while not done():
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError("the loop waited too long")
                await asyncio.sleep(0.001)

        self.loop.run_until_complete(wait())
        return time.monotonic() - t0

    def execute(self, opc: int, **fields: int) -> object:
        """Execute one command from inside the running loop, as the controller's doorbell
        handlers do (a backend may start its I/O on the running loop): its result, or DEFERRED."""

        async def execute() -> object:
            return self.nvm.execute(self.area.admin_sq, sqe(opc, **fields))

        return self.loop.run_until_complete(execute())

    def execute_all(self, commands: list[tuple[int, dict[str, int]]]) -> list[object]:
        """Execute ``(opc, fields)`` one after another in ONE loop turn (nothing completes
        between them): their results, or DEFERRED."""

        async def execute() -> list[object]:
            return [self.nvm.execute(self.area.admin_sq, sqe(opc, **fields)) for opc, fields in commands]

        return self.loop.run_until_complete(execute())

    def command(self, opc: int, **fields: int) -> tuple[int, int]:
        """Execute one command; when deferred, serve the loop until it finishes: (status, dw0)."""
        before = len(self.finished())
        result = self.execute(opc, **fields)
        if result is not DEFERRED:
            assert not isinstance(result, type(DEFERRED))
            return result
        self.run_until(lambda: len(self.finished()) > before)
        _sq, _cid, status, dw0, *_ = self.finished()[-1]
        return status, dw0

    def close(self) -> None:
        self.pool.close()
        self.loop.close()
