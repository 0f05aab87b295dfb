"""Boot a throw-away Linux guest in QEMU and run a command / fio job in it.

The guest sees either our NVMe controller (``socket_path``: QEMU's
``vfio-user-pci`` attached to a running vfio-user server) or QEMU's own
in-process NVMe (``builtin_image``: a raw file), and runs a shell command
and/or a fio job.  Everything is pure stdlib.

Pieces (all under ``qemu-configs/``):

* ``provide-qemu.sh`` prints a QEMU >= 10.1 with vfio-user-pci (host QEMU or a
  cached trixie chroot wrapper);
* ``build-guest.sh`` prints a cached kernel + initramfs (busybox, fio,
  nvme-cli, nvme modules, ``guest-init.sh`` as /init);
* ``vfio-user-nvme.args`` / ``builtin-nvme.args`` / ``builtin-zoned-nvme.args`` /
  ``builtin-pi-nvme.args``
  are the QEMU command lines with ``@PLACEHOLDER@`` words;
* ``build-rich-guest.sh`` prints the same kernel, an initramfs with a second
  stage (``rich-root.sh``) and a Debian tree that QEMU exports over virtio-9p:
  ``rich_root=True`` runs the job in that tree (bash, blkzone, mkfs.btrfs,
  python3, fio's t/zbd scripts under /opt/fio-zbd) on a tmpfs overlay.

Per run, the job (``/job/run.sh``, ``/job/cmd.sh``, ``/job/job.fio``) is put
in a small newc cpio appended to the cached initramfs (Linux unpacks
concatenated archives), so the cached image is never rebuilt.  /init prints
the job output between ``=====NVME-EMU-BEGIN=====`` and
``=====NVME-EMU-END rc=N=====`` on the serial console and powers off.

Command line::

    python -m nvme_emu.guest --builtin-image disk.raw --cmd 'nvme list'
    python -m nvme_emu.guest --socket /tmp/nvme.sock --fio job.fio
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

CONFIG_DIR = Path(__file__).resolve().parent.parent / "qemu-configs"

BEGIN_MARKER = "=====NVME-EMU-BEGIN====="
END_RE = re.compile(r"=====NVME-EMU-END rc=(\d+)=====")
FIO_BEGIN = "=====NVME-EMU-FIO-JSON-BEGIN====="
FIO_END = "=====NVME-EMU-FIO-JSON-END====="

# Directories the chroot wrapper of provide-qemu.sh always shares with the host.
_SHARED_PREFIXES = ("/tmp/", "/run/", "/dev/")


class GuestError(RuntimeError):
    """Infrastructure failure (QEMU/guest image could not be provided or run)."""


@dataclass
class GuestResult:
    returncode: int | None   # exit status of the guest job; None if it never finished
    output: str              # text between the BEGIN/END markers
    console: str             # whole serial console log
    qemu_stderr: str
    fio: dict | None         # parsed fio JSON (fio_job runs) or None
    accel: str               # "kvm" or "tcg"
    qemu_returncode: int | None = None
    timed_out: bool = False
    elapsed: float = 0.0
    cmdline: list[str] = field(default_factory=list)
    #: Seconds after start at which ``kill_when`` SIGKILLed QEMU (None: it never did).
    killed_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe_failure(self, tail: int = 60) -> str:
        lines = self.console.splitlines()[-tail:]
        return (
            f"guest rc={self.returncode} qemu rc={self.qemu_returncode} "
            f"timed_out={self.timed_out} elapsed={self.elapsed:.1f}s\n"
            f"--- qemu stderr ---\n{self.qemu_stderr.strip()}\n"
            f"--- console (last {tail} lines) ---\n" + "\n".join(lines)
        )

    def check(self) -> "GuestResult":
        """Raise GuestError unless the guest job finished with status 0."""
        if not self.ok:
            raise GuestError(self.describe_failure())
        return self


# --------------------------------------------------------------------------
# provisioning


def _run_script(name: str | Path, *args: str) -> list[str]:
    """Run a provisioning script (a qemu-configs/ name, or a path); its non-empty stdout lines."""
    script = CONFIG_DIR / name
    proc = subprocess.run(
        [str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise GuestError(
            f"{script} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise GuestError(f"{script} printed nothing")
    return lines


_qemu_path: str | None = None
_guest_paths: tuple[str, str] | None = None
_rich_paths: tuple[str, str, str] | None = None


def ensure_qemu() -> str:
    """Path of a qemu-system-x86_64 with vfio-user-pci (built/cached on demand)."""
    global _qemu_path
    if _qemu_path is None:
        _qemu_path = _run_script("provide-qemu.sh")[-1]
    return _qemu_path


def ensure_guest() -> tuple[str, str]:
    """(kernel, initramfs) paths of the cached test guest (built on demand)."""
    global _guest_paths
    if _guest_paths is None:
        lines = _run_script("build-guest.sh")
        if len(lines) < 2:
            raise GuestError(f"build-guest.sh printed {lines!r}")
        _guest_paths = (lines[-2], lines[-1])
    return _guest_paths


def ensure_rich_guest() -> tuple[str, str, str]:
    """(kernel, initramfs, root tree) of the cached rich guest (built on demand)."""
    global _rich_paths
    if _rich_paths is None:
        lines = _run_script("build-rich-guest.sh")
        if len(lines) < 3:
            raise GuestError(f"build-rich-guest.sh printed {lines!r}")
        _rich_paths = (lines[-3], lines[-2], lines[-1])
    return _rich_paths


#: The rich root's 9p tag (rich-root.sh mounts it).
RICH_ROOT_TAG = "richroot"


def rich_root_args(tree: str) -> list[str]:
    """QEMU arguments that export the rich guest's tree read-only over virtio-9p."""
    return ["-virtfs", f"local,path={tree},mount_tag={RICH_ROOT_TAG},security_model=none,readonly=on,multidevs=remap"]


