"""The judges of issue 25's guest checks (tests/e2e/test_zoned_guest.py): each reads the
output of a step of :func:`zoned_checks.zns_guest_script` and returns what is wrong by
the ZNS specification (empty: the check passed). They never compare one peer with the
other: QEMU's zoned nvme and nvme-emu each go through the same judges and must be right
alone, so a check cannot pass because both are wrong the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from nvme_emu.spec.zns import ZoneState

from .zoned_checks import (
    APPENDS, FIO_JOBS, FS_FILES_MIB, Geometry, Step, ZoneCount, ZoneFaultPlan, ZoneOp, fio_jobs, key_values,
    zone_ops,
)

#: blkzone report: ``start: 0x000004000, len 0x002000, cap 0x001800, wptr 0x000002 ...,
#: zcond: 4(cl) [type: 2(SEQ_WRITE_REQUIRED)]`` (sectors of 512 bytes).
BLKZONE_RE = re.compile(r"start: (0x[0-9a-f]+), len (0x[0-9a-f]+), cap (0x[0-9a-f]+), wptr (0x[0-9a-f]+) .*"
                        r"zcond:\s*(\d+)\(\w+\) \[type: (\d+)")


@dataclass(frozen=True)
class BlkZone:
    start: int      # sectors
    len: int
    cap: int
    wptr: int       # relative to start
    cond: int       # BLK_ZONE_COND_*: the ZNS zone state's value
    type: int


def parse_blkzone(text: str) -> list[BlkZone]:
    return [BlkZone(*(int(v, 0) for v in m.groups())) for m in BLKZONE_RE.finditer(text)]


OP_RE = re.compile(r"^op (\S+) rc=(\d+) zone=\[(.*?)\] out=\[(.*)\]$", re.M)
COUNT_RE = re.compile(r"^count (\S+) nr_zones: (\d+)", re.M)
#: nvme-cli's ``NVMe status: Zone Is Full: ...(0x41b9)``: the status field (DNR bit 14)
NVME_STATUS_RE = re.compile(r"NVMe status: .*?\((0x[0-9a-fA-F]+)\)")
#: nvme-cli's descriptor line after ``SLBA:``: ``0x800 WP: 0x802 Cap: 0x300 State: 0x40 ...``
DESCRIPTOR_RE = re.compile(r"^\s*(\S+)\s+WP:\s*(\S+)\s+Cap:\s*(\S+)\s+State:\s*(\S+)\s+Type:\s*(\S+)")
#: ``Success appended data to LBA 802`` (hex, no 0x)
APPENDED_RE = re.compile(r"appended data to LBA ([0-9a-fA-F]+)")
#: The status field's Status Code Type and Status Code (bits 10:0; DNR and More dropped).
STATUS_MASK = 0x7FF


@dataclass(frozen=True)
class Descriptor:
    slba: int
    wp: int
    cap: int
    state: int      # the ZNS zone state (ZoneState), not the byte's high nibble
    type: int


@dataclass(frozen=True)
class OpResult:
    label: str
    rc: int
    zone: Descriptor | None
    out: str

    @property
    def status(self) -> int:
        """The NVMe status nvme-cli printed (SCT and SC), 0 when it printed none."""
        m = NVME_STATUS_RE.search(self.out)
        return int(m.group(1), 16) & STATUS_MASK if m else 0


def parse_descriptor(text: str) -> Descriptor | None:
    m = DESCRIPTOR_RE.match(text)
    if m is None:
        return None
    slba, wp, cap, state, ztype = (int(v, 0) for v in m.groups())
    return Descriptor(slba, wp, cap, state >> 4, ztype)


def parse_ops(text: str) -> dict[str, OpResult]:
    return {m.group(1): OpResult(m.group(1), int(m.group(2)), parse_descriptor(m.group(3)), m.group(4))
            for m in OP_RE.finditer(text)}


def _state_name(state: int) -> str:
    try:
        return ZoneState(state).name
    except ValueError:
        return hex(state)


def judge_op(row: ZoneOp, got: OpResult | None) -> list[str]:
    """One row of the zone-management table against what nvme-cli printed."""
    if got is None:
        return [f"{row.label}: no result"]
    problems = []
    want_status = int(row.status) if row.status is not None else 0
    if got.status != want_status or (got.rc == 0) != (row.status is None):
        want = row.status.name if row.status is not None else "success"
        problems.append(f"{row.label}: want {want}, got rc={got.rc} status={got.status:#x} ({got.out})")
    z = got.zone
    if z is None:
        return problems + [f"{row.label}: no zone descriptor for {row.slba:#x}"]
    if z.slba != row.slba:
        problems.append(f"{row.label}: report-zones -s {row.slba:#x} began at {z.slba:#x}")
    if row.state is not None and z.state != row.state:
        problems.append(f"{row.label}: zone {row.slba:#x} is {_state_name(z.state)}, want {row.state.name}")
    if row.wp is not None and z.wp != row.slba + row.wp:
        problems.append(f"{row.label}: zone {row.slba:#x} WP {z.wp:#x}, want {row.slba + row.wp:#x}")
    return problems


def judge_zones(steps: dict[str, Step], g: Geometry) -> list[str]:
    """Zone Management Send/Receive, writes, Zone Append and reads through nvme-cli: each
    row's status and the zone's state and write pointer after it; the appended LBA is the
    write pointer before the append; report-zones' state filters count the zones."""
    out = steps["zones"].output
    ops = parse_ops(out)
    counts = {m.group(1): int(m.group(2)) for m in COUNT_RE.finditer(out)}
    problems: list[str] = []
    for row in zone_ops(g):
        if isinstance(row, ZoneCount):
            if counts.get(row.label) != row.count:
                problems.append(f"{row.label}: report-zones --state={int(row.option)} ({row.option.name}) "
                                f"listed {counts.get(row.label)} zones, want {row.count}")
        else:
            problems += judge_op(row, ops.get(row.label))
    append, before = ops.get("append"), ops.get("close_closed")
    m = APPENDED_RE.search(append.out) if append else None
    if append and before and before.zone and (m is None or int(m.group(1), 16) != before.zone.wp):
        problems.append(f"append: the LBA it returned is not the write pointer before it ({before.zone.wp:#x}): "
                        f"{append.out}")
    return problems


