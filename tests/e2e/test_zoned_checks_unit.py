"""Fast checks of zoned_checks' script and judges (no QEMU): each judge fails the output
of a device that breaks the spec, so a check cannot pass for want of looking."""

from __future__ import annotations

import subprocess

from nvme_emu.spec.commands import Status
from nvme_emu.spec.zns import ZoneState

from . import zoned_checks as zc
from . import zoned_judges as zj

GEO = zc.Geometry(zone_size=4 << 20, zone_cap=3 << 20, nr_zones=8, max_open=2, max_active=3)


def blkzone_line(z: zj.BlkZone) -> str:
    """A line as util-linux 2.41's ``blkzone report`` prints it."""
    return (f"  start: 0x{z.start:09x}, len 0x{z.len:06x}, cap 0x{z.cap:06x}, wptr 0x{z.wptr:06x} "
            f"reset:0 non-seq:0, zcond:{z.cond:2d}(xx) [type: {z.type}(SEQ_WRITE_REQUIRED)]")


def steps_of(**outputs: str) -> dict[str, zc.Step]:
    return {name: zc.Step(name, 0.0, text) for name, text in outputs.items()}


def test_scripts_are_bash():
    for script in (zc.zns_guest_script(GEO), zc.zns_guest_script(GEO, zbd_tests=None),
                   zc.fs_verify_script(["0" * 64 + "  f1"], then=zc.zone_fault_step(GEO))):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_the_zbd_step_runs_the_tests_asked_for():
    script = zc.zns_guest_script(GEO, zbd_tests=(1, 5))
    step = zc.zbd_step((1, 5))
    assert step.startswith("step zbd\n") and 'for t in 1 5; do' in step and "test-zbd-support -r" in step
    assert step in script
    assert "sed -n 's/^test" in zc.zbd_step(None)    # all: the script's own list


def test_nvme_cli_lines():
    d = zj.parse_descriptor(" 0x800      WP: 0x802      Cap: 0x300      State: 0x40 Type: 0x2  Attrs: 0")
    assert d == zj.Descriptor(0x800, 0x802, 0x300, ZoneState.CLOSED, 2)
    full = zj.OpResult("x", 1, d, "NVMe status: Zone Is Full: The accessed zone is in ZSF:Full state(0x41b9)")
    assert full.status == Status.ZONE_IS_FULL


def test_judge_op_wants_the_status_state_and_write_pointer():
    row = zc.ZoneOp("w", 0x800, "nvme write", Status.ZONE_INVALID_WRITE, ZoneState.EXPLICITLY_OPENED, 2)
    right = zj.Descriptor(0x800, 0x802, 0x300, ZoneState.EXPLICITLY_OPENED, 2)
    bad = "NVMe status: Zone Invalid Write: not at the write pointer(0x41bc)"
    assert zj.judge_op(row, zj.OpResult("w", 1, right, bad)) == []
    assert zj.judge_op(row, zj.OpResult("w", 0, right, "write: Success"))                    # it succeeded
    assert zj.judge_op(row, zj.OpResult("w", 1, right, bad.replace("0x41bc", "0x41b8")))      # other status
    assert zj.judge_op(row, zj.OpResult("w", 1, zj.Descriptor(0x800, 0x803, 0x300, 3, 2), bad))  # WP moved
    assert zj.judge_op(row, zj.OpResult("w", 1, zj.Descriptor(0x800, 0x802, 0x300, 2, 2), bad))  # state
    assert zj.judge_op(row, None)


def test_judge_zones_wants_every_row():
    assert len(zj.judge_zones(steps_of(zones=""), GEO)) == len(zc.zone_ops(GEO))


def test_judge_blkzone():
    fresh = [zj.expected_zone(GEO, i) for i in range(GEO.nr_zones)]
    assert zj.judge_blkzone(steps_of(blkzone="\n".join(map(blkzone_line, fresh))), GEO) == []
    wrong_cap = [*fresh[:3], zj.BlkZone(fresh[3].start, fresh[3].len, fresh[3].len, 0, 1, 2), *fresh[4:]]
    assert zj.judge_blkzone(steps_of(blkzone="\n".join(map(blkzone_line, wrong_cap))), GEO)
    assert zj.judge_blkzone(steps_of(blkzone="\n".join(map(blkzone_line, fresh[1:]))), GEO)


