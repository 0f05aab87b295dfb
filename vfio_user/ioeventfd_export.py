"""Hand a region's ioeventfds to an agent inside the VMM, at the BAR's guest address.

QEMU's vfio-user client never asks for io fds (GET_REGION_IO_FDS), and KVM refuses VM
ioctls from any process but the VM's creator, so a server cannot register ioeventfds on
QEMU's VM itself. The agent (``nvme_emu/agent``, LD_PRELOADed into an unmodified QEMU)
can. This module is the server's half: it follows the BAR's address and Memory Space
Enable in config space (QEMU forwards those writes), asks the device which ioeventfds to
export (all of them with POST_WRITE; without it only those whose value the device can
find elsewhere), and sends them with :meth:`IoeventfdAgent.set`. It withdraws them when
decoding goes off, the BAR moves, the client detaches or the device says its set changed.

Nothing here can break the device: any agent failure is logged and counted, and the
doorbells simply stay trapped (REGION_WRITE), which the device serves as always.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .device import Device, DeviceObserver
from .ioeventfd_agent import AgentCaps, AgentError, AgentRecord, IoeventfdAgent
from .pci import BAR0, BAR_MEM_64, COMMAND, COMMAND_MEMORY

log = logging.getLogger(__name__)


@dataclass
class ExportStats:
    """What the export did, for the device's stats."""

    agent: str = ""
    connected: bool = False
    post_write: bool = False
    bar_gpa: int | None = None
    registered: int = 0
    refused: int = 0
    sets: int = 0
    clears: int = 0
    failures: int = 0
    agent_gone: int = 0
    last_error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class IoeventfdExport(DeviceObserver):
    """Keeps the agent's registrations equal to (BAR address, device's exported set)."""

    device: Device
    index: int
    agent_path: str
    timeout: float = 2.0
    #: False: plain ioeventfds even where the kernel has POST_WRITE (to compare the two)
    use_post_write: bool = True
    counters: ExportStats = field(default_factory=ExportStats)

    def __post_init__(self) -> None:
        self.counters.agent = self.agent_path
        self._agent: IoeventfdAgent | None = None
        self._caps: AgentCaps | None = None
        self._attached = False
        self._current: tuple | None = None  # what the agent holds now: (gpa, keys)
        self.device.observers.append(self)
        self.device.config.write_hooks.append(self._config_written)

    # -- DeviceObserver -----------------------------------------------------------------

    def describe(self) -> dict:
        return {"ioeventfd_agent": self.counters.as_dict()}

    def device_attached(self) -> None:
        self._attached = True
        self.refresh()

    def device_detached(self) -> None:
        # The VMM may be going away, its agent with it: withdraw if it still listens, then
        # forget the connection (a new VMM brings a new agent).
        self._attached = False
        if self._agent is not None and self._current is not None:
            try:
                self._clear()
            except OSError as e:
                log.info("ioeventfd agent %s gone with its VMM (%s)", self.agent_path, e)
        self._disconnect()

    def ioeventfds_changed(self, index: int) -> None:
        if index == self.index:
            self.refresh()

    def _config_written(self, offset: int, old: int, new: int) -> None:
        bars = range(BAR0 + 4 * self.index, BAR0 + 4 * self.index + 8)
        if old != new and (offset == COMMAND or offset in bars):
            self.refresh()

    # -- the BAR ------------------------------------------------------------------------

    def bar_address(self) -> int | None:
        """The region's guest-physical address while memory decoding is on, else None."""
        cfg = self.device.config
        if not cfg.command & COMMAND_MEMORY:
            return None
        off = BAR0 + 4 * self.index
        lo = cfg.get(off, 4)
        addr = lo & ~0xF
        if lo & BAR_MEM_64:
            addr |= cfg.get(off + 4, 4) << 32
        size = self.device.regions[self.index].size
        if addr == 0 or addr & (size - 1):
            return None  # unassigned, or mid-sizing
        return addr

    # -- keeping the agent in step ------------------------------------------------------

    def refresh(self) -> None:
        """Make the agent hold exactly what it should now (idempotent, never raises)."""
        gpa = self.bar_address() if self._attached else None
        try:
            if gpa is None:
                self._clear()
            else:
                self._set(gpa)
        except (BrokenPipeError, ConnectionResetError) as e:
            # the agent's process (the VMM) is gone: nothing is registered any more
            self.counters.agent_gone += 1
            log.info("ioeventfd agent %s gone (%s); doorbells trapped", self.agent_path, e)
            self._disconnect()
        except Exception as e:  # whatever goes wrong here, the device keeps working trapped
            self.counters.failures += 1
            self.counters.last_error = str(e)
            log.warning("ioeventfd agent %s: %s; doorbells stay trapped", self.agent_path, e,
                        exc_info=not isinstance(e, OSError))
            try:
                self._disconnect()
            except OSError:
                pass

    def _connect(self) -> IoeventfdAgent:
        if self._agent is None:
            self._agent = IoeventfdAgent(self.agent_path, timeout=self.timeout)
            self._caps = self._agent.hello()
            self.counters.connected = True
            self.counters.post_write = self._caps.post_write and self.use_post_write
            log.info("ioeventfd agent %s: %s", self.agent_path, self._caps)
        return self._agent

    def _disconnect(self) -> None:
        if self._agent is not None:
            self._agent.close()
        self._agent = None
        self._caps = None
        self._current = None
        self.counters.connected = False
        self.counters.registered = 0  # whatever the agent held went with the connection
        self.counters.bar_gpa = None

    def _set(self, gpa: int) -> None:
        if not os.path.exists(self.agent_path) and self._agent is None:
            return  # no agent (a VMM started without it): trapped, quietly
        agent = self._connect()
        assert self._caps is not None
        if not self._caps.vm_known:
            raise AgentError(0, "the agent has not seen the VM yet")
        post = self._caps.post_write and self.use_post_write
        efds = self.device.exported_ioeventfds(self.index, post)
        records = [AgentRecord(offset=e.offset, size=e.size, eventfd=e.fd, datamatch=e.datamatch,
                               shadow_fd=e.shadow.fd if post and e.shadow is not None else None,
                               shadow_offset=e.shadow_offset,
                               post_write=post and e.shadow is not None) for e in efds]
        key = (gpa, tuple((r.offset, r.eventfd, r.post_write) for r in records))
        if key == self._current:
            return
        size = self.device.regions[self.index].size
        errors = agent.set(gpa, size, records)
        self._current = key
        self.counters.sets += 1
        self.counters.bar_gpa = gpa
        self.counters.registered = sum(1 for err in errors if err == 0)
        self.counters.refused = len(errors) - self.counters.registered
        refused = {r.offset: os.strerror(err) for r, err in zip(records, errors, strict=True) if err}
        log.info("ioeventfd agent: region %d at %#x: %d ioeventfds registered (%s)%s", self.index, gpa,
                 self.counters.registered, "POST_WRITE" if post else "plain",
                 f", refused {refused}" if refused else "")

    def _clear(self) -> None:
        if self._agent is None or self._current is None:
            return
        self._agent.clear()
        self._current = None
        self.counters.clears += 1
        self.counters.registered = 0
        self.counters.bar_gpa = None
        log.info("ioeventfd agent: region %d withdrawn (doorbells trapped)", self.index)

    def close(self) -> None:
        self._attached = False
        self.refresh()
        self._disconnect()
        if self in self.device.observers:
            self.device.observers.remove(self)
        if self._config_written in self.device.config.write_hooks:
            self.device.config.write_hooks.remove(self._config_written)