def judge_appends(steps: dict[str, Step], g: Geometry) -> list[str]:
    """32 concurrent Zone Appends to one empty zone: each returned a distinct LBA from the
    zone's start on, the block at each LBA holds what that append wrote, and the write
    pointer moved by 32."""
    out = steps["append"].output
    zslba = g.slba(5)
    problems: list[str] = []
    lbas: dict[int, int] = {}
    for m in re.finditer(r"^append (\d+) out=\[(.*)\]$", out, re.M):
        a = APPENDED_RE.search(m.group(2))
        if a is None:
            problems.append(f"append {m.group(1)} failed: {m.group(2)}")
        else:
            lbas[int(m.group(1))] = int(a.group(1), 16)
    if sorted(lbas.values()) != list(range(zslba, zslba + APPENDS)):
        problems.append(f"the appends' LBAs are not {zslba:#x}..+{APPENDS - 1} once each: "
                        f"{sorted(hex(v) for v in lbas.values())}")
    kv = key_values(out)
    blocks = kv.get("blocks", "")
    held = [blocks[i:i + 10] for i in range(0, len(blocks), 10)]
    for i, lba in lbas.items():
        k = lba - zslba
        if not 0 <= k < len(held) or held[k] != f"append-{i:03d}":
            problems.append(f"append {i} went to {lba:#x}, which holds {held[k] if 0 <= k < len(held) else None!r}")
    after = parse_ops(out).get("after")
    if after is None or after.zone is None or after.zone.wp != zslba + APPENDS \
            or after.zone.state != ZoneState.IMPLICITLY_OPENED:
        problems.append(f"after the appends the zone is {after.zone if after else None}, want WP "
                        f"{zslba + APPENDS:#x} IMPLICITLY_OPENED")
    return problems


