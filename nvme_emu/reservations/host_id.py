"""The Host Identifier feature (FID 81h; Base 2.0 "Host Identifier").

Set Features CDW11 bit 0, EXHID, picks a 128-bit (1) or 64-bit (0) identifier; the data is 16
bytes, of which a 64-bit identifier uses the first 8. A controller that supports 128-bit
identifiers only (CTRATT bit 0, which this model assumes when ``support_128`` is set) refuses a
64-bit one, and one that does not refuses a 128-bit one: both Invalid Field in Command. The
identifier is what reservations are keyed by, so it cannot change under a registration
(Command Sequence Error).
"""

from __future__ import annotations

from nvme_emu.spec.commands import Status

EXHID = 0x01
HOST_ID_DATA_SIZE = 16


def set_host_id(cdw11: int, data: bytes, *, support_128: bool, registered: bool) -> tuple[Status, bytes | None]:
    """The Host Identifier a Set Features would store (8 or 16 bytes), or why not."""
    if len(data) < HOST_ID_DATA_SIZE:
        return Status.INVALID_FIELD, None
    if bool(cdw11 & EXHID) != support_128:
        return Status.INVALID_FIELD, None
    if registered:
        return Status.COMMAND_SEQUENCE_ERROR, None
    return Status.SUCCESS, bytes(data[: 16 if support_128 else 8])


def get_host_id(host_id: bytes) -> tuple[int, bytes]:
    """Get Features: (Dword 0 with EXHID, the 16-byte data)."""
    return (EXHID if len(host_id) == 16 else 0), host_id.ljust(HOST_ID_DATA_SIZE, b"\0")
