"""The SIGBUS guard absorbs faults in registered guest memory only: real bugs still crash.

Each case runs in a child interpreter (a SIGBUS that is not absorbed must kill it, by signal 7,
which pytest's own process could not survive).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

PROLOGUE = """
import mmap, os, signal
from vfio_user import dma_guard
fd = os.memfd_create("guard-test")
os.ftruncate(fd, 1 << 20)
guarded, other = mmap.mmap(fd, 1 << 20), mmap.mmap(fd, 1 << 20)
slot = dma_guard.guard(guarded)
os.ftruncate(fd, 4096)
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    code = PROLOGUE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_fault_in_a_guarded_mapping_is_absorbed_and_counted():
    r = _run("""
        before = dma_guard.FAULTS[0]
        guarded[0x80000:0x80008] = b"12345678"    # store into the vanished part
        assert guarded[0x90000] == 0               # load from another vanished page
        assert guarded[0x80000:0x80008] == b"12345678"  # the scratch page kept the store
        assert dma_guard.FAULTS[0] == before + 2, dma_guard.FAULTS[0]
        assert dma_guard.poisoned(slot)
        dma_guard.unguard(slot)
        print("survived")
    """)
    assert r.returncode == 0 and "survived" in r.stdout, r.stderr


def test_a_fault_elsewhere_still_kills_the_process():
    r = _run("""
        other[0x80000] = 1  # the same file, but a mapping nobody registered: a real bug
        print("survived")
    """)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "survived" not in r.stdout


def test_a_fault_after_unguard_kills_the_process():
    r = _run("""
        dma_guard.unguard(slot)
        guarded[0x80000] = 1
        print("survived")
    """)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)


def test_a_sigbus_sent_by_kill_is_not_absorbed():
    r = _run("""
        os.kill(os.getpid(), signal.SIGBUS)
        print("survived")
    """)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
