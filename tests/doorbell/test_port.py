"""The doorbell port is narrow: every doorbell path runs against a fake that offers only it.

The fake (:class:`FakePort`) implements :class:`~nvme_emu.doorbell_port.DoorbellPort` and
records what a path does with it; :class:`Narrow` lets nothing else of it through, so a path
that reached past the port (``ctrl.state``, the controller's attributes) fails here. The
paths' real wake-ups are driven by hand: trapped writes, eventfd signals, the poller's page.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from nvme_emu import doorbell as db
from nvme_emu.controller import Controller
from nvme_emu.doorbell_port import CqHeadSource, DoorbellPort, QueueListener
from nvme_emu.latency import LatencyRecorder, Via
from nvme_emu.namespace_spec import open_namespace
from nvme_emu.queue import QueueEvent
from nvme_emu.spec.registers import Reg
from vfio_user.device import Region

#: The port's members, as the Protocol declares them.
PORT_MEMBERS = frozenset(name for name in vars(DoorbellPort) if not name.startswith("_"))
BAR0_SIZE = 0x4000
MAX_IO_QUEUES = 3


class FakePort:
    """A controller as far as the port goes, and no further; it records what it is told."""

    def __init__(self) -> None:
        self.delivered: list[tuple[int, bool, int]] = []
        self.tails: list[tuple[Any, int]] = []
        self.fatal: list[str] = []
        self.listeners: list[QueueListener] = []
        self.source: CqHeadSource | None = None
        #: called after a delivery is recorded (a host that rings again; a failing controller)
        self.on_doorbell = lambda qid, is_cq, value: None
        self.latency = LatencyRecorder(every=1)  # every batch sampled: every arrival stamped
        self.max_io_queues = MAX_IO_QUEUES
        self.sqs: dict[int, Any] = {}
        self.cqs: dict[int, Any] = {}
        self.dbbuf: Any = None
        self.bus_master = True

    def doorbell(self, qid: int, is_cq: bool, value: int) -> None:
        self.delivered.append((qid, is_cq, value))
        self.on_doorbell(qid, is_cq, value)

    def sq_tail_doorbell(self, sq: Any, value: int) -> None:
        self.tails.append((sq, value))

    def set_fatal(self, reason: str) -> None:
        self.fatal.append(reason)

    def add_queue_listener(self, listener: QueueListener) -> None:
        self.listeners.append(listener)

    def register_cq_head_source(self, source: CqHeadSource) -> None:
        self.source = source

    def unregister_cq_head_source(self, source: CqHeadSource) -> None:
        if self.source is source:
            self.source = None

    def event(self, event: QueueEvent, qid: int = 0) -> None:
        """What the controller does: change what the port shows first, then tell."""
        for listener in self.listeners:
            listener(event, qid)


class Narrow:
    """``fake`` seen through the port: any other attribute is an error."""

    def __init__(self, fake: FakePort) -> None:
        object.__setattr__(self, "_fake", fake)

    def __getattr__(self, name: str) -> Any:
        if name not in PORT_MEMBERS:
            raise AttributeError(f"a doorbell path reached for {name!r}, which is not on the doorbell port")
        return getattr(self._fake, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a doorbell path set {name!r} on the controller")


def _port_typed(fake: FakePort) -> DoorbellPort:
    return fake  # the fake is a DoorbellPort (mypy checks this line when it checks tests)


@pytest.fixture
def port() -> FakePort:
    return FakePort()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


def make(mode: db.DoorbellMode, fake: FakePort, **kw: Any) -> db.DoorbellPath:
    bar0 = Region(BAR0_SIZE, mmap_areas=db.bar0_mmap_areas(mode))
    return db.make_path(mode, Narrow(fake), bar0, **kw)  # type: ignore[arg-type]


def ring(path: db.DoorbellPath, slot: int, value: int) -> None:
    path.trapped_write(Reg.DOORBELLS + 4 * slot, value.to_bytes(4, "little"))


def signal(path: db.DoorbellPath, slot: int, value: int) -> None:
    """What KVM does for a shadow ioeventfd: store the value, then signal."""
    path.page.value_words[slot] = value
    os.eventfd_write(path.ioeventfds[slot].fd, 1)  # type: ignore[attr-defined]


# -- the port itself ---------------------------------------------------------------------


def test_the_port_names_exactly_what_a_path_may_use() -> None:
    assert PORT_MEMBERS == {
        "doorbell", "sq_tail_doorbell", "set_fatal",
        "max_io_queues", "latency", "sqs", "cqs", "dbbuf", "bus_master",
        "add_queue_listener", "register_cq_head_source", "unregister_cq_head_source",
    }  # fmt: skip
    ctrl = Controller([open_namespace("ram:size=1M,nsid=1")])
    missing = [name for name in PORT_MEMBERS if not hasattr(ctrl, name)]
    assert not missing, f"the controller does not implement {missing}"
    ctrl.close()
    _port_typed(FakePort())


def test_doorbell_paths_hold_no_controller() -> None:
    """The paths' module names no controller state and imports no controller."""
    source = Path(db.__file__).read_text()
    assert ".state." not in source and "cq_head_source =" not in source
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "controller" not in imported and "nvme_emu.controller" not in imported
    probe = "import sys, nvme_emu.doorbell; print('nvme_emu.controller' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", [m for m in db.DoorbellMode])
