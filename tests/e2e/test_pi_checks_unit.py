"""Fast checks of pi_checks' script and pi_judges (no QEMU): each judge passes the output of
a device and a Linux that do what the spec says, and fails each way of getting it wrong, so
that a check cannot pass for want of looking."""

from __future__ import annotations

import subprocess

import pytest

from nvme_emu.pi.format import GuardKind, ProtectionType
from nvme_emu.spec.commands import Status

from . import pi_checks as pc
from . import pi_judges as pj

#: nvme-cli 2.13's status words (the judges read only the number in brackets).
STATUS_TEXT = {
    Status.END_TO_END_GUARD_CHECK_ERROR: "End-to-end Guard Check Error: ...",
    Status.END_TO_END_APPLICATION_TAG_CHECK_ERROR: "End-to-end Application Tag Check Error: ...",
    Status.END_TO_END_REFERENCE_TAG_CHECK_ERROR: "End-to-end Reference Tag Check Error: ...",
    Status.INVALID_PROTECTION_INFORMATION: "Invalid Protection Information: ...",
    Status.INVALID_FIELD: "Invalid Field in Command: ...",
}


def steps_of(**outputs: str) -> dict[str, pc.Step]:
    return {name: pc.Step(name, 0.0, text) for name, text in outputs.items()}


def test_scripts_are_bash():
    for script in (pc.pi_guest_script(), pc.pi_guest_script(corrupt=pc.CorruptPlan())):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "step corrupt" not in pc.pi_guest_script()
    assert "step corrupt" in pc.pi_guest_script(corrupt=pc.CorruptPlan())


def test_namespaces():
    assert [ns.integrity_format for ns in pc.NAMESPACES] == ["T10-DIF-TYPE1-CRC", "T10-DIF-TYPE3-CRC",
                                                             "EXT-DIF-TYPE1-CRC64"]
    assert pc.PiNamespace("t2", 1, ProtectionType.TYPE2).integrity_format == "T10-DIF-TYPE1-CRC"
    assert [ns.tag_size for ns in pc.NAMESPACES] == [2, 6, 2]
    assert pc.PiNamespace("x", 1, ProtectionType.TYPE3, GuardKind.GUARD_64, ms=16).tag_size == 8
    assert pc.TYPE1.nlbas == (64 << 20) // 520 and pc.GUARD64.nlbas == (64 << 20) // 528
    q = pc.GUARD64.qemu()
    assert (q.ms, q.pi, q.pif, q.pil, q.mset, q.size) == (16, 1, 2, 0, 0, 64 << 20)
    assert pc.TYPE3.nvme_emu_spec("/x") == f"file:/x,size={pc.TYPE3.nlbas * 512},lba=512,ms=8,pi=3,guard=16"
    assert pc.image_size() == 3 * (64 << 20)


def test_fio_jobs_on_passthrough_carry_the_metadata():
    job = next(j for j in pc.FIO_JOBS if j.name == "ng_guard64_pi_act0")
    cmd = job.command()
    assert "--filename=${ng[3]}" in cmd and "--md_per_io_size=128" in cmd and "--pi_act=0" in cmd
    assert "--pi_chk=GUARD,REFTAG,APPTAG" in cmd and "--direct=1" not in cmd
    blk = pc.FIO_JOBS[0].command()
    assert "--filename=${dev[1]}" in blk and "--direct=1" in blk and "pi_act" not in blk


def integrity_output(**changes: str) -> str:
    kv = {}
    for ns in pc.NAMESPACES:
        kv |= {f"{ns.name}.format": ns.integrity_format, f"{ns.name}.tag_size": str(ns.tag_size),
               f"{ns.name}.protection_interval_bytes": "512", f"{ns.name}.read_verify": "1",
               f"{ns.name}.write_generate": "1", f"{ns.name}.logical_block_size": "512"}
    kv |= changes
    return "\n".join(f"{k}={v}" for k, v in kv.items())


def test_judge_integrity():
    assert pj.judge_integrity(steps_of(integrity=integrity_output())) == []
    for change in ({"type1.format": "nop"}, {"type3.format": "T10-DIF-TYPE1-CRC"},
                   {"guard64.format": "T10-DIF-TYPE1-CRC"}, {"type3.tag_size": "2"},
                   {"type1.protection_interval_bytes": "4096"}, {"guard64.read_verify": "0"}):
        assert pj.judge_integrity(steps_of(integrity=integrity_output(**change))), change


