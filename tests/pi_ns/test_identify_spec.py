"""Identify for each metadata/PI configuration, from the ``--namespace`` spec to the bytes a
host parses, and the spec keys' refusals."""

from __future__ import annotations

import pytest

from nvme_emu import structures as st
from nvme_emu.backends.ram import RamBackend
from nvme_emu.namespace import LBA_FORMATS, Namespace
from nvme_emu.namespace_spec import open_namespace, parse_namespace_spec
from nvme_emu.pi.format import GuardKind, PiLocation, ProtectionType
from nvme_emu.spec.identify import Ctratt, Dpc, Mc

from .helpers import ctratt, ns_view, state_of

# spec tail -> (LBA format index, MSET, MS, PI type, PI first, PIF of the format)
CONFIGS = {
    "": (0, False, 0, 0, False, 0b00),
    "lba=4096": (1, False, 0, 0, False, 0b00),
    "ms=8": (2, False, 8, 0, False, 0b00),
    "ms=8,pi=1": (2, False, 8, 1, False, 0b00),
    "ms=8,pi=3,pil=first,ext": (2, True, 8, 3, True, 0b00),
    "ms=16,pi=2": (3, False, 16, 2, False, 0b00),
    "ms=64,pi=1,pil=last": (4, False, 64, 1, False, 0b00),
    "lba=4096,ms=8,pi=1": (5, False, 8, 1, False, 0b00),
    "lba=4096,ms=16,pi=1,guard=64": (6, False, 16, 1, False, 0b10),
    "lba=4096,ms=64,pi=3,guard=64,pil=first,ext": (7, True, 64, 3, True, 0b10),
    "ms=16,guard=64": (3, False, 16, 0, False, 0b10),  # 64b Guard formats, PI off for now
}


@pytest.mark.parametrize("tail", CONFIGS)
def test_identify_fields_for_each_configuration(tail: str):
    spec = "ram:size=1M" + (f",{tail}" if tail else "")
    with open_namespace(spec, 1) as ns:
        state = state_of(ns)
        v = ns_view(state, 1)
        lbaf, mset, ms, pi, first, pif = CONFIGS[tail]
        assert (v.lbaf, v.mset, v.ms, v.pi_type, v.pi_first, v.pif, v.sts) == (lbaf, mset, ms, pi, first, pif, 0)
        assert v.nlbaf == len(LBA_FORMATS) - 1 == 7
        assert v.mc == Mc.EXTENDED | Mc.SEPARATE and v.dpc == Dpc.ALL == 0x1F
        assert ctratt(state) & Ctratt.EXTENDED_LBA_FORMATS
        # what the I/O path reads, set once per format
        assert (ns.ms, ns.extended, ns.plain_rw) == (ms, mset, ms == 0)
        if pi:
            assert ns.pi is not None and ns.pi_engine is not None and ns.pi.dps == pi | first << 3
            assert ns.pi.guard == GuardKind(pif) and ns.pi_engine.fmt is ns.pi
        else:
            assert ns.pi is None and ns.pi_engine is None


def test_the_lba_format_list():
    """0 and 1 are what they always were; the metadata formats follow (namespace.py says why
    not QEMU's order)."""
    assert [(f.size, f.ms) for f in LBA_FORMATS] == [
        (512, 0), (4096, 0), (512, 8), (512, 16), (512, 64), (4096, 8), (4096, 16), (4096, 64)]


def test_a_64b_guard_namespace_lists_16b_guard_where_its_pi_cannot_fit():
    """ELBAF is per LBA format: 16 and 64 bytes of metadata hold 16-byte PI, 8 bytes only 8."""
    with open_namespace("ram:size=1M,ms=16,pi=1,guard=64", 1) as ns:
        elbaf = st.IdentifyNamespaceNvm.parse(ns.identify_namespace_nvm()).elbaf
        assert [e >> 7 & 3 for e in elbaf[:8]] == [0, 0, 0, 2, 2, 0, 2, 2]
    with open_namespace("ram:size=1M,ms=8,pi=1", 1) as ns:
        assert ns.identify_namespace_nvm() == bytes(4096)  # 16b Guard: all zeros, as before


def test_a_plain_namespace_keeps_the_plain_path():
    with open_namespace("ram:size=1M", 1) as ns:
        assert ns.plain_rw and ns.ms == 0 and ns.pi is None and not ns.extended
        assert ns.read_meta(0, 4).nbytes == 0


def test_zoned_namespaces_offer_no_metadata_capabilities():
    with open_namespace("ram:size=4M,zoned,zone_size=1M", 1) as ns:
        v = ns_view(state_of(ns), 1)
        assert (v.mc, v.dpc, v.ms, v.pi_type) == (0, 0, 0, 0)


def test_spec_keys_parse():
    s = parse_namespace_spec("ram:size=1M,lba=4096,ms=16,pi=2,pil=first,ext,guard=64")
    assert (s.lba_size, s.ms, s.pi, s.pil, s.extended, s.guard) == (
        4096, 16, ProtectionType.TYPE2, PiLocation.FIRST, True, GuardKind.GUARD_64)
    s = parse_namespace_spec("file:/tmp/x.img,ms=8")
    assert (s.ms, s.pi, s.pil, s.extended, s.guard) == (8, ProtectionType.NONE, PiLocation.LAST, False, GuardKind.GUARD_16)
    assert parse_namespace_spec("ram:ms=0").ms == 0


@pytest.mark.parametrize("tail, msg", [
    ("pi=1", "protection information lives in metadata"),
    ("ms=12", "ms must be one of 8, 16, 64"),
    ("ms=x", "ms must be one of"),
    ("ms=8,guard=64", "does not fit ms=8"),
    ("ms=8,guard=32", "guard must be 16"),
    ("ms=8,pi=4", "pi must be 0"),
    ("ms=8,pi=-1", "pi must be 0"),
    ("ms=8,pi=1,pil=middle", "pil must be first or last"),
    ("ms=8,pil=first", "pil: only with protection information"),
    ("ext", "extended LBAs need metadata"),
    ("ms=8,ext=maybe", "ext must be a boolean"),
    ("zoned,zone_size=1M,ms=8", "a zoned namespace has no metadata"),
])
def test_spec_refusals(tail: str, msg: str):
    with pytest.raises(ValueError, match=msg):
        parse_namespace_spec(f"ram:size=4M,{tail}")


def test_the_constructor_refuses_what_cannot_be():
    with pytest.raises(ValueError, match="protection information needs metadata"):
        Namespace(1, RamBackend(1 << 20), pi_type=ProtectionType.TYPE1)
    with pytest.raises(ValueError, match="unsupported metadata size 12"):
        Namespace(1, RamBackend(1 << 20), ms=12)
