"""``nvme-emu``: serve the controller over vfio-user, or boot a guest against it.

This is the composition root: the only place where the NVMe device meets a vfio-user
backend and an event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time

from vfio_user.client_watch import DEFAULT_HANDSHAKE_TIMEOUT
from vfio_user.server_api import ServerBackend

from . import __version__, atomics, identity
from .control import PARAMS as CONTROL_PARAMS, ControlPlane
from .controller import ControllerConfig
from .ctl import default_control_socket
from .doorbell import DoorbellMode
from .function import NvmeFunction
from .jsonrpc import Dispatcher
from .latency import DEFAULT_SAMPLE_EVERY, format_table
from .inline_budget import INLINE_BUDGET_NS, default_budget_ns, set_default_budget
from .namespace_spec import open_namespace, parse_size
from .rpc_socket import RpcServer
from .state import DEFAULT_NVM_CAPACITY

log = logging.getLogger("nvme_emu")

DEFAULT_SOCKET = "/tmp/nvme-emu.sock"
DEFAULT_NAMESPACE = "ram:size=1G"


def qemu_arguments(socket_path: str, memory: str = "1G") -> str:
    """The QEMU arguments that attach a guest to this server (shared memfd RAM + device)."""
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": socket_path}, "x-msg-timeout": 30000}, separators=(",", ":"))
    return (
        f"-object memory-backend-memfd,id=mem,size={memory},share=on "
        f"-machine q35,memory-backend=mem -m {memory} "
        f"-device '{device}'"
    )


def _size(text: str) -> int:
    """An argparse type: a size as namespace specs write it (512M, 4G, 4096)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _switch_interval_us(text: str) -> float:
    """An argparse type: a GIL switch interval in microseconds (> 0)."""
    try:
        us = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < us <= 1e6:
        raise argparse.ArgumentTypeError(f"{text} us: must be > 0 and <= 1000000")
    return us


def process_stats() -> dict[str, float]:
    """What the process runs with (in the stats JSON next to the device's counters)."""
    return {"switch_interval_us": round(sys.getswitchinterval() * 1e6, 3), "inline_write_budget_us": default_budget_ns() / 1000}


def _crdt(value: str) -> int:
    """A Command Retry Delay Time: 16 bits, in 100 ms."""
    n = int(value, 0)
    if not 0 <= n <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{value}: 0 to 65535 (units of 100 ms)")
    return n


def build_function(args: argparse.Namespace) -> NvmeFunction:
    seed = identity.controller_seed(args.socket)
    serial = args.serial or identity.controller_serial(seed)
    config = ControllerConfig(serial=serial, model=args.model, max_io_queues=args.queues, ns_dir=args.ns_dir, identity_seed=seed,
                              nvm_capacity=args.nvm_capacity, command_retry_delay_100ms=args.crdt1)
    specs = args.namespace or [DEFAULT_NAMESPACE]
    namespaces = []
    try:
        for i, spec in enumerate(specs, start=1):
            namespaces.append(open_namespace(spec, i, controller_seed=seed))
    except BaseException:
        for ns in namespaces:
            ns.close()
        raise
    function = NvmeFunction(namespaces, config, doorbell=args.doorbell, spin_us=args.spin_us, poll_idle_max_us=args.poll_idle_max_us)
    function.controller.state.latency.set_sampling(args.latency_sample)
    return function


def agent_socket(args: argparse.Namespace) -> str | None:
    """Where the doorbell agent inside QEMU listens: next to the vfio-user socket by default."""
    if args.agent_socket == "off":
        return None
    return args.agent_socket or f"{args.socket}.agent"


def control_socket(args: argparse.Namespace) -> str | None:
    """Where the control plane listens: next to the vfio-user socket by default."""
    if args.ctl_socket == "off":
        return None
    return args.ctl_socket or default_control_socket(args.socket)


async def start_control(function: NvmeFunction, path: str | None, mode: int) -> RpcServer | None:
    """Serve the control plane's methods on ``path`` (on this loop), or nothing."""
    if path is None:
        return None
    server = RpcServer(Dispatcher(ControlPlane(function).methods(), CONTROL_PARAMS), path, mode=mode)
    await server.start()
    return server


def agent_library_hint() -> str:
    """The agent's shared object if it is built (or can be, here), else how to build it."""
    from .guest import GuestError, ensure_agent

    try:
        return ensure_agent()
    except GuestError:
        return "$(nvme_emu/agent/build.sh | tail -n1)"


