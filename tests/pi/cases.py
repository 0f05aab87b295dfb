"""The PI test suites' shared vocabulary: a case is a PI format and a host buffer layout,
named the same way in every suite (``t1-g16-ms8-last-sep``)."""

from __future__ import annotations

from dataclasses import dataclass

from nvme_emu.pi.format import GuardKind, PiFormat


@dataclass(frozen=True)
class PiCase:
    fmt: PiFormat
    extended: bool

    def __str__(self) -> str:
        f = self.fmt
        guard = 16 if f.guard is GuardKind.GUARD_16 else 64
        return f"t{int(f.pi_type)}-g{guard}-ms{f.ms}-{f.location.name.lower()}-{'ext' if self.extended else 'sep'}"
