"""Asymmetric Namespace Access (Base 2.0, "Asymmetric Namespace Access Reporting") and the
multi-controller NVM subsystem it lives in, as sans-IO models: no sockets, no timers, no
controller. The caller passes the clock and gets back what to tell which controller.

- :mod:`~nvme_emu.ana.commands`: which commands a namespace in each ANA state processes,
  and the Path Related status the others get;
- :mod:`~nvme_emu.ana.states`: per-controller ANA group states and timed transitions;
- :mod:`~nvme_emu.ana.log`: the ANA log page (0Ch) layout and builder;
- :mod:`~nvme_emu.ana.subsystem`: controllers, shared namespaces, attachment, change
  counts and the ANA Change / Namespace Attribute Changed notices each controller is owed;
- :mod:`~nvme_emu.ana.events`: a notice as the asynchronous event a controller posts, if
  its host enabled it;
- :mod:`~nvme_emu.ana.identify`: the Identify Controller / Namespace fields they report.

Nothing is re-exported here: each name is imported from its module.
"""
