"""The Identify fields a multi-controller subsystem with ANA reports, as keyword arguments for
:func:`nvme_emu.structures.build_identify_controller` and
:func:`nvme_emu.structures.build_identify_namespace` (and its CNS 08h sibling, which has
NMIC and ANAGRPID at other offsets), so the existing builders stay the one layout.
"""

from __future__ import annotations

from ..spec.identify import Cmic, Nmic, Oaes
from .subsystem import Subsystem

#: OAES bit the controllers add: they raise ANA Change notices.
OAES_ANA = Oaes.ASYMMETRIC_NAMESPACE_ACCESS


def identify_controller_fields(subsystem: Subsystem) -> dict[str, int | str]:
    """CMIC, ANATT, ANACAP, ANAGRPMAX, NANAGRPID, MNAN and SUBNQN for every controller of
    ``subsystem``. CMIC says multi-port as well as multi-controller: each controller is its
    own vfio-user endpoint, the PCIe analogue of a port. Linux sizes its ANA log buffer from
    NANAGRPID and MNAN, so MNAN must cover every NSID the log can list."""
    return dict(
        cmic=int(Cmic.MULTI_PORT | Cmic.MULTI_CONTROLLER | Cmic.ANA_REPORTING),
        anatt=subsystem.states.anatt,
        anacap=int(subsystem.states.anacap),
        anagrpmax=subsystem.states.anagrpmax,
        nanagrpid=subsystem.states.anagrpmax,  # static groups: every ID up to ANAGRPMAX exists
        mnan=subsystem.mnan,
        subnqn=subsystem.subnqn,
    )


def identify_namespace_fields(subsystem: Subsystem, nsid: int) -> dict[str, int]:
    """NMIC (shared: Linux joins paths into one head only for a shared namespace) and
    ANAGRPID of ``nsid``."""
    return dict(nmic=int(Nmic.SHARED), anagrpid=subsystem.namespaces[nsid])
