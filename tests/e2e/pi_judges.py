"""The judges of issue 26's guest checks (tests/e2e/test_pi_guest.py): each reads the output
of a step of :func:`pi_checks.pi_guest_script` and returns what is wrong by the NVM Command
Set specification's End-to-end Data Protection (and Linux's documented view of a correct
device); empty: the check passed. They never compare one peer with the other: QEMU's nvme and
nvme-emu each go through the same judges and must be right alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .pi_checks import (
    CORRUPT, FIO_JOBS, HOST_PI_LBA, NAMESPACES, CorruptPlan, FioJob, PiNamespace, PiOp, Step, host_pi, key_values, pi_ops,
)

#: nvme-cli's ``NVMe status: End-to-end Reference Tag Check Error: ...(0x284)``: the status
#: field as nvme-cli prints it (bits 10:0 SCT and SC, bit 14 DNR).
NVME_STATUS_RE = re.compile(r"NVMe status: .*?\((0x[0-9a-fA-F]+)\)")
STATUS_MASK = 0x7FF
DNR = 0x4000
OP_RE = re.compile(r"^op (\S+) rc=(\d+) md=\[([0-9a-f]*)\] out=\[(.*)\]$", re.M)


@dataclass(frozen=True)
class OpResult:
    label: str
    rc: int
    metadata: bytes     # what a read returned in its metadata buffer (empty for a write)
    out: str

    @property
    def status_field(self) -> int:
        m = NVME_STATUS_RE.search(self.out)
        return int(m.group(1), 16) if m else 0

    @property
    def status(self) -> int:
        """SCT and SC, 0 when nvme-cli printed no status."""
        return self.status_field & STATUS_MASK

    @property
    def dnr(self) -> bool:
        return bool(self.status_field & DNR)


def parse_ops(text: str) -> dict[str, OpResult]:
    return {m[0]: OpResult(m[0], int(m[1]), bytes.fromhex(m[2]), m[3]) for m in OP_RE.findall(text)}


def expected_metadata(op: PiOp) -> bytes | None:
    """What a successful read with ``read_back`` must return (the row's ``expect``)."""
    return op.expect if op.read_back else None


def judge_op(row: PiOp, got: OpResult | None) -> list[str]:
    """One nvme-cli row: the status the spec gives it (SCT/SC; DNR is reported, not
    required: the spec leaves it to the controller and QEMU does not set it), and for a
    read that succeeds the PI it returned."""
    if got is None:
        return [f"{row.label}: no result"]
    problems = []
    if not any(got.status == (int(st) if st is not None else 0) and (got.rc == 0) == (st is None)
               for st in row.allowed):
        names = " or ".join(f"{st.name} ({int(st):#x})" if st is not None else "success" for st in row.allowed)
        problems.append(f"{row.label}: want {names}, got rc={got.rc} status={got.status_field:#x} ({got.out})")
    md = expected_metadata(row)
    if md is not None and got.rc == 0 and got.metadata != md:
        problems.append(f"{row.label}: the read returned PI {got.metadata.hex()}, want {md.hex()} "
                        "(guard, application tag, reference tag)")
    return problems


def judge_op_named(label: str) -> Callable[[dict[str, Step]], list[str]]:
    row = next(o for o in pi_ops() if o.label == label)

    def judge(steps: dict[str, Step]) -> list[str]:
        return judge_op(row, parse_ops(steps["ops"].output).get(label))

    judge.__doc__ = f"nvme-cli row {label}: {row.status.name if row.status else 'success'}"
    return judge


def judge_integrity(steps: dict[str, Step], namespaces: tuple[PiNamespace, ...] = NAMESPACES) -> list[str]:
    """Linux registers block integrity on each namespace: the format's name, one PI interval
    per logical block, the tag bytes it leaves to the owner, and it generates PI on writes
    and checks it on reads."""
    kv = key_values(steps["integrity"].output)
    problems = []
    for ns in namespaces:
        want = {"format": ns.integrity_format, "protection_interval_bytes": str(ns.lba), "tag_size": str(ns.tag_size),
                "read_verify": "1", "write_generate": "1", "logical_block_size": str(ns.lba)}
        problems += [f"{ns.name} (nsid {ns.nsid}): {k}={kv.get(f'{ns.name}.{k}')}, want {v}"
                     for k, v in want.items() if kv.get(f"{ns.name}.{k}") != v]
    return problems


def judge_host_pi(steps: dict[str, Step], namespaces: tuple[PiNamespace, ...] = NAMESPACES) -> list[str]:
    """A block written through the block layer reads back with its data and, in its
    metadata, the PI Linux generated (guard, Application Tag 0, Reference Tag the LBA for
    Type 1): the device stores the host's PI unchanged, in the layout of its guard format."""
    kv = key_values(steps["host_pi"].output)
    problems = []
    for ns in namespaces:
        problems += [f"{ns.name}: {k}={kv.get(f'{ns.name}.{k}')}" for k in ("write", "read", "data")
                     if kv.get(f"{ns.name}.{k}") != "0"]
        want = host_pi(ns, HOST_PI_LBA).hex()
        if kv.get(f"{ns.name}.md") != want:
            problems.append(f"{ns.name}: metadata {kv.get(f'{ns.name}.md')}, want Linux's PI {want}")
    return problems


def judge_fio(job: FioJob) -> Callable[[dict[str, Step]], list[str]]:
    """A fio job wrote its whole size and read it all back with every crc32c right and no
    error (with pi_act: the device inserted or checked the PI, fio checked it on reads)."""

    def judge(steps: dict[str, Step]) -> list[str]:
        out = steps[job.name].output
        m = re.search(rf"^job {job.name} error=(\d+) write=(\d+) read=(\d+)$", out, re.M)
        if key_values(out).get("rc") != "0" or m is None:
            return [f"fio failed: rc={key_values(out).get('rc')}\n{out[-1500:]}"]
        error, written, read = (int(v) for v in m.groups())
        if error or written != job.size or read != job.size:
            return [f"error={error} write={written} read={read}, want 0, {job.size}, {job.size}"]
        return []

    judge.__doc__ = f"fio {job.engine} on nsid {job.ns.nsid}" + (f", pi_act={job.pi_act}" if job.pi_act is not None else "")
    return judge


def judge_format(steps: dict[str, Step], ns: PiNamespace = NAMESPACES[0]) -> list[str]:
    """Format NVM to the plain LBA format and back: both succeed, Identify's FLBAS and DPS
    follow (no PI, then the PI type with the PI in the last bytes), Linux drops integrity
    and registers it again, and data written after each reads back."""
    out = steps["format"].output
    kv = key_values(out)
    plain, meta = kv.get("plain", ""), kv.get("meta", "")
    problems = [] if plain.isdigit() and meta.isdigit() else [f"no LBA formats for ms 0 and {ns.ms}: {plain!r} {meta!r}"]
    want = {
        "to_plain.integrity": "none", "to_plain.dps": "0", "to_plain.rw": "0",
        "to_pi.integrity": ns.integrity_format, "to_pi.dps": str(int(ns.pi)), "to_pi.rw": "0",
    }
    for k, v in want.items():
        got = kv.get(k, "")
        if (int(got, 0) if k.endswith("dps") and got else got) != (int(v) if k.endswith("dps") else v):
            problems.append(f"{k}={got!r}, want {v}")
    for when, lbaf in (("to_plain", plain), ("to_pi", meta)):
        flbas = kv.get(f"{when}.flbas", "")
        if not flbas or not lbaf.isdigit() or int(flbas, 0) & 0xF != int(lbaf):
            problems.append(f"{when}: FLBAS {flbas!r}, want format {lbaf}")
        if "Success formatting namespace" not in kv.get(f"{when}.out", "") or "NVMe status" in kv.get(f"{when}.out", ""):
            problems.append(f"{when}: {kv.get(f'{when}.out')}")
    return problems if not problems else problems + [out[-1500:]]


LBA_RE = re.compile(r"^lba (\d+) rc=(\d+) same=(\w+) err=\[(.*)\]$", re.M)
#: Linux turns the NVMe End-to-end check errors into BLK_STS_PROTECTION, which a read
#: returns as EILSEQ (strerror: "Invalid or incomplete multibyte or wide character").
EILSEQ_TEXT = "Invalid or incomplete multibyte or wide character"


def judge_corrupt(steps: dict[str, Step], plan: CorruptPlan = CORRUPT) -> list[str]:
    """A guard corruption by the host over ``plan``'s range: each block in it fails alone
    with EILSEQ, each block of the margins reads back what was written, and the namespace
    before and after the range reads whole."""
    out = steps["corrupt"].output
    kv = key_values(out)
    problems = [f"{k}={kv.get(k)}" for k in ("write", "before_range", "after_range") if kv.get(k) != "0"]
    blocks = {int(m[0]): (int(m[1]), m[2], m[3]) for m in LBA_RE.findall(out)}
    lo = plan.slba - plan.margin
    for lba in range(lo, plan.slba + plan.nlb + plan.margin):
        got = blocks.get(lba)
        corrupt = plan.slba <= lba < plan.slba + plan.nlb
        if got is None:
            problems.append(f"LBA {lba}: not read")
        elif corrupt and (got[0] == 0 or EILSEQ_TEXT not in got[2]):
            problems.append(f"LBA {lba} (corrupted): rc={got[0]} {got[2]!r}, want EILSEQ")
        elif not corrupt and (got[0] != 0 or got[1] != "yes"):
            problems.append(f"LBA {lba} (intact): rc={got[0]} same={got[1]} {got[2]!r}")
    return problems if not problems else problems + [out[-2000:]]


#: Every check of the script, by name (the steps' order); the host-corruption check is
#: judge_corrupt, for a peer whose script has that step.
CHECKS: dict[str, Callable[[dict[str, Step]], list[str]]] = {
    "integrity": judge_integrity,
    "host_pi": judge_host_pi,
    **{j.name: judge_fio(j) for j in FIO_JOBS},
    **{f"op_{o.label}": judge_op_named(o.label) for o in pi_ops()},
    "format": judge_format,
}
