"""Where a namespace's state files live when they are not its data: the zone sidecar
(:mod:`nvme_emu.zoned.sidecar`) and the metadata sidecar (:mod:`nvme_emu.metadata_store`).

One rule for both: a ``file:`` namespace keeps them next to its image (``IMAGE`` + suffix,
so they move and are deleted with it); a ``blk:`` device cannot have a file next to it, so its
state goes under the state directory, named by the device path as given (``/dev/disk/by-id/...``
keeps a name across reboots, ``/dev/sdb`` does not) plus a hash of it; an ``nbd:`` export's
too, named by its normalised URI (it is not a path: made absolute, it would follow the working
directory); an ``rbd:`` image's by its ``POOL/IMAGE``; RAM keeps none.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .backends.base import BackendKind
from .backends.nbd import normalise_uri


def state_dir() -> Path:
    """Where state that is not next to its data lives (a ``blk:`` namespace's zones and
    metadata): ``$NVME_EMU_STATE_DIR``, else ``$XDG_STATE_HOME/nvme-emu``, else
    ``~/.local/state/nvme-emu``."""
    if explicit := os.environ.get("NVME_EMU_STATE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "nvme-emu"


def state_file(kind: BackendKind | str, path: str | None, area: str, suffix: str) -> str | None:
    """Where a namespace of backend ``kind`` on ``path`` keeps its ``area`` state (``zones``,
    ``meta``) in a file ending in ``suffix``; None for RAM, whose state dies with its data."""
    kind = BackendKind(kind)
    if kind == BackendKind.RAM or path is None:
        return None
    if kind == BackendKind.FILE:
        return os.path.realpath(path) + suffix
    # an nbd: URI and an rbd: POOL/IMAGE are names, not paths: made absolute, they would follow the cwd
    given = normalise_uri(path) if kind == BackendKind.NBD else path if kind == BackendKind.RBD else os.path.abspath(path)
    digest = hashlib.sha256(f"nvme-emu:{area}:{kind}:{given}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(given))[:64]
    return str(state_dir() / area / f"{kind}-{name}-{digest}{suffix}")
