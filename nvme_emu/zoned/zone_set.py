"""The zones of one zoned namespace and every transition of the ZNS zone state machine (ZNS
1.1, "Zone State Machine"), sans-IO: the model decides and moves write pointers; its caller
does the reads, writes and deallocations it is told to.

Where the specification leaves a choice, the model makes the one QEMU's hw/nvme makes
(issue 25), and says so where it does:

- Open Resources are reclaimed by closing the oldest implicitly opened zone when a zone must
  open and all are in use (QEMU's ``zoned.auto_transition``, on by default);
- a Close of an opened zone leaves it Closed even if nothing was written to it;
- Reads across zone boundaries are refused with Zone Boundary Error unless the namespace is
  made with ``cross_zone_read`` (QEMU's ``zoned.cross_read``, off by default; OZCS.RAZB
  advertises it). Linux splits I/O at zone boundaries, so it never asks;
- Full, Read Only and Offline zones report the write pointer as all ones;
- at shutdown (and when state is restored after a restart) opened zones become Closed, or
  Empty if nothing was written to them.

One departure: QEMU closes an implicitly opened zone before it checks Active Resources, so a
write refused with Too Many Active Zones has still closed a zone. Here a refused command
changes nothing.

Reads of LBAs above a zone's write pointer return zeros: a namespace reads deallocated LBAs as
zeros (DLFEAT 001b), and every written LBA of a zone is deallocated when the zone is reset
(:meth:`ZoneSet.send` returns the ranges for the caller to deallocate). A new zoned namespace
has to start deallocated for the same to hold of zones never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from ..spec.commands import NvmeError, Status
from ..spec.zns import (
    ACTIVE_STATES,
    OPEN_STATES,
    REPORT_OPTION_STATE,
    SELECT_ALL_STATES,
    WP_INVALID,
    WP_VALID_STATES,
    ZoneAttribute,
    ZoneReportOption,
    ZoneSendAction,
    ZoneState,
)
from .changed import ChangedZoneList

#: An LBA range as (SLBA, number of LBAs).
LbaRange = tuple[int, int]

#: Attributes the controller sets about a zone's life; a Reset starts the zone afresh.
_CLEARED_BY_RESET = ZoneAttribute.ZFC | ZoneAttribute.FZR | ZoneAttribute.RZR


@dataclass(slots=True)
class Zone:
    """One zone: its start LBA (ZSLBA), capacity (ZCAP, writable LBAs, at most the zone
    size), write pointer, state and attributes. ``wp`` is kept in every state; the
    descriptor reports it only where the specification says it is valid (:attr:`reported_wp`)."""

    index: int
    zslba: int
    zcap: int
    wp: int
    state: ZoneState = ZoneState.EMPTY
    attrs: ZoneAttribute = ZoneAttribute(0)

    @property
    def write_boundary(self) -> int:
        """One past the last writable LBA."""
        return self.zslba + self.zcap

    @property
    def written(self) -> int:
        """LBAs written since the last reset (the zone's whole capacity once Full)."""
        return self.wp - self.zslba

    @property
    def reported_wp(self) -> int:
        return self.wp if self.state in WP_VALID_STATES else WP_INVALID


class ZoneStore(Protocol):
    """Where a zone set's state is kept across restarts (:mod:`nvme_emu.zoned.sidecar`).

    :meth:`zone_changed` is called after every change of a zone's state, attributes or write
    pointer, before the command that made it completes, so what the store holds is never
    behind what the host was told; it must be cheap (the write path calls it per command).
    :meth:`sync` makes what it holds durable (Flush, FUA, shutdown); the zone set never calls
    it, as it does no I/O."""

    def zone_changed(self, zone: Zone) -> None: ...

    def sync(self) -> None: ...


@dataclass(slots=True)
class ZoneStats:
    """Counters since the namespace was made; the zones per state are counted on demand."""

    writes: int = 0  # Write (and Write Zeroes, Copy) commands that moved a write pointer
    appends: int = 0
    resets: int = 0  # zones reset, by the host (one per zone of a Select All)
    finishes: int = 0  # zones finished by the host
    auto_closes: int = 0  # implicitly opened zones closed to free an Open Resource


@dataclass(slots=True)
class ZoneReport:
    """What Report Zones returns: the header's Number of Zones and the zones to describe."""

    number_of_zones: int
    zones: list[Zone] = field(default_factory=list)


class ZoneSet:
    """The zones of one namespace: ``nlbas // zone_size`` zones of ``zone_size`` LBAs, each
    writable up to ``zone_capacity`` LBAs; LBAs past the last whole zone are not part of
    the namespace (:attr:`nlbas`).

    ``max_open`` and ``max_active`` bound the Open and Active Resources (0 = no limit; the
    Identify fields MOR and MAR are these minus one). ``on_descriptor_changed`` is called when
    the controller changes a zone on its own (:meth:`make_read_only`, :meth:`make_offline`,
    :meth:`finish_by_controller`): the caller raises the Zone Descriptor Changed notice, which
    the Asynchronous Event Configuration may mask. Such zones also go to :attr:`changed`.
    ``store`` (:class:`ZoneStore`), when set, hears of every change of a zone.
    """

    def __init__(
        self,
        nlbas: int,
        zone_size: int,
        zone_capacity: int | None = None,
        *,
        max_open: int = 0,
        max_active: int = 0,
        auto_transition: bool = True,
        cross_zone_read: bool = False,
        on_descriptor_changed: Callable[[], None] | None = None,
        store: ZoneStore | None = None,
    ) -> None:
        cap = zone_size if zone_capacity is None else zone_capacity
        if zone_size <= 0 or not 0 < cap <= zone_size:
            raise ValueError(f"zone capacity {cap} must be in 1..zone size {zone_size}")
        if nlbas < zone_size:
            raise ValueError(f"{nlbas} LBAs hold no zone of {zone_size} LBAs")
        if max_open < 0 or max_active < 0:
            raise ValueError("max_open and max_active are counts (0 = no limit)")
        if max_open and max_active and max_open > max_active:
            # Every open zone is active, so more open than active zones could never be used
            # (QEMU refuses the same configuration).
            raise ValueError(f"max_open {max_open} exceeds max_active {max_active}")
        self.zone_size = zone_size
        self.zone_capacity = cap
        self.max_open = max_open
        self.max_active = max_active
        self.auto_transition = auto_transition
        self.cross_zone_read = cross_zone_read
        self.on_descriptor_changed = on_descriptor_changed
        self.store = store
        self.zones = [Zone(i, i * zone_size, cap, i * zone_size) for i in range(nlbas // zone_size)]
        self.open_count = 0
        self.active_count = 0
        # Implicitly opened zones, oldest first: the one auto-transition closes.
        self._implicit: dict[int, None] = {}
        self.changed = ChangedZoneList()
        self.counters = ZoneStats()

    @property
    def num_zones(self) -> int:
        return len(self.zones)

    @property
    def nlbas(self) -> int:
        """The namespace's size in LBAs: whole zones only."""
        return len(self.zones) * self.zone_size

    def zone_at(self, lba: int) -> Zone:
        """The zone holding ``lba``; LBA Out of Range past the namespace."""
        if not 0 <= lba < self.nlbas:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"LBA {lba} past {self.nlbas} LBAs")
        return self.zones[lba // self.zone_size]

    def _save(self, zone: Zone) -> None:
        """Tell the store (if any) that ``zone`` changed; called once its change is whole."""
        if self.store is not None:
            self.store.zone_changed(zone)

    def _check_range(self, slba: int, nlb: int) -> None:
        if nlb < 1 or slba < 0 or slba + nlb > self.nlbas:
            raise NvmeError(Status.LBA_OUT_OF_RANGE, f"LBAs {slba}+{nlb} past {self.nlbas} LBAs")

    # -----------------------------------------------------------------------------------------
    # Resources and the state changes every path shares
    # -----------------------------------------------------------------------------------------

    def _release(self, zone: Zone) -> None:
        """Give back the resources ``zone``'s current state holds (its caller sets the next)."""
        if zone.state in OPEN_STATES:
            self.open_count -= 1
            self._implicit.pop(zone.index, None)
        if zone.state in ACTIVE_STATES:
            self.active_count -= 1

    def _open(self, zone: Zone, *, implicit: bool) -> None:
        """An Empty or Closed zone opens: take an Open Resource (and an Active one if Empty).

        With auto-transition, when every Open Resource is in use, the oldest implicitly
        opened zone is closed to free one (ZNS 1.1 lets the controller do so; QEMU's
        ``zoned.auto_transition`` does, by default). Explicitly opened zones are the host's
        to close, so with none implicitly opened the command fails with Too Many Open Zones.
        """
        new_active = zone.state == ZoneState.EMPTY
        if new_active and self.max_active and self.active_count >= self.max_active:
            raise NvmeError(Status.TOO_MANY_ACTIVE_ZONES, f"{self.active_count} zones active")
        if self.max_open and self.open_count >= self.max_open:
            if not (self.auto_transition and self._implicit):
                raise NvmeError(Status.TOO_MANY_OPEN_ZONES, f"{self.open_count} zones open")
            victim = self.zones[next(iter(self._implicit))]
            self._release(victim)
            self.active_count += 1  # it stays active, Closed
            victim.state = ZoneState.CLOSED
            self.counters.auto_closes += 1
            self._save(victim)
        self.open_count += 1
        if new_active:
            self.active_count += 1
        if implicit:
            zone.state = ZoneState.IMPLICITLY_OPENED
            self._implicit[zone.index] = None
        else:
            zone.state = ZoneState.EXPLICITLY_OPENED

    def _to_full(self, zone: Zone) -> None:
        self._release(zone)
        zone.state = ZoneState.FULL
        zone.wp = zone.write_boundary

    # -----------------------------------------------------------------------------------------
    # I/O: Write (Write Zeroes, Copy's destination), Zone Append, Read
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_writable(zone: Zone) -> None:
        if zone.state == ZoneState.FULL:
            raise NvmeError(Status.ZONE_IS_FULL, f"zone {zone.index} is full")
        if zone.state == ZoneState.READ_ONLY:
            raise NvmeError(Status.ZONE_IS_READ_ONLY, f"zone {zone.index} is read only")
        if zone.state == ZoneState.OFFLINE:
            raise NvmeError(Status.ZONE_IS_OFFLINE, f"zone {zone.index} is offline")

    def _write_at(self, zone: Zone, slba: int, nlb: int) -> None:
        if slba + nlb > zone.write_boundary:
            raise NvmeError(Status.ZONE_BOUNDARY_ERROR, f"LBAs {slba}+{nlb} cross zone {zone.index}'s capacity")
        if zone.state in (ZoneState.EMPTY, ZoneState.CLOSED):
            self._open(zone, implicit=True)
        zone.wp += nlb
        if zone.wp == zone.write_boundary:
            self._to_full(zone)
        # Once per write, after the state and the write pointer both moved: the store keeps
        # them as one record, so it never holds one without the other.
        if self.store is not None:
            self.store.zone_changed(zone)

    def write(self, slba: int, nlb: int) -> int:
        """A Write of ``nlb`` LBAs at ``slba`` (also Write Zeroes and a Copy's destination):
        check it against the zone, open the zone if it is Empty or Closed, move the write
        pointer; Full once it reaches the zone's capacity. Returns ``slba``, where the data
        goes. Refused writes change nothing.

        The checks run in QEMU's order: the namespace's range, the zone's state (Full, Read
        Only, Offline), the write pointer (Zone Invalid Write), the capacity (Zone Boundary
        Error), then Active and Open Resources.
        """
        self._check_range(slba, nlb)
        zone = self.zones[slba // self.zone_size]
        self._check_writable(zone)
        if slba != zone.wp:
            raise NvmeError(Status.ZONE_INVALID_WRITE, f"write at {slba}, zone {zone.index}'s write pointer is {zone.wp}")
        self._write_at(zone, slba, nlb)
        self.counters.writes += 1
        return slba

    def append(self, zslba: int, nlb: int) -> int:
        """A Zone Append of ``nlb`` LBAs to the zone starting at ``zslba``: the data goes at
        the write pointer, which is returned (the command's completion carries it).
        ``zslba`` that is not a zone's start is Invalid Field in Command."""
        self._check_range(zslba, nlb)
        zone = self.zones[zslba // self.zone_size]
        if zslba != zone.zslba:
            raise NvmeError(Status.INVALID_FIELD, f"Zone Append to {zslba}, not a zone start")
        self._check_writable(zone)
        slba = zone.wp
        self._write_at(zone, slba, nlb)
        self.counters.appends += 1
        return slba

    def check_read(self, slba: int, nlb: int) -> None:
        """Refuse a Read (Compare, Verify, a Copy's source) the zones do not allow: from an
        Offline zone (Zone Is Offline), or across a zone boundary without Read Across Zone
        Boundaries (Zone Boundary Error). LBAs above the write pointer read as zeros."""
        self._check_range(slba, nlb)
        first = slba // self.zone_size
        last = (slba + nlb - 1) // self.zone_size
        if self.zones[first].state == ZoneState.OFFLINE:
            raise NvmeError(Status.ZONE_IS_OFFLINE, f"zone {first} is offline")
        if last != first:
            if not self.cross_zone_read:
                raise NvmeError(Status.ZONE_BOUNDARY_ERROR, f"read {slba}+{nlb} crosses zone {first}")
            for zone in self.zones[first + 1 : last + 1]:
                if zone.state == ZoneState.OFFLINE:
                    raise NvmeError(Status.ZONE_IS_OFFLINE, f"zone {zone.index} is offline")

    # -----------------------------------------------------------------------------------------
    # Zone Management Send
    # -----------------------------------------------------------------------------------------

    def send(self, action: int, slba: int = 0, *, select_all: bool = False) -> list[LbaRange]:
        """Zone Management Send: ``action`` on the zone starting at ``slba``, or with
        ``select_all`` on every zone in the states the action lists (``slba`` is then
        ignored). Returns the LBA ranges a Reset left deallocated, for the caller to
        deallocate in storage; the other actions return none.

        A single zone in a state the action does not leave from fails with Invalid Zone State
        Transition; one already in the action's target state succeeds unchanged. With Select
        All, Open fails with Too Many Open Zones, changing nothing, if the Closed zones would
        not all fit the Open Resources.
        """
        try:
            zsa = ZoneSendAction(action)
        except ValueError:
            raise NvmeError(Status.INVALID_FIELD, f"Zone Send Action {action:#x}") from None
        if zsa == ZoneSendAction.SET_ZONE_DESCRIPTOR_EXTENSION:
            # No zone descriptor extensions (ZDES 0): ZNS 1.1 makes the action invalid then.
            raise NvmeError(Status.INVALID_FIELD, "no zone descriptor extensions")
        op = self._ACTIONS[zsa]
        if not select_all:
            zone = self.zone_at(slba)
            if slba != zone.zslba:
                raise NvmeError(Status.INVALID_FIELD, f"{slba} is not a zone start")
            return op(self, zone)
        targets = [z for z in self.zones if z.state in SELECT_ALL_STATES[zsa]]
        if zsa == ZoneSendAction.OPEN and self.max_open and self.open_count + len(targets) > self.max_open:
            # Closing implicitly opened zones would not help: they would be Closed zones too.
            raise NvmeError(Status.TOO_MANY_OPEN_ZONES, f"{len(targets)} closed zones, {self.open_count} open")
        ranges: list[LbaRange] = []
        for zone in targets:
            ranges += op(self, zone)
        return ranges

    def open(self, zone: Zone) -> list[LbaRange]:
        """Open Zone: Empty, Closed or Implicitly Opened -> Explicitly Opened."""
        if zone.state in (ZoneState.EMPTY, ZoneState.CLOSED):
            self._open(zone, implicit=False)
        elif zone.state == ZoneState.IMPLICITLY_OPENED:
            self._implicit.pop(zone.index)
            zone.state = ZoneState.EXPLICITLY_OPENED
        elif zone.state != ZoneState.EXPLICITLY_OPENED:
            raise self._invalid(zone, "open")
        else:
            return []
        self._save(zone)
        return []

    def close(self, zone: Zone) -> list[LbaRange]:
        """Close Zone: an opened zone -> Closed (QEMU's choice even if nothing was written)."""
        if zone.state in OPEN_STATES:
            self._release(zone)
            self.active_count += 1  # a Closed zone stays active
            zone.state = ZoneState.CLOSED
            self._save(zone)
        elif zone.state != ZoneState.CLOSED:
            raise self._invalid(zone, "close")
        return []

    def finish(self, zone: Zone) -> list[LbaRange]:
        """Finish Zone: Empty, opened or Closed -> Full, the write pointer to the capacity's
        end (the LBAs between hold no data and read as zeros)."""
        if zone.state in ACTIVE_STATES or zone.state == ZoneState.EMPTY:
            self._to_full(zone)
            self.counters.finishes += 1
            self._save(zone)
        elif zone.state != ZoneState.FULL:
            raise self._invalid(zone, "finish")
        return []

    def reset(self, zone: Zone) -> list[LbaRange]:
        """Reset Zone: opened, Closed or Full -> Empty, write pointer back to the zone start;
        returns the written LBAs, which the caller deallocates."""
        if zone.state == ZoneState.EMPTY:
            self.counters.resets += 1
            return []
        if zone.state not in ACTIVE_STATES and zone.state != ZoneState.FULL:
            raise self._invalid(zone, "reset")
        written = zone.written
        self._release(zone)
        zone.state = ZoneState.EMPTY
        zone.wp = zone.zslba
        zone.attrs &= ~_CLEARED_BY_RESET
        self.counters.resets += 1
        self._save(zone)
        return [(zone.zslba, written)] if written else []

    def offline(self, zone: Zone) -> list[LbaRange]:
        """Offline Zone: Read Only -> Offline (the only way the host may take a zone offline)."""
        if zone.state == ZoneState.READ_ONLY:
            zone.state = ZoneState.OFFLINE
            self._save(zone)
        elif zone.state != ZoneState.OFFLINE:
            raise self._invalid(zone, "offline")
        return []

    @staticmethod
    def _invalid(zone: Zone, what: str) -> NvmeError:
        return NvmeError(Status.INVALID_ZONE_STATE_TRANSITION, f"cannot {what} zone {zone.index} in {zone.state.name}")

    _ACTIONS: dict[ZoneSendAction, Callable[[ZoneSet, Zone], list[LbaRange]]] = {
        ZoneSendAction.OPEN: open,
        ZoneSendAction.CLOSE: close,
        ZoneSendAction.FINISH: finish,
        ZoneSendAction.RESET: reset,
        ZoneSendAction.OFFLINE: offline,
    }

    # -----------------------------------------------------------------------------------------
    # Zone Management Receive: Report Zones
    # -----------------------------------------------------------------------------------------

    def report(self, slba: int, option: int = ZoneReportOption.ALL, *, partial: bool = False, max_zones: int) -> ZoneReport:
        """Report Zones from the zone holding ``slba``: the zones matching the Reporting
        Option, at most ``max_zones`` of them (what the host's buffer holds after the header).
        Number of Zones counts every matching zone to the namespace's end, or, with the
        Partial Report bit, only those returned."""
        try:
            opt = ZoneReportOption(option)
        except ValueError:
            raise NvmeError(Status.INVALID_FIELD, f"Reporting Options {option:#x}") from None
        first = self.zone_at(slba).index
        want = REPORT_OPTION_STATE.get(opt)
        matching = [z for z in self.zones[first:] if want is None or z.state == want]
        returned = matching[: max(max_zones, 0)]
        return ZoneReport(len(returned) if partial else len(matching), returned)

    # -----------------------------------------------------------------------------------------
    # The controller's own changes (the control plane's fault injection)
    # -----------------------------------------------------------------------------------------

    def _changed_by_controller(self, zone: Zone) -> None:
        self._save(zone)
        if self.changed.add(zone.zslba) and self.on_descriptor_changed is not None:
            self.on_descriptor_changed()

    def make_read_only(self, index: int) -> bool:
        """The zone becomes Read Only (a media fault): readable, no longer writable, its
        resources freed. False if it already was; ValueError for an Offline zone, which no
        transition leaves."""
        zone = self.zones[index]
        if zone.state == ZoneState.READ_ONLY:
            return False
        if zone.state == ZoneState.OFFLINE:
            raise ValueError(f"zone {index} is offline")
        self._release(zone)
        zone.state = ZoneState.READ_ONLY
        self._changed_by_controller(zone)
        return True

    def make_offline(self, index: int) -> bool:
        """The zone goes Offline: neither readable nor writable. False if it already was."""
        zone = self.zones[index]
        if zone.state == ZoneState.OFFLINE:
            return False
        self._release(zone)
        zone.state = ZoneState.OFFLINE
        self._changed_by_controller(zone)
        return True

    def finish_by_controller(self, index: int) -> None:
        """A zone active excursion: the controller finishes an opened or Closed zone and sets
        its Zone Finished by Controller attribute (advertised by ZOC.ZAE)."""
        zone = self.zones[index]
        if zone.state not in ACTIVE_STATES:
            raise ValueError(f"zone {index} is {zone.state.name}, not active")
        self._to_full(zone)
        zone.attrs |= ZoneAttribute.ZFC
        self._changed_by_controller(zone)

    # -----------------------------------------------------------------------------------------
    # Shutdown, restore, stats
    # -----------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """What a controller shutdown (and a restart) leaves: no zone open. Opened and Closed
        zones become Closed, or Empty when nothing was written to them, as QEMU does."""
        for zone in self.zones:
            if zone.state in ACTIVE_STATES:
                self._release(zone)
                if zone.wp == zone.zslba:
                    zone.state = ZoneState.EMPTY
                else:
                    zone.state = ZoneState.CLOSED
                    self.active_count += 1
                self._save(zone)

    def restore(self, zones: Iterable[tuple[ZoneState, ZoneAttribute, int]]) -> None:
        """Set each zone's (state, attributes, write pointer) as saved, then :meth:`shutdown`:
        a restarted namespace has no open zones. Closed zones count as active even past
        ``max_active`` if the limit was lowered: new zones then cannot open until enough are
        finished or reset."""
        saved = list(zones)
        if len(saved) != len(self.zones):
            raise ValueError(f"{len(saved)} zones saved, the namespace has {len(self.zones)}")
        for zone, (_state, _attrs, wp) in zip(self.zones, saved, strict=True):
            if not zone.zslba <= wp <= zone.write_boundary:
                raise ValueError(f"zone {zone.index}: write pointer {wp} outside the zone")
        self.open_count = self.active_count = 0
        self._implicit.clear()
        for zone, (state, attrs, wp) in zip(self.zones, saved, strict=True):
            zone.state, zone.attrs, zone.wp = ZoneState(state), ZoneAttribute(attrs), wp
            if zone.state in OPEN_STATES:
                self.open_count += 1
                if zone.state == ZoneState.IMPLICITLY_OPENED:
                    self._implicit[zone.index] = None
            if zone.state in ACTIVE_STATES:
                self.active_count += 1
        self.shutdown()
        for zone in self.zones:
            self._save(zone)

    def zones_per_state(self) -> dict[ZoneState, int]:
        counts = dict.fromkeys(ZoneState, 0)
        for zone in self.zones:
            counts[zone.state] += 1
        return counts

    def stats(self) -> dict[str, int]:
        """Zones per state, open and active counts and limits, and the counters."""
        out = {f"zones_{state.name.lower()}": n for state, n in self.zones_per_state().items()}
        out.update(
            zones=self.num_zones, open=self.open_count, active=self.active_count,
            max_open=self.max_open, max_active=self.max_active,
            writes=self.counters.writes, appends=self.counters.appends, resets=self.counters.resets,
            finishes=self.counters.finishes, auto_closes=self.counters.auto_closes,
        )
        return out
