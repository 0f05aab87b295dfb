"""Helpers for the namespace side of metadata and PI: Identify pages parsed with the project's
own layouts, and a controller state over chosen namespaces."""

from __future__ import annotations

from dataclasses import dataclass

from nvme_emu import structures as st
from nvme_emu.identify import identify_controller, identify_data
from nvme_emu.namespace import Namespace
from nvme_emu.spec.identify import ELBAF_PIF_MASK, ELBAF_PIF_SHIFT, ELBAF_STS_MASK, Cns, Csi, flbas_decode
from nvme_emu.state import ControllerState


@dataclass(frozen=True)
class NsView:
    """What a host learns of a namespace's format from Identify (CNS 00h and 05h)."""

    lbaf: int
    mset: bool
    ms: int
    lbads: int
    mc: int
    dpc: int
    pi_type: int
    pi_first: bool
    pif: int
    sts: int
    nlbaf: int


def ns_view(state: ControllerState, nsid: int) -> NsView:
    ns = st.IdentifyNamespace.parse(identify_data(state, Cns.NAMESPACE, nsid, 0))
    nvm = st.IdentifyNamespaceNvm.parse(identify_data(state, Cns.IOCS_NAMESPACE, nsid, Csi.NVM))
    index = flbas_decode(ns.flbas)
    elbaf = nvm.elbaf[index]
    assert nvm.lbstm == 0 and nvm.pic == 0  # no storage tag
    return NsView(
        lbaf=index, mset=bool(ns.flbas & 0x10), ms=ns.lbaf[index].ms, lbads=ns.lbaf[index].lbads, mc=ns.mc, dpc=ns.dpc,
        pi_type=ns.dps & 0b111, pi_first=bool(ns.dps & 0b1000), pif=(elbaf >> ELBAF_PIF_SHIFT) & ELBAF_PIF_MASK,
        sts=elbaf & ELBAF_STS_MASK, nlbaf=ns.nlbaf,
    )


def state_of(*namespaces: Namespace) -> ControllerState:
    return ControllerState.of(namespaces)


def ctratt(state: ControllerState) -> int:
    return st.IdentifyController.parse(identify_controller(state)).ctratt
