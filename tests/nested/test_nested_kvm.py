"""Real KVM_IOEVENTFD_FLAG_POST_WRITE, in the nested rig (nvme_emu.nested).

Each module set boots the L1 guest and runs, inside it, the KVM suites of this checkout
against the L1 /dev/kvm, each file (each test, for the L2 guest suite) as its own pytest
whose report survives L1 (a boot that dies resumes in a fresh one with what is left):

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
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable

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
    boots: list[g.GuestResult]
    unit_rcs: dict[str, int]  # pytest argument(s) of a unit -> its exit status
    cases: dict[str, str]  # "file::test[param]" -> passed | failed | error | skipped
    skips: dict[str, str]  # same key -> skip message

    @property
    def output(self) -> str:
        return "\n".join(b.output for b in self.boots)

    def outcome(self, name: str) -> dict[str, str]:
        return {k: v for k, v in self.cases.items() if k.split("::")[-1].split("[")[0] == name}


def _parse_junit(path: str, cases: dict[str, str], skips: dict[str, str]) -> None:
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


#: One boot runs every unit still without a report in about 3 minutes; this cap lets a
#: frozen L1 cost CI little.
INNER_TIMEOUT_S = 600
#: L1 under TCG's emulated SVM sometimes dies or freezes (a triple fault or a "corrupted
#: stack end" panic, a few percent of the L2 boots); a fresh boot then resumes with the
#: units that have no report yet. Never more boots than this, and never after a boot that
#: finished no unit.
MAX_BOOTS = 4
#: Suites split into one unit per test: each of their tests boots L2 guests (minutes under
#: TCG), so an L1 death costs one test's rerun, not the file's.
PER_TEST_SUITES = ("tests/e2e/test_agent_guest.py",)


def _units() -> list[str]:
    """The inner run's units, each a pytest argument: a file, or one test of a file in
    PER_TEST_SUITES (collected here, on the host, from the same checkout)."""
    units: list[str] = []
    for suite in INNER_SUITES:
        if suite not in PER_TEST_SUITES:
            units.append(suite)
            continue
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", suite],
                             cwd=REPO, capture_output=True, text=True, check=False).stdout
        ids = [line.strip() for line in out.splitlines() if line.startswith(suite + "::")]
        assert ids, f"no tests collected from {suite}:\n{out}"
        units.extend(ids)
    return units


def _job(units: list[str], out_dir: str) -> str:
    """The L1 job: each unit without a report gets its own pytest, whose JUnit report and
    exit status land in ``out_dir`` (a host directory over 9p, synced after each unit, so
    they outlive an L1 that dies later)."""
    lines = ["run_unit() {", '  i=$1; shift', f'  out={shlex.quote(out_dir)}',
             '  [ -e "$out/junit-$i.xml" ] && return 0',
             '  echo "--- unit $i: $* ---"',
             f'  {shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -rs -s -q --junitxml="$out/junit-$i.part" "$@"',
             '  echo $? >"$out/rc-$i"', '  sync "$out/rc-$i" 2>/dev/null',
             '  [ -e "$out/junit-$i.part" ] && mv "$out/junit-$i.part" "$out/junit-$i.xml"', '  sync', "}"]
    lines += [f"run_unit {i} {shlex.quote(u)}" for i, u in enumerate(units)]
    return "\n".join(lines) + "\n"


def _boot_inner(kvm: str, units: list[str], out_dir: str) -> g.GuestResult:
    expect = "1" if kvm == "patched" else "0"
    return nested.run_nested(
        ["sh", "-c", _job(units, out_dir)], kvm=kvm, cwd=REPO, out_dirs=[out_dir], timeout=INNER_TIMEOUT_S,
        env={"NVME_EMU_EXPECT_POST_WRITE": expect, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def _done(units: list[str], out_dir: str) -> dict[str, int]:
    done: dict[str, int] = {}
    for i, u in enumerate(units):
        rc_file, junit = os.path.join(out_dir, f"rc-{i}"), os.path.join(out_dir, f"junit-{i}.xml")
        if os.path.exists(junit) and os.path.exists(rc_file):
            done[u] = int(open(rc_file).read().strip() or "-1")
    return done


def _inner_run(kvm: str, out_dir: str, units: list[str] | None = None,
               boot: Callable[[str, list[str], str], g.GuestResult] = _boot_inner) -> InnerRun:
    """Boots of the rig until every unit has a report. A boot that never finished (L1 froze
    or died) is followed by a fresh one that runs only the units left, while boots make
    progress. A unit that ran to its end is never rerun: its report decides, failed or not."""
    units = _units() if units is None else units
    boots: list[g.GuestResult] = []
    done: dict[str, int] = {}
    while len(done) < len(units):
        res = boot(kvm, units, out_dir)
        boots.append(res)
        before, done = len(done), _done(units, out_dir)
        print(f"--- nested rig, {kvm} modules, boot {len(boots)}: rc={res.returncode} in {res.elapsed:.0f} s, "
              f"units done {len(done)}/{len(units)} ---")
        print(res.output[-6000:])
        assert res.returncode != 125, f"the rig failed before the tests ran:\n{res.output}"
        if len(done) == len(units):
            break
        assert res.returncode is None, f"L1 finished with units left unrun:\n{res.describe_failure()}"
        print(f"--- L1 never finished (frozen or dead) ---\n{res.describe_failure()}")
        assert len(boots) < MAX_BOOTS and (len(done) > before or len(boots) == 1), \
            f"{kvm}: L1 never finished in {len(boots)} boots, the last ones without progress"
    cases: dict[str, str] = {}
    skips: dict[str, str] = {}
    for i in range(len(units)):
        _parse_junit(os.path.join(out_dir, f"junit-{i}.xml"), cases, skips)
    return InnerRun(kvm, boots, done, cases, skips)


@pytest.fixture(scope="module", params=list(nested.KVM_SETS))
def inner(request, tmp_path_factory) -> InnerRun:
    _require_root()
    return _inner_run(request.param, str(tmp_path_factory.mktemp(f"nested-{request.param}")))


def test_inner_suites_pass(inner: InnerRun):
    bad = {k: v for k, v in inner.cases.items() if v in ("failed", "error")}
    assert not bad, f"{inner.kvm}: failing inside the nested guest: {bad}\n{inner.output[-4000:]}"
    assert set(inner.unit_rcs.values()) == {0}, (inner.unit_rcs, inner.output[-4000:])
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
    out = inner.output
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


def test_rig_job_pytest_spares_host_dirs(tmp_path):
    """Pytest runs in L1 (the inner suites are four or more of them) must not take the
    caller's numbered pytest directory, which L1 shows without its lock file, for a stale one
    and delete it through the bind: the job's TMPDIR is L1's own."""
    _require_root()
    (tmp_path / "test_t.py").write_text("def test_t(tmp_path):\n    (tmp_path / 'x').write_text('x')\n")
    (tmp_path / "keep.txt").write_text("host file\n")
    job = "; ".join([f"{shlex.quote(sys.executable)} -c 'import tempfile; print(\"tmp=\" + tempfile.gettempdir())'"]
                    + [f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -q test_t.py >/dev/null || exit 3"] * 4
                    + ["echo done > after.txt"])
    res = nested.run_nested(["sh", "-c", job], kvm=None, cwd=str(tmp_path), out_dirs=[str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.describe_failure()
    assert f"tmp={nested.L1_JOB_TMPDIR}" in res.output.splitlines(), res.output
    assert (tmp_path / "keep.txt").read_text() == "host file\n"
    assert (tmp_path / "after.txt").read_text() == "done\n"


def test_rig_resumes_after_l1_death(tmp_path):
    """The resume logic on its own, with the real job script run here and a "boot" that dies
    (its shell killed) once the first unit has reported: the second boot runs only the
    units left, the failing unit is reported and never rerun, and the reports are merged."""
    tests = tmp_path / "units"
    tests.mkdir()
    runs = tmp_path / "runs.log"
    for name, body in (("test_a.py", "assert True"), ("test_b.py", "assert 1 == 2"), ("test_c.py", "assert True")):
        (tests / name).write_text(f"def test_{name[5]}():\n    open({str(runs)!r}, 'a').write({name!r} + '\\n')\n"
                                  f"    {body}\n")
    units = [str(tests / n) for n in ("test_a.py", "test_b.py", "test_c.py")]
    out = tmp_path / "out"
    out.mkdir()

    def boot(kvm: str, units: list[str], out_dir: str) -> g.GuestResult:
        first = not any(out.iterdir())
        proc = subprocess.Popen(["sh", "-c", _job(units, out_dir)], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        if first:  # L1 "dies" once the first unit has reported
            while not (out / "junit-0.xml").exists():
                assert proc.poll() is None
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the pytest it runs, as L1's death would
        text = proc.communicate()[0]
        return g.GuestResult(returncode=None if first else proc.returncode, output=text, console=text,
                             qemu_stderr="", fio=None, accel="tcg")

    run = _inner_run("stock", str(out), units=units, boot=boot)
    assert len(run.boots) == 2 and run.boots[0].returncode is None
    assert sorted(runs.read_text().split()) == ["test_a.py", "test_b.py", "test_c.py"]  # each ran once
    assert run.unit_rcs == {units[0]: 0, units[1]: 1, units[2]: 0}
    assert sorted(run.cases.values()) == ["failed", "passed", "passed"]
