"""The control plane's protection-information faults: damage one PI field of stored blocks,
as a medium or a firmware bug would, so that a host's check of that field fails on exactly
that range (issue 26: "corrupt the stored guard, application tag or reference tag").

It goes through the namespace's metadata door (read_meta / write_meta) and the PI engine's
``corrupt``, so the stored bytes change as a failing drive's would and every later command
sees them: the damage is not a fault that stays configured, and a Write of those blocks
repairs it, as it would on a drive.
"""

from __future__ import annotations

import numpy as np

from .namespace import Namespace
from .pi.engine import PiField

#: Blocks damaged per read-modify-write of the metadata (a data buffer of this many blocks is
#: allocated alongside for the engine's block view): bounds the memory a large range costs.
CHUNK_BLOCKS = 4096

#: The RPC's field names.
PI_FIELDS: dict[str, PiField] = {"guard": PiField.GUARD, "apptag": PiField.APPTAG, "reftag": PiField.REFTAG}


def corrupt_pi(ns: Namespace, field: PiField, slba: int, nlb: int) -> None:
    """Damage ``field`` of the stored PI of blocks ``slba .. slba + nlb``. ValueError for a
    namespace without PI or a range outside it (the control plane's errors)."""
    engine = ns.pi_engine
    if engine is None:
        raise ValueError(f"namespace {ns.nsid} has no protection information")
    if nlb < 1 or slba < 0 or slba + nlb > ns.nsze:
        raise ValueError(f"blocks {slba}..{slba + nlb - 1} outside namespace {ns.nsid} (0..{ns.nsze - 1})")
    for first in range(slba, slba + nlb, CHUNK_BLOCKS):
        count = min(CHUNK_BLOCKS, slba + nlb - first)
        meta = ns.read_meta(first, count)
        # the engine views blocks as data + metadata; only the metadata is changed here
        engine.corrupt(field, np.zeros(count * ns.lba_size, np.uint8), meta)
        ns.write_meta(first, meta, fua=True)
