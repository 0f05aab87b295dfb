"""Reservation Report and Reservation Notification log layouts, byte for byte against the
offsets of Base 2.0 Figures "Reservation Status Data Structure", "Registered Controller Data
Structure" (and their extended forms) and "Reservation Notification Log Page"."""

from __future__ import annotations

import struct

from nvme_emu.reservations.access import ReservationType as T
from nvme_emu.reservations.model import NotificationType, ReservationState
from nvme_emu.reservations.report import notification_log, report
from nvme_emu.spec.commands import Status

A, B = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")
STATE = ReservationState({A: 0xAAAA, B: 0xBBBB}, T.WRITE_EXCLUSIVE, A, generation=0x01020304, ptpl=True)
CONTROLLERS = {3: B, 1: A, 2: b"\x09" * 8}  # controller 2's host is not registered


def test_report_layout() -> None:
    status, data = report(STATE, CONTROLLERS, 0, host_id_128=False)
    assert status is Status.SUCCESS
    header = bytes.fromhex("04030201" "01" "0200" "0000" "01") + bytes(14)
    ctrl1 = bytes.fromhex("0100" "01") + bytes(5) + A + (0xAAAA).to_bytes(8, "little")
    ctrl3 = bytes.fromhex("0300" "00") + bytes(5) + B + (0xBBBB).to_bytes(8, "little")
    assert data == header + ctrl1 + ctrl3
    assert len(data) == 24 + 2 * 24


def test_extended_report_layout() -> None:
    wide = bytes(range(16))
    state = ReservationState({wide: 7}, T.WRITE_EXCLUSIVE_ALL_REGISTRANTS, None, generation=2)
    status, data = report(state, {5: wide}, 1, host_id_128=True)
    assert status is Status.SUCCESS
    header = struct.pack("<IBHxxB", 2, 5, 1, 0) + bytes(14) + bytes(40)
    entry = struct.pack("<HB5xQ", 5, 1, 7) + wide + bytes(32)
    assert data == header + entry and len(data) == 64 + 64


def test_extended_report_zero_extends_64_bit_identifiers() -> None:
    _, data = report(STATE, {1: A}, 1, host_id_128=False)
    assert data[64 + 16 : 64 + 32] == A + bytes(8)


def test_unreserved_header() -> None:
    _, data = report(ReservationState(), CONTROLLERS, 0, host_id_128=False)
    assert data == bytes(24)


def test_128_bit_identifiers_need_extended_structure() -> None:
    assert report(STATE, CONTROLLERS, 0, host_id_128=True) == (Status.HOST_ID_INCONSISTENT_FORMAT, b"")


def test_notification_log_layout() -> None:
    data = notification_log(0x1122, NotificationType.RESERVATION_PREEMPTED, 4, 9)
    assert data == struct.pack("<QBBxxI", 0x1122, 3, 4, 9) + bytes(48)
    assert len(data) == 64
