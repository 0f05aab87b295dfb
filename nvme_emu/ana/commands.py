"""Which commands a namespace processes in each ANA state, and the status of those it refuses.

The Base specification (2.0, "Asymmetric Namespace Access Reporting", the ANA Inaccessible,
Persistent Loss and Change state sections) lets a controller process, for a namespace it
cannot reach, only the commands that describe or configure it, and abort the others with the
Path Related status matching the state. :data:`ANA_COMMAND_RULES` is that rule as data, one
row per state, so the dispatcher asks one function and the test reads the same rows.

Choices where the specification leaves room (each is one value in a row, so one line changes it):

- Every I/O command is refused in Inaccessible, Persistent Loss and Change, Reservation
  Report included: Linux's nvmet and SPDK's nvmf target do the same, and the host's
  multipath then fails the command over to a path that can serve it.
- In ANA Change a controller "may" process commands; this model refuses them with
  Asymmetric Access Transition, so a test sees the same outcome every run.
- DNR is clear in all three. The path status tells the host to try another controller; with
  DNR set Linux completes the request with an error instead of failing it over
  (``nvme_decide_disposition`` checks DNR before the path error), which would turn a path
  event into I/O errors on the multipath head: the opposite of what ANA is for.
- Admin commands that name the namespace and only describe or attach it (Identify, Get Log
  Page, Get/Set Features, Namespace Management and Attachment) are processed; those that
  touch its media (Format NVM, Sanitize, Device Self-test, Get LBA Status, ...) are refused.
  Admin commands that name no namespace are not the table's business (NSID 0 or FFFFFFFFh
  is the caller's to skip).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec.commands import AdminOpcode, NvmeError, Status
from ..spec.log_pages import AnaState

#: The admin commands a namespace that cannot be reached through this controller still
#: processes: they read or change what the host knows of it, never its data.
ADMIN_PROCESSED_WHEN_UNREACHABLE: frozenset[int] = frozenset(
    {
        AdminOpcode.IDENTIFY,
        AdminOpcode.GET_LOG_PAGE,
        AdminOpcode.GET_FEATURES,
        AdminOpcode.SET_FEATURES,
        AdminOpcode.NAMESPACE_MANAGEMENT,
        AdminOpcode.NAMESPACE_ATTACHMENT,
    }
)


@dataclass(frozen=True)
class AnaCommandRule:
    """What a namespace in one ANA state does with a command that names it.

    ``refused_with`` is None where every command is processed; otherwise the status of the
    I/O commands and of the admin commands outside ``admin_processed``."""

    state: AnaState
    refused_with: Status | None
    dnr: bool
    admin_processed: frozenset[int]


ANA_COMMAND_RULES: dict[AnaState, AnaCommandRule] = {
    rule.state: rule
    for rule in (
        AnaCommandRule(AnaState.OPTIMIZED, None, False, frozenset()),
        AnaCommandRule(AnaState.NON_OPTIMIZED, None, False, frozenset()),
        AnaCommandRule(AnaState.INACCESSIBLE, Status.ASYMMETRIC_ACCESS_INACCESSIBLE, False, ADMIN_PROCESSED_WHEN_UNREACHABLE),
        AnaCommandRule(AnaState.PERSISTENT_LOSS, Status.ASYMMETRIC_ACCESS_PERSISTENT_LOSS, False, ADMIN_PROCESSED_WHEN_UNREACHABLE),
        AnaCommandRule(AnaState.CHANGE, Status.ASYMMETRIC_ACCESS_TRANSITION, False, ADMIN_PROCESSED_WHEN_UNREACHABLE),
    )
}


def ana_refusal(state: AnaState, opcode: int, *, admin: bool) -> NvmeError | None:
    """The error a command (``opcode``, admin or I/O) naming a namespace in ``state`` fails
    with, or None if it is processed. Returned rather than raised, so the I/O path can
    complete it without an exception's cost."""
    rule = ANA_COMMAND_RULES[state]
    if rule.refused_with is None or (admin and opcode in rule.admin_processed):
        return None
    return NvmeError(rule.refused_with, f"namespace's ANA group is {state.name}", dnr=rule.dnr)
