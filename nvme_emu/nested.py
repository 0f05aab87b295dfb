"""The nested KVM rig: run a host command inside an L1 guest that has real KVM.

This machine's /dev/kvm is PVM and no released kernel has
``KVM_IOEVENTFD_FLAG_POST_WRITE``, so the real POST_WRITE path needs a KVM we build
ourselves. QEMU's TCG with ``-cpu max`` offers its guest SVM with nested paging, Debian
trixie's kernel there loads kvm_amd, and ``qemu-configs/kvm-post-write/build-kvm.sh``
rebuilds kvm.ko/kvm-amd.ko for exactly that kernel with the flag added. This module
boots that L1 guest (``qemu-configs/build-nested.sh``) with either the stock or the
patched module set, shares the host's root filesystem into it over 9p, and runs a
command there with ``chroot`` into the host tree, so the checkout and its .venv run
unchanged against the L1 /dev/kvm. It returns the command's output and exit status
and tears everything down (QEMU is killed on every exit path).

Command line (also ``./dev nested``)::

    nvme-emu nested [--kvm stock|patched] [--env K=V] [--out DIR] -- CMD [ARGS...]

Numbers measured inside include TCG-emulated VM exits: only ratios within one run mean
anything.

For the power-cut test (``tests/reliability/test_power_cut.py``) the rig also attaches raw
image files as virtio-blk disks of L1 (``disks``: /dev/vda, /dev/vdb, ... in order; L1 has
the virtio-blk and ext4 modules), pulls the plug on L1 at a console marker (``kill_when``),
and can leave KVM out of L1 altogether (``kvm=None``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import guest as g

KVM_SETS = ("stock", "patched")
#: L1 needs room for itself, the host's Python processes and small KVM guests.
DEFAULT_MEMORY_MB = 3072
#: Mount point (inside the QEMU chroot) of a non-recursive bind of the host's ``/``.
_HOST_ROOT = "host-root"
#: What the job inherits from the caller's environment (nothing else leaks in).
_PASS_ENV = ("PYTHONHASHSEED", "LANG", "LC_ALL")
#: Directories L1 mounts fresh tmpfs on, over the host's (nested-init.sh).
_L1_TMPFS = ("/tmp", "/run", "/dev/shm")
#: The job's TMPDIR: L1-only, beside (never around) the host directories bound back into
#: L1's /tmp. The binds' parent directories exist in L1 without the lock files they have on
#: the host, so a pytest run in L1 with the default temp root took the caller's numbered
#: ``/tmp/pytest-of-*/pytest-N`` for a stale one and deleted it, host files included,
#: through the bind.
L1_JOB_TMPDIR = "/tmp/nvme-emu-l1"


def ensure_nested() -> tuple[str, str]:
    """(kernel, initramfs) of the L1 guest (built and cached on first use)."""
    lines = g._run_script("build-nested.sh")
    if len(lines) < 2:
        raise g.GuestError(f"build-nested.sh printed {lines!r}")
    return lines[-2], lines[-1]


def ensure_patched_modules() -> Path:
    """Directory with the POST_WRITE kvm.ko / kvm-amd.ko (built and cached on first use)."""
    return Path(g._run_script("kvm-post-write/build-kvm.sh")[-1])


def _module_cpio(kvm: str | None) -> bytes:
    """The per-run cpio that adds the patched module set under /usr/lib/modules/patched."""
    if kvm != "patched":
        return b""
    d = ensure_patched_modules()
    files = {}
    for name in ("kvm.ko", "kvm-amd.ko", "kvm-intel.ko"):
        p = d / name
        if p.exists():
            files[f"usr/lib/modules/patched/{name}"] = p.read_bytes()
    if "usr/lib/modules/patched/kvm.ko" not in files:
        raise g.GuestError(f"no kvm.ko in {d}")
    return g.make_cpio(files, dirs=["usr/lib/modules/patched"])


def _job_script(argv: list[str], cwd: str, env: Mapping[str, str]) -> bytes:
    """/job/run.sh: the environment, the working directory, then the command."""
    lines = ["export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [f"export TMPDIR={L1_JOB_TMPDIR}", f"mkdir -p {L1_JOB_TMPDIR} || exit 126"]
    lines += [f"cd {shlex.quote(cwd)} || exit 126", "exec " + shlex.join(argv)]
    return ("\n".join(lines) + "\n").encode()


def _hidden_by_tmpfs(paths: Iterable[str]) -> list[str]:
    """The host directories among ``paths`` that L1's tmpfs mounts would hide (a checkout
    or an output directory under /tmp): nested-init.sh binds them back in."""
    out: list[str] = []
    for p in paths:
        if not any(_is_under(p, t) for t in _L1_TMPFS) or p in out:
            continue
        if _is_under(p, L1_JOB_TMPDIR) or _is_under(L1_JOB_TMPDIR, p):
            raise g.GuestError(f"{p}: a host directory cannot be shared at or around L1's TMPDIR {L1_JOB_TMPDIR}")
        out.append(p)
    return out


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _host_root_binds(paths: Iterable[str]) -> list[str]:
    """Host directories to bind under the 9p export because they sit on another
    filesystem than ``/`` (a non-recursive bind of ``/`` does not show them)."""
    root_dev = os.stat("/").st_dev
    out: list[str] = []
    for p in paths:
        p = os.path.realpath(p)
        if os.path.isdir(p) and os.stat(p).st_dev != root_dev and p not in out:
            out.append(p)
    return out


def _seen_by_qemu(path: str, chroot: str | None) -> str:
    """Where QEMU finds the host file ``path``: as is, or under the chroot's bind of the
    host's ``/`` (the chroot wrapper shares /tmp, /run and /dev itself)."""
    if chroot is None or path.startswith(g._SHARED_PREFIXES):
        return path
    return "/" + _HOST_ROOT + path