def test_judge_fio():
    job = pc.FIO_JOBS[1]
    judge = pj.CHECKS[job.name]

    def out(rc: int = 0, error: int = 0, write: int = job.size, read: int = job.size) -> dict[str, pc.Step]:
        return steps_of(**{job.name: f"rc={rc}\njob {job.name} error={error} write={write} read={read}"})

    assert judge(out()) == []
    for bad in (out(rc=1), out(error=84), out(write=job.size // 2), out(read=0)):
        assert judge(bad)
    assert judge(steps_of(**{job.name: "rc=0"}))


def op_line(label: str, status: Status | None, md: bytes = b"", dnr: bool = False) -> str:
    if status is None:
        out = "read: Success" if "read" in label else "write: Success"
        return f"op {label} rc=0 md=[{md.hex()}] out=[{out}]"
    field = int(status) | (pj.DNR if dnr else 0)
    return f"op {label} rc=1 md=[] out=[NVMe status: {STATUS_TEXT[status]}({field:#x})]"


def right_line(op: pc.PiOp) -> str:
    md = pj.expected_metadata(op) if op.status is None else None
    return op_line(op.label, op.status, md or b"")


@pytest.mark.parametrize("op", pc.pi_ops(), ids=lambda o: o.label)
def test_judge_op(op: pc.PiOp):
    judge = pj.CHECKS[f"op_{op.label}"]
    assert judge(steps_of(ops=right_line(op))) == []
    if op.status is not None:
        assert judge(steps_of(ops=op_line(op.label, op.status, dnr=True))) == []   # DNR is the controller's
        assert judge(steps_of(ops=op_line(op.label, None)))                         # it succeeded
        other = next(s for s in STATUS_TEXT if s not in op.allowed)
        assert judge(steps_of(ops=op_line(op.label, other)))
    else:
        for st in op.or_status:
            assert judge(steps_of(ops=op_line(op.label, st))) == []
        wrong = next(s for s in STATUS_TEXT if s not in op.allowed)
        assert judge(steps_of(ops=op_line(op.label, wrong)))
    if op.read_back and op.status is None:
        md = pj.expected_metadata(op)
        assert md is not None and len(md) == op.ns.ms
        for i in range(0, op.ns.ms, 2):   # every 16-bit piece of the guard and the tags
            bad = md[:i] + bytes([md[i] ^ 1]) + md[i + 1:]
            assert judge(steps_of(ops=op_line(op.label, None, bad)))
    assert judge(steps_of(ops=""))


def test_read_pi_wants_the_spec_guard():
    """PRACT's PI: the CRC-16/T10-DIF of the block (check value of the definition D0DBh),
    LBAT, and the block's LBA as Type 1's reference tag."""
    assert pc.guard16(b"123456789") == 0xD0DB
    read_pi = next(o for o in pc.pi_ops() if o.label == "read_pi")
    assert pj.expected_metadata(read_pi) == pc.pi16(pc.guard16(pc.PATTERN), 0x1234, pc.OP_LBA)
    assert pc.pi16(0xABCD, 0x1234, 0x01020304) == bytes.fromhex("abcd123401020304")
    assert pc.pi64(0x0102030405060708, 0x1234, 0xA0B0C0D0E0F0) == bytes.fromhex("01020304050607081234a0b0c0d0e0f0")
    g64 = next(o for o in pc.pi_ops() if o.label == "guard64_read_pi")
    assert pj.expected_metadata(g64) == pc.pi64(pc.guard64(pc.PATTERN), 0x1234, pc.OP_LBA)


def format_output(**changes: str) -> str:
    kv = {"plain": "0", "meta": "1", "to_plain.rc": "0", "to_plain.out": "[Success formatting namespace:1]",
          "to_plain.integrity": "none", "to_plain.flbas": "0", "to_plain.dps": "0", "to_plain.rw": "0",
          "to_pi.rc": "0", "to_pi.out": "[Success formatting namespace:1]", "to_pi.integrity": "T10-DIF-TYPE1-CRC",
          "to_pi.flbas": "0x1", "to_pi.dps": "0x1", "to_pi.rw": "0"} | changes
    return "\n".join(f"{k}={v}" for k, v in kv.items())


def test_judge_format():
    assert pj.judge_format(steps_of(format=format_output())) == []
    for change in ({"to_plain.integrity": "T10-DIF-TYPE1-CRC"}, {"to_pi.integrity": "none"},
                   {"to_plain.dps": "0x1"}, {"to_pi.dps": "0x3"}, {"to_pi.flbas": "0"}, {"to_plain.rw": "1"},
                   {"to_pi.rw": "1"}, {"plain": ""},
                   {"to_pi.out": "[NVMe status: Invalid Format: ...(0x410a)]"}):
        assert pj.judge_format(steps_of(format=format_output(**change))), change


def corrupt_output(plan: pc.CorruptPlan, **changes: str) -> str:
    lines = ["write=0", "seen_after=0.5"]
    for lba in range(plan.slba - plan.margin, plan.slba + plan.nlb + plan.margin):
        bad = plan.slba <= lba < plan.slba + plan.nlb
        lines.append(changes.get(str(lba), f"lba {lba} rc=1 same=no err=[dd: error reading '/dev/nvme0n1': "
                                           f"{pj.EILSEQ_TEXT}]" if bad else f"lba {lba} rc=0 same=yes err=[]"))
    lines += [changes.get("before_range", "before_range=0"), changes.get("after_range", "after_range=0")]
    return "\n".join(lines)


def test_judge_corrupt():
    plan = pc.CorruptPlan()
    assert pj.judge_corrupt(steps_of(corrupt=corrupt_output(plan)), plan) == []
    first, last_intact = plan.slba, plan.slba + plan.nlb
    wrong = {
        "a corrupted block reads": {str(first): f"lba {first} rc=0 same=yes err=[]"},
        "EIO, not an integrity error": {str(first): f"lba {first} rc=1 same=no err=[dd: Input/output error]"},
        "the block after the range fails": {str(last_intact): f"lba {last_intact} rc=1 same=no err=[{pj.EILSEQ_TEXT}]"},
        "a margin block reads other data": {str(first - 1): f"lba {first - 1} rc=0 same=no err=[]"},
        "the disk before the range fails": {"before_range": "before_range=1"},
    }
    for what, change in wrong.items():
        assert pj.judge_corrupt(steps_of(corrupt=corrupt_output(plan, **change)), plan), what
    assert pj.judge_corrupt(steps_of(corrupt=""), plan)


def test_every_check_fails_on_no_output():
    for name, judge in pj.CHECKS.items():
        steps = steps_of(**{s: "" for s in ("integrity", "host_pi", "ops", "format", *(j.name for j in pc.FIO_JOBS))})
        assert judge(steps), name


def test_the_host_corrupts_what_the_guest_asks_for():
    calls: list[tuple[int, int, int]] = []
    errors: list[str] = []
    on_line = pc.guard_corruption_on_request(lambda *a: calls.append(a), errors)
    on_line("nothing here")
    on_line(f"{pc.CORRUPT_MARK} nsid=1 slba=20000 nlb=8")
    assert calls == [(1, 20000, 8)] and errors == []

    def refuse(*_: int) -> None:
        raise RuntimeError("no such namespace")

    pc.guard_corruption_on_request(refuse, errors)(f"{pc.CORRUPT_MARK} nsid=9 slba=1 nlb=1")
    assert errors and "no such namespace" in errors[0]
    step = pc.corrupt_step(pc.CorruptPlan())
    assert f"{pc.CORRUPT_MARK} nsid=1 slba=20000 nlb=8" in step


def host_pi_output(**changes: str) -> str:
    kv: dict[str, str] = {}
    for ns in pc.NAMESPACES:
        kv |= {f"{ns.name}.write": "0", f"{ns.name}.read": "0", f"{ns.name}.data": "0",
               f"{ns.name}.md": pc.host_pi(ns).hex()}
    return "\n".join(f"{k}={v}" for k, v in (kv | changes).items())


def test_judge_host_pi():
    """Linux's PI as stored: 16b Guard PI with the LBA (Type 1) or 0 (Type 3) as the
    reference tag; the 64b Guard's 16 bytes with the CRC-64/NVME guard and a 48-bit tag."""
    from nvme_emu.pi import crc

    assert crc.reference(crc.CRC64_NVME, b"123456789") == 0xAE8B14860A799888
    assert pc.host_pi(pc.TYPE1)[4:] == pc.HOST_PI_LBA.to_bytes(4, "big") and pc.host_pi(pc.TYPE3)[4:] == bytes(4)
    g64 = pc.host_pi(pc.GUARD64)
    assert len(g64) == 16 and g64[8:10] == bytes(2) and g64[10:] == pc.HOST_PI_LBA.to_bytes(6, "big")
    assert pj.judge_host_pi(steps_of(host_pi=host_pi_output())) == []
    for ns in pc.NAMESPACES:
        md = pc.host_pi(ns)
        for i in range(len(md)):
            bad = md[:i] + bytes([md[i] ^ 0x80]) + md[i + 1:]
            assert pj.judge_host_pi(steps_of(host_pi=host_pi_output(**{f"{ns.name}.md": bad.hex()}))), (ns.name, i)
        for k in ("write", "read", "data"):
            assert pj.judge_host_pi(steps_of(host_pi=host_pi_output(**{f"{ns.name}.{k}": "1"}))), (ns.name, k)
