"""Default identities: distinct per socket and per namespace file, stable across restarts."""

from __future__ import annotations

import argparse
import shutil

from nvme_emu import identity, structures as st
from nvme_emu.cli import build_function, make_parser
from nvme_emu.identify import identify_controller
from nvme_emu.identity import CNTLID_MAX
from nvme_emu.namespace import create_namespace


def serve_args(socket: str, *namespaces: str, serial: str | None = None) -> argparse.Namespace:
    """What ``nvme-emu serve`` parses, for build_function."""
    argv = ["serve", "--socket", socket, "--queues", "4", "--doorbell", "trap"]
    argv += [a for ns in namespaces for a in ("--namespace", ns)]
    argv += ["--serial", serial] if serial is not None else []
    return make_parser().parse_args(argv)


def identities(args: argparse.Namespace) -> tuple[tuple, list[tuple]]:
    """((serial, CNTLID, SUBNQN), [(NGUID, EUI64, UUID) per namespace]) of a built server."""
    function = build_function(args)
    try:
        ctrl = function.controller.state
        ident = st.IdentifyController.parse(identify_controller(ctrl))
        namespaces = [(ns.nguid, ns.eui64, ns.uuid) for ns in ctrl.namespaces.values()]
        return (ident.sn, ident.cntlid, ident.subnqn), namespaces
    finally:
        for ns in function.controller.state.namespaces.values():
            ns.close()


def test_two_sockets_get_distinct_controllers_and_ram_namespaces(tmp_path):
    a_ctrl, a_ns = identities(serve_args(str(tmp_path / "a.sock"), "ram:size=1M"))
    b_ctrl, b_ns = identities(serve_args(str(tmp_path / "b.sock"), "ram:size=1M"))
    for x, y in zip(a_ctrl, b_ctrl, strict=True):
        assert x != y
    assert not set(a_ns[0]) & set(b_ns[0])
    assert 1 <= a_ctrl[1] <= CNTLID_MAX and len(a_ctrl[0]) <= 20


def test_restart_on_the_same_socket_and_file_keeps_every_id(tmp_path):
    disk = tmp_path / "disk.img"
    first = identities(serve_args(str(tmp_path / "s.sock"), f"file:{disk},size=1M", "ram:size=1M"))
    again = identities(serve_args(str(tmp_path / "s.sock"), f"file:{disk}", "ram:size=1M"))
    assert first == again


def test_file_namespaces_follow_the_file_not_the_socket(tmp_path):
    disk = tmp_path / "disk.img"
    _, on_a = identities(serve_args(str(tmp_path / "a.sock"), f"file:{disk},size=1M"))
    _, on_b = identities(serve_args(str(tmp_path / "b.sock"), f"file:{disk}"))
    assert on_a == on_b  # the same disk, served elsewhere, is the same namespace
    shutil.copy(disk, tmp_path / "copy.img")
    _, copy = identities(serve_args(str(tmp_path / "a.sock"), f"file:{tmp_path / 'copy.img'}"))
    assert not set(copy[0]) & set(on_a[0])  # a copy is another disk: Linux must not merge them


def test_two_namespaces_of_one_controller_differ(tmp_path):
    _, (one, two) = identities(serve_args(str(tmp_path / "a.sock"), "ram:size=1M", "ram:size=1M"))
    assert not set(one) & set(two)


def test_serial_option_wins_and_cntlid_follows_it(tmp_path):
    (serial, cntlid, subnqn), _ = identities(serve_args(str(tmp_path / "a.sock"), serial="MYSERIAL1"))
    assert serial == "MYSERIAL1" and cntlid == identity.controller_id("MYSERIAL1")
    assert subnqn == st.subsystem_nqn("MYSERIAL1")


def test_a_created_namespace_is_new_even_on_a_reused_nsid():
    first, again = create_namespace(3, 1 << 20, 512), create_namespace(3, 1 << 20, 512)
    try:
        assert not {first.nguid, first.eui64, first.uuid} & {again.nguid, again.eui64, again.uuid}
    finally:
        first.close()
        again.close()
