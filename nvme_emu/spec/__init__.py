"""NVMe constants: the one place where numbers from the specifications live.

Sources: NVM Express Base Specification 2.0, NVM Command Set Specification 1.0 and Zoned
Namespace Command Set Specification 1.1. Every other module imports its numbers from here, so
a wrong value has to be fixed once. One module per subject, as the Base specification lays
them out:

- :mod:`~nvme_emu.spec.registers`: the controller registers in BAR0 and the version;
- :mod:`~nvme_emu.spec.commands`: what travels on the queues: queue entries, PRPs and SGLs,
  admin and NVM opcodes, the NVM commands' fields, status codes and :class:`NvmeError`;
- :mod:`~nvme_emu.spec.identify`: Identify: CNS values, command sets, data structure sizes,
  controller and namespace capabilities;
- :mod:`~nvme_emu.spec.log_pages`: Get Log Page: log identifiers and sizes, log entries,
  SMART / Health, LBA Status (and Get LBA Status);
- :mod:`~nvme_emu.spec.features`: Get / Set Features: feature identifiers and fields;
- :mod:`~nvme_emu.spec.events`: Asynchronous Event Request: event types, information, DW0,
  and the feature that enables them;
- :mod:`~nvme_emu.spec.zns`: the Zoned Namespace Command Set: its opcodes, Zone Management
  fields, zone states and attributes, report and Identify fields (its status codes, log page
  and event live with the others of their kind above).

Nothing is re-exported here: each name is imported from its module.
"""