def appended(lbas: list[int], held: list[str]) -> str:
    zslba = GEO.slba(5)
    lines = [f"append {i} out=[Success appended data to LBA {lba:x}]" for i, lba in enumerate(lbas)]
    after = f"op after rc=0 zone=[ {zslba:#x} WP: {zslba + len(lbas):#x} Cap: 0x300 State: 0x20 Type: 0x2] out=[]"
    return "\n".join([*lines, "blocks=" + "".join(held), after])


def test_judge_appends():
    zslba = GEO.slba(5)
    order = [(i * 7) % zc.APPENDS for i in range(zc.APPENDS)]   # the order the device chose
    lbas = [zslba + k for k in order]
    held = [""] * zc.APPENDS
    for i, k in enumerate(order):
        held[k] = f"append-{i:03d}"
    assert zj.judge_appends(steps_of(append=appended(lbas, held)), GEO) == []
    twice = [*lbas[:-1], lbas[0]]
    assert zj.judge_appends(steps_of(append=appended(twice, held)), GEO)
    swapped = [held[1], held[0], *held[2:]]
    assert zj.judge_appends(steps_of(append=appended(lbas, swapped)), GEO)


def test_judge_fio_counts_what_the_zones_hold():
    job = next(j for j in zc.fio_jobs(GEO) if j.name == "qd1")
    full = [zj.BlkZone(z.start, z.len, z.cap, z.len, ZoneState.FULL, 2)
            for z in (zj.expected_zone(GEO, job.first + i) for i in range(job.zones))]
    n = job.written(GEO)

    def out(zones: list[zj.BlkZone], written: int = n) -> dict[str, zc.Step]:
        return steps_of(fio_qd1="\n".join(["rc=0", f"job qd1 error=0 write={written} read={written}",
                                           *map(blkzone_line, zones)]))

    assert zj.CHECKS["fio_qd1"](out(full), GEO) == []
    short = [*full[:-1], zj.BlkZone(full[-1].start, full[-1].len, full[-1].cap, 8, ZoneState.IMPLICITLY_OPENED, 2)]
    assert zj.CHECKS["fio_qd1"](out(short), GEO)        # a zone holds less than fio wrote
    assert zj.CHECKS["fio_qd1"](out(full, n // 2), GEO)


def test_judge_server_view():
    zones = [zj.BlkZone(0, 8, 6, 2, ZoneState.IMPLICITLY_OPENED, 2), zj.BlkZone(8, 8, 6, 8, ZoneState.FULL, 2),
             zj.BlkZone(16, 8, 6, 0, ZoneState.EMPTY, 2)]
    steps = steps_of(final="\n".join(map(blkzone_line, zones)))
    server = {**{f"zones_{s.name.lower()}": 0 for s in ZoneState}, "zones_implicitly_opened": 1, "zones_full": 1,
              "zones_empty": 1, "open": 1, "active": 1}
    assert zj.judge_server_view(steps, server) == []
    assert zj.judge_server_view(steps, {**server, "zones_full": 0, "zones_closed": 1, "active": 2})


def test_judge_restart_wants_open_zones_closed_and_the_rest_unchanged():
    left = [zj.BlkZone(0, 8, 6, 2, ZoneState.IMPLICITLY_OPENED, 2), zj.BlkZone(8, 8, 6, 8, ZoneState.FULL, 2),
            zj.BlkZone(16, 8, 6, 0, ZoneState.EXPLICITLY_OPENED, 2), zj.BlkZone(24, 8, 6, 3, ZoneState.CLOSED, 2)]
    g = zc.Geometry(zone_size=4096, zone_cap=3072, nr_zones=len(left), max_open=2, max_active=3)
    restored = [zj.BlkZone(0, 8, 6, 2, ZoneState.CLOSED, 2), left[1], zj.BlkZone(16, 8, 6, 0, ZoneState.EMPTY, 2),
                left[3]]
    fs_ok = "remount=0\nverify=0\numount_again=0"

    def judge(after: list[zj.BlkZone], fs: str = fs_ok) -> list[str]:
        return zj.judge_restart(steps_of(final="\n".join(map(blkzone_line, left))),
                                steps_of(zones_now="\n".join(map(blkzone_line, after)), fs=fs), g)

    assert judge(restored) == []
    assert judge(left)                                   # still open after a restart
    assert judge([zj.BlkZone(0, 8, 6, 1, ZoneState.CLOSED, 2), *restored[1:]])     # write pointer behind
    assert judge(restored, fs_ok.replace("verify=0", "verify=1"))


def zfault_output(**changes: str) -> str:
    """zone_fault_step's output on a device and a Linux that do what they should; a change
    replaces the line that starts with its key (``after_read_only``: ``after read_only ...``)."""
    mib = zc.ZoneFaultPlan().mib << 20
    lines = ["mkzonefs=0", "mount=0", "seq_files=7", *(f"write {k} rc=0" for k in ("read_only", "offline", "good")),
             *(f"before {k} mode=640 size={mib} zcond=2" for k in ("read_only", "offline", "good")),
             "seen_after=0.51",
             "append read_only rc=1 out=[dd: error writing: Input/output error]",
             "append offline rc=1 out=[dd: error writing: Input/output error]",
             "append good rc=0 out=[]",
             f"after read_only mode=440 size={mib} zcond=13", "after offline mode=0 size=0 zcond=15",
             f"after good mode=640 size={2 * mib} zcond=2",
             f"read read_only rc=0 same=once bytes={mib} out=[]", "read offline rc=0 same=no bytes=0 out=[]",
             f"read good rc=0 same=twice bytes={2 * mib} out=[]",
             "kernel: zonefs (nvme0n1) WARNING: inode 42: write access disabled",
             "kernel: zonefs (nvme0n1) WARNING: inode 43: read/write access disabled",
             "umount=0", "remount=0",
             "remounted read_only mode=440 size=0 zcond=13", "remounted offline mode=0 size=0 zcond=15",
             f"remounted good mode=640 size={2 * mib} zcond=4"]
    for key, line in changes.items():
        prefix = key.replace("_", " ", 1) + " " if key.split("_", 1)[0] in ("before", "after", "remounted", "append", "read") else key
        lines = [line if entry.startswith(prefix) else entry for entry in lines]
    return "\n".join(lines)


def test_judge_zone_faults():
    plan = zc.ZoneFaultPlan()
    assert zj.judge_zone_faults(steps_of(zfault=zfault_output()), plan) == []
    mib = plan.mib << 20
    wrong = {
        "the zone report missed Read Only": {"after_read_only": f"after read_only mode=440 size={mib} zcond=2"},
        "the Read Only file still writable": {"after_read_only": f"after read_only mode=640 size={mib} zcond=13"},
        "the append to the Read Only zone went through": {"append_read_only": "append read_only rc=0 out=[]"},
        "the Read Only zone's data lost": {"read_read_only": "read read_only rc=1 same=no bytes=0 out=[]"},
        "the Offline file still has its size": {"after_offline": f"after offline mode=0 size={mib} zcond=15"},
        "the Offline file readable": {"after_offline": "after offline mode=440 size=0 zcond=15"},
        "the good file hurt": {"append_good": "append good rc=1 out=[EIO]"},
        "no mkzonefs": {"mkzonefs=": "mkzonefs=127"},
        "zonefs said nothing": {"kernel: zonefs (nvme0n1) WARNING: inode 42": "kernel: other"},
        "a remount forgot the Offline zone": {"remounted_offline": "remounted offline mode=640 size=0 zcond=1"},
    }
    for what, change in wrong.items():
        assert zj.judge_zone_faults(steps_of(zfault=zfault_output(**change)), plan), what
