"""When a blocking backend call may run on the loop thread: a time budget learned from the calls.

File and block namespaces hand blocking calls to worker threads (nvme_emu.aio) so that one
slow call freezes no other queue. At QD1 there is nothing to freeze, and the hand-off is
most of the cost: for fio's 4k random writes at QD1 in a TCG guest the hand-off took 78 us at
p50 around a 37 us ``pwritev`` (to the worker 37, back to the loop 18, to the CQE 9, to the
interrupt 14; ``nvme-emu ctl latency``), and running the writes inline took QD1 write IOPS from
2,187 to 3,144 (bench/README.md, "Where the QD1 time goes, and what the inline budget bought"). The
kernel cannot be asked to write only if that is quick (``RWF_NOWAIT`` on a buffered write is
EOPNOTSUPP on ext4, kernel 6.18, measured), and a Read the page cache missed must wait for
the disk whoever runs it.

So :meth:`nvme_emu.nvm.NvmCommands._start` runs such a call inline when nothing else is in
flight and nothing waits behind it in its queue, timed by this budget: one call that overran
it (dirty-page throttling, a journal commit, a slow disk) sends the next ones to the pool,
1, 2, 4 ... up to :data:`MAX_SKIP` calls in a row while they keep overrunning, and one call
within the budget resets that. FUA writes, flushes and the other long calls never run inline.
"""

from __future__ import annotations

from dataclasses import dataclass

#: An inline call slower than this sends the next ones to the pool (a page-cache write is
#: ~11 us, a read from this machine's virtual disk 100-200 us; 1 ms is what another queue's
#: command might wait behind one).
INLINE_BUDGET_NS = 1_000_000
#: The longest run of calls sent to the pool after consecutive overruns.
MAX_SKIP = 4096

#: What new budgets start with: ``serve --inline-write-budget-us`` sets it for the process
#: (like the GIL switch interval, a property of the process, not of one namespace); 0 sends
#: every such call to the pool, as before this module existed.
_default_budget_ns = INLINE_BUDGET_NS


def default_budget_ns() -> int:
    return _default_budget_ns


def set_default_budget(ns: int) -> None:
    """The budget of every :class:`InlineBudget` made from now on (0: never inline)."""
    global _default_budget_ns
    if ns < 0:
        raise ValueError(f"budget {ns} ns: must be >= 0")
    _default_budget_ns = ns


@dataclass
class InlineStats:
    inline: int = 0  # calls run on the loop thread
    overruns: int = 0  # of which took longer than the budget
    handed_off: int = 0  # calls sent to the pool by the back-off


class InlineBudget:
    """Run inline, or not: :meth:`admit` before a call, :meth:`took` after an inline one."""

    __slots__ = ("budget_ns", "skip", "backoff", "stats")

    def __init__(self, budget_ns: int | None = None) -> None:
        self.budget_ns = _default_budget_ns if budget_ns is None else budget_ns
        self.skip = 0  # calls left to hand off
        self.backoff = 0  # the length of the next hand-off run (0: none yet)
        self.stats = InlineStats()

    def admit(self) -> bool:
        """True: run this call inline (then report :meth:`took`); False: hand it off."""
        if not self.budget_ns:
            return False
        if self.skip:
            self.skip -= 1
            self.stats.handed_off += 1
            return False
        return True

    def took(self, ns: int) -> None:
        """An inline call took ``ns``: within the budget resets the back-off, over it grows it."""
        stats = self.stats
        stats.inline += 1
        if ns <= self.budget_ns:
            self.backoff = 0
            return
        stats.overruns += 1
        self.backoff = min(MAX_SKIP, 2 * self.backoff or 1)
        self.skip = self.backoff