def test_every_path_takes_trapped_writes_through_the_port(port: FakePort, mode: db.DoorbellMode) -> None:
    path = make(mode, port)
    assert path.nslots == 2 * (MAX_IO_QUEUES + 1)
    assert port.listeners == [path._queue_event]
    ring(path, 2, 5)  # SQ 1 tail
    ring(path, 3, 7)  # CQ 1 head
    ring(path, 2, 5)  # the same tail again: no news without a shadow buffer
    ring(path, 2 * (MAX_IO_QUEUES + 1), 1)  # beyond the page: ignored
    assert port.delivered == [(1, False, 5), (1, True, 7)]
    assert port.latency.via is Via.TRAP and port.latency.arrived
    port.event(QueueEvent.RESET)  # the doorbells read as zero again
    ring(path, 2, 5)
    assert port.delivered[-1] == (1, False, 5)
    shares_page = isinstance(path, db.SharedPagePath)
    assert (port.source is path) == shares_page
    path.close()
    assert port.source is None


def test_a_repeated_kick_is_news_under_a_shadow_buffer(port: FakePort) -> None:
    """The path binds the port's buffer at each queue event (DBBUF, RESET)."""
    path = make(db.DoorbellMode.TRAP, port)
    ring(path, 2, 4)
    port.dbbuf = object()
    port.event(QueueEvent.DBBUF)
    ring(path, 2, 4)
    assert port.delivered == [(1, False, 4), (1, False, 4)]
    port.dbbuf = None
    port.event(QueueEvent.RESET)
    ring(path, 2, 4)
    ring(path, 2, 4)
    assert len(port.delivered) == 3


# -- shadow ioeventfds -----------------------------------------------------------------------


def test_shadow_path_wakes_on_sq_tails_and_peeks_at_cq_heads(port: FakePort, loop: asyncio.AbstractEventLoop) -> None:
    path = make(db.DoorbellMode.SHADOW, port, spin_us=0.0)
    assert isinstance(path, db.ShadowPath)
    path.attach(loop)
    signal(path, 2, 3)
    path._signalled(2)
    assert port.delivered == [(1, False, 3)]
    assert port.latency.via is Via.EVENTFD
    # a CQ head nothing woke us for: the controller peeks at it through the registered source
    assert port.source is path
    path.page.value_words[3] = 9
    assert port.source.peek_cq_head(1) == 9
    assert port.source.peek_cq_head(1) is None  # taken: nothing new
    assert port.source.peek_cq_head(MAX_IO_QUEUES + 1) is None  # no such slot
    # a full CQ is armed; its wake-up delivers the head, and disarms once the CQ has room
    port.cqs[1] = SimpleNamespace(room=0)
    port.source.arm_cq_head(1)
    assert path.armed == {3}
    signal(path, 3, 12)
    path._signalled(3)
    assert port.delivered[-1] == (1, True, 12) and path.armed == {3}  # still full
    port.cqs[1].room = 4
    signal(path, 3, 13)
    path._signalled(3)
    assert port.delivered[-1] == (1, True, 13) and not path.armed
    # deleting a CQ takes its armed eventfd along
    port.source.arm_cq_head(1)
    port.event(QueueEvent.DELETE_CQ, 1)
    assert not path.armed
    path.detach()
    path.close()
    assert port.source is None