@dataclass(frozen=True)
class ZonedNamespace:
    """QEMU's own zoned namespace (hw/nvme ``nvme-ns``, ``zoned=on``) for ``builtin_image``:
    the image's size must be a multiple of ``zone_size``. Sizes in bytes; 0 means QEMU's
    default (capacity = zone size, no open/active limit). Linux needs a power-of-two zone
    size. ``zasl``: Zone Append Size Limit of the controller (a power of two in units of
    the minimum memory page size; 0: MDTS's)."""

    zone_size: int = 4 << 20
    zone_capacity: int = 0
    max_open: int = 0
    max_active: int = 0
    lba_size: int = 4096
    cross_read: bool = False
    zasl: int = 0

    def ns_properties(self) -> str:
        """The ``-device nvme-ns`` properties after ``drive=``/``bus=``, QEMU 11.1 names."""
        props = [
            f"logical_block_size={self.lba_size}", f"physical_block_size={self.lba_size}",
            "zoned=on", f"zoned.zone_size={self.zone_size}",
            f"zoned.max_open={self.max_open}", f"zoned.max_active={self.max_active}",
            f"zoned.cross_read={'on' if self.cross_read else 'off'}",
        ]
        if self.zone_capacity:
            props.append(f"zoned.zone_capacity={self.zone_capacity}")
        return ",".join(props)


