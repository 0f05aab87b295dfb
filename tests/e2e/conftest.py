"""End-to-end tests: boot a real QEMU + Linux guest (slow; marker `e2e`)."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest (slow)")


# Errors that mean "this machine cannot fetch Debian packages", not "our code is broken".
_NO_NETWORK_HINTS = (
    "Could not resolve", "Temporary failure resolving", "Failed to fetch",
    "Network is unreachable", "Connection refused", "Couldn't download",
    "Could not connect",
)


@pytest.fixture(scope="session")
def guest_infra():
    """Provide QEMU (vfio-user capable) and the cached guest, or skip with a reason.

    Skips only when the machine truly cannot build them (not root, no network);
    NVME_EMU_E2E_REQUIRED=1 turns those skips into failures.
    """
    from nvme_emu import guest

    required = os.environ.get("NVME_EMU_E2E_REQUIRED") == "1"

    def skip(reason):
        print(f"e2e skipped: {reason}")
        if required:
            pytest.fail(reason)
        pytest.skip(reason)

    try:
        qemu = guest.ensure_qemu()
        kernel, initrd = guest.ensure_guest()
    except guest.GuestError as e:
        msg = str(e)
        if "needs root" in msg:
            skip("building the QEMU chroot needs root")
        if any(h in msg for h in _NO_NETWORK_HINTS):
            skip(f"no network to build the QEMU chroot: {msg.splitlines()[-1]}")
        raise
    return {"qemu": qemu, "kernel": kernel, "initrd": initrd}


@pytest.fixture(scope="session")
def rich_infra(guest_infra):
    """The rich guest (tree ~2 min to build the first time, then cached), or skip as guest_infra does."""
    from nvme_emu import guest

    try:
        return guest.ensure_rich_guest()
    except guest.GuestError as e:
        if os.environ.get("NVME_EMU_E2E_REQUIRED") == "1":
            raise
        msg = str(e)
        if "needs root" in msg or "Could not resolve" in msg or "Failed to fetch" in msg:
            pytest.skip(f"cannot build the rich guest here: {msg.splitlines()[-1]}")
        raise