def test_shadow_spin_hands_new_tails_to_the_looked_up_sq(port: FakePort, loop: asyncio.AbstractEventLoop) -> None:
    """A spin hit goes straight to the SQ the path looked up in the port's ``sqs``."""
    path = make(db.DoorbellMode.SHADOW, port, spin_us=2000.0)
    assert isinstance(path, db.ShadowPath)
    sq = port.sqs[1] = object()
    port.event(QueueEvent.CREATE_SQ, 1)
    # the host rings again right after our delivery: the spin window sees it
    port.on_doorbell = lambda qid, is_cq, value: path.page.value_words.__setitem__(2, value + 1)
    signal(path, 2, 1)
    path._signalled(2)
    assert port.delivered == [(1, False, 1)]
    assert port.tails == [(sq, 2)]
    assert path.stats.spin_hits == 1 and path.stats.spin_misses == 1
    path.close()


def test_auto_path_is_the_shadow_path(port: FakePort) -> None:
    path = make(db.DoorbellMode.AUTO, port)
    assert path.active_mode is db.DoorbellMode.TRAP
    assert port.source is path
    path.close()


# -- plain ioeventfds (with a shadow buffer) ---------------------------------------------


def test_ioeventfd_path_kicks_only_with_a_shadow_buffer(port: FakePort) -> None:
    path = make(db.DoorbellMode.IOEVENTFD, port)
    assert isinstance(path, db.IoEventFdPath)
    efd = path.ioeventfds[2]
    os.eventfd_write(efd.fd, 1)
    path._signalled(2, efd)
    assert port.delivered == [] and path.stats.lost_values == 1
    port.dbbuf = object()
    port.event(QueueEvent.DBBUF)
    os.eventfd_write(efd.fd, 2)
    path._signalled(2, efd)
    assert port.delivered == [(1, False, 0)]  # the value is the buffer's
    assert port.latency.via is Via.IOEVENTFD
    path.close()


# -- the poller --------------------------------------------------------------------------------


class FakeShadowBuffer:
    def __init__(self, tails: dict[int, int]) -> None:
        self.tails = tails

    def sq_tail(self, qid: int) -> int:
        return self.tails[qid]


def test_poll_path_scans_the_page_cq_heads_first(port: FakePort) -> None:
    path = make(db.DoorbellMode.POLL, port, spin_us=0.0)
    words = path.page.value_words
    words[2], words[3], words[5] = 6, 2, 1
    assert path._run() == 3
    assert port.delivered == [(1, True, 2), (2, True, 1), (1, False, 6)]
    assert port.latency.via is Via.POLL
    assert port.source is path
    path.page.value_words[5] = 4
    assert path.peek_cq_head(2) == 4
    path.close()


def test_poll_path_polls_shadow_tails_while_bus_master(port: FakePort) -> None:
    path = make(db.DoorbellMode.POLL, port, spin_us=0.0)
    assert isinstance(path, db.PollPath)
    port.sqs.update({0: SimpleNamespace(tail=0, size=16), 1: SimpleNamespace(tail=0, size=16), 2: SimpleNamespace(tail=5, size=16)})
    port.dbbuf = FakeShadowBuffer({1: 3, 2: 5})
    assert path._poll_dbbuf() == 0  # not bound yet: no DBBUF event came
    port.event(QueueEvent.DBBUF)
    port.bus_master = False
    assert path._poll_dbbuf() == 0  # host memory is not read while BME is clear
    port.bus_master = True
    assert path._poll_dbbuf() == 1
    assert port.delivered == [(1, False, 0)]  # SQ 2's shadow tail is no news; the admin SQ has none
    path.close()


def test_a_failing_poll_round_makes_the_controller_fatal(port: FakePort, loop: asyncio.AbstractEventLoop) -> None:
    path = make(db.DoorbellMode.POLL, port, spin_us=0.0, idle_max_us=100.0)

    def broken(qid: int, is_cq: bool, value: int) -> None:
        raise RuntimeError("a bug behind the doorbell")

    port.on_doorbell = broken
    path.attach(loop)
    path.page.value_words[2] = 1

    async def until_fatal() -> None:
        deadline = time.monotonic() + 10
        while not port.fatal and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    loop.run_until_complete(until_fatal())
    assert port.fatal == ["internal error in the doorbell poller"]
    port.on_doorbell = lambda qid, is_cq, value: None
    path.page.value_words[2] = 2  # the poller goes on after a failed round

    async def until_delivered() -> None:
        deadline = time.monotonic() + 10
        while port.delivered[-1] != (1, False, 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    loop.run_until_complete(until_delivered())
    assert port.delivered[-1] == (1, False, 2)
    path.detach()
    loop.run_until_complete(asyncio.sleep(0))  # let the cancelled poller finish
    path.close()
