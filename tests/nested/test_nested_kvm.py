"""Real KVM_IOEVENTFD_FLAG_POST_WRITE, in the nested rig (nvme_emu.nested).

Each module set boots the L1 guest once and runs, inside it, the KVM suites of this
checkout against the L1 /dev/kvm:

* ``tests/test_kvm.py`` (its POST_WRITE semantics test included),
* ``tests/test_kvm_post_write.py`` (the ABI suite),
* ``tests/doorbell/test_kvm_doorbell.py`` (SQ tail doorbells from a KVM guest, through the
  server's GET_REGION_IO_FDS records),
* ``tests/agent/test_ioeventfd_agent.py`` (the doorbell agent LD_PRELOADed into a VMM),
* ``tests/e2e/test_agent_guest.py`` (stock QEMU ``-accel kvm`` with the agent, an L2 Linux
  guest running fio with verify against ``nvme-emu serve --doorbell shadow``).

With our patched modules ``NVME_EMU_EXPECT_POST_WRITE=1`` turns any fallback into a
failure, so a pass proves the kernel path; with Debian's modules ``=0`` requires the
suites to detect the missing flag and run on the emulation. The inner pytest writes a
JUnit report to a host directory, which these tests read.

Needs root (mount namespaces, the 9p export) and Debian's package mirror the first time
(the QEMU chroot, the kernel package, linux-source and headers for the modules).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

from nvme_emu import guest as g
from nvme_emu import nested

INNER_SUITES = ["tests/test_kvm.py", "tests/test_kvm_post_write.py", "tests/doorbell/test_kvm_doorbell.py",
                "tests/agent/test_ioeventfd_agent.py", "tests/e2e/test_agent_guest.py"]
#: Tests whose subject is the kernel path itself: on the patched modules they must pass
#: (never skip), and on the stock modules they must run on the emulation (never skip).
POST_WRITE_TESTS = ("test_post_write_semantics", "test_guest_doorbell_shadow_ioeventfd", "test_post_write",
                    "test_fio_with_agent_doorbells")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require_root() -> None:
    if os.geteuid() != 0:
        print("nested KVM rig skipped: needs root (mount namespaces, 9p export of /)")
        pytest.skip("the nested rig needs root")


@dataclass
class InnerRun:
    kvm: str
    result: g.GuestResult
    cases: dict[str, str]  # "file::test[param]" -> passed | failed | error | skipped
    skips: dict[str, str]  # same key -> skip message

    def outcome(self, name: str) -> dict[str, str]:
        return {k: v for k, v in self.cases.items() if k.split("::")[-1].split("[")[0] == name}


def _parse_junit(path: str) -> tuple[dict[str, str], dict[str, str]]:
    cases: dict[str, str] = {}
    skips: dict[str, str] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        key = f"{tc.get('classname')}::{tc.get('name')}"
        state = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                state = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped" and state == "passed":
                state = "skipped"
                skips[key] = child.get("message", "")
        cases[key] = state
    return cases, skips


#: One inner run takes about 3 minutes; this cap lets a frozen L1 cost CI little.
INNER_TIMEOUT_S = 600


def _boot_inner(kvm: str, junit: str, out_dir: str):
    expect = "1" if kvm == "patched" else "0"
    return nested.run_nested(
        [os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(os.path.join(REPO, ".venv")) else "python3",
         "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-s", "-q", f"--junitxml={junit}", *INNER_SUITES],
        kvm=kvm, cwd=REPO, out_dirs=[out_dir], timeout=INNER_TIMEOUT_S,
        env={"NVME_EMU_EXPECT_POST_WRITE": expect, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def _inner_run(kvm: str, out_dir: str) -> InnerRun:
    """One boot of the rig running the inner suites; a second, fresh boot only when the first
    never finished (L1 froze or died: TCG's emulated SVM has done both, a few percent of long
    runs). A test that fails inside is never retried: its JUnit report decides."""
    junit = os.path.join(out_dir, f"junit-{kvm}.xml")
    res = _boot_inner(kvm, junit, out_dir)
    if res.returncode is None:
        print(f"--- nested rig, {kvm} modules: L1 never finished ({res.elapsed:.0f} s); booting once more ---\n"
              + res.describe_failure())
        if os.path.exists(junit):
            os.unlink(junit)
        res = _boot_inner(kvm, junit, out_dir)
    print(f"--- nested rig, {kvm} modules: rc={res.returncode} in {res.elapsed:.0f} s ---")
    print(res.output[-6000:])
    assert res.returncode is not None, res.describe_failure()
    assert res.returncode != 125, f"the rig failed before the tests ran:\n{res.output}"
    assert os.path.exists(junit), f"no JUnit report from the inner pytest:\n{res.describe_failure()}"
    cases, skips = _parse_junit(junit)
    return InnerRun(kvm, res, cases, skips)


@pytest.fixture(scope="module", params=list(nested.KVM_SETS))
def inner(request, tmp_path_factory) -> InnerRun:
    _require_root()
    return _inner_run(request.param, str(tmp_path_factory.mktemp(f"nested-{request.param}")))


def test_inner_suites_pass(inner: InnerRun):
    bad = {k: v for k, v in inner.cases.items() if v in ("failed", "error")}
    assert not bad, f"{inner.kvm}: failing inside the nested guest: {bad}\n{inner.result.output[-4000:]}"
    assert inner.result.returncode == 0, inner.result.output[-4000:]
    modules = {k.split("::")[0] for k in inner.cases}
    wanted = {f.removesuffix(".py").replace("/", ".") for f in INNER_SUITES}
    assert modules == wanted and len(inner.cases) >= 60, (len(inner.cases), modules)


def test_no_kvm_test_skips(inner: InnerRun):
    """/dev/kvm is real in L1: nothing may skip for want of KVM, and nothing about
    POST_WRITE may skip on either module set (patched: real path; stock: emulation)."""
    kvm_skips = {k: m for k, m in inner.skips.items() if "KVM unusable" in m or "/dev/kvm" in m}
    assert not kvm_skips, kvm_skips
    for name in POST_WRITE_TESTS:
        got = inner.outcome(name)
        assert got and set(got.values()) == {"passed"}, (inner.kvm, name, got)


def test_post_write_detection_matches_module_set(inner: InnerRun):
    out = inner.result.output
    if inner.kvm == "patched":
        assert "KVM_IOEVENTFD_FLAG_POST_WRITE accepted" in out, out[-3000:]
        assert "KVM POST_WRITE (in-kernel value copy + eventfd signal)" in out, out[-3000:]
        assert not [k for k, m in inner.skips.items() if "lacks KVM_IOEVENTFD_FLAG_POST_WRITE" in m]
    else:
        assert "lacks KVM_IOEVENTFD_FLAG_POST_WRITE" in out, out[-3000:]
        assert "emulated POST_WRITE" in out, out[-3000:]


def test_rig_returns_status_and_output(tmp_path):
    """The rig's contract on its own: output and exit status come back, files written to
    an output directory appear on the host, and the job runs in the given directory."""
    _require_root()
    res = nested.run_nested(["sh", "-c", "echo marker-$((6*7)); pwd; test -c /dev/kvm && echo kvm-ok; "
                             "echo from-l1 > out.txt; exit 7"],
                            kvm="stock", cwd=str(tmp_path), out_dirs=[str(tmp_path)], timeout=600)
    assert res.returncode == 7, res.describe_failure()
    lines = res.output.splitlines()
    assert "marker-42" in lines and str(tmp_path) in lines and "kvm-ok" in lines, res.output
    assert (tmp_path / "out.txt").read_text() == "from-l1\n"