def _disk_args(disks: Sequence[str], chroot: str | None) -> list[str]:
    """virtio-blk devices for raw images, /dev/vda first. QEMU's default cache mode gives
    L1 a volatile write cache, so L1's flushes reach QEMU as real flush commands."""
    out: list[str] = []
    for i, path in enumerate(disks):
        file = _seen_by_qemu(path, chroot).replace(",", ",,")  # QEMU's option syntax escapes commas
        out += ["-drive", f"file={file},format=raw,if=none,id=disk{i}",
                "-device", f"virtio-blk-pci,drive=disk{i},serial=nvme-emu-disk{i}"]
    return out


def _qemu_command(qemu: str, kernel: str, initrd: str, *, kvm: str | None, memory_mb: int, cpus: int,
                  keep_dirs: list[str], share_dirs: list[str], disks: Sequence[str] = ()) -> list[str]:
    """The L1 QEMU command (wrapped in a mount namespace that exposes the host's root when
    QEMU runs in the provide-qemu.sh chroot)."""
    wrapped = os.path.exists(os.path.join(os.path.dirname(qemu), "chroot-run"))  # provide-qemu.sh's wrapper
    chroot = g._run_script("provide-qemu.sh", "--chroot")[-1] if wrapped else None
    kargs = [
        "console=ttyS0,115200", "panic=-1", "quiet", "loglevel=3",
        f"nvme_emu_kvm={kvm or 'none'}",
    ]
    if keep_dirs:
        kargs.append("nvme_emu_share=" + ":".join(keep_dirs))
    export = "/" if chroot is None else "/" + _HOST_ROOT
    cmd = [
        qemu, "-nodefaults", "-no-user-config", "-nographic", "-serial", "mon:stdio", "-no-reboot",
        "-machine", "q35", "-m", f"{memory_mb}M", "-smp", str(cpus),
        *g.ACCEL_ARGS["tcg"],
        "-kernel", kernel, "-initrd", initrd, "-append", " ".join(kargs),
        "-virtfs", f"local,path={export},mount_tag=host,security_model=none,multidevs=remap",
        *_disk_args(disks, chroot),
    ]
    if chroot is None:
        return cmd
    # QEMU runs in the provide-qemu.sh chroot: expose the host's / there through a private
    # mount namespace (inherited by the wrapper's own), never touching the host's mounts.
    root_dir = os.path.join(chroot, _HOST_ROOT)
    os.makedirs(root_dir, exist_ok=True)
    script = ['set -e', f'mount --bind / {shlex.quote(root_dir)}']
    for d in share_dirs:
        script.append(f'mount --bind {shlex.quote(d)} {shlex.quote(root_dir + d)}')
    script.append('exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", "\n".join(script), "nested", *cmd]


def run_nested(argv: list[str], *, kvm: str | None = "stock", env: Mapping[str, str] | None = None,
               cwd: str | None = None, out_dirs: Iterable[str] = (), memory_mb: int = DEFAULT_MEMORY_MB,
               cpus: int = 2, timeout: float = 1200, echo_console: bool = False,
               disks: Sequence[str] = (), kill_when: g.KillWhen | None = None) -> g.GuestResult:
    """Run ``argv`` in the L1 guest with the ``kvm`` module set ("stock" or "patched"; None:
    no KVM in L1, and no /dev/kvm).

    ``cwd`` (default: ours) and ``out_dirs`` must be host directories; files the command
    writes under ``out_dirs`` are on the host afterwards. The job sees only ``env`` (plus
    PATH/HOME and a few locale variables) and ``NVME_EMU_NESTED=<kvm>``. The result's
    ``returncode`` is the command's exit status (125: the rig failed before the command).
    ``disks`` are raw image files on the host, L1's /dev/vda, /dev/vdb, ...; ``kill_when``
    SIGKILLs L1's QEMU at a console marker (then ``returncode`` is None and ``killed_at`` set).
    """
    if kvm is not None and kvm not in KVM_SETS:
        raise ValueError(f"kvm must be one of {KVM_SETS} or None, got {kvm!r}")
    if os.geteuid() != 0:
        raise g.GuestError("the nested rig needs root (mount namespaces, 9p export of /)")
    cwd = os.path.realpath(cwd or os.getcwd())
    outs = [os.path.realpath(d) for d in out_dirs]
    images = [os.path.realpath(d) for d in disks]
    for p in images:
        if not os.path.isfile(p):
            raise FileNotFoundError(p)
    job_env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    job_env.update(env or {})
    job_env["NVME_EMU_NESTED"] = kvm or "none"
    job_env.setdefault("TERM", "dumb")  # the serial console is a tty: no colour codes in the output
    qemu = g.ensure_qemu()
    kernel, base_initrd = ensure_nested()
    with tempfile.TemporaryDirectory(prefix="nvme-emu-nested-", dir="/tmp", ignore_cleanup_errors=True) as tmp:
        extra = g.make_cpio({"job/run.sh": _job_script(argv, cwd, job_env)}, dirs=["job"]) + _module_cpio(kvm)
        initrd = g.append_initrd(base_initrd, os.path.join(tmp, "initrd.img"), extra)
        host_dirs = [cwd, *map(os.path.realpath, (sys.prefix, sys.base_prefix)), *outs]
        cmd = _qemu_command(qemu, kernel, initrd, kvm=kvm, memory_mb=memory_mb, cpus=cpus,
                            keep_dirs=_hidden_by_tmpfs(host_dirs),
                            share_dirs=_host_root_binds(host_dirs + [os.path.dirname(p) for p in images]),
                            disks=images)
        return g.boot(cmd, env=dict(os.environ), accel="tcg", timeout=timeout, echo_console=echo_console,
                      kill_when=kill_when)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nvme-emu nested", description=__doc__.split("\n\n")[0])
    p.add_argument("--kvm", choices=KVM_SETS, default="patched",
                   help="KVM modules in the L1 guest: Debian's, or ours with POST_WRITE (default)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment of the command (repeatable)")
    p.add_argument("--out", action="append", default=[], metavar="DIR", help="host directory the command writes results to")
    p.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("-v", "--verbose", action="store_true", help="echo the L1 serial console live")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] (run in the current directory)")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give a command after --")
    env = dict(kv.split("=", 1) for kv in a.env)
    res = run_nested(cmd, kvm=a.kvm, env=env, out_dirs=a.out, memory_mb=a.memory_mb,
                     timeout=a.timeout, echo_console=a.verbose)
    sys.stdout.write(res.output)
    if res.returncode is None:
        print(f"nvme-emu nested: the L1 guest did not finish\n{res.describe_failure()}", file=sys.stderr)
        return 124
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