def parse_zoned(spec: str) -> ZonedNamespace:
    """``zone_size=4M,zone_capacity=3M,max_open=8,max_active=10,lba_size=512`` -> ZonedNamespace."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    kw: dict[str, int | bool] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "cross_read":
            kw[key] = value in ("1", "on", "true", "")
            continue
        mult = units.get(value[-1:].upper(), 1)
        kw[key] = int(value[:-1] if mult > 1 else value) * mult
    return ZonedNamespace(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ProtectedNamespace:
    """A namespace of QEMU's own nvme with metadata and end-to-end protection (hw/nvme
    ``nvme-ns`` ms/mset/pi/pil/pif, QEMU 11.1 names) for ``builtin_pi``: the next ``size``
    bytes of ``builtin_image`` (a raw node at an offset; hw/nvme keeps the metadata behind
    the data in those bytes). ``pi``: Protection Information Type (0: none); ``pil``: 1 PI
    in the first bytes of the metadata, 0 (QEMU's default) the last; ``mset``: 1 extended
    LBAs, 0 a separate buffer; ``pif``: 0 16b Guard, 2 64b Guard (ELBAF PIF)."""

    size: int
    ms: int = 8
    pi: int = 1
    pil: int = 0
    mset: int = 0
    pif: int = 0
    lba_size: int = 512

    def ns_properties(self) -> str:
        """The ``-device nvme-ns`` properties after ``drive=``/``bus=``/``nsid=``."""
        return (f"logical_block_size={self.lba_size},physical_block_size={self.lba_size},ms={self.ms},"
                f"mset={self.mset},pi={self.pi},pil={self.pil},pif={self.pif}")


def pi_namespace_args(image: str, namespaces: Sequence[ProtectedNamespace]) -> list[str]:
    """One raw node per namespace over one file node of ``image``, packed from offset 0, and
    its ``nvme-ns`` (nsid 1, 2...). share-rw: the raw nodes are siblings on one file, each
    writable, so each device must let the others write (they never overlap). A comma in
    the path is doubled (QEMU's key=value escape)."""
    args = ["-blockdev", f"driver=file,filename={image.replace(',', ',,')},node-name=img,discard=unmap"]
    offset = 0
    for i, ns in enumerate(namespaces, 1):
        args += ["-blockdev", f"driver=raw,file=img,offset={offset},size={ns.size},node-name=pi{i}",
                 "-device", f"nvme-ns,bus=nvme0,drive=pi{i},nsid={i},share-rw=on,{ns.ns_properties()}"]
        offset += ns.size
    return args


_agent_path: str | None = None


def ensure_agent() -> str:
    """Path of the doorbell agent's shared object (nvme_emu/agent/build.sh, cached)."""
    global _agent_path
    if _agent_path is None:
        _agent_path = _run_script(Path(__file__).resolve().parent / "agent" / "build.sh")[-1]
    return _agent_path


def detect_accel() -> str:
    """'kvm' only with real VMX/SVM and a usable /dev/kvm, else 'tcg'.

    NVME_EMU_ACCEL=kvm|tcg overrides.  (/dev/kvm on PVM hosts has neither flag
    and cannot run a stock Linux guest, so it is correctly left alone.)
    """
    forced = os.environ.get("NVME_EMU_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags: set[str] = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "tcg"
    if ({"vmx", "svm"} & flags) and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


ACCEL_ARGS = {
    "kvm": ["-accel", "kvm", "-cpu", "host"],
    "tcg": ["-accel", "tcg,thread=multi", "-cpu", "max"],
}


def load_args(name: str, subs: dict[str, str], accel: str) -> list[str]:
    """Read a qemu-configs/*.args file and substitute its @PLACEHOLDER@s."""
    text = (CONFIG_DIR / name).read_text()
    words = shlex.split(text, comments=True)
    out: list[str] = []
    for w in words:
        if w == "@ACCEL@":
            out.extend(ACCEL_ARGS[accel])
            continue
        for k, v in subs.items():
            w = w.replace(f"@{k}@", v)
        if re.search(r"@[A-Z_]+@", w):
            raise GuestError(f"{name}: unfilled placeholder in {w!r}")
        out.append(w)
    return out


# --------------------------------------------------------------------------
# per-run cpio (newc)


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    namez = name.encode() + b"\0"
    fields = (
        ino, mode, 0, 0,                 # ino, mode, uid, gid
        2 if mode & 0o040000 else 1,     # nlink
        int(time.time()), len(data),     # mtime, filesize
        0, 0, 0, 0,                      # devmajor/minor, rdevmajor/minor
        len(namez), 0,                   # namesize, check
    )
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    buf = hdr + namez
    buf += b"\0" * (-len(buf) % 4)
    buf += data
    buf += b"\0" * (-len(buf) % 4)
    return buf


def make_cpio(files: dict[str, bytes], dirs: Iterable[str] = ()) -> bytes:
    """A newc archive with the given directories and regular files (root-owned)."""
    out = bytearray()
    ino = 0x4E56_0000  # arbitrary, distinct from the base archive's
    for d in dirs:
        ino += 1
        out += _newc_entry(d.strip("/"), 0o040755, ino=ino)
    for path, data in files.items():
        ino += 1
        out += _newc_entry(path.strip("/"), 0o100755, data, ino=ino)
    out += _newc_entry("TRAILER!!!", 0, ino=0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def _job_files(command: str | None, fio_job: str | None, rich_root: bool = False) -> dict[str, bytes]:
    """The per-run /job: run.sh (what guest-init.sh runs), cmd.sh, job.fio. With
    ``rich_root`` run.sh hands the job to rich-root.sh, which runs it (inner.sh) in the
    rich tree, and the command runs with bash."""
    files: dict[str, bytes] = {}
    run = ["#!/bin/sh", "cd /job"]
    shell = "bash" if rich_root else "sh"
    if command is not None:
        files["job/cmd.sh"] = (command.rstrip("\n") + "\n").encode()
        run.append(f"{shell} /job/cmd.sh || exit $?" if fio_job is not None else f"{shell} /job/cmd.sh")
    if fio_job is not None:
        files["job/job.fio"] = fio_job.encode()
        run += [
            "fio --eta=never --output-format=json --output=/tmp/fio.json /job/job.fio",
            "rc=$?",
            f"echo {FIO_BEGIN}",
            "cat /tmp/fio.json",
            "echo",
            f"echo {FIO_END}",
            "exit $rc",
        ]
    if rich_root:
        files["job/inner.sh"] = ("\n".join(run) + "\n").encode()
        files["job/run.sh"] = b"#!/bin/sh\nexec sh /usr/lib/nvme-emu/rich-root.sh /job/inner.sh\n"
    else:
        files["job/run.sh"] = ("\n".join(run) + "\n").encode()
    return files


# --------------------------------------------------------------------------
# console parsing


def parse_console(console: str) -> tuple[int | None, str, dict | None]:
    """(returncode, output, fio_json) from a serial console log."""
    text = console.replace("\r", "")
    start = text.find(BEGIN_MARKER + "\n")
    if start < 0:
        return None, "", None
    body = text[start + len(BEGIN_MARKER) + 1:]
    m = END_RE.search(body)
    if m is None:
        return None, body, _parse_fio(body)
    return int(m.group(1)), body[: m.start()], _parse_fio(body[: m.start()])


def _parse_fio(text: str) -> dict | None:
    a = text.find(FIO_BEGIN)
    if a < 0:
        return None
    b = text.find(FIO_END, a)
    raw = text[a + len(FIO_BEGIN): b if b >= 0 else len(text)]
    # fio may print warnings (e.g. "fio: ...") before the JSON object.
    i = raw.find("{")
    if i < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(raw[i:])[0]
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class KillWhen:
    """Pull the plug: SIGKILL QEMU's process group ``delay`` seconds after the first
    console line that contains ``marker``. The guest gets no shutdown and its page cache
    and queued disk writes are gone, which is what a power cut does to it (the host's
    own page cache survives: what QEMU had written to an image file stays)."""

    marker: str
    delay: float = 0.0


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGTERM if the runner dies without cleaning up.

    Survives the wrapper's exec chain (unshare/chroot all exec)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _bind_dirs(paths: Iterable[str]) -> str:
    """Directories the chroot wrapper must bind for these host paths."""
    dirs = []
    for p in paths:
        d = os.path.dirname(os.path.abspath(p))
        if not d.startswith(_SHARED_PREFIXES) and d not in ("/tmp", "/run") and d not in dirs:
            dirs.append(d)
    return ":".join(dirs)


def build_cmdline(
    *,
    socket_path: str | None,
    builtin_image: str | None,
    kernel: str,
    initrd: str,
    cpus: int,
    memory_mb: int,
    accel: str,
    kernel_args: str = "",
    extra_sockets: Sequence[str] = (),
    builtin_null: int | None = None,
    builtin_zoned: ZonedNamespace | None = None,
    rich_tree: str | None = None,
    builtin_pi: Sequence[ProtectedNamespace] = (),
) -> list[str]:
    """The QEMU command line; each of ``extra_sockets`` adds one more vfio-user device
    after the first (a guest with several nvme-emu controllers). ``builtin_null`` (bytes):
    QEMU's own nvme on a ``null-co`` block node of that size instead of a file.
    ``builtin_zoned``: ``builtin_image`` backs a zoned namespace of QEMU's nvme.
    ``builtin_pi``: ``builtin_image`` backs these namespaces with metadata, in order.
    ``rich_tree``: export that directory over virtio-9p (the rich guest's root)."""
    tail = rich_root_args(rich_tree) if rich_tree is not None else []
    subs = {
        "MEM": f"{memory_mb}M",
        "CPUS": str(cpus),
        "KERNEL": kernel,
        "INITRD": initrd,
        "KERNEL_ARGS": kernel_args,
    }
    if socket_path is not None:
        subs["SOCKET"] = os.path.abspath(socket_path)
        args = load_args("vfio-user-nvme.args", subs, accel)
        for extra in extra_sockets:
            args += ["-device", vfio_user_device(extra)]
        return args + tail
    if builtin_null is not None:
        subs["SIZE"] = str(builtin_null)
        return load_args("builtin-null-nvme.args", subs, accel) + tail
    assert builtin_image is not None
    subs["IMAGE"] = os.path.abspath(builtin_image)
    if builtin_zoned is not None:
        subs["ZONED_NS"] = builtin_zoned.ns_properties()
        subs["ZASL"] = str(builtin_zoned.zasl)
        return load_args("builtin-zoned-nvme.args", subs, accel) + tail
    if builtin_pi:
        return load_args("builtin-pi-nvme.args", subs, accel) + pi_namespace_args(subs["IMAGE"], builtin_pi) + tail
    return load_args("builtin-nvme.args", subs, accel) + tail


def vfio_user_device(socket_path: str) -> str:
    """A ``-device`` value for one more vfio-user controller, with the options the .args
    file gives the first one (JSON: the socket is a QAPI object)."""
    return json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": os.path.abspath(socket_path)},
                       "x-msg-timeout": 30000, "rombar": 0}, separators=(",", ":"))


def run_guest(
    *,
    socket_path: str | None = None,
    builtin_image: str | None = None,
    command: str | None = None,
    fio_job: str | None = None,
    cpus: int = 2,
    memory_mb: int = 1024,
    timeout: float = 600,
    extra_qemu_args: Iterable[str] = (),
    kernel_args: str = "",
    echo_console: bool = False,
    agent: bool | None = None,
    extra_sockets: Sequence[str] = (),
    builtin_null: int | None = None,
    on_console_line: Callable[[str], None] | None = None,
    rich_root: bool = False,
    builtin_zoned: ZonedNamespace | None = None,
    builtin_pi: Sequence[ProtectedNamespace] = (),
) -> GuestResult:
    """Boot the test guest, run ``command`` and/or ``fio_job`` (file *contents*).

    Exactly one of ``socket_path`` (vfio-user server socket), ``builtin_image`` (raw file
    for QEMU's own nvme) or ``builtin_null`` (QEMU's own nvme on a ``null-co`` block node
    of that many bytes: no host I/O, reads return zeroes) must be given.
    QEMU is killed on timeout and on every exit path. ``agent`` (default: whenever the
    accelerator is KVM and the device is ours) preloads the doorbell agent into QEMU,
    listening on ``socket_path + ".agent"``, where ``nvme-emu serve`` looks for it.
    ``extra_sockets`` attach more vfio-user servers as further NVMe controllers (their
    doorbells stay trapped: the agent serves the first socket only).
    ``on_console_line`` is called with each console line as it arrives (on a reader
    thread; the guest does not wait for it), e.g. to act on markers a job prints.
    ``rich_root`` runs the job (command with bash) in the rich guest's Debian tree
    (build-rich-guest.sh) instead of the busybox initramfs; same markers, same result.
    ``builtin_zoned`` makes ``builtin_image`` a zoned namespace of QEMU's own nvme;
    ``builtin_pi`` makes it namespaces with metadata and PI (their sizes in a row).
    """
    if sum(x is not None for x in (socket_path, builtin_image, builtin_null)) != 1:
        raise ValueError("give exactly one of socket_path, builtin_image or builtin_null")
    if command is None and fio_job is None:
        raise ValueError("give command and/or fio_job")
    if builtin_image is not None and not os.path.exists(builtin_image):
        raise FileNotFoundError(builtin_image)
    if agent and socket_path is None:
        raise ValueError("the doorbell agent serves a vfio-user device: give socket_path")
    if builtin_zoned is not None and builtin_image is None:
        raise ValueError("builtin_zoned describes builtin_image's namespace: give builtin_image")
    if builtin_pi and (builtin_image is None or builtin_zoned is not None):
        raise ValueError("builtin_pi carves builtin_image (and is not zoned): give builtin_image alone")

    qemu = ensure_qemu()
    rich_tree: str | None = None
    if rich_root:
        kernel, base_initrd, rich_tree = ensure_rich_guest()
    else:
        kernel, base_initrd = ensure_guest()
    accel = detect_accel()

    # Under /tmp so the chroot-wrapped QEMU sees the same path.
    with tempfile.TemporaryDirectory(prefix="nvme-emu-guest-", dir="/tmp", ignore_cleanup_errors=True) as tmpdir:
        initrd = append_initrd(base_initrd, os.path.join(tmpdir, "initrd.img"),
                               make_cpio(_job_files(command, fio_job, rich_root), dirs=["job"]))
        args = build_cmdline(
            socket_path=socket_path, builtin_image=builtin_image,
            kernel=kernel, initrd=initrd, cpus=cpus, memory_mb=memory_mb,
            accel=accel, kernel_args=kernel_args, extra_sockets=extra_sockets, builtin_null=builtin_null,
            builtin_zoned=builtin_zoned, rich_tree=rich_tree, builtin_pi=builtin_pi,
        )
        env = dict(os.environ)
        if socket_path is not None and (agent if agent is not None else accel == "kvm"):
            env["LD_PRELOAD"] = ensure_agent()
            env["NVME_EMU_AGENT_SOCKET"] = os.path.abspath(socket_path) + ".agent"
        binds = _bind_dirs([p for p in (socket_path, builtin_image, *extra_sockets) if p])
        if binds:
            env["NVME_EMU_BIND"] = ":".join(filter(None, [env.get("NVME_EMU_BIND", ""), binds]))
        return boot([qemu, *args, *extra_qemu_args], env=env, accel=accel,
                    timeout=timeout, echo_console=echo_console, on_console_line=on_console_line)


def append_initrd(base: str, dest: str, extra: bytes) -> str:
    """Write ``base`` followed by the cpio ``extra`` to ``dest`` (Linux unpacks both)."""
    with open(dest, "wb") as out, open(base, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
        # the build scripts pad to 512; re-align defensively.
        out.write(b"\0" * (-out.tell() % 512))
        out.write(extra)
    return dest


def boot(cmd: list[str], *, env: dict[str, str], accel: str, timeout: float,
         echo_console: bool = False, kill_when: KillWhen | None = None,
         on_console_line: Callable[[str], None] | None = None) -> GuestResult:
    """Run a QEMU whose guest prints the BEGIN/END markers; kill it on timeout and on
    every exit path, and return what the console said. ``kill_when`` kills it on purpose
    at a console marker (the result's ``killed_at`` says when)."""
    proc: subprocess.Popen | None = None
    timer: threading.Timer | None = None
    killed_at: list[float] = []
    try:
        console_chunks: list[str] = []
        stderr_chunks: list[str] = []
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

        def pull_plug() -> None:
            if proc.poll() is not None:  # finished on its own first
                return
            killed_at.append(time.monotonic() - t0)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def pump(stream, sink: list[str], echo) -> None:
            nonlocal timer
            for raw in iter(lambda: stream.readline(), b""):
                s = raw.decode("utf-8", "replace")
                sink.append(s)
                if kill_when is not None and timer is None and sink is console_chunks and kill_when.marker in s:
                    timer = threading.Timer(kill_when.delay, pull_plug)
                    timer.daemon = True
                    timer.start()
                if echo is not None:
                    echo.write(s.replace("\r", ""))
                    echo.flush()
                if on_console_line is not None and sink is console_chunks:
                    try:
                        on_console_line(s.rstrip("\r\n"))
                    except Exception as e:  # a watcher's bug must not stop the console pump
                        stderr_chunks.append(f"on_console_line failed: {e!r}\n")

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, console_chunks,
                                                sys.stderr if echo_console else None), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, stderr_chunks, None), daemon=True),
        ]
        for t in threads:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        for t in threads:
            t.join(timeout=5)
        elapsed = time.monotonic() - t0

        console = "".join(console_chunks)
        rc, output, fio = parse_console(console)
        return GuestResult(
            returncode=rc,
            output=output,
            console=console.replace("\r", ""),
            qemu_stderr="".join(stderr_chunks),
            fio=fio,
            accel=accel,
            qemu_returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            elapsed=elapsed,
            cmdline=cmd,
            killed_at=killed_at[0] if killed_at else None,
        )
    finally:
        if timer is not None:
            timer.cancel()
        if proc is not None:
            _kill_group(proc)
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()


