"""Command-line namespace specs: ``kind:[path,]key=value,...`` -> an open :class:`Namespace`.

The kind picks the backend class from :data:`nvme_emu.backends.BACKENDS`; what a kind takes
(a path first, a default size, keys it refuses) and what its namespace's IDs derive from are
that class's (:class:`nvme_emu.backends.base.Backend`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .spec.commands import NSID_ALL
from .backends import backend_class
from .backends.base import BackendSpec
from .namespace import Namespace, lba_format_index

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """'4096', '512K', '1G', '8GiB' -> bytes (binary multiples)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) << _SIZE_UNITS[m.group(2).upper()]


@dataclass
class NamespaceSpec(BackendSpec):
    """A parsed ``kind:[path,]key=value,...`` namespace description: what to open (the
    :class:`BackendSpec` part) and the namespace's LBA size and NSID."""

    lba_size: int = 512
    nsid: int | None = None
    extra: dict = field(default_factory=dict)


def parse_namespace_spec(text: str) -> NamespaceSpec:
    """Parse ``ram:size=1G,lba=512``, ``file:/path,size=8G,lba=4096``, ``blk:/dev/loop0,nsid=2``.

    Keys: ``size`` (K/M/G/T suffixes), ``lba`` (512 or 4096), ``nsid``, ``ro`` (file/blk).
    """
    kind, sep, rest = text.partition(":")
    try:
        cls = backend_class(kind.strip().lower())
    except ValueError as e:
        raise ValueError(f"namespace spec {text!r}: {e}") from None
    parts = [p.strip() for p in rest.split(",")] if sep and rest.strip() else []
    ns = NamespaceSpec(cls.kind)
    if cls.spec_path:
        if not parts or not parts[0] or "=" in parts[0]:
            raise ValueError(f"namespace spec {text!r}: {cls.kind}: needs a path first, e.g. {cls.kind}:/path")
        ns.path = parts.pop(0)
    for p in parts:
        key, eq, value = p.partition("=")
        key = key.strip().lower()
        if key == "ro" and not eq:
            value, eq = "1", "="
        if not eq or not value.strip():
            raise ValueError(f"namespace spec {text!r}: {p!r} is not key=value")
        value = value.strip()
        if key == "size":
            ns.size = parse_size(value)
            if ns.size <= 0:
                raise ValueError(f"namespace spec {text!r}: size must be positive")
        elif key == "lba":
            try:
                ns.lba_size = parse_size(value)
                lba_format_index(ns.lba_size)
            except ValueError as e:
                raise ValueError(f"namespace spec {text!r}: {e}") from None
        elif key == "nsid":
            if not value.isdigit() or not 0 < int(value) < NSID_ALL:
                raise ValueError(f"namespace spec {text!r}: nsid must be 1..{NSID_ALL - 1}")
            ns.nsid = int(value)
        elif key == "ro":
            if value.lower() not in ("0", "1", "on", "off", "true", "false", "yes", "no"):
                raise ValueError(f"namespace spec {text!r}: ro must be a boolean")
            ns.readonly = value.lower() in ("1", "on", "true", "yes")
        else:
            raise ValueError(f"namespace spec {text!r}: unknown key {key!r} (size, lba, nsid, ro)")
    try:
        cls.check_spec(ns)
    except ValueError as e:
        raise ValueError(f"namespace spec {text!r}: {e}") from None
    if ns.size is None:
        ns.size = cls.default_size
    if ns.size is not None and ns.size % ns.lba_size:
        raise ValueError(f"namespace spec {text!r}: size {ns.size} is not a multiple of lba={ns.lba_size}")
    return ns


def open_namespace(spec_: str | NamespaceSpec, nsid: int | None = None, *, controller_seed: str = "") -> Namespace:
    """Create the backend a spec describes and wrap it in a Namespace.

    An ``nsid=`` inside the spec wins; ``nsid`` here is the default the CLI assigns by position.
    Its IDs derive from the file or device, a RAM namespace's from ``controller_seed``
    (:meth:`nvme_emu.backends.base.Backend.identity_seed`, :mod:`nvme_emu.identity`).
    """
    ns_spec = parse_namespace_spec(spec_) if isinstance(spec_, str) else spec_
    chosen = ns_spec.nsid if ns_spec.nsid is not None else nsid
    if chosen is None:
        raise ValueError("no NSID given (add nsid=N to the spec)")
    cls = backend_class(ns_spec.kind)
    backend = cls.from_spec(ns_spec)
    try:
        seed = cls.identity_seed(ns_spec, controller_seed)
        return Namespace(chosen, backend, lba_size=ns_spec.lba_size, id_seed=seed)
    except BaseException:
        backend.close()
        raise
