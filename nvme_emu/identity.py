"""Default identities: distinct for every device on a host, stable across restarts.

Linux refuses duplicates. A second controller whose subsystem NQN it already knows is
ignored unless the subsystem reports several controllers, two controllers of one subsystem
may not share a CNTLID, and a namespace whose NGUID, EUI-64 or UUID another namespace
already has is not added. So nothing may default to a constant. Each identity is a hash of
something that is unique on the host and stays the same while the device does:

- a controller (serial number, and from it the subsystem NQN and the CNTLID): the absolute
  path of its vfio-user socket, since one server owns a socket. ``--serial`` overrides it.
- a file namespace (NGUID, EUI-64, UUID): the file's real path and inode. A copy is a new
  disk and gets new IDs; restarting nvme-emu on the same file keeps them, whichever socket
  serves it.
- a block device namespace: the device path as given (``/dev/disk/by-id/...`` stays stable).
- a RAM namespace: its controller's socket path. Its data does not outlive the process anyway.
- a namespace created by Namespace Management (``nvme create-ns``): random, drawn when it is
  created. It is a new namespace even where a deleted one had its NSID, and it lives as long
  as the process.

A namespace's seed also includes its NSID. Each backend kind computes its namespaces' seed
(:meth:`nvme_emu.backends.base.Backend.identity_seed`).
"""

from __future__ import annotations

import hashlib
import os
import uuid

#: Controller IDs FFF0h-FFFFh are reserved; 0 is valid but a hash may as well avoid it.
CNTLID_MAX = 0xFFEF
SERIAL_PREFIX = "NVMEEMU"
#: Hex digits of the hash in a derived serial (the field holds 20 ASCII characters).
SERIAL_HASH_DIGITS = 12


def _digest(text: str) -> bytes:
    return hashlib.sha256(f"nvme-emu:{text}".encode()).digest()


def controller_seed(socket_path: str) -> str:
    """What a controller's default identity derives from: its socket's absolute path."""
    return f"socket:{os.path.abspath(socket_path)}"


def controller_serial(seed: str) -> str:
    """A serial number for the controller ``seed`` names, e.g. NVMEEMU1A2B3C4D5E6F."""
    return SERIAL_PREFIX + _digest(seed).hex()[:SERIAL_HASH_DIGITS].upper()


def controller_id(serial: str) -> int:
    """CNTLID 1..FFEFh from the serial number: distinct serials, distinct CNTLIDs (almost
    always; a clash matters only inside one subsystem, and each serial is its own)."""
    return 1 + int.from_bytes(_digest(f"cntlid:{serial}")[:4], "little") % CNTLID_MAX


def created_namespace_seed() -> str:
    """A seed for a namespace Namespace Management creates: new on every creation."""
    return f"created:{uuid.uuid4()}"


def derive_ids(seed: str, nsid: int) -> tuple[bytes, bytes, uuid.UUID]:
    """Stable (NGUID, EUI64, UUID) for a namespace: same inputs, same IDs across restarts."""
    h = hashlib.sha256(f"nvme-emu:{seed}:{nsid}".encode()).digest()
    nguid = h[:16]
    # EUI-64: first 3 bytes are an OUI; set the locally-administered bit, clear multicast.
    eui = bytes([(h[16] & 0xFC) | 0x02]) + h[17:24]
    uid = uuid.uuid5(uuid.NAMESPACE_OID, f"nvme-emu:{seed}:{nsid}")
    return nguid, eui, uid
