"""QEMU's own rbd block driver (Debian's qemu-block-extra in the QEMU chroot, installed by
qemu-configs/provide-qemu.sh) on a tests/support/ceph.py cluster: the block node that opens an
image of it, and qemu-io on that node in a QEMU with no machine (``qemu-system-x86_64``'s HMP,
not a separate tool). tests/rbd/test_qemu_rbd.py checks the driver with it, and the guest check
of network namespaces (tests/e2e/test_netstore_guest.py) asks it whether its rbd peer can run."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from ..support.ceph import CephCluster


class QemuBlockError(RuntimeError):
    """QEMU could not open the node (no rbd driver in it, the cluster unreachable from its
    chroot, ...) or did not run the commands; the message has QEMU's own words."""


def rbd_node(cluster: CephCluster, node_name: str, image: str | None = None) -> dict[str, Any]:
    """The ``-blockdev`` of ``image`` (default: the cluster's own) for QEMU's rbd driver: the
    cluster's conf (which names the keyring; both under /tmp, which the chroot shares) and
    client. ``cache.direct`` is how QEMU's rbd driver turns librbd's cache off (``rbd_cache =
    false``), as QEMU's ``cache=none``: a write completes once the OSD has it."""
    return {"driver": "rbd", "node-name": node_name, "pool": cluster.pool, "image": image or cluster.image,
            "conf": str(cluster.conf), "user": cluster.client_id, "cache": {"direct": True}}


def qemu_io(qemu: str, node: dict[str, Any], commands: list[str]) -> list[str]:
    """Open ``node`` in a machine-less QEMU and run each qemu-io command on it; each one's
    output. No commands: only whether QEMU opens the node (raises :class:`QemuBlockError` if not)."""
    qmp: list[dict[str, Any]] = [{"execute": "qmp_capabilities"}]
    qmp += [{"execute": "human-monitor-command", "arguments": {"command-line": f'qemu-io {node["node-name"]} "{c}"'}} for c in commands]
    qmp.append({"execute": "quit"})
    try:
        r = subprocess.run([qemu, "-nodefaults", "-display", "none", "-machine", "none", "-blockdev", json.dumps(node), "-qmp", "stdio"],
                           input="".join(json.dumps(m) + "\n" for m in qmp), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise QemuBlockError(f"QEMU did not open {node['node-name']} and quit within 120 s") from None
    if r.returncode != 0:
        raise QemuBlockError(f"QEMU exited {r.returncode}: {(r.stderr.strip() or r.stdout.strip())[-600:]}")
    # qemu-io prints to QEMU's stdout before the command's (empty) QMP return
    outputs: list[str] = []
    text: list[str] = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            if '"return"' in line:
                outputs.append("\n".join(text))
            text = []
        else:
            text.append(line)
    if len(outputs) != len(qmp):
        raise QemuBlockError(f"{len(outputs)} QMP returns for {len(qmp)} commands:\n{r.stdout[-2000:]}")
    return outputs[1:-1]


def driver_problem(qemu: str, node: dict[str, Any]) -> str | None:
    """Why this QEMU cannot open ``node`` (None: it can)."""
    try:
        qemu_io(qemu, node, [])
    except QemuBlockError as e:
        return str(e)
    return None