def format_stats(function: NvmeFunction) -> str:
    st = function.stats()
    db = st["doorbells"]
    lines = [
        f"doorbell path {st['doorbell_mode']}: trapped={db['trapped']} trapped_io_sq={db['trapped_io_sq']} signals={db['signals']} wakeups={db['wakeups']} "
        f"doorbells={db['doorbells']} coalesced={db['coalesced']} spin_hits={db['spin_hits']}/{db['spins']} "
        f"polls={db['polls']} poll_cpu={db['poll_cpu_seconds']:.3f}s lost_values={db['lost_values']} "
        f"lazy_cq_heads={db['lazy_cq_heads']} cq_head_arms={db['cq_head_arms']}"
    ]
    for name, q in st["queues"].items():
        per_wake = q["commands"] / q["batches"] if q["batches"] else 0.0
        lines.append(
            f"  {name}: commands={q['commands']} batches={q['batches']} cmds/batch={per_wake:.2f} max_batch={q['max_batch']} "
            f"completions={q['cq_completions']} interrupts={q['cq_interrupts']} cq_full_stalls={q['cq_full_stalls']} to_workers={q['to_workers']}"
        )
    if st["latency"]["queues"]:
        lines.append(format_table(st["latency"]))
    agent = st.get("ioeventfd_agent")
    if agent is not None:
        lines.append(f"  ioeventfd agent {agent['agent']}: connected={agent['connected']} post_write={agent['post_write']} "
                     f"registered={agent['registered']} refused={agent['refused']} sets={agent['sets']} "
                     f"clears={agent['clears']} failures={agent['failures']}")
    return "\n".join(lines)


async def serve(args: argparse.Namespace) -> int:
    from vfio_user.backends import make_server

    from vfio_user.constants import RegionIndex
    from vfio_user.ioeventfd_export import IoeventfdExport

    function = build_function(args)
    try:
        server = make_server(ServerBackend(args.backend), function, args.socket, mode=int(args.socket_mode, 8), handshake_timeout=args.handshake_timeout,
                             dma_unsealed=args.dma_unsealed)
    except BaseException:
        function.close()
        raise
    agent_path = agent_socket(args)
    export = (IoeventfdExport(function, RegionIndex.BAR0, agent_path, use_post_write=args.agent_post_write == "auto")
              if agent_path else None)
    print(f"nvme-emu: vfio-user backend {server.backend}, "
          f"GIL switch interval {process_stats()['switch_interval_us']:g} us", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _report_stats(function, args.stats_json))
    control = None
    try:
        await server.start()
        control = await start_control(function, control_socket(args), int(args.socket_mode, 8))
        print(f"nvme-emu {__version__}: serving {len(function.controller.namespaces)} namespace(s) on {args.socket} (doorbells: {args.doorbell})", flush=True)
        for ns in function.controller.namespaces.values():
            print(f"  namespace {ns.nsid}: {ns!r}", flush=True)
        print("attach QEMU (10.1+) with:", flush=True)
        print(f"  qemu-system-x86_64 {qemu_arguments(args.socket)} ...", flush=True)
        if agent_path:
            print("under KVM, let the doorbell agent register the doorbells as ioeventfds (POST_WRITE where the "
                  "kernel has it) by starting that QEMU as:", flush=True)
            print(f"  LD_PRELOAD={agent_library_hint()} NVME_EMU_AGENT_SOCKET={agent_path} qemu-system-x86_64 -accel kvm ...",
                  flush=True)
        if control is not None:
            print(f"control plane: nvme-emu ctl --socket {control.path} list", flush=True)
        stats_task = loop.create_task(_print_stats(function, args.stats)) if args.stats else None
        await stop.wait()
        print("nvme-emu: shutting down", flush=True)
        if stats_task is not None:
            stats_task.cancel()
    finally:
        if control is not None:
            control.close()
        if export is not None:
            export.close()
        server.close()
        for ns in function.controller.state.allocated.values():
            try:
                ns.flush()
            except Exception as e:  # report, but still close everything
                log.error("flush of namespace %d failed: %s", ns.nsid, e)
        function.close()
    return 0


def _report_stats(function: NvmeFunction, json_path: str | None) -> None:
    """SIGUSR1: print the counters; with --stats-json also dump them there (atomically)."""
    print(format_stats(function), flush=True)
    if json_path:
        tmp = f"{json_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**function.stats(), "process": process_stats()}, f)
        os.replace(tmp, json_path)


