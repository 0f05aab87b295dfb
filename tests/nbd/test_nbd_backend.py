"""The nbd: backend against real servers (nbdkit's memory plugin, qemu-nbd serving a file):
data round trips through a Namespace, the export's flags honoured, a server killed and
stopped mid-run (a retryable status within a bounded time, never a hang) and restarted (I/O
resumes, flushed data is there), and IDs that follow the export."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from .nbd_servers import NbdServer, nbdkit, need_libnbd


from ..nvme_areas.loop_area import Loop
from ..support.ns_io import read, write
from ..nvme_areas.area_helpers import BUF, Guest, make_area, sqe
from nvme_emu.control import describe_namespace
from nvme_emu.backends.errors import BackendError
from nvme_emu.backends.nbd import COMMAND_TIMEOUT_S, NbdBackend, normalise_uri
from nvme_emu.metadata_store import meta_path
from nvme_emu.namespace import Namespace
from nvme_emu.namespace_spec import open_namespace, parse_namespace_spec
from nvme_emu.nvm import NvmCommands
from nvme_emu.outcome import finish_here
from nvme_emu.outcome import DEFERRED
from nvme_emu.spec.commands import STATUS_DNR, NvmOpcode, NvmeError, RwCdw12, Status
from nvme_emu.spec.identify import DLFEAT_READ_ZEROES

#: A command against a dead server must fail within this (it fails at once: EOF or refused).
FAIL_WITHIN_S = 5.0


def server_bytes(uri: str, offset: int, length: int) -> bytes:
    """What the server holds, through a connection of its own (not the backend's)."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


@pytest.fixture(params=["memory_server", "file_server"])
def server(request: pytest.FixtureRequest) -> NbdServer:
    return request.getfixturevalue(request.param)


# -- the spec and the URI ---------------------------------------------------------------------------


def test_spec_names_the_export_by_uri():
    spec = parse_namespace_spec("nbd:nbd+unix:///disk?socket=/run/x.sock,lba=4096,ro")
    assert (spec.kind, spec.path, spec.lba_size, spec.readonly) == ("nbd", "nbd+unix:///disk?socket=/run/x.sock", 4096, True)
    assert parse_namespace_spec("nbd:nbd://10.0.0.1:10810/vol").path == "nbd://10.0.0.1:10810/vol"
    for bad in ("nbd:http://host/x", "nbd:nbd+unix:///x", "nbd:nbd:///x", "nbd:nbd://h/x,size=1G", "nbd:nbd://h:port/x"):
        with pytest.raises(ValueError):
            parse_namespace_spec(bad)


def test_uri_normalised():
    assert normalise_uri("NBD://Host.Example") == "nbd://host.example:10809/"
    assert normalise_uri("nbd://h:10809/a%20b") == normalise_uri("nbd://h/a b") == "nbd://h:10809/a%20b"
    rel = normalise_uri("nbd+unix:///e?socket=x.sock&tls=off")
    assert rel == f"nbd+unix:///e?socket={os.path.abspath('x.sock')}"


# -- data -------------------------------------------------------------------------------------------


def test_round_trips(server: NbdServer):
    ns = open_namespace(f"nbd:{server.uri}", 1)
    try:
        assert ns.blocking and not ns.write_protected
        assert ns.backend.inline_budget is None  # never on the loop: a stopped server would freeze it
        one = os.urandom(4096)
        write(ns, 8, one)
        assert read(ns, 8, 8) == one == server_bytes(server.uri, 8 * 512, 4096)
        several = os.urandom(16 * 4096)
        write(ns, 1024, several, pages=16, fua=True)  # a PRP list: one NBD write with FUA
        assert read(ns, 1024, 128, pages=16) == several == server_bytes(server.uri, 1024 * 512, len(several))
        ns.flush()
        finish_here(ns.write_zeroes(1024, 8))  # no DEAC: NO_HOLE
        finish_here(ns.write_zeroes(1032, 8, deallocate=True, fua=True))
        assert read(ns, 1024, 16) == bytes(8192)
        assert read(ns, 1040, 8) == several[8192:12288]
        finish_here(ns.deallocate([(1040, 8), (1056, 8)]))
        assert ns.dlfeat & DLFEAT_READ_ZEROES  # both servers zero: Deallocate is a zeroing NBD_CMD_WRITE_ZEROES
        assert read(ns, 1040, 8) == bytes(4096) and read(ns, 1056, 8) == bytes(4096)
        assert read(ns, 1048, 8) == several[3 * 4096 : 4 * 4096]
        finish_here(ns.compare(8, 8, [memoryview(one)]))
        with pytest.raises(NvmeError) as e:
            finish_here(ns.compare(8, 8, [memoryview(bytes(4096))]))
        assert e.value.status == Status.COMPARE_FAILURE
        finish_here(ns.verify(0, 2048))
        finish_here(ns.copy([(8, 8)], 4096))
        assert read(ns, 4096, 8) == one
        assert ns.nsze == ns.backend.size // 512
        with pytest.raises(NvmeError) as e:
            read(ns, ns.nsze, 1)
        assert e.value.status == Status.LBA_OUT_OF_RANGE
        stats = ns.describe_storage()["storage"]
        assert (stats["in_flight"], stats["errors"], stats["transient_errors"]) == (0, 0, 0)
    finally:
        ns.close()


def test_guest_memory_is_released(memory_server: NbdServer):
    """Guest memory read into and written from can be unmapped afterwards (a DMA unmap closes
    its mmap): the backend keeps no export of it. libnbd 1.14.2's aio_pread would."""
    b = NbdBackend(memory_server.uri)
    try:
        mm = mmap.mmap(-1, 3 * 4096)
        mv = memoryview(mm)
        pages = [mv[i * 4096 : (i + 1) * 4096] for i in range(3)]
        b.write_from(0, pages[:2], fua=True)
        b.write_from(8192, pages[2:])
        b.read_into(0, pages[:1])
        b.read_into(4096, pages[1:])
        b.deallocate(0, 4096)
        b.flush()
        pages.clear()
        mv.release()
        mm.close()  # BufferError if an export of the memory were left behind
    finally:
        b.close()


def test_connections_follow_multi_conn(tmp_path: Path, memory_server: NbdServer, file_server: NbdServer):
    """A connection per worker where the server offers multi-conn (nbdkit's memory plugin;
    qemu-nbd with --shared above 1), else one the workers share."""
    single = nbdkit(tmp_path, "--filter=multi-conn", "memory", "16M", "multi-conn-mode=disable", name="single").start()
    errors: list[BaseException] = []
    data = os.urandom(4096)

    def io(b: NbdBackend, i: int) -> None:
        try:
            for j in range(50):
                b.write_from((i * 50 + j) * 4096, [memoryview(data)])
                out = memoryview(bytearray(4096))
                b.read_into((i * 50 + j) * 4096, [out])
                assert bytes(out) == data
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    for server, conns in ((memory_server, 4), (file_server, 4), (single, 1)):
        b = NbdBackend(server.uri)
        try:
            assert b.connections == conns
            threads = [threading.Thread(target=io, args=(b, i)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors
            assert b.stats.connects <= conns  # a connection per worker at most, kept between calls
        finally:
            b.close()
    single.kill()


def test_flags_taken_away_are_emulated_or_declared(tmp_path: Path):
    """No zero, no FUA, no multi-conn (nbdkit's filters): Write Zeroes writes zeros, FUA is a
    write then a flush, Deallocate is a trim and DLFEAT no longer promises zeros."""
    need_libnbd()
    server = nbdkit(tmp_path, "--filter=nozero", "--filter=fua", "--filter=multi-conn",
                    "memory", "16M", "multi-conn-mode=disable").start()
    try:
        ns = open_namespace(f"nbd:{server.uri}", 1)
        try:
            flags = ns.backend.flags
            assert (flags.zero, flags.fua, flags.multi_conn, flags.trim, flags.flush) == (False, False, False, True, True)
            assert ns.backend.connections == 1
            assert not ns.dlfeat & DLFEAT_READ_ZEROES
            data = os.urandom(8192)
            write(ns, 0, data, fua=True)
            assert server_bytes(server.uri, 0, 8192) == data
            finish_here(ns.write_zeroes(0, 8))
            assert read(ns, 0, 16) == bytes(4096) + data[4096:]
            finish_here(ns.deallocate([(8, 8)]))  # a trim: advisory, whatever it reads now
        finally:
            ns.close()
    finally:
        server.kill()


def test_read_only_export_is_write_protected(tmp_path: Path, memory_server: NbdServer):
    server = nbdkit(tmp_path, "-r", "memory", "1M", name="ro").start()
    guest = Guest()
    area = make_area(guest)
    try:
        ns = open_namespace(f"nbd:{server.uri}", 2)
        area.state.namespaces[2] = ns
        # a writable export opened with ro: the same
        area.state.namespaces[3] = open_namespace(f"nbd:{memory_server.uri},ro", 3)
        nvm = NvmCommands(area.state, area.hooks)
        for nsid in (2, 3):
            assert area.state.namespaces[nsid].write_protected
            for opc in (NvmOpcode.WRITE, NvmOpcode.WRITE_ZEROES):
                status, _ = nvm.execute(area.admin_sq, sqe(opc, nsid=nsid, prp1=BUF, cdw12=0))
                assert status & 0x7FF == Status.NAMESPACE_WRITE_PROTECTED, (nsid, opc)
            assert nvm.execute(area.admin_sq, sqe(NvmOpcode.READ, nsid=nsid, prp1=BUF)) == (Status.SUCCESS, 0)
        with pytest.raises(BackendError) as e:
            ns.backend.write_from(0, [memoryview(bytes(512))])
        assert e.value.status == Status.NAMESPACE_WRITE_PROTECTED
    finally:
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()
        server.kill()


def test_nvm_write_fua_through_the_dispatch(memory_server: NbdServer):
    guest = Guest()
    area = make_area(guest)
    try:
        area.state.namespaces[2] = open_namespace(f"nbd:{memory_server.uri}", 2)
        nvm = NvmCommands(area.state, area.hooks)
        data = os.urandom(4096)
        guest.write(BUF, data)
        rw = dict(nsid=2, prp1=BUF, prp2=BUF + 4096, cdw10=64, cdw11=0)
        assert nvm.execute(area.admin_sq, sqe(NvmOpcode.WRITE, **rw, cdw12=7 | RwCdw12.FUA)) == (Status.SUCCESS, 0)
        guest.write(BUF, bytes(4096))
        assert nvm.execute(area.admin_sq, sqe(NvmOpcode.READ, **rw, cdw12=7)) == (Status.SUCCESS, 0)
        assert guest.read(BUF, 4096) == data == server_bytes(memory_server.uri, 64 * 512, 4096)
        assert nvm.execute(area.admin_sq, sqe(NvmOpcode.FLUSH, nsid=2)) == (Status.SUCCESS, 0)
    finally:
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()


@pytest.mark.parametrize("filters", [(), ("--filter=nozero", "--filter=fua", "--filter=multi-conn")], ids=["all-flags", "no-zero-fua"])
def test_every_command_on_the_loops_connection(tmp_path: Path, filters: tuple[str, ...]):
    """Plain I/O through the dispatch on a real loop goes on the loop's connection (nbd_link),
    and every command keeps its meaning there: Write with and without FUA (native, or a write
    then a flush), Read of several pages and of a range longer than one PRP page, Write Zeroes
    (native or written zeros), Deallocate, Flush; the export holds what the host wrote."""
    need_libnbd()
    extra = ("multi-conn-mode=disable",) if filters else ()
    server = nbdkit(tmp_path, *filters, "memory", "16M", *extra).start()
    guest = Guest()
    area = make_area(guest)
    lp = Loop(area)
    try:
        area.state.namespaces[2] = ns = open_namespace(f"nbd:{server.uri}", 2)
        data = os.urandom(8192)
        guest.write(BUF, data)
        rw = dict(nsid=2, prp1=BUF, prp2=BUF + 4096, cdw11=0)
        assert lp.command(NvmOpcode.WRITE, cdw10=64, cdw12=15, **rw) == (Status.SUCCESS, 0)
        assert lp.command(NvmOpcode.WRITE, cdw10=128, cdw12=15 | RwCdw12.FUA, **rw) == (Status.SUCCESS, 0)
        assert server_bytes(server.uri, 64 * 512, 8192) == data == server_bytes(server.uri, 128 * 512, 8192)
        guest.write(BUF, bytes(8192))
        assert lp.command(NvmOpcode.READ, cdw10=64, cdw12=15, **rw) == (Status.SUCCESS, 0)
        assert guest.read(BUF, 8192) == data
        assert lp.command(NvmOpcode.WRITE_ZEROES, nsid=2, cdw10=64, cdw11=0, cdw12=7) == (Status.SUCCESS, 0)
        assert server_bytes(server.uri, 64 * 512, 8192) == bytes(4096) + data[4096:]
        assert lp.command(NvmOpcode.FLUSH, nsid=2) == (Status.SUCCESS, 0)
        storage = describe_namespace(ns, True)["storage"]
        assert storage["loop_connection"] == "ready" and storage["in_flight"] == 0 and storage["errors"] == 0
        assert (storage["flags"]["fua"], storage["flags"]["zero"]) == ((False, False) if filters else (True, True))
    finally:
        lp.close()
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()
        server.kill()


# -- a server that goes away --------------------------------------------------------------------------


def assert_not_ready(call, within: float = FAIL_WITHIN_S) -> None:
    t0 = time.monotonic()
    with pytest.raises(NvmeError) as e:
        call()
    assert time.monotonic() - t0 < within
    assert e.value.status == Status.NAMESPACE_NOT_READY and not e.value.dnr, e.value  # the host retries


def test_server_killed_then_restarted(file_server: NbdServer):
    """qemu-nbd on a file: SIGKILL between commands and under four threads' I/O; every command
    fails at once with Namespace Not Ready (DNR clear); after a restart on the same socket I/O
    resumes on a new connection and what was flushed before the kill reads back."""
    ns = open_namespace(f"nbd:{file_server.uri}", 1)
    try:
        flushed = os.urandom(8192)
        write(ns, 0, flushed)
        ns.flush()
        file_server.kill()
        assert_not_ready(lambda: read(ns, 0, 16))  # the connection's EOF
        assert_not_ready(lambda: write(ns, 16, bytes(512)))  # refused: nobody listens
        assert_not_ready(ns.flush)
        file_server.start()
        assert read(ns, 0, 16) == flushed
        write(ns, 16, b"\x01" * 512, fua=True)
        stats = ns.describe_storage()["storage"]
        assert stats["reconnects"] >= 1 and stats["transient_errors"] == 3 and stats["in_flight"] == 0

        # now under load: four threads in a loop, the server killed under them
        failures: list[BaseException] = []
        done = threading.Event()

        def io(i: int) -> None:
            data = os.urandom(4096)
            try:
                while not done.is_set():
                    write(ns, 64 + 8 * i, data)
                    assert read(ns, 64 + 8 * i, 8) == data
            except NvmeError as e:
                failures.append(e)

        threads = [threading.Thread(target=io, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        file_server.kill()
        for t in threads:
            t.join(FAIL_WITHIN_S)
        done.set()
        assert not any(t.is_alive() for t in threads), "a command hung on a dead server"
        assert len(failures) == 4 and all(f.status == Status.NAMESPACE_NOT_READY and not f.dnr for f in failures)
        file_server.start()
        assert read(ns, 0, 16) == flushed
        assert ns.describe_storage()["storage"]["in_flight"] == 0
    finally:
        ns.close()


def test_killed_server_completes_in_flight_commands_retryably(file_server: NbdServer):
    """Through the NVM dispatch on a real loop and pool (plain I/O runs on the loop's
    connection): Reads in flight when the server dies complete with Namespace Not Ready, DNR
    clear in the CQE's status field, each with its Error Information entry; the namespace on
    RAM is served meanwhile; after the restart a Read succeeds on a new connection, and the
    control plane shows the transient errors and the reconnect."""
    guest = Guest()
    area = make_area(guest)
    lp = Loop(area)
    try:
        area.state.namespaces[2] = ns = open_namespace(f"nbd:{file_server.uri}", 2)
        rw = dict(nsid=2, prp1=BUF, prp2=BUF + 4096, cdw10=0, cdw11=0, cdw12=7)
        assert lp.command(NvmOpcode.READ, cid=1, **rw)[0] == Status.SUCCESS  # the loop's connection is up
        file_server.stop()  # the reads wait in the server ...
        for cid in (2, 3):
            assert lp.execute(NvmOpcode.READ, cid=cid, **rw) is DEFERRED
        lp.run_until(lambda: True)
        file_server.kill()  # ... which dies with them
        took = lp.run_until(lambda: len(lp.finished()) == 3, timeout=FAIL_WITHIN_S)
        assert took < FAIL_WITHIN_S
        finished = lp.finished()[1:]
        assert sorted((cid, status & 0x7FF) for _sq, cid, status, _dw0, _stamps in finished) == \
            [(2, Status.NAMESPACE_NOT_READY), (3, Status.NAMESPACE_NOT_READY)]
        assert not any(status & STATUS_DNR for _sq, _cid, status, _dw0, _stamps in finished)
        assert sorted(e["cid"] for e in list(area.state.error_log.entries)[:2]) == [2, 3]
        assert lp.command(NvmOpcode.READ, cid=4, nsid=1, prp1=BUF, prp2=BUF + 4096, cdw10=0, cdw11=0, cdw12=7)[0] == Status.SUCCESS
        file_server.start()
        assert lp.command(NvmOpcode.READ, cid=5, **rw)[0] == Status.SUCCESS
        storage = describe_namespace(ns, True)["storage"]
        assert storage["transient_errors"] == 2 and storage["reconnects"] >= 1 and storage["in_flight"] == 0
        assert storage["loop_connection"] == "ready"
    finally:
        lp.close()
        for ns in area.state.namespaces.values():
            ns.close()
        guest.close()


def test_idle_connection_to_a_restarted_server_is_replaced(file_server: NbdServer):
    """A blocking connection that sat idle while its server restarted (the loop's connection
    carried the I/O meanwhile) fails on its next use; the call runs again on a new connection
    instead of failing (it failed the shutdown Flush of a guest whose server had been killed)."""
    b = NbdBackend(file_server.uri)
    try:
        b.write_from(0, [memoryview(b"\x77" * 4096)])
        b.flush()
        file_server.kill()
        file_server.start()
        b.flush()  # on the idle connection, dead since the kill: retried on a new one
        out = memoryview(bytearray(4096))
        b.read_into(0, [out])
        assert bytes(out) == b"\x77" * 4096
        assert b.stats.reconnects == 1 and b.stats.transient_errors == 0
    finally:
        b.close()


def test_stopped_server_times_out(memory_server: NbdServer):
    """A server that stops answering (SIGSTOP) fails the command at its deadline, not never;
    the connection is dropped, and once the server goes on the next command connects again."""
    b = NbdBackend(memory_server.uri, timeout=1.0)
    assert b.timeout < COMMAND_TIMEOUT_S
    ns = Namespace(1, b, id_seed="x")
    try:
        write(ns, 0, b"\x07" * 512)
        memory_server.stop()
        try:
            assert_not_ready(lambda: read(ns, 0, 1), within=3.0)
        finally:
            memory_server.cont()
        assert read(ns, 0, 1) == b"\x07" * 512
        assert (b.stats.reconnects, b.stats.timeouts, b.stats.transient_errors) == (1, 1, 1)
    finally:
        ns.close()


def test_unreachable_export_refuses_to_open(tmp_path: Path):
    need_libnbd()
    with pytest.raises(ValueError, match="cannot open"):
        open_namespace(f"nbd:nbd+unix:///?socket={tmp_path}/nobody.sock", 1)


def test_metadata_and_pi_keep_a_sidecar_by_uri(memory_server: NbdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Metadata (here Type 1 PI) on an NBD namespace: the sidecar lives in the state
    directory, named by the normalised URI whatever the working directory."""
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "state"))
    uri = memory_server.uri
    first = meta_path("nbd", uri)
    monkeypatch.chdir(memory_server.socket.parent)
    assert meta_path("nbd", f"nbd+unix:///?socket={memory_server.socket.name}") == first
    assert first is not None and first.startswith(str(tmp_path / "state" / "meta" / "nbd-"))
    ns = open_namespace(f"nbd:{uri},ms=8,pi=1", 1)
    try:
        assert ns.describe_storage()["meta_path"] == first and os.path.exists(first)
        assert ns.pi is not None and not ns.plain_rw
    finally:
        ns.close()


# -- identity -----------------------------------------------------------------------------------------


def test_identity_follows_the_export(memory_server: NbdServer, file_server: NbdServer, monkeypatch: pytest.MonkeyPatch):
    """The same export, opened twice (another controller, a relative socket path), has the
    same IDs; another export has others."""
    first = open_namespace(f"nbd:{memory_server.uri}", 1, controller_seed="socket:/a")
    monkeypatch.chdir(memory_server.socket.parent)
    again = open_namespace(f"nbd:nbd+unix:///?socket={memory_server.socket.name}", 1, controller_seed="socket:/b")
    other = open_namespace(f"nbd:{file_server.uri}", 1, controller_seed="socket:/a")
    try:
        ids = (first.nguid, first.eui64, first.uuid)
        assert (again.nguid, again.eui64, again.uuid) == ids
        assert other.nguid != first.nguid and other.eui64 != first.eui64 and other.uuid != first.uuid
    finally:
        for ns in (first, again, other):
            ns.close()