def judge_sysfs(steps: dict[str, Step], g: Geometry) -> list[str]:
    """Linux sees a host-managed disk of the configured geometry; Zone Append is usable
    (zone_append_max_bytes is the ZASL or MDTS limit, never 0 on a ZNS namespace)."""
    kv = key_values(steps["sysfs"].output)
    want = {"zoned": "host-managed", "nr_zones": str(g.nr_zones), "chunk_sectors": str(g.zone_size // 512),
            "max_open_zones": str(g.max_open), "max_active_zones": str(g.max_active),
            "logical_block_size": str(g.lba), "size_sectors": str(g.size // 512)}
    problems = [f"{k}={kv.get(k)}, want {v}" for k, v in want.items() if kv.get(k) != v]
    zasl, mdts = int(kv.get("zone_append_max_bytes") or 0), int(kv.get("max_hw_sectors_kb") or 0) * 1024
    if not 0 < zasl <= mdts:
        problems.append(f"zone_append_max_bytes={zasl}, want 1..max_hw_sectors ({mdts})")
    return problems


def expected_zone(g: Geometry, i: int) -> BlkZone:
    """Zone ``i`` of the fresh namespace as blkzone shows it (sectors): empty, sequential."""
    return BlkZone(i * g.zone_size // 512, g.zone_size // 512, g.zone_cap // 512, 0, ZoneState.EMPTY, 2)


def judge_blkzone(steps: dict[str, Step], g: Geometry) -> list[str]:
    """``blkzone report`` of the fresh namespace lists every zone with the configured start,
    length and capacity, empty, sequential write required."""
    zones = parse_blkzone(steps["blkzone"].output)
    if len(zones) != g.nr_zones:
        return [f"blkzone listed {len(zones)} zones, want {g.nr_zones}"]
    return [f"zone {i}: {z}, want {expected_zone(g, i)}" for i, z in enumerate(zones) if z != expected_zone(g, i)]


def judge_fio(name: str) -> Callable[[dict[str, Step], Geometry], list[str]]:
    """A fio job wrote and verified every byte without error, its zones hold exactly what it
    wrote (full ones to capacity) and no more zones are left open than it may open."""

    def judge(steps: dict[str, Step], g: Geometry) -> list[str]:
        job = next(j for j in fio_jobs(g) if j.name == name)
        out = steps[f"fio_{job.name}"].output
        kv = key_values(out)
        m = re.search(rf"^job {job.name} error=(\d+) write=(\d+) read=(\d+)$", out, re.M)
        if kv.get("rc") != "0" or m is None:
            return [f"fio failed: rc={kv.get('rc')}\n{out[-1500:]}"]
        error, written, read = (int(v) for v in m.groups())
        problems = []
        if error or written != job.written(g) or read != written:
            problems.append(f"error={error} write={written} read={read}, want 0, {job.written(g)}, {job.written(g)}")
        zones = parse_blkzone(out)
        held = sum(z.wptr for z in zones if z.cond != ZoneState.FULL) + \
            sum(z.cap for z in zones if z.cond == ZoneState.FULL)
        if len(zones) != job.zones or held * 512 != written:
            problems.append(f"its {len(zones)} zones hold {held * 512} bytes, fio wrote {written}")
        partial = [z for z in zones if z.cond not in (ZoneState.EMPTY, ZoneState.FULL)]
        if len(partial) > max(job.max_open, 1):
            problems.append(f"{len(partial)} zones left open or closed, fio's limit {job.max_open}: {partial}")
        return problems

    return judge


def fs_manifest(steps: dict[str, Step]) -> list[str]:
    """The fs step's ``sha256sum`` lines (what :func:`fs_verify_script` checks again)."""
    return [line[4:] for line in steps["fs"].output.splitlines() if line.startswith("sum ")]


def judge_fs(steps: dict[str, Step], g: Geometry) -> list[str]:
    """btrfs -O zoned: made, mounted, files written with their checksums, unmounted, mounted
    again and every checksum right; the data is on the device (the final report's zones
    hold at least the files' bytes)."""
    out = steps["fs"].output
    kv = key_values(out)
    problems = [f"{k}={kv.get(k)}" for k in ("mkfs", "mount", "sync", "umount", "remount", "verify", "umount_again")
                if kv.get(k) != "0"]
    if len(fs_manifest(steps)) != len(FS_FILES_MIB):
        problems.append(f"manifest {fs_manifest(steps)}")
    held = sum(z.cap if z.cond == ZoneState.FULL else z.wptr for z in parse_blkzone(steps["final"].output)) * 512
    if held < sum(FS_FILES_MIB) << 20:
        problems.append(f"the zones hold {held} bytes after writing {sum(FS_FILES_MIB)} MiB of files")
    return problems if not problems else problems + [out[-2000:]]


def zone_state_counts(zones: list[BlkZone]) -> dict[str, int]:
    """Zones per state, keyed as ``nvme-emu ctl namespaces`` keys them (``zones_full``...)."""
    counts = {f"zones_{s.name.lower()}": 0 for s in ZoneState}
    for z in zones:
        counts[f"zones_{ZoneState(z.cond).name.lower()}"] += 1
    return counts


def judge_final(steps: dict[str, Step], g: Geometry) -> list[str]:
    """The last report (after the filesystem) still has the configured zones, each with a
    write pointer within its capacity."""
    zones = parse_blkzone(steps["final"].output)
    problems = [] if len(zones) == g.nr_zones else [f"{len(zones)} zones, want {g.nr_zones}"]
    for i, z in enumerate(zones):
        e = expected_zone(g, i)
        if (z.start, z.len, z.cap, z.type) != (e.start, e.len, e.cap, e.type):
            problems.append(f"zone {i}: {z}")
        elif z.cond != ZoneState.FULL and z.wptr > z.cap:
            problems.append(f"zone {i}: write pointer past capacity: {z}")
    return problems


#: Every check of the script, by name (the steps' order).
CHECKS: dict[str, Callable[[dict[str, Step], Geometry], list[str]]] = {
    "sysfs": judge_sysfs,
    "blkzone": judge_blkzone,
    "zones": judge_zones,
    "append": judge_appends,
    **{f"fio_{name}": judge_fio(name) for name in FIO_JOBS},
    "fs": judge_fs,
    "final": judge_final,
}


def judge_server_view(steps: dict[str, Step], server: dict[str, int]) -> list[str]:
    """The guest's last ``blkzone report`` against the server's own count (``nvme-emu ctl
    namespaces``, taken after the guest powered off): zones per state, open, active."""
    counts = zone_state_counts(parse_blkzone(steps["final"].output))
    counts["open"] = counts["zones_implicitly_opened"] + counts["zones_explicitly_opened"]
    counts["active"] = counts["open"] + counts["zones_closed"]
    return [f"{k}: the guest saw {v}, the server has {server.get(k)}" for k, v in counts.items() if server.get(k) != v]


def zone_after_restart(z: BlkZone) -> BlkZone:
    """What a zone the guest left should be after the server restarts: the same, but an
    open zone comes back Closed, or Empty when nothing was written (README, the sidecar)."""
    if z.cond in (ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED):
        return BlkZone(z.start, z.len, z.cap, z.wptr, ZoneState.CLOSED if z.wptr else ZoneState.EMPTY, z.type)
    return z


def judge_restart(before: dict[str, Step], after: dict[str, Step], g: Geometry) -> list[str]:
    """The zones after a restart (:func:`fs_verify_script`'s boot) against the last report of
    the boot before, and the filesystem's second verify."""
    old, new = parse_blkzone(before["final"].output), parse_blkzone(after["zones_now"].output)
    problems = [] if len(new) == g.nr_zones == len(old) else [f"{len(old)} zones before, {len(new)} after"]
    problems += [f"zone {i}: {n}, want {zone_after_restart(o)}" for i, (o, n) in enumerate(zip(old, new, strict=False))
                 if n != zone_after_restart(o)]
    kv = key_values(after["fs"].output)
    problems += [f"{k}={kv.get(k)}" for k in ("remount", "verify", "umount_again") if kv.get(k) != "0"]
    return problems if not problems else problems + [after["fs"].output[-2000:]]


#: zone_fault_step's per-file lines: ``after read_only mode=440 size=1048576 zcond=13``
FILE_STATE_RE = re.compile(r"^(before|after|remounted) (\w+) mode=(\d+) size=(\d+) zcond=(\d*)$", re.M)
FILE_IO_RE = re.compile(r"^(write|append|read) (\w+) rc=(\d+)(?: same=(\w+))?", re.M)


def judge_zone_faults(steps: dict[str, Step], plan: ZoneFaultPlan) -> list[str]:
    """A zone made Read Only and one made Offline at run time (the host's ``zone_fault``
    between ``before`` and ``after``): Linux's zone report shows both conditions; zonefs's
    append to each fails, and zonefs takes write access from the Read Only zone's file,
    keeping its size and its data readable, and all access from the Offline zone's file
    (size 0, nothing to read); the control file on a good zone takes its append and reads
    back whole; after a remount zonefs finds both conditions again."""
    out = steps["zfault"].output
    kv = key_values(out)
    size = plan.mib << 20
    problems = [f"{k}={kv.get(k)}" for k in ("mkzonefs", "mount", "umount", "remount") if kv.get(k) != "0"]
    state = {(m[0], m[1]): (m[2], int(m[3]), int(m[4] or -1)) for m in FILE_STATE_RE.findall(out)}
    io = {(m[0], m[1]): (int(m[2]), m[3]) for m in FILE_IO_RE.findall(out)}
    S = ZoneState
    want_state = {
        ("before", "read_only"): (None, size, S.IMPLICITLY_OPENED), ("before", "offline"): (None, size, S.IMPLICITLY_OPENED),
        ("before", "good"): (None, size, S.IMPLICITLY_OPENED),
        # zonefs_inode_update_mode: Read Only drops the write bits, Offline every bit (and
        # an Offline file is empty); a good file is untouched and grew by the append
        ("after", "read_only"): ("no-write", size, S.READ_ONLY), ("after", "offline"): ("000", 0, S.OFFLINE),
        ("after", "good"): (None, 2 * size, S.IMPLICITLY_OPENED),
        ("remounted", "read_only"): ("no-write", None, S.READ_ONLY), ("remounted", "offline"): ("000", 0, S.OFFLINE),
        ("remounted", "good"): (None, 2 * size, None),
    }
    for key, (mode, want_size, cond) in want_state.items():
        if key not in state:
            problems.append(f"no line for {' '.join(key)}")
            continue
        got_mode, got_size, got_cond = state[key]
        if mode == "000" and got_mode != "0":
            problems.append(f"{' '.join(key)}: mode {got_mode}, want 0 (no access)")
        if mode == "no-write" and int(got_mode, 8) & 0o222:
            problems.append(f"{' '.join(key)}: mode {got_mode} still lets it be written")
        if mode is None and key[0] != "before" and got_mode != state.get(("before", key[1]), ("",))[0]:
            problems.append(f"{' '.join(key)}: mode {got_mode}, was {state.get(('before', key[1]))}")
        if want_size is not None and got_size != want_size:
            problems.append(f"{' '.join(key)}: size {got_size}, want {want_size}")
        if cond is not None and got_cond != cond:
            problems.append(f"{' '.join(key)}: zone condition {got_cond}, want {int(cond)} ({cond.name})")
    want_io = {("write", k): (0, "") for k in plan.zones} | {
        ("append", "read_only"): (1, ""), ("append", "offline"): (1, ""), ("append", "good"): (0, ""),
        # root reads past the cleared mode bits: the Offline file has nothing to give
        ("read", "read_only"): (0, "once"), ("read", "offline"): (None, "no"), ("read", "good"): (0, "twice"),
    }
    for key, (rc, same) in want_io.items():
        got = io.get(key)
        if got is None or (rc is not None and (got[0] != 0) != (rc != 0)) or (same and got[1] != same):
            problems.append(f"{' '.join(key)}: {got}, want rc {rc} {same}")
    kernel = "\n".join(line for line in out.splitlines() if line.startswith("kernel: "))
    # zonefs_handle_io_error's warnings: "inode N: write access disabled" (Read Only) and
    # "inode N: read/write access disabled" (Offline)
    for what in ("write", "read/write"):
        if not re.search(rf"inode \d+: {what} access disabled", kernel):
            problems.append(f"zonefs did not say {what} access disabled")
    return problems if not problems else problems + [out[-3000:]]