async def _print_stats(function: NvmeFunction, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        print(f"[{time.strftime('%H:%M:%S')}] " + format_stats(function), flush=True)


def guest(args: argparse.Namespace) -> int:
    """Start a server, boot the guest against it, run the job, print fio's summary."""
    import subprocess

    from . import guest as guest_runner

    sock = os.path.join(tempfile.mkdtemp(prefix="nvme-emu-", dir="/tmp"), "nvme.sock")
    cmd = [sys.executable, "-m", "nvme_emu", "serve", "--socket", sock, "--doorbell", args.doorbell, "--backend", args.backend]
    for spec in args.namespace or []:
        cmd += ["--namespace", spec]
    log_path = sock + ".log"
    with open(log_path, "w") as server_log:
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if server.poll() is not None or time.monotonic() > deadline:
                    print(open(log_path).read(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
            fio_job = open(args.fio).read() if args.fio else None
            result = guest_runner.run_guest(socket_path=sock, command=args.cmd, fio_job=fio_job, cpus=args.cpus, memory_mb=args.memory_mb,
                                            timeout=args.timeout, rich_root=args.rich_root)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    if result.output:
        print(result.output)
    if result.fio is not None:
        print(guest_runner.format_fio_summary(result.fio))
    print(f"server log: {log_path}", file=sys.stderr)
    return result.returncode if result.returncode is not None else 1


def make_parser() -> argparse.ArgumentParser:
    """The command line of every subcommand (tests parse real ``serve`` arguments with it, so
    a new option can never be missing from what they build)."""
    parser = argparse.ArgumentParser(prog="nvme-emu", description="An NVMe controller emulator served over vfio-user.")
    parser.add_argument("--version", action="version", version=f"nvme-emu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--namespace", action="append", metavar="SPEC",
            help="ram:size=1G | file:PATH[,size=8G][,lba=4096] | blk:/dev/X, any of them [,zoned,zone_size=64M[,zone_cap=SIZE]"
                 "[,max_open=N][,max_active=N][,cross_read]] (repeatable; default ram:size=1G)",
        )
        p.add_argument("--doorbell", default=DoorbellMode.AUTO.value, choices=[m.value for m in DoorbellMode])
        p.add_argument(
            "--backend",
            default=ServerBackend.PYTHON.value,
            choices=[b.value for b in ServerBackend],
            help="vfio-user server: our Python one, libvfio-user (docs/libvfio-user.md), or auto (libvfio-user when installed)",
        )

    s = sub.add_parser("serve", help="serve the controller on a Unix socket (the default)")
    common(s)
    s.add_argument("--socket", default=DEFAULT_SOCKET)
    s.add_argument("--socket-mode", default="0600", help="permissions of the socket (default owner only)")
    s.add_argument("--dma-unsealed", action="store_true",
                   help="accept guest-memory memfds not sealed against shrinking (QEMU seals them unless seal=off); "
                        "the client can then truncate them under the server, and commands touching the lost pages fail")
    s.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                   help="drop a client that has not finished VERSION negotiation, or that stops this long in the "
                        f"middle of a message, so it cannot hold the one client slot (default {DEFAULT_HANDSHAKE_TIMEOUT:g}; "
                        "0 = never; both backends)")
    s.add_argument("--agent-socket", default=None, metavar="PATH|off",
                   help="socket of the doorbell agent inside QEMU (LD_PRELOAD, see README); default SOCKET.agent, "
                        "used when it exists; 'off' never uses an agent")
    s.add_argument("--agent-post-write", choices=["auto", "off"], default="auto",
                   help="auto: POST_WRITE ioeventfds where QEMU's kernel has the flag; off: plain ioeventfds for "
                        "queues with Doorbell Buffer Config only (to compare the two)")
    s.add_argument("--ctl-socket", default=None, metavar="PATH|off",
                   help="control plane (nvme-emu ctl: namespaces at runtime, fault injection); default SOCKET.ctl, "
                        "created with --socket-mode; 'off' for none")
    s.add_argument("--ns-dir", default=None, metavar="DIR",
                   help="where Namespace Management (nvme create-ns) creates namespace files; default: RAM")
    s.add_argument("--nvm-capacity", type=_size, default=DEFAULT_NVM_CAPACITY, metavar="SIZE",
                   help="what the guest may allocate with Namespace Management, all its namespaces together "
                        "(e.g. 512M, 16G; default 4G); namespaces given here or by the control plane come on top")
    s.add_argument("--crdt1", type=_crdt, default=ControllerConfig.command_retry_delay_100ms, metavar="N",
                   help="Identify Controller CRDT1 (Command Retry Delay Time 1, in 100 ms; default %(default)s): how long a "
                        "host waits before retrying a command its storage server could not take; 0: no delay, retries at once")
    s.add_argument("--serial", default=None, help="serial number (default: derived from the socket path, see README \"Identity\")")
    s.add_argument("--model", default="nvme-emu")
    s.add_argument("--queues", type=int, default=64, help="maximum I/O queue pairs")
    s.add_argument("--poll-idle-max-us", type=float, default=None,
                   help="poll path: the idle poller backs off 2, 4, 8 ... us up to this (default 1000); lower = less latency after idle, more CPU")
    s.add_argument("--spin-us", type=float, default=None, help="keep looking for doorbells this long after work before sleeping; 0: never "
                   "(default: shadow learns a window of up to 20 us from the host, poll spins 50, the others 0)")
    s.add_argument("--stats", type=float, default=0.0, metavar="SECONDS", help="print per-queue counters every SECONDS (also on SIGUSR1)")
    s.add_argument("--stats-json", metavar="PATH", help="on SIGUSR1 also write the counters as JSON to PATH (benchmarks read it)")
    s.add_argument("--latency-sample", type=int, default=DEFAULT_SAMPLE_EVERY, metavar="N",
                   help=f"latency anatomy: stamp every stage of one batch in N (default {DEFAULT_SAMPLE_EVERY}; 1: every batch, "
                        "~1/3 of QD1 IOPS); deferred commands are always stamped")
    s.add_argument("--inline-write-budget-us", type=float, default=None, metavar="US",
                   help="file and block namespaces: with nothing else in flight, a read the page cache missed or a write "
                        "without FUA runs on the event loop instead of a worker thread while each takes at most this long; "
                        f"after one took longer, the next go to workers for a while (default {INLINE_BUDGET_NS // 1000}; "
                        "0: always workers)")
    s.add_argument("--switch-interval-us", type=_switch_interval_us, default=None, metavar="US",
                   help="the interpreter's GIL switch interval (sys.setswitchinterval): how long an I/O worker thread may "
                        "hold the GIL before the event loop gets it back (default: Python's, 5000)")

    g = sub.add_parser("guest", help="serve, boot a QEMU guest against it, run a command or fio job")
    common(g)
    g.add_argument("--fio", metavar="JOB", help="fio job file to run in the guest")
    g.add_argument("--cmd", help="shell command to run in the guest")
    g.add_argument("--cpus", type=int, default=2)
    g.add_argument("--memory-mb", type=int, default=1024)
    g.add_argument("--timeout", type=float, default=900)
    g.add_argument("--rich-root", action="store_true",
                   help="run the job with bash in the rich guest's Debian tree (blkzone, mkfs.btrfs, python3, fio's t/zbd)")

    sub.add_parser("nested", add_help=False, help="run a command inside a TCG guest with real KVM (stock or POST_WRITE modules); see nvme-emu nested --help")
    sub.add_parser("ctl", add_help=False, help="control a running server: namespaces, faults, counters; see nvme-emu ctl --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["nested"]:
        from . import nested

        return nested.main(raw[1:])
    if raw[:1] == ["ctl"]:
        from . import ctl

        return ctl.main(raw[1:], default_control_socket(DEFAULT_SOCKET))
    if not any(a in ("serve", "guest", "nested", "ctl", "-h", "--help", "--version") for a in raw):
        raw.insert(0, "serve")  # plain `nvme-emu [--socket ...]` serves
    args = parser.parse_args(raw)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        atomics.ensure_ready()
    except (atomics.UnsupportedArchitecture, atomics.AtomicsUnavailable) as e:
        print(f"nvme-emu: {e}", file=sys.stderr)
        return 1
    if args.command == "guest":
        if not args.fio and not args.cmd:
            args.cmd = "nvme list"
        return guest(args)
    from vfio_user.server import new_event_loop

    if args.switch_interval_us is not None:
        sys.setswitchinterval(args.switch_interval_us / 1e6)
    if args.inline_write_budget_us is not None:
        if args.inline_write_budget_us < 0:
            print("nvme-emu: --inline-write-budget-us must be >= 0", file=sys.stderr)
            return 2
        set_default_budget(round(args.inline_write_budget_us * 1000))
    loop = new_event_loop()
    try:
        return loop.run_until_complete(serve(args))
    except (OSError, ValueError) as e:
        print(f"nvme-emu: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
