"""Zoned namespaces (NVMe Zoned Namespace Command Set 1.1), sans-IO: the zone model of one
namespace and what the host and the control plane see of it. Nothing here touches storage,
queues or the controller; the command set's handlers (issue 25) drive it and do the I/O.

- :mod:`~nvme_emu.zoned.zone_set`: :class:`~nvme_emu.zoned.zone_set.Zone` and
  :class:`~nvme_emu.zoned.zone_set.ZoneSet`: zone states, write pointers, Open and Active
  Resources, every transition of the zone state machine, Report Zones, faults, stats;
- :mod:`~nvme_emu.zoned.changed`: the Changed Zone List (log BFh) tracker;
- :mod:`~nvme_emu.zoned.structures`: the byte layouts: zone descriptor, Report Zones header,
  Changed Zone List, ZNS Identify Namespace and Identify Controller;
- :mod:`~nvme_emu.zoned.persist`: zone state as versioned, checksummed bytes (for a sidecar).
"""
