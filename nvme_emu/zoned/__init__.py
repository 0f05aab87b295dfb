"""Zoned namespaces (NVMe Zoned Namespace Command Set 1.1): the zone model of one namespace,
sans-IO, and what the host and the control plane see of it. Nothing here touches queues or
the controller, and only the sidecar touches a file (its own); the command set's handlers
(issue 25) drive the model and do the I/O it asks for.

- :mod:`~nvme_emu.zoned.zone_set`: :class:`~nvme_emu.zoned.zone_set.Zone` and
  :class:`~nvme_emu.zoned.zone_set.ZoneSet`: zone states, write pointers, Open and Active
  Resources, every transition of the zone state machine, Report Zones, faults, stats;
- :mod:`~nvme_emu.zoned.changed`: the Changed Zone List (log BFh) tracker;
- :mod:`~nvme_emu.zoned.structures`: the byte layouts: zone descriptor, Report Zones header,
  Changed Zone List, ZNS Identify Namespace and Identify Controller;
- :mod:`~nvme_emu.zoned.persist`: zone state as versioned, checksummed bytes;
- :mod:`~nvme_emu.zoned.sidecar`: zone state on disk, one record per zone stored as it
  changes (the set's :class:`~nvme_emu.zoned.zone_set.ZoneStore`), so zones survive a restart
  and a SIGKILL (the one module here that does I/O).
"""
