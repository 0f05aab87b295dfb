"""Sets of LBA ranges: the LBAs a namespace has marked unrecoverable (Write Uncorrectable),
and what the controller reports as tracked potentially unrecoverable LBAs (Get LBA Status,
the LBA Status Information log), which adds the fault injector's media-error ranges.

No NVMe command here: :mod:`nvme_emu.nvm` marks and clears, :mod:`nvme_emu.lba_status`
reports, :mod:`nvme_emu.faults` registers its ranges in :class:`LbaStatusState`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Iterator


class LbaRanges:
    """Disjoint, sorted, non-adjacent LBA ranges. Adding merges, removing splits; both are
    O(log n + ranges touched), so a host marking many small ranges does not make a read's
    check (:meth:`first_in`) linear. Empty is false: the check the I/O path gates on."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []  # exclusive

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(SLBA, NLB) of each range, lowest first."""
        return ((s, e - s) for s, e in zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def copy(self) -> "LbaRanges":
        other = LbaRanges()
        other._starts, other._ends = list(self._starts), list(self._ends)
        return other

    def clear(self) -> bool:
        had = bool(self._starts)
        self._starts.clear()
        self._ends.clear()
        return had

    def add(self, slba: int, nlb: int) -> bool:
        """Mark [slba, slba + nlb); True if any LBA was not marked before."""
        end = slba + nlb
        i = bisect_left(self._ends, slba)  # the first range ending at or after slba: merges
        j = bisect_right(self._starts, end)  # past the last range starting at or before end
        if i < j and self._starts[i] <= slba and self._ends[i] >= end:
            return False  # inside one range already
        if i < j:
            slba, end = min(slba, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [slba]
        self._ends[i:j] = [end]
        return True

    def remove(self, slba: int, nlb: int) -> bool:
        """Unmark [slba, slba + nlb); True if any LBA was marked."""
        end = slba + nlb
        i = bisect_right(self._ends, slba)  # the first range ending after slba
        j = bisect_left(self._starts, end)  # past the last range starting before end
        if i >= j:
            return False
        starts, ends = [], []
        if self._starts[i] < slba:
            starts.append(self._starts[i])
            ends.append(slba)
        if self._ends[j - 1] > end:
            starts.append(end)
            ends.append(self._ends[j - 1])
        self._starts[i:j] = starts
        self._ends[i:j] = ends
        return True

    def first_in(self, slba: int, nlb: int) -> int | None:
        """The lowest marked LBA in [slba, slba + nlb), or None."""
        i = bisect_right(self._ends, slba)
        if i < len(self._starts) and self._starts[i] < slba + nlb:
            return max(self._starts[i], slba)
        return None

    def within(self, slba: int, nlb: int) -> Iterator[tuple[int, int]]:
        """(SLBA, NLB) of the marked LBAs in [slba, slba + nlb), each range cut to it."""
        end = slba + nlb
        i = bisect_right(self._ends, slba)
        while i < len(self._starts) and self._starts[i] < end:
            start = max(self._starts[i], slba)
            yield start, min(self._ends[i], end) - start
            i += 1


#: A media-error fault's range: (NSID, 0 for every namespace; SLBA; NLB, 0 to the end).
FaultRange = tuple[int, int, int]


@dataclass
class LbaStatusState:
    """The controller's side of LBA status: the fault injector's media-error ranges (the
    marks Write Uncorrectable makes live on each namespace, and go with it) and the LBA
    Status Generation Counter (LSGC) of the LBA Status Information log."""

    fault_ranges: dict[int, FaultRange] = field(default_factory=dict)
    generation: int = 0

    def changed(self) -> None:
        """The tracked LBAs changed: a new LSGC (16 bits, wraps)."""
        self.generation = (self.generation + 1) & 0xFFFF
