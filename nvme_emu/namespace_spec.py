"""Command-line namespace specs: ``kind:[path,]key=value,...`` -> an open :class:`Namespace`.

The kind picks the backend class from :data:`nvme_emu.backends.BACKENDS`; what a kind takes
(a path first, a default size, keys it refuses) and what its namespace's IDs derive from are
that class's (:class:`nvme_emu.backends.base.Backend`).

Any kind may be zoned (the Zoned Namespace Command Set, issue 25): ``zoned`` and its keys
``zone_size`` (default 128M, a power of two), ``zone_cap`` (default the zone size),
``max_open`` and ``max_active`` (default 0, no limit) and ``cross_read`` (Read Across Zone
Boundaries); :mod:`nvme_emu.zoned.geometry` says why each rule is what it is.

Any kind but a zoned one may have metadata (issue 26): ``ms`` (8, 16 or 64 bytes per block),
``ext`` (extended LBAs, FLBAS bit 4: metadata interleaved with the data in the host's buffers;
default separate, through MPTR, which is what Linux's block layer uses), ``pi`` (protection
information type 0-3), ``pil`` (``first`` or ``last``, default last: where the PI sits in the
metadata) and ``guard`` (16 or 64: CRC-16 T10-DIF or the 64b CRC; 64 needs 16 or more bytes of
metadata). On ``file:`` and ``blk:`` the metadata and the format live in a sidecar
(:mod:`nvme_emu.metadata_store`), whose format wins over these keys at a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .spec.commands import NSID_ALL
from .backends import backend_class
from .backends.base import BackendSpec
from .metadata_store import meta_path
from .namespace import SUPPORTED_METADATA_SIZES, Namespace, lba_format_index
from .pi.format import GuardKind, PiLocation, ProtectionType
from .zoned.geometry import DEFAULT_ZONE_SIZE, ZoneGeometry
from .zoned.sidecar import sidecar_path

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
    #: The zone geometry of a zoned namespace (``zoned``), None for an NVM one.
    zoned: ZoneGeometry | None = None
    #: Metadata bytes per block (0: none), FLBAS bit 4, and the protection information.
    ms: int = 0
    extended: bool = False
    pi: ProtectionType = ProtectionType.NONE
    pil: PiLocation = PiLocation.LAST
    guard: GuardKind = GuardKind.GUARD_16
    extra: dict = field(default_factory=dict)


#: Keys that are flags: ``ro`` alone means ``ro=1``.
_FLAGS = ("ro", "zoned", "cross_read", "ext")
#: The zoned namespace's keys besides ``zoned`` itself.
_ZONE_KEYS = ("zone_size", "zone_cap", "max_open", "max_active", "cross_read")
#: The metadata and protection information keys (the module docstring).
_META_KEYS = ("ms", "ext", "pi", "pil", "guard")
_PIL = {"first": PiLocation.FIRST, "last": PiLocation.LAST}
_GUARDS = {"16": GuardKind.GUARD_16, "64": GuardKind.GUARD_64}
_BOOLEANS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}
#: Every key, for the error that names them.
_KEYS = ("size", "lba", "nsid", "ro", "zoned", *_ZONE_KEYS, *_META_KEYS)


def _boolean(key: str, value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"{key} must be a boolean") from None


def _count(key: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{key} must be a count (0: no limit), not {value!r}")
    return int(value)


def _zone_geometry(zoned: bool, keys: dict[str, str], lba_size: int, size: int | None) -> ZoneGeometry | None:
    """The geometry the zone keys describe (checked for this LBA size and namespace size,
    when known: a block device's is only known once it is open)."""
    if not zoned:
        if keys:
            raise ValueError(f"{', '.join(keys)}: only for a zoned namespace (add zoned)")
        return None
    geometry = ZoneGeometry(
        zone_size=parse_size(keys["zone_size"]) if "zone_size" in keys else DEFAULT_ZONE_SIZE,
        zone_capacity=parse_size(keys["zone_cap"]) if "zone_cap" in keys else None,
        max_open=_count("max_open", keys["max_open"]) if "max_open" in keys else 0,
        max_active=_count("max_active", keys["max_active"]) if "max_active" in keys else 0,
        cross_read=_boolean("cross_read", keys["cross_read"]) if "cross_read" in keys else False,
    )
    geometry.check(lba_size, size)
    return geometry


def _metadata(ns: NamespaceSpec, keys: dict[str, str]) -> None:
    """Set the metadata and PI keys on ``ns``, refusing what cannot be (ValueError: why)."""
    if "ms" in keys:
        if not keys["ms"].isdigit() or (ms := int(keys["ms"])) not in (0, *SUPPORTED_METADATA_SIZES):
            raise ValueError(f"ms must be one of {', '.join(map(str, SUPPORTED_METADATA_SIZES))} (bytes of metadata per block)")
        ns.ms = ms
    if "ext" in keys:
        ns.extended = _boolean("ext", keys["ext"])
        if ns.extended and not ns.ms:
            raise ValueError("ext: extended LBAs need metadata (add ms=)")
    if "pi" in keys:
        if keys["pi"] not in ("0", "1", "2", "3"):
            raise ValueError("pi must be 0 (none), 1, 2 or 3 (the protection information type)")
        ns.pi = ProtectionType(int(keys["pi"]))
        if ns.pi is not ProtectionType.NONE and not ns.ms:
            raise ValueError("pi: protection information lives in metadata (add ms=8, 16 or 64)")
    if "pil" in keys:
        if keys["pil"].lower() not in _PIL:
            raise ValueError("pil must be first or last (where the PI sits in the metadata)")
        if ns.pi is ProtectionType.NONE:
            raise ValueError("pil: only with protection information (add pi=1, 2 or 3)")
        ns.pil = _PIL[keys["pil"].lower()]
    if "guard" in keys:
        if keys["guard"] not in _GUARDS:
            raise ValueError("guard must be 16 (CRC-16 T10-DIF) or 64 (the 64b CRC)")
        ns.guard = _GUARDS[keys["guard"]]
        if ns.ms and ns.ms < ns.guard.pi_size:
            raise ValueError(f"guard=64: its {ns.guard.pi_size}-byte PI does not fit ms={ns.ms}")
    if ns.zoned is not None and ns.ms:
        raise ValueError("a zoned namespace has no metadata (QEMU allows it, nvme-emu does not)")


def parse_namespace_spec(text: str) -> NamespaceSpec:
    """Parse ``ram:size=1G,lba=512``, ``file:/path,size=8G,lba=4096``, ``blk:/dev/loop0,nsid=2``,
    ``nbd:nbd://host:10809/export,lba=4096``, ``nbd:nbd+unix:///export?socket=/run/nbd.sock``.

    Keys: ``size`` (K/M/G/T suffixes), ``lba`` (512 or 4096), ``nsid``, ``ro`` (file/blk);
    ``zoned`` with ``zone_size``, ``zone_cap``, ``max_open``, ``max_active``, ``cross_read``
    (the module docstring).
    """
    kind, sep, rest = text.partition(":")
    try:
        cls = backend_class(kind.strip().lower())
    except ValueError as e:
        raise ValueError(f"namespace spec {text!r}: {e}") from None
    parts = [p.strip() for p in rest.split(",")] if sep and rest.strip() else []
    ns = NamespaceSpec(cls.kind)
    if cls.spec_path:
        # a URI path (nbd:) may hold "=" in its query; a key=value pair never holds "://"
        if not parts or not parts[0] or ("=" in parts[0] and "://" not in parts[0]):
            raise ValueError(f"namespace spec {text!r}: {cls.kind}: needs a path first, e.g. {cls.kind}:/path")
        ns.path = parts.pop(0)
    zoned = False
    zone_keys: dict[str, str] = {}
    meta_keys: dict[str, str] = {}
    for p in parts:
        key, eq, value = p.partition("=")
        key = key.strip().lower()
        if key in _FLAGS and not eq:
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
            try:
                ns.readonly = _boolean("ro", value)
            except ValueError as e:
                raise ValueError(f"namespace spec {text!r}: {e}") from None
        elif key == "zoned":
            try:
                zoned = _boolean("zoned", value)
            except ValueError as e:
                raise ValueError(f"namespace spec {text!r}: {e}") from None
        elif key in _ZONE_KEYS:
            zone_keys[key] = value
        elif key in _META_KEYS:
            meta_keys[key] = value
        elif key in cls.spec_keys:  # the kind's own (rbd: conf, id), checked by its check_spec
            ns.options[key] = value
        else:
            raise ValueError(f"namespace spec {text!r}: unknown key {key!r} ({', '.join((*_KEYS, *cls.spec_keys))})")
    try:
        cls.check_spec(ns)
    except ValueError as e:
        raise ValueError(f"namespace spec {text!r}: {e}") from None
    if ns.size is None:
        ns.size = cls.default_size
    if ns.size is not None and ns.size % ns.lba_size:
        raise ValueError(f"namespace spec {text!r}: size {ns.size} is not a multiple of lba={ns.lba_size}")
    try:
        ns.zoned = _zone_geometry(zoned, zone_keys, ns.lba_size, ns.size)
        _metadata(ns, meta_keys)
    except ValueError as e:
        raise ValueError(f"namespace spec {text!r}: {e}") from None
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
        ns = Namespace(chosen, backend, lba_size=ns_spec.lba_size, id_seed=seed, zoned=ns_spec.zoned, ms=ns_spec.ms,
                       extended=ns_spec.extended, pi_type=ns_spec.pi, pil=ns_spec.pil, guard=ns_spec.guard)
    except BaseException:
        backend.close()
        raise
    try:
        ns.keep_zones_in(sidecar_path(ns_spec.kind, ns_spec.path))
        ns.keep_meta_in(meta_path(ns_spec.kind, ns_spec.path))
    except BaseException:
        ns.close()
        raise
    return ns
