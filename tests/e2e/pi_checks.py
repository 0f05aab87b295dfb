"""End-to-end data protection checks for one rich-guest boot (``run_guest(rich_root=True)``),
written once and run against any NVMe controller that gives the guest namespaces with
metadata and PI: QEMU's own ``nvme-ns ms=8,pi=1`` now, nvme-emu's ``--namespace ...,ms=8,
pi=1`` when it has them (tests/e2e/test_pi_guest.py).

One boot serves every format: the controller carries three namespaces (Type 1 with a 16b
Guard, Type 3, Type 1 with the 64b Guard), found in the guest by their NSID. The job is one
bash script of ``step NAME`` blocks that print raw results (sysfs, fio's JSON summaries,
nvme-cli's output and statuses, the metadata a read returned); pi_judges.py holds them to the
spec's values. Nothing here decides pass or fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from nvme_emu import guest
from nvme_emu.pi import crc
from nvme_emu.pi.format import GuardKind, Prinfo, ProtectionType
from nvme_emu.spec.commands import Status

from .zoned_checks import Step, boot_rich, key_values, parse_steps

__all__ = ["Step", "boot_rich", "key_values", "parse_steps"]


@dataclass(frozen=True)
class PiNamespace:
    """One namespace both peers get: ``size`` bytes of storage for data and metadata (QEMU's
    nvme-ns keeps both in them), so ``nlbas`` blocks of ``lba`` bytes each with ``ms`` bytes
    of separate metadata (Linux's block integrity needs separate metadata; the PI at QEMU's
    default place, the last bytes, which for ms = the PI size is the whole metadata)."""

    name: str
    nsid: int
    pi: ProtectionType
    guard: GuardKind = GuardKind.GUARD_16
    ms: int = 8
    lba: int = 512
    size: int = 64 << 20

    @property
    def nlbas(self) -> int:
        return self.size // (self.lba + self.ms)

    @property
    def integrity_format(self) -> str:
        """The name Linux's block integrity gives the format (block/blk-integrity.c: T10-DIF
        for the 16b Guard's CRC, EXT-DIF..CRC64 for the 64b Guard; Type 2 is TYPE1's)."""
        kind = "TYPE3" if self.pi is ProtectionType.TYPE3 else "TYPE1"
        return f"T10-DIF-{kind}-CRC" if self.guard is GuardKind.GUARD_16 else f"EXT-DIF-{kind}-CRC64"

    @property
    def tag_size(self) -> int:
        """Linux's integrity ``tag_size``: the PI bytes the block layer leaves to the owner,
        the Application Tag, and for Type 3 the Reference Tag too (nvme_init_integrity)."""
        if self.pi is not ProtectionType.TYPE3:
            return 2
        return 2 + (4 if self.guard is GuardKind.GUARD_16 else 6)

    def qemu(self) -> guest.ProtectedNamespace:
        return guest.ProtectedNamespace(size=self.size, ms=self.ms, pi=int(self.pi), pil=0, mset=0,
                                        pif=int(self.guard), lba_size=self.lba)

    def nvme_emu_spec(self, path: str) -> str:
        """nvme-emu's ``--namespace`` (issue 26's syntax) for the same blocks and format."""
        guard = 16 if self.guard is GuardKind.GUARD_16 else 64
        return f"file:{path},size={self.nlbas * self.lba},lba={self.lba},ms={self.ms},pi={int(self.pi)},guard={guard}"


TYPE1 = PiNamespace("type1", 1, ProtectionType.TYPE1)
TYPE3 = PiNamespace("type3", 2, ProtectionType.TYPE3)
GUARD64 = PiNamespace("guard64", 3, ProtectionType.TYPE1, GuardKind.GUARD_64, ms=16)
NAMESPACES = (TYPE1, TYPE3, GUARD64)


def image_size(namespaces: tuple[PiNamespace, ...] = NAMESPACES) -> int:
    return sum(ns.size for ns in namespaces)


# ---------------------------------------------------------------------------------------
# fio: through the block layer (Linux generates and checks the PI) and through passthrough


@dataclass(frozen=True)
class FioJob:
    """A write + crc32c verify job on one namespace. ``pi_act`` set: io_uring_cmd on the
    namespace's generic node (/dev/ngXnY) with a separate metadata buffer per I/O, the PRACT
    bit as given and every PRCHK bit; else the block device with O_DIRECT."""

    name: str
    ns: PiNamespace
    engine: str
    iodepth: int
    bs: int
    size: int
    pi_act: int | None = None

    def command(self) -> str:
        node = f"${{ng[{self.ns.nsid}]}}" if self.pi_act is not None else f"${{dev[{self.ns.nsid}]}}"
        opts = [f"--name={self.name}", f"--filename={node}", f"--ioengine={self.engine}", f"--iodepth={self.iodepth}",
                "--rw=randwrite", f"--bs={self.bs}", f"--size={self.size}", "--verify=crc32c", "--do_verify=1",
                "--eta=never", "--output-format=json", f"--output=/tmp/{self.name}.json"]
        if self.pi_act is None:
            opts.append("--direct=1")
        else:
            opts += ["--cmd_type=nvme", f"--md_per_io_size={self.ns.ms * (self.bs // self.ns.lba)}",
                     f"--pi_act={self.pi_act}", "--pi_chk=GUARD,REFTAG,APPTAG", "--apptag=0x1234",
                     "--apptag_mask=0xffff"]
        return "fio " + " ".join(opts)


FIO_JOBS = (
    FioJob("fio_type1_psync", TYPE1, "psync", 1, 4096, 4 << 20),
    FioJob("fio_type1_libaio", TYPE1, "libaio", 16, 64 << 10, 16 << 20),
    FioJob("fio_type1_io_uring", TYPE1, "io_uring", 16, 16 << 10, 8 << 20),
    FioJob("fio_type3_psync", TYPE3, "psync", 1, 4096, 2 << 20),
    FioJob("fio_type3_libaio", TYPE3, "libaio", 16, 64 << 10, 16 << 20),
    FioJob("fio_guard64_psync", GUARD64, "psync", 1, 4096, 2 << 20),
    FioJob("fio_guard64_libaio", GUARD64, "libaio", 16, 64 << 10, 16 << 20),
    FioJob("ng_pi_act1", TYPE1, "io_uring_cmd", 8, 4096, 4 << 20, pi_act=1),
    FioJob("ng_pi_act0", TYPE1, "io_uring_cmd", 8, 4096, 4 << 20, pi_act=0),
    FioJob("ng_guard64_pi_act0", GUARD64, "io_uring_cmd", 8, 4096, 4 << 20, pi_act=0),
)


# ---------------------------------------------------------------------------------------
# nvme-cli: one block written or read with the PRINFO, tags and metadata each row gives


#: The one block every row writes: a fixed pattern, so its guard is known here.
PATTERN = (b"nvme-emu end-to-end data protection " * 15)[:512]
APPTAG = 0x1234
OTHER_APPTAG = 0x4321


def guard16(data: bytes) -> int:
    return crc.reference(crc.CRC16_T10DIF, data)


def pi16(guard: int, apptag: int, reftag: int) -> bytes:
    """8 bytes of 16b-Guard PI, big-endian as the spec lays them out."""
    return guard.to_bytes(2, "big") + apptag.to_bytes(2, "big") + reftag.to_bytes(4, "big")


def guard64(data: bytes) -> int:
    return crc.reference(crc.CRC64_NVME, data)


def pi64(guard: int, apptag: int, reftag: int) -> bytes:
    """16 bytes of 64b-Guard PI: the guard, the Application Tag and, with no storage tag,
    a 48-bit Reference Tag filling the Storage and Reference Space; big-endian."""
    return guard.to_bytes(8, "big") + apptag.to_bytes(2, "big") + reftag.to_bytes(6, "big")


@dataclass(frozen=True)
class PiOp:
    """One nvme-cli command on one block of a namespace and what the spec makes of it:
    ``status`` None for success. ``metadata``: the PI a write hands over (PRACT 0), written
    to a file for ``--metadata``; a read with ``read_back`` prints the metadata it got, which
    must be ``expect`` when it succeeds."""

    label: str
    ns: PiNamespace
    write: bool
    slba: int
    prinfo: Prinfo
    reftag: int
    status: Status | None
    apptag: int = APPTAG
    apptag_mask: int = 0xFFFF
    metadata: bytes | None = None
    read_back: bool = False
    expect: bytes | None = None
    #: other outcomes the spec allows (None: success)
    or_status: tuple[Status | None, ...] = ()

    @property
    def allowed(self) -> tuple[Status | None, ...]:
        return (self.status, *self.or_status)

    def command(self) -> str:
        verb = "write" if self.write else "read"
        data = "/tmp/pattern" if self.write else f"/tmp/r_{self.label}"
        cmd = (f"nvme {verb} ${{dev[{self.ns.nsid}]}} -s {self.slba} -c 0 -z {self.ns.lba} -d {data} "
               f"-p {int(self.prinfo)} -r {self.reftag} -a {self.apptag:#x} -m {self.apptag_mask:#x}")
        if self.metadata is not None or self.read_back:
            cmd += f" -y {self.ns.ms} -M /tmp/m_{self.label}"
        return cmd


#: The block the status rows use (Type 1 and Type 3 namespaces): past fio's ranges.
OP_LBA = 100_000


def pi_ops() -> tuple[PiOp, ...]:
    """Each PRINFO rule nvme-cli can drive, in an order where each row starts from what the
    last left: PRACT insert, a checked read that returns the PI (held to the spec's guard,
    tags), each tag's check error on a write whose PI is wrong in that field alone, the LBATM
    mask, Type 1's ILBRT rule, the escape values of Type 1 and Type 3, Type 3's Reference Tag
    check bit."""
    P, S = Prinfo, Status
    s, g, g64 = OP_LBA, guard16(PATTERN), guard64(PATTERN)
    ref_all = P.PRCHK_ALL
    inserted = pi16(g, APPTAG, s)   # PRACT's PI: the data's guard, LBAT, ILBRT
    escape = pi16(g ^ 0xFFFF, 0xFFFF, s + 7)
    return (
        PiOp("pract_write", TYPE1, True, s, P.PRACT | ref_all, s, None),
        PiOp("read_pi", TYPE1, False, s, ref_all, s, None, read_back=True, expect=inserted),
        PiOp("read_wrong_apptag", TYPE1, False, s, P.PRCHK_APP, s, S.END_TO_END_APPLICATION_TAG_CHECK_ERROR,
             apptag=OTHER_APPTAG, read_back=True),
        PiOp("read_apptag_masked", TYPE1, False, s, P.PRCHK_APP, s, None, apptag=OTHER_APPTAG, apptag_mask=0,
             read_back=True, expect=inserted),
        # the check: the PI carries a wrong Reference Tag (ILBRT is right)
        PiOp("write_wrong_reftag", TYPE1, True, s, P.PRCHK_REF, s, S.END_TO_END_REFERENCE_TAG_CHECK_ERROR,
             metadata=pi16(g, APPTAG, s + 1)),
        PiOp("write_wrong_guard", TYPE1, True, s, P.PRCHK_GUARD, s, S.END_TO_END_GUARD_CHECK_ERROR,
             metadata=pi16(g ^ 0xFFFF, APPTAG, s)),
        PiOp("write_wrong_apptag", TYPE1, True, s, P.PRCHK_APP, s, S.END_TO_END_APPLICATION_TAG_CHECK_ERROR,
             metadata=pi16(g, OTHER_APPTAG, s)),
        # Type 1: an ILBRT that is not the SLBA's low bits is Invalid Protection Information
        # (QEMU's nvme_check_prinfo does the same before it looks at any block)
        PiOp("write_ilbrt_not_slba", TYPE1, True, s, P.PRACT | P.PRCHK_REF, s + 5, S.INVALID_PROTECTION_INFORMATION),
        # Type 1: an Application Tag of FFFFh turns every check of that block off
        # (the controller stores the PI it did not check, as it came)
        PiOp("write_escape", TYPE1, True, s, ref_all, s, None, metadata=escape),
        PiOp("read_escape", TYPE1, False, s, ref_all, s, None, read_back=True, expect=escape),
        # Type 3 and PRCHK's Reference Tag bit: the controller should not compare the tag and
        # may ignore EILBRT; if it aborts for the bit, Invalid Protection Information, or
        # Invalid Field in Command (NVM Command Set; QEMU aborts: Invalid Protection Information)
        PiOp("type3_prchk_ref", TYPE3, True, s, ref_all, 0, None, metadata=pi16(g, APPTAG, 0xDEADBEEF),
             or_status=(S.INVALID_PROTECTION_INFORMATION, S.INVALID_FIELD)),
        # Type 3's escape needs FFFFh in the Application Tag and FFFFFFFFh in the Reference Tag
        # (LBAT FFFFh too: the Application Tag matches, only the guard is wrong)
        PiOp("type3_apptag_escape_alone", TYPE3, True, s, P.PRCHK_GUARD | P.PRCHK_APP, 0,
             S.END_TO_END_GUARD_CHECK_ERROR, apptag=0xFFFF, metadata=pi16(g ^ 0xFFFF, 0xFFFF, s)),
        PiOp("type3_escape", TYPE3, True, s, P.PRCHK_GUARD | P.PRCHK_APP, 0, None, apptag=0xFFFF,
             metadata=pi16(g ^ 0xFFFF, 0xFFFF, 0xFFFF_FFFF)),
        # the 64b Guard: PRACT's 16 bytes (CRC-64/NVME, 48-bit Reference Tag), its check errors
        PiOp("guard64_pract_write", GUARD64, True, s, P.PRACT | ref_all, s, None),
        PiOp("guard64_read_pi", GUARD64, False, s, ref_all, s, None, read_back=True, expect=pi64(g64, APPTAG, s)),
        PiOp("guard64_wrong_reftag", GUARD64, True, s, P.PRCHK_REF, s, S.END_TO_END_REFERENCE_TAG_CHECK_ERROR,
             metadata=pi64(g64, APPTAG, s + (1 << 32))),
        PiOp("guard64_wrong_guard", GUARD64, True, s, P.PRCHK_GUARD, s, S.END_TO_END_GUARD_CHECK_ERROR,
             metadata=pi64(g64 ^ (1 << 63), APPTAG, s)),
    )


def _op_lines() -> str:
    lines = []
    for op in pi_ops():
        if op.metadata is not None:
            escaped = "".join("\\x%02x" % b for b in op.metadata)
            lines.append(f"printf '{escaped}' > /tmp/m_{op.label}")
        lines.append(f"op {op.label} {op.command()}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the PI Linux generates, as the device stored it

#: The block the host_pi step writes through the block layer on each namespace.
HOST_PI_LBA = 90_000


def host_pi(ns: PiNamespace, lba: int = HOST_PI_LBA) -> bytes:
    """The PI Linux's block integrity generates for :data:`PATTERN` written at ``lba``
    (t10_pi_generate, ext_pi_crc64_generate): the guard over the data, Application Tag 0,
    Reference Tag the LBA for Type 1 and 0 for Type 3; the 64b Guard's PI is the 8-byte
    guard, the Application Tag and a 48-bit Reference Tag, big-endian."""
    ref = 0 if ns.pi is ProtectionType.TYPE3 else lba
    if ns.guard is GuardKind.GUARD_16:
        return pi16(guard16(PATTERN), 0, ref & 0xFFFF_FFFF)
    return pi64(guard64(PATTERN), 0, ref & GuardKind.GUARD_64.reftag_mask)


def host_pi_step(namespaces: tuple[PiNamespace, ...]) -> str:
    """The step ``host_pi``: one block written through the block layer (Linux generates its
    PI) on each namespace, then read back with nvme-cli and no PRINFO bit: the data and the
    metadata the device stored, which must be Linux's PI unchanged."""
    lines = ["step host_pi"]
    for ns in namespaces:
        n, d = ns.name, f"${{dev[{ns.nsid}]}}"
        lines += [
            f"dd if=/tmp/pattern of={d} bs={ns.lba} seek={HOST_PI_LBA} count=1 oflag=direct 2>/dev/null; "
            f'echo "{n}.write=$?"',
            f"nvme read {d} -s {HOST_PI_LBA} -c 0 -z {ns.lba} -d /tmp/hp_{n} -y {ns.ms} -M /tmp/hpm_{n} -p 0 "
            f'>/dev/null 2>&1; echo "{n}.read=$?"',
            f"cmp -s /tmp/hp_{n} /tmp/pattern; echo \"{n}.data=$?\"",
            f"echo \"{n}.md=$(od -An -tx1 -v /tmp/hpm_{n} | tr -d ' \\n')\"",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# the host's guard corruption (nvme-emu only: the control plane)

#: The line a job prints when the range is written and the host may corrupt its guards
#: (the host's on_console_line acts on it: :func:`guard_corruption_on_request`).
CORRUPT_MARK = "PI-CORRUPT-REQUEST"
CORRUPT_RE = re.compile(CORRUPT_MARK + r" nsid=(\d+) slba=(\d+) nlb=(\d+)")


@dataclass(frozen=True)
class CorruptPlan:
    """The host corrupts the stored guards of ``nlb`` blocks from ``slba`` of ``ns``; the
    guest reads each block of ``margin`` blocks either side, and the whole namespace."""

    ns: PiNamespace = TYPE1
    slba: int = 20_000
    nlb: int = 8
    margin: int = 8


def guard_corruption_on_request(corrupt: Callable[[int, int, int], object],
                                errors: list[str]) -> Callable[[str], None]:
    """The host side of the ``corrupt`` step, for run_guest's ``on_console_line``: on the
    job's :data:`pi_checks.CORRUPT_MARK` line, ``corrupt(nsid, slba, nlb)`` (the nvme-emu
    boot passes its control plane's guard corruption of that range); what goes wrong is
    appended to ``errors`` (the console reader thread must not raise), for the test to
    report. The guest polls its read of the range until it fails."""

    def on_line(line: str) -> None:
        m = CORRUPT_RE.search(line)
        if m is None:
            return
        try:
            corrupt(*(int(v) for v in m.groups()))
        except Exception as e:  # noqa: BLE001 (reported by the test, not lost on the reader thread)
            errors.append(repr(e))

    return on_line


#: The corruption the nvme-emu boot asks for.
CORRUPT = CorruptPlan()


def corrupt_step(plan: CorruptPlan = CORRUPT) -> str:
    """The step ``corrupt`` (issue 26: a ctl-injected guard corruption fails the guest's read
    of exactly that range, the rest of the disk reads fine). It writes the range and its
    margins, asks the host, waits until a read of the range fails (the guest cannot see the
    corruption otherwise), then reads each block of the window alone (Linux maps the NVMe
    End-to-end check errors to BLK_STS_PROTECTION: EILSEQ) and the whole namespace around the
    range. pi_judges.judge_corrupt reads it. Checked once on QEMU with the guest itself writing
    bad PI in place of the host (QEMU has no way to corrupt stored PI): 8 blocks EILSEQ, their
    16 neighbours and the rest of the namespace read fine."""
    lo, n = plan.slba - plan.margin, plan.nlb + 2 * plan.margin
    d = f"${{dev[{plan.ns.nsid}]}}"
    return f"""
step corrupt
head -c {n * plan.ns.lba} /dev/urandom > /tmp/window
dd if=/tmp/window of={d} bs={plan.ns.lba} seek={lo} oflag=direct 2>/dev/null; echo "write=$?"
dmesg -C
echo "{CORRUPT_MARK} nsid={plan.ns.nsid} slba={plan.slba} nlb={plan.nlb}"
t0=$(cut -d' ' -f1 /proc/uptime)
for i in $(seq 1 120); do
    dd if={d} of=/dev/null bs={plan.ns.lba} skip={plan.slba} count={plan.nlb} iflag=direct 2>/dev/null || break
    sleep 0.25
done
echo "seen_after=$(awk -v s="$t0" '{{print $1 - s}}' /proc/uptime)"
for b in $(seq {lo} {lo + n - 1}); do
    out=$(dd if={d} of=/tmp/blk bs={plan.ns.lba} skip=$b count=1 iflag=direct 2>&1); rc=$?
    same=$(cmp -s /tmp/blk <(dd if=/tmp/window bs={plan.ns.lba} skip=$((b - {lo})) count=1 2>/dev/null) && echo yes || echo no)
    echo "lba $b rc=$rc same=$same err=[$(echo "$out" | grep -i error | head -n 1)]"
done
# the rest of the namespace in 1 MiB reads (one block at a time took 20 s under TCG)
dd if={d} of=/dev/null bs=1M count={plan.slba * plan.ns.lba} iflag=direct,count_bytes 2>/dev/null; echo "before_range=$?"
dd if={d} of=/dev/null bs=1M skip={(plan.slba + plan.nlb) * plan.ns.lba} iflag=direct,skip_bytes 2>/dev/null; echo "after_range=$?"
dmesg | grep -i -E 'protection|I/O Error' | head -n 5 | sed 's/^/kernel: /'
"""


# ---------------------------------------------------------------------------------------
# Format NVM between the PI format and a plain one, and back


def format_step(ns: PiNamespace = TYPE1) -> str:
    """The step ``format``: the LBA formats as ``nvme id-ns -H`` lists them, a Format NVM to
    the plain one (no metadata, same data size) and back to the one with metadata and
    Type 1 PI, each followed by Linux's integrity format once its rescan shows it, Identify's
    FLBAS and DPS, and a 64 KiB write and read back through the block layer. Sent to the
    controller node so that nvme-cli does not re-read a partition table while Linux
    rescans the namespace."""
    nsid = ns.nsid
    b = f"/sys/block/${{dev[{nsid}]#/dev/}}"
    return f"""
step format
nvme id-ns -H ${{dev[{nsid}]}} | grep '^LBA Format'
plain=$(nvme id-ns -H ${{dev[{nsid}]}} | sed -n 's/^LBA Format *\\([0-9]*\\) : Metadata Size: 0 *bytes - Data Size: {ns.lba} bytes.*/\\1/p' | head -n 1)
meta=$(nvme id-ns -H ${{dev[{nsid}]}} | sed -n 's/^LBA Format *\\([0-9]*\\) : Metadata Size: {ns.ms} *bytes - Data Size: {ns.lba} bytes.*/\\1/p' | head -n 1)
echo "plain=$plain"
echo "meta=$meta"
after() {{  # after WHEN WANT: wait for Linux's rescan to show WANT, then what it shows and a r/w
    local i
    for i in $(seq 1 40); do [ "$(cat {b}/integrity/format)" = "$2" ] && break; sleep 0.25; done
    echo "$1.integrity=$(cat {b}/integrity/format)"
    echo "$1.flbas=$(nvme id-ns ${{dev[{nsid}]}} | sed -n 's/^flbas *: //p')"
    echo "$1.dps=$(nvme id-ns ${{dev[{nsid}]}} | sed -n 's/^dps *: //p')"
    head -c 65536 /dev/urandom > /tmp/f_$1
    dd if=/tmp/f_$1 of=${{dev[{nsid}]}} bs=65536 seek=16 oflag=direct 2>/dev/null
    dd if=${{dev[{nsid}]}} of=/tmp/g_$1 bs=65536 skip=16 count=1 iflag=direct 2>/dev/null
    cmp -s /tmp/f_$1 /tmp/g_$1; echo "$1.rw=$?"
}}
out=$(nvme format $ctrl -n {nsid} --lbaf=$plain --pi=0 --force 2>&1); echo "to_plain.rc=$?"
echo "to_plain.out=[${{out//$'\\n'/ }}]"
after to_plain none
out=$(nvme format $ctrl -n {nsid} --lbaf=$meta --pi={int(ns.pi)} --pil=0 --ms=0 --force 2>&1); echo "to_pi.rc=$?"
echo "to_pi.out=[${{out//$'\\n'/ }}]"
after to_pi {ns.integrity_format}
"""


# ---------------------------------------------------------------------------------------
# the script


#: Every script's start: the step marker, each namespace's block and generic nodes by NSID
#: (Linux scans namespaces concurrently: nvme0n1 is not always NSID 1), the helpers.
FIND = """\
set -u
step() { echo "=====STEP $1 $(cut -d' ' -f1 /proc/uptime)====="; }

step find
declare -A dev ng
for b in /sys/block/nvme*n*; do
    n=$(cat $b/nsid); dev[$n]=/dev/${b##*/}; ng[$n]=/dev/ng${b##*/nvme}
done
ctrl=/dev/nvme0
for n in "${!dev[@]}"; do echo "ns $n dev=${dev[$n]} ng=$( [ -c ${ng[$n]} ] && echo ${ng[$n]} )"; done
op() {  # op LABEL CMD...: CMD's exit status, its output, the metadata a read got
    local label=$1 out rc md="" read=no
    shift
    case " $* " in *" read "*) read=yes; rm -f /tmp/m_$label ;; esac
    out=$("$@" 2>&1); rc=$?
    [ $read = yes ] && [ -f /tmp/m_$label ] && md=$(od -An -tx1 -v /tmp/m_$label | tr -d ' \\n')
    echo "op $label rc=$rc md=[$md] out=[${out//$'\\n'/ }]"
}
fio_summary() {  # one line per fio job of a JSON output
    python3 -c 'import json, sys
for j in json.load(open(sys.argv[1]))["jobs"]:
    print("job", j["jobname"], "error=%d" % j["error"], "write=%d" % j["write"]["io_bytes"],
          "read=%d" % j["read"]["io_bytes"])' "$1"
}
"""


def pi_guest_script(namespaces: tuple[PiNamespace, ...] = NAMESPACES, corrupt: CorruptPlan | None = None) -> str:
    """The bash job of test_pi_guest.py: one step per check, each printing what pi_judges
    reads. ``corrupt``: the host-corruption step too (a device whose host side can corrupt
    stored guards: nvme-emu's control plane), before the format step."""
    integrity = "\n".join(
        f'b=/sys/block/${{dev[{ns.nsid}]#/dev/}}\n'
        f'for f in format tag_size protection_interval_bytes read_verify write_generate; do '
        f'echo "{ns.name}.$f=$(cat $b/integrity/$f 2>/dev/null)"; done\n'
        f'echo "{ns.name}.logical_block_size=$(cat $b/queue/logical_block_size)"\n'
        f'echo "{ns.name}.size_sectors=$(cat $b/size)"'
        for ns in namespaces)
    fio = "\n".join(f"""\
step {j.name}
{j.command()}
echo "rc=$?"
fio_summary /tmp/{j.name}.json
""" for j in FIO_JOBS if j.ns in namespaces)
    return FIND + f"""printf '%s' '{PATTERN.decode()}' > /tmp/pattern

step integrity
{integrity}
{host_pi_step(namespaces)}
{fio}
step ops
{_op_lines()}
{corrupt_step(corrupt) if corrupt is not None else ""}
{format_step()}
step end
"""