# --------------------------------------------------------------------------
# fio summary


def fio_summary(fio: dict) -> list[dict]:
    """One row per job and direction with I/O: iops, bw, clat mean/p50/p99 (us), errors."""
    rows = []
    for job in fio.get("jobs", []):
        for d in ("read", "write", "trim"):
            st = job.get(d) or {}
            if not st.get("total_ios"):
                continue
            clat = st.get("clat_ns") or {}
            pct = clat.get("percentile") or {}
            rows.append({
                "job": job.get("jobname"),
                "dir": d,
                "iops": st.get("iops", 0.0),
                "bw_kib": st.get("bw", 0),
                "ios": st.get("total_ios", 0),
                "clat_mean_us": clat.get("mean", 0.0) / 1000,
                "clat_p50_us": pct.get("50.000000", 0) / 1000,
                "clat_p99_us": pct.get("99.000000", 0) / 1000,
                "errors": job.get("error", 0),
            })
    return rows


def format_fio_summary(fio: dict) -> str:
    lines = [f"{'job':<20} {'dir':<5} {'IOPS':>10} {'KiB/s':>10} "
             f"{'mean us':>9} {'p50 us':>9} {'p99 us':>9} {'err':>4}"]
    for r in fio_summary(fio):
        lines.append(
            f"{r['job']:<20} {r['dir']:<5} {r['iops']:>10.0f} {r['bw_kib']:>10} "
            f"{r['clat_mean_us']:>9.1f} {r['clat_p50_us']:>9.1f} {r['clat_p99_us']:>9.1f} "
            f"{r['errors']:>4}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nvme_emu.guest", description=__doc__.split("\n\n")[0])
    tgt = ap.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--socket", help="vfio-user server socket (our controller)")
    tgt.add_argument("--builtin-image", help="raw image for QEMU's own -device nvme")
    ap.add_argument("--cmd", help="shell command to run in the guest")
    ap.add_argument("--fio", metavar="JOBFILE", help="fio job file to run in the guest")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mem", type=int, default=1024, metavar="MB")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--kernel-args", default="")
    ap.add_argument("--qemu-arg", action="append", default=[], help="extra QEMU argument (repeatable)")
    ap.add_argument("--fio-json", metavar="FILE", help="write the full fio JSON here")
    ap.add_argument("--rich-root", action="store_true",
                    help="run the job in the rich guest's Debian tree (bash, blkzone, mkfs.btrfs, /opt/fio-zbd)")
    ap.add_argument("--builtin-zoned", metavar="SPEC",
                    help="with --builtin-image: a zoned namespace, e.g. zone_size=4M,max_open=8,max_active=8")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the serial console to stderr")
    a = ap.parse_args(argv)
    if a.cmd is None and a.fio is None:
        ap.error("need --cmd and/or --fio")

    fio_job = Path(a.fio).read_text() if a.fio else None
    try:
        res = run_guest(
            socket_path=a.socket, builtin_image=a.builtin_image, command=a.cmd,
            fio_job=fio_job, cpus=a.cpus, memory_mb=a.mem, timeout=a.timeout,
            extra_qemu_args=a.qemu_arg, kernel_args=a.kernel_args,
            echo_console=a.verbose, rich_root=a.rich_root,
            builtin_zoned=parse_zoned(a.builtin_zoned) if a.builtin_zoned else None,
        )
    except GuestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 125

    if res.fio is not None:
        out = res.output
        i = out.find(FIO_BEGIN)
        if i >= 0:
            out = out[:i]
        if out.strip():
            print(out.rstrip())
        print(format_fio_summary(res.fio))
        if a.fio_json:
            Path(a.fio_json).write_text(json.dumps(res.fio, indent=1))
    else:
        sys.stdout.write(res.output)
    sys.stdout.flush()
    print(f"[guest rc={res.returncode} accel={res.accel} {res.elapsed:.1f}s]", file=sys.stderr)
    if res.returncode is None:
        print(res.describe_failure(), file=sys.stderr)
        return 124
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
