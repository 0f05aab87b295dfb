"""The ANA log page (0Ch), byte for byte: the expected pages are written out by hand from the
specification's layout (header 16 bytes, descriptors 32 bytes plus 4 per NSID)."""

from __future__ import annotations

from nvme_emu.ana.log import AnaGroupView, AnaLog, ana_log_size_limit, build_ana_log
from nvme_emu.spec.log_pages import AnaState

GROUPS = [
    AnaGroupView(anagrpid=1, state=AnaState.OPTIMIZED, nsids=(1, 4), chgcnt=3),
    AnaGroupView(anagrpid=0x0102, state=AnaState.CHANGE, nsids=(0x01020304,), chgcnt=0x1122334455667788),
]

HEADER = (
    "0700000000000000"  # Change Count 7
    "0200"  # two descriptors
    "000000000000"  # reserved
)
GROUP_1 = (
    "01000000"  # ANAGRPID 1
    "{nn1}"  # Number of NSID Values
    "0300000000000000"  # Change Count 3
    "01"  # Optimized
    + "00" * 15  # reserved
)
GROUP_2 = (
    "02010000"  # ANAGRPID 102h
    "{nn2}"
    "8877665544332211"
    "0f"  # ANA Change
    + "00" * 15
)


def test_log_page_byte_exact_with_nsids() -> None:
    expected = HEADER + GROUP_1.format(nn1="02000000") + "01000000" "04000000" + GROUP_2.format(nn2="01000000") + "04030201"
    page = build_ana_log(7, GROUPS)
    assert page.hex() == expected
    assert len(page) == 16 + 32 + 8 + 32 + 4


def test_log_page_byte_exact_return_groups_only() -> None:
    expected = HEADER + GROUP_1.format(nn1="00000000") + GROUP_2.format(nn2="00000000")
    page = build_ana_log(7, GROUPS, rgo=True)
    assert page.hex() == expected
    assert len(page) == 16 + 2 * 32


def test_an_empty_log_is_its_header() -> None:
    assert build_ana_log(0, []) == bytes(16)


def test_the_layout_parses_back_what_it_builds() -> None:
    parsed = AnaLog.parse(build_ana_log(7, GROUPS))
    assert parsed.header.chgcnt == 7 and parsed.header.ngrps == 2
    assert [(g.anagrpid, g.state, list(g.nsids), g.chgcnt) for g in parsed.groups] == [
        (1, 1, [1, 4], 3),
        (0x102, 0xF, [0x01020304], 0x1122334455667788),
    ]


def test_size_limit_is_what_linux_allocates() -> None:
    assert ana_log_size_limit(nanagrpid=2, mnan=3) == 16 + 2 * 32 + 3 * 4
